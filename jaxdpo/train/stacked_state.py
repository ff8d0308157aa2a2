"""A train state held stacked in memory (`decoder.StackedParams`) and per layer on disk.

With `train.stacked_params` the DPO job keeps the scanned decoder layers of the params and of every
parameter-shaped optimizer subtree (AdamW's mu, nu) as [L, ...] leaves, so the step's per-leaf code
(clipping, AdamW, the non-finite guard) runs over ~14-95 leaves instead of ~440. Checkpoints keep
today's per-layer layout: the loop unstacks the state on device before each save and stacks what it
restores, so resume, `jax-to-hf` export and older checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdpo.models import decoder
from jaxdpo.parallel import sharding as shd


@dataclasses.dataclass(frozen=True)
class DiskLayout:
  """How the loop saves and restores a stacked state.

  Attributes:
    abstract: the per-layer state's ShapeDtypeStructs with shardings (what a checkpoint holds).
    to_disk: stacked state -> per-layer state (jitted; a copy, made on device).
    from_disk: per-layer state -> stacked state (jitted; the argument is donated).
  """

  abstract: dict
  to_disk: Callable
  from_disk: Callable


def stack_state(graphdef, state: dict) -> tuple[dict, DiskLayout]:
  """(`state` with its params and parameter-shaped optimizer subtrees stacked, its `DiskLayout`).

  `state` is {"step", "params", "opt_state"} over per-layer params; it is donated. Each stacked leaf
  is sharded as its layers were, after a leading layer axis on no mesh axis (`sharding.stacked`).
  """
  p_def = jax.tree.structure(state["params"])
  is_params = lambda node: _structure(node) == p_def
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
  prefix, segments = decoder.stack_layout(graphdef, abstract_params)

  def stacked(tree, combine):
    return jax.tree.map(lambda n: decoder.restack(n, prefix, segments, combine) if is_params(n) else n, tree,
                        is_leaf=is_params)

  def unstack(tree):
    is_stacked = lambda n: isinstance(n, decoder.StackedParams)
    return jax.tree.map(lambda n: n.full() if is_stacked(n) else n, tree, is_leaf=is_stacked)

  per_layer_sh = jax.tree.map(lambda x: x.sharding, state)
  stacked_sh = stacked(per_layer_sh, shd.stacked)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  from_disk = jax.jit(lambda s: stacked(s, jnp.stack), out_shardings=stacked_sh, donate_argnums=0)
  to_disk = jax.jit(unstack, out_shardings=per_layer_sh)
  return from_disk(state), DiskLayout(abstract=abstract, to_disk=to_disk, from_disk=from_disk)


def _structure(node):
  try:
    return jax.tree.structure(node)
  except Exception:  # noqa: BLE001  (non-pytree leaves)
    return None
