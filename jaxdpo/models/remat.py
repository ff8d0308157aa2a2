"""Rematerialisation policies of the decoder blocks (`train.remat`), and the names they save.

Each block runs under `jax.checkpoint` with a policy that says which of its intermediate values
the backward pass may keep; everything else is recomputed from the block's input. The named values
are tagged with `jax.ad_checkpoint.checkpoint_name` on the outputs (or inputs) of the block's
projections (`tag_block`), so a policy can name them whatever the family:

  q_proj, k_proj, v_proj   the query / key / value projections (before q/k norms and RoPE)
  attn_context             the attention output, the input of the output projection
  o_proj                   the output projection
  mlp_hidden               act(gate) * up, the input of the MLP's down projection

Policies (per token and layer, what the backward pass keeps besides the block input):
  none            no remat: everything the backward pass reads (fastest, most memory)
  full            nothing: the whole block is recomputed (one extra forward of every block)
  dots_saveable   every matmul output, attention scores included (jax's `dots_saveable`);
                  norms, activations and the softmax are recomputed
  dots_no_batch   the projections' outputs (q, k, v, o, gate, up, down), not the attention
                  matmuls (jax's `dots_with_no_batch_dims_saveable`): the attention core is recomputed
  save_attn       q/k/v, the attention context and o: the attention half needs no recompute beyond
                  its softmax; the MLP (the largest activations) is recomputed
  save_qkv_proj   q, k, v only: everything but the three input projections is recomputed
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Q_PROJ, K_PROJ, V_PROJ = "q_proj", "k_proj", "v_proj"
ATTN_CONTEXT, O_PROJ = "attn_context", "o_proj"
MLP_HIDDEN = "mlp_hidden"

POLICIES = ("none", "full", "dots_saveable", "dots_no_batch", "save_attn", "save_qkv_proj")

_NAMED = {
    "save_attn": (Q_PROJ, K_PROJ, V_PROJ, ATTN_CONTEXT, O_PROJ),
    "save_qkv_proj": (Q_PROJ, K_PROJ, V_PROJ),
}

# (module path suffix inside a block, tag of its input, tag of its output). The input of `o` is the
# attention context and the input of `down` the gated hidden; tagging inputs keeps the attention
# math itself free of remat concerns.
_TAGS = (
    (("self_attn", "q"), None, Q_PROJ),
    (("self_attn", "k"), None, K_PROJ),
    (("self_attn", "v"), None, V_PROJ),
    (("self_attn", "o"), ATTN_CONTEXT, O_PROJ),
    (("mlp", "down"), MLP_HIDDEN, None),
)


def check(name: str) -> str:
  """Returns `name` if it is a known policy, else raises ValueError listing them."""
  if name not in POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; expected one of {', '.join(POLICIES)}")
  return name


def policy(name: str):
  """The `jax.checkpoint` policy of `name` (None for "full": save nothing); not defined for "none"."""
  check(name)
  if name == "none":
    raise ValueError("remat 'none' runs the block without jax.checkpoint; there is no policy")
  if name == "full":
    return None
  if name == "dots_saveable":
    return jax.checkpoint_policies.dots_saveable
  if name == "dots_no_batch":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint_policies.save_only_these_names(*_NAMED[name])


def tag(x, name: str | None):
  """`checkpoint_name(x, name)`, or x when `name` is None. An identity outside remat."""
  return x if name is None else checkpoint_name(x, name)


def tag_block(block) -> None:
  """Sets the checkpoint names on a block's projections (`layers.Einsum.tag_in` / `tag_out`).

  Matched by module path (`self_attn/q`, `mlp/down`, ...), the layout every text family here
  shares; a block without such a path keeps its projections untagged (the name-based policies then
  save less there, the values stay the same).
  """
  for path, module in nnx.iter_modules(block):
    for suffix, tag_in, tag_out in _TAGS:
      if tuple(path[-len(suffix):]) == suffix:
        module.tag_in, module.tag_out = tag_in, tag_out
