"""Building blocks shared by every model family.

Letter vocabulary (used in einsum strings and in shape-suffixed names):
  B batch, T query sequence, S key/value sequence, D model width, N query heads,
  K kv heads, G query heads per kv head (N = K * G), H head dim, F MLP width, V vocab.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata; `jaxdpo.parallel.sharding` maps
those names onto mesh axes through the rules table in the config. We use our own metadata key
rather than flax's `sharding_names` because the latter triggers flax's eager sharding, which
requires a mesh at construction time; we want abstract construction under `eval_shape` and
initialisation under `jit` with explicit out shardings instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import attention, remat

Initializer = jax.nn.initializers.Initializer


def scoped(name: str) -> Callable[[Callable], Callable]:
  """Runs a method under `jax.named_scope(name)`, so that profiles and HLO name its ops
  (e.g. "block_3/attention/..."), whichever family or tower calls it."""
  def wrap(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
      with jax.named_scope(name):
        return method(*args, **kwargs)
    return run
  return wrap


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """Creates a parameter with logical axis names attached.

  Args:
    rngs: source of the init key.
    init: a jax initializer.
    shape: parameter shape.
    axes: one logical axis name (or None) per dimension.
    dtype: parameter (storage) dtype.

  Returns:
    An `nnx.Param` whose metadata holds `logical_axes`.
  """
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


class Einsum(nnx.Module):
  """A kernel (and optional bias) applied with one einsum equation.

  The equation names the contraction in the project's letter vocabulary, e.g.
  "BTD,DNH->BTNH" for a query projection. The bias has the kernel's output dims.
  """

  def __init__(self, eqn: str, shape: Sequence[int], axes: Sequence[str | None], *,
               bias_shape: Sequence[int] | None = None, bias_axes: Sequence[str | None] | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, init_std: float = 0.02):
    self.eqn = eqn
    self.kernel = param(rngs, jax.nn.initializers.normal(init_std), shape, axes, dtype)
    if bias_shape is not None:
      self.bias = param(rngs, jax.nn.initializers.zeros, bias_shape, bias_axes, dtype)
    else:
      self.bias = None

  # LoRA (issue 13): set by `add_lora`; None = a plain linear layer (and no extra parameters).
  lora_a = None
  lora_b = None
  lora_scale = 0.0
  # Remat (issue 17): checkpoint names of the input / output (`remat.tag_block`); None = untagged.
  tag_in = None
  tag_out = None

  def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs, dtype=jnp.float32):
    """Adds a LoRA adapter: y += (x A) B * alpha / rank, after the bias (as PEFT does).

    A [kernel input dims..., R] is uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform default),
    B [R, kernel output dims...] is zero, so the layer's output is unchanged until B trains. Both
    carry the kernel's logical axes on the dims they share with it ("lora_rank", unsharded, on R),
    so they shard as the kernel does.
    """
    x_spec, rest = self.eqn.split(",")
    k_spec, out_spec = rest.split("->")
    if "R" in self.eqn:
      raise ValueError(f"LoRA needs the letter R free in the einsum {self.eqn!r}")
    axes = self.kernel.get_metadata().get("logical_axes") or (None,) * len(k_spec)
    shape = self.kernel.get_value().shape
    ins = [i for i, c in enumerate(k_spec) if c in x_spec]
    outs = [i for i, c in enumerate(k_spec) if c not in x_spec]
    batch = "".join(c for c in x_spec if c not in k_spec)
    in_l, out_l = "".join(k_spec[i] for i in ins), "".join(k_spec[i] for i in outs)
    fan_in = 1
    for i in ins:
      fan_in *= shape[i]
    bound = fan_in ** -0.5
    init_a = lambda key, shp, dt: jax.random.uniform(key, shp, dt, -bound, bound)
    self.lora_a = param(rngs, init_a, [shape[i] for i in ins] + [rank], [axes[i] for i in ins] + ["lora_rank"], dtype)
    self.lora_b = param(rngs, jax.nn.initializers.zeros, [rank] + [shape[i] for i in outs],
                        ["lora_rank"] + [axes[i] for i in outs], dtype)
    self.lora_scale = float(alpha) / rank
    self.lora_eqns = (f"{x_spec},{in_l}R->{batch}R", f"{batch}R,R{out_l}->{out_spec}")
    self.lora_merge_eqn = f"{in_l}R,R{out_l}->{k_spec}"  # A B in the kernel's layout

  def merged_kernel(self):
    """The kernel with the adapter folded in: W + (A B) * alpha / rank, in the kernel's dtype."""
    w = self.kernel[...]
    if self.lora_a is None:
      return w
    delta = jnp.einsum(self.lora_merge_eqn, self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
    return (w.astype(jnp.float32) + delta * self.lora_scale).astype(w.dtype)

  def __call__(self, x):
    x = remat.tag(x, self.tag_in)
    y = jnp.einsum(self.eqn, x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora_a is not None:
      eqn_a, eqn_b = self.lora_eqns
      h = jnp.einsum(eqn_a, x, self.lora_a[...].astype(x.dtype))
      y = y + jnp.einsum(eqn_b, h, self.lora_b[...].astype(x.dtype)) * jnp.asarray(self.lora_scale, x.dtype)
    return remat.tag(y, self.tag_out)


class RMSNorm(nnx.Module):
  """RMSNorm with the normalisation in fp32.

  Two conventions exist and both are exact ports:
    * Llama/Qwen (`plus_one=False`): `w * cast(x̂, input dtype)`;
    * Gemma (`plus_one=True`): `cast(x̂ * (1 + w), input dtype)`, weight applied in fp32.
  """

  def __init__(self, dim: int, *, eps: float, plus_one: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, axes: Sequence[str | None] = ("norm",)):
    self.eps = eps
    self.plus_one = plus_one
    init = jax.nn.initializers.zeros if plus_one else jax.nn.initializers.ones
    self.weight = param(rngs, init, (dim,), axes, dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    w = self.weight[...]
    if self.plus_one:
      return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias, statistics in fp32 (SigLIP, Qwen vision merger)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               axes: Sequence[str | None] = ("norm",)):
    self.eps = eps
    self.weight = param(rngs, jax.nn.initializers.ones, (dim,), axes, dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), axes, dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(head_dim: int, theta: float, scaling_factor: float = 1.0) -> jax.Array:
  """Inverse frequencies of split-half RoPE, fp32, shape [H/2].

  `scaling_factor` implements "linear" rope scaling (positions divided by the factor), which
  is the same as dividing the inverse frequencies.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents) / scaling_factor


def rope_cos_sin(positions, inv_freq, mrope_section: Sequence[int] | None = None):
  """Cos/sin tables for split-half RoPE.

  Args:
    positions: int [B, T], or [3, B, T] (temporal, height, width) for multimodal RoPE.
    inv_freq: fp32 [H/2].
    mrope_section: for M-RoPE, how many of the H/2 frequencies each of the three position
      streams drives (e.g. (16, 24, 24)); chunk i of the frequency axis reads stream i % 3.

  Returns:
    (cos, sin), each fp32 [B, T, H].
  """
  if mrope_section is None:
    if positions.ndim != 2:
      raise ValueError(f"1D RoPE expects positions [B, T], got shape {positions.shape}")
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  else:
    if positions.ndim == 2:  # text only: the three streams coincide
      positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
    freqs3 = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, H/2]
    chunks, start = [], 0
    for i, width in enumerate(mrope_section):
      chunks.append(freqs3[i % 3, ..., start:start + width])
      start += width
    if start != inv_freq.shape[0]:
      raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2={inv_freq.shape[0]}")
    freqs = jnp.concatenate(chunks, axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
  """Applies split-half ("rotate_half") RoPE; the rotation is done in x's dtype like HF."""
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
  sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Attention


# `attention_mask` builds the reference mask of a structure; `dot_product_attention` runs a
# `attention.Structure` (or a raw mask, or None) on the requested backend. Both live in
# `jaxdpo.models.attention`; they are re-exported here because every family calls them as layers.
attention_mask = attention.attention_mask
dot_product_attention = attention.attend


def write_kv_cache(cache, k_BTKH, v_BTKH, cache_index):
  """Writes this call's keys/values into a preallocated cache at each row's slot `cache_index`.

  Args:
    cache: (k [B, S, K, H], v [B, S, K, H]) in the cache dtype.
    k_BTKH, v_BTKH: the new keys and values.
    cache_index: int [B], the slot of each row's first new token (rows advance independently,
      so that generation can refill a finished row with a new prompt).

  Returns:
    (new cache, keys [B, S, K, H], values [B, S, K, H]) where the keys and values span the whole
    cache in the new keys' dtype; the attention mask decides which slots count.
  """
  k_BSKH = write_rows(cache[0], k_BTKH, cache_index)
  v_BSKH = write_rows(cache[1], v_BTKH, cache_index)
  return (k_BSKH, v_BSKH), k_BSKH.astype(k_BTKH.dtype), v_BSKH.astype(v_BTKH.dtype)


def write_rows(buf_BS, new_BT, index_B):
  """`buf_BS` [B, S, ...] with row b's `new_BT[b]` [T, ...] written at slots index_B[b] .. + T - 1.

  Slots past S are dropped: a finished generation row keeps stepping (the batch moves together)
  until it is refilled, and what it writes is never read.
  """
  b, t = new_BT.shape[:2]
  rows_B1 = jnp.arange(b, dtype=jnp.int32)[:, None]
  cols_BT = index_B.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  return buf_BS.at[rows_B1, cols_BT].set(new_BT.astype(buf_BS.dtype), mode="drop")


class GatedMLP(nnx.Module):
  """SwiGLU / GeGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, d: int, f: int, *, activation: str, bias: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, axes_in=("embed", "mlp"), axes_out=("mlp", "embed")):
    bias_in = dict(bias_shape=(f,), bias_axes=(axes_in[1],)) if bias else {}
    bias_out = dict(bias_shape=(d,), bias_axes=(axes_out[1],)) if bias else {}
    self.gate = Einsum("BTD,DF->BTF", (d, f), axes_in, rngs=rngs, dtype=dtype, **bias_in)
    self.up = Einsum("BTD,DF->BTF", (d, f), axes_in, rngs=rngs, dtype=dtype, **bias_in)
    self.down = Einsum("BTF,FD->BTD", (f, d), axes_out, rngs=rngs, dtype=dtype, **bias_out)
    self.activation = activation

  @scoped("mlp")
  def __call__(self, x_BTD):
    return self.down(activation(self.activation)(self.gate(x_BTD)) * self.up(x_BTD))


def activation(name: str):
  """Maps an HF `hidden_act` name to a jax function with the same numerics."""
  table = {
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
  return table[name]


BATCH_MESH_AXES = ("data", "fsdp")


def constrain_batch(x):
  """Pins an activation's leading (batch) axis to the batch mesh axes.

  Without it, XLA's propagation on an fsdp mesh follows the parameters (split on D) and
  replicates the batch, so every device computes every row (measured: 4x the temporaries on
  fsdp=8). A no-op outside a mesh context, on a 1-device mesh, and when the batch does not
  divide the batch axes (tiny tests, generation with odd batch sizes).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  if not axes or x.shape[0] % size:
    return x
  spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)
