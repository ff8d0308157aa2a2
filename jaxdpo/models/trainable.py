"""Which parameters a run trains (`config.model.trainable`), and splitting a parameter tree by it.

A split tree keeps the parameter tree's structure with `None` where a leaf belongs to the other
part. `None` is an empty pytree node for JAX and optax, so gradients, optimizer moments and
norms of the trainable part simply have no leaves for frozen parameters: no gradient is
computed for them and no optimizer state is allocated.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax

from jaxdpo.errors import ConfigError


def path_str(path) -> str:
  """A key path of a pure parameter dict as "language_model/layers/0/mlp/gate/kernel"."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def predicate(spec: str, family) -> Callable[[str], bool] | None:
  """`model.trainable` -> (parameter path -> trainable?), or None when everything trains.

  Args:
    spec: "all"; "language" (the family's `vision_params` prefixes frozen: the vision tower and
      the projector); or a regex, searched in each "/"-joined parameter path: matching
      parameters train, the others are frozen.
    family: the `registry.Family` (its `vision_params` name the vision-side subtrees).
  """
  spec = (spec or "all").strip()
  if spec == "all":
    return None
  if spec == "language":
    prefixes = tuple(family.vision_params)
    if not prefixes:
      return None  # a text-only family: its whole model is the language model
    return lambda p: not any(p == x or p.startswith(x + "/") for x in prefixes)
  try:
    pattern = re.compile(spec)
  except re.error as e:
    raise ConfigError(f"config.model.trainable={spec!r} is neither 'all', 'language' nor a valid regex: {e}") from e
  return lambda p: pattern.search(p) is not None


def mask_of(params, pred: Callable[[str], bool] | None, spec: str = ""):
  """A bool tree like `params` (True = trainable), or None when `pred` is None.

  Refuses a mask that trains nothing (a regex that matches no parameter path).
  """
  if pred is None:
    return None
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(pred(path_str(path))), params)
  if not any(jax.tree.leaves(mask)):
    example = path_str(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
    raise ConfigError(f"config.model.trainable={spec!r} leaves no parameter trainable; parameter paths look "
                      f"like {example!r}")
  return mask


def split(params, mask):
  """(trainable, frozen): two trees like `params`, each `None` where the leaf is in the other.

  `mask` None: (params, None).
  """
  if mask is None:
    return params, None
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def merge(trainable, frozen):
  """The inverse of `split`."""
  if frozen is None:
    return trainable
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def trainable_part(tree, mask):
  """The trainable part of `tree` (params, shardings, ShapeDtypeStructs)."""
  return split(tree, mask)[0]
