"""Model families: HF architecture name -> config parser, model class and weight table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxdpo.errors import ConfigError
from jaxdpo.models import batching
from jaxdpo.models.convert_table import ConversionError, Rule


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything the converters and loaders need to know about one model family.

  Attributes:
    name: jaxdpo family name, stored in converted checkpoints.
    hf_architectures: `architectures` entries of HF config.json that this family reads.
    config_cls: the frozen config dataclass.
    config_from_hf: HF config dict -> config.
    module_cls: the nnx module, constructed as (config, *, rngs, param_dtype, attention_impl).
    rules: config -> list of conversion rules over canonical HF keys.
    normalize_key: config -> (HF key -> canonical key or None to ignore).
    presets: named config constructors.
    denormalize_key: canonical key -> the key written by jax-to-hf; by default the canonical
      (transformers-5) key itself.
    model_inputs: (batch, rows_per_record) -> what the model's `hidden_states` takes, traced
      inside the jitted steps (see `jaxdpo.models.batching`); the family's image layout lives
      here, so the objectives never read family-specific batch keys.
    vision_adapter: "module:Class" of the data pipeline's image adapter for this family, or
      None for text-only families. A path, not a class: models/ does not import data/.
    row_positions: (model config, input_ids [T], segment_ids [T], image grids) -> positions of a
      text row with images, for families whose positions depend on the images (M-RoPE); None
      when positions stay 1D.
    vision_params: top-level parameter subtrees of the vision side (tower and projector), which
      `config.model.trainable="language"` freezes; empty for text-only families.
    config_to_hf: config -> the HF config.json dict that transformers loads it from, written for
      models initialised from a preset (which have no source config.json) so that they can be
      exported; None where a family does not provide it yet.
  """

  name: str
  hf_architectures: tuple[str, ...]
  config_cls: type
  config_from_hf: Callable[[dict], Any]
  module_cls: type
  rules: Callable[[Any], list[Rule]]
  normalize_key: Callable[[Any], Callable[[str], str | None]]
  presets: dict[str, Callable[[], Any]]
  denormalize_key: Callable[[str], str] = lambda key: key
  model_inputs: Callable[[dict, int], dict] = batching.text_inputs
  vision_adapter: str | None = None
  row_positions: Callable[..., Any] | None = None
  vision_params: tuple[str, ...] = ()
  config_to_hf: Callable[[Any], dict] | None = None

  def build(self, cfg, rngs, param_dtype, attention_impl=None):
    """Constructs the family's module (call under `nnx.eval_shape` for an abstract one)."""
    return self.module_cls(cfg, rngs=rngs, param_dtype=param_dtype, attention_impl=attention_impl)


class UnknownFamilyError(ConfigError, KeyError):
  """A family name no registered family carries (config.model.family, a checkpoint's meta)."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  _FAMILIES[family.name] = family
  return family


def get_family(name: str) -> Family:
  _load_builtin()
  if name not in _FAMILIES:
    raise UnknownFamilyError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}")
  return _FAMILIES[name]


def families() -> dict[str, Family]:
  _load_builtin()
  return dict(_FAMILIES)


def family_for_hf_config(hf_config: dict, source: str = "config.json") -> Family:
  """Picks the family from an HF config's `architectures` (or `model_type`)."""
  _load_builtin()
  archs = hf_config.get("architectures") or []
  for fam in _FAMILIES.values():
    if any(a in fam.hf_architectures for a in archs):
      return fam
  known = sorted(a for f in _FAMILIES.values() for a in f.hf_architectures)
  raise ConversionError(f"{source}: architecture {archs or hf_config.get('model_type')!r} is not supported; "
                        f"supported: {known}")


def _load_builtin():
  # Imported lazily so that `import jaxdpo.models.registry` stays cheap and cycle-free.
  import jaxdpo.models.families  # noqa: F401
