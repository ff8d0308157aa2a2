"""Multimodal configs hold a text and a vision sub-config; converted checkpoints store them as dicts."""

from __future__ import annotations


def rebuild_sub_configs(config, **classes: type) -> None:
  """Turns dict-valued fields of a frozen config back into their dataclasses, in place.

  Args:
    config: a frozen dataclass instance, from its `__post_init__`.
    **classes: field name -> the dataclass that field holds (e.g. text=..., vision=...).
  """
  for name, cls in classes.items():
    value = getattr(config, name)
    if isinstance(value, dict):
      object.__setattr__(config, name, cls(**value))
