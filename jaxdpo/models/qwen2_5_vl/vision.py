"""The Qwen2.5-VL vision tower in flax.nnx, held to transformers'
`Qwen2_5_VisionTransformerPretrainedModel` by the parity tests.

All images of a batch are packed into one patch sequence, in the order (and the per-image
merge-block layout) that transformers' Qwen2-VL image processor emits. Attention is
bidirectional and masked by segment ids: in full-attention blocks a patch sees the patches of its
own image frame, in the other blocks only those of its own window. transformers instead permutes
the patches into window order and cuts the sequence at window boundaries; masking in place is the
same computation (windows never split a merged token, so the merger sees the same groups) and
needs no permutation.

Extra letters (on top of those in `layers`): P packed patches, E flattened patch pixels
(C * t * p * p), J the three q/k/v projections, M patches per merged token (merge**2), G merged
tokens (P / M), O output width (the text model's width). B counts rows of packed images.

Static shapes under jit: `pixel_values` [P, E] and `grid_thw` [I, 3] may be padded at the end
(zero pixel rows, zero grid rows); P must be a multiple of M. Padding patches form their own
segment (-1), so no attention row is empty, and their outputs are never read.

Images may also be packed into several rows, `pixel_values` [R, P, E] with `grid_thw` [R, I, 3]
(each row laid out as above). Attention never crosses an image, so splitting the packed sequence
at image boundaries is exact, and the dense [P, P] masks stay small when a batch holds many
large images. A 2D input is one row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import layers
from jaxdpo.models.qwen2_5_vl.config import VisionConfig

PAD_SEGMENT = -1


def patch_layout(grid_thw, num_patches: int, cfg: VisionConfig) -> dict[str, jax.Array]:
  """Per-patch bookkeeping derived from the image grids; jit-traceable.

  Args:
    grid_thw: int [I, 3] (temporal, height, width) in patches; zero rows are padding.
    num_patches: P, the (static) length of the packed patch sequence.
    cfg: the vision config.

  Returns:
    dict of int32 [P] arrays: `h_pos`, `w_pos` (rotary coordinates), `frame_ids` (one id per
    image frame: the full-attention segments), `window_ids` (one id per attention window);
    padding patches have id -1.
  """
  m, ws = cfg.spatial_merge_size, cfg.window_merged
  grid = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
  t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
  counts = t * h * w
  ends = jnp.cumsum(counts)
  starts = ends - counts
  p = jnp.arange(num_patches, dtype=jnp.int32)
  img = jnp.searchsorted(ends, p, side="right")
  valid = img < grid.shape[0]
  img = jnp.minimum(img, grid.shape[0] - 1)
  q = p - starts[img]
  hw = jnp.maximum(h * w, 1)[img]
  lw = jnp.maximum(w // m, 1)[img]
  frame, r = q // hw, q % hw
  # The processor lays out each frame as merge blocks of m x m patches, block-row-major.
  block, within = r // (m * m), r % (m * m)
  bh, bw = block // lw, block % lw
  h_pos, w_pos = bh * m + within // m, bw * m + within % m
  # Windows tile the merged-token grid in ws x ws squares (partial at the bottom / right edge).
  win_h = -(-(h // m) // ws)
  win_w = -(-(w // m) // ws)
  windows = t * win_h * win_w
  win_start = jnp.cumsum(windows) - windows
  local = frame * (win_h * win_w)[img] + (bh // ws) * win_w[img] + bw // ws
  frame_start = jnp.cumsum(t) - t
  pad = jnp.int32(PAD_SEGMENT)
  return {
      "h_pos": jnp.where(valid, h_pos, 0),
      "w_pos": jnp.where(valid, w_pos, 0),
      "frame_ids": jnp.where(valid, frame_start[img] + frame + 1, pad),
      "window_ids": jnp.where(valid, win_start[img] + local + 1, pad),
  }


def rope_2d(h_pos, w_pos, head_size: int, theta: float):
  """Axial 2D rotary tables: the first half of each rotation pair's frequencies reads the row,
  the second the column. Returns (cos, sin), fp32 [..., H] for positions [...]."""
  inv_freq = layers.rope_inv_freq(head_size // 2, theta)  # [H/4]
  freqs = jnp.concatenate([h_pos.astype(jnp.float32)[..., None] * inv_freq,
                           w_pos.astype(jnp.float32)[..., None] * inv_freq], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (with bias) and 2D RoPE."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_size
    self.qkv = layers.Einsum("BPD,DJNH->BPJNH", (d, 3, n, h), ("vision_embed", None, "heads", "head_dim"),
                             bias_shape=(3, n, h), bias_axes=(None, "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.proj = layers.Einsum("BPNH,NHD->BPD", (n, h, d), ("heads", "head_dim", "vision_embed"), bias_shape=(d,),
                              bias_axes=("vision_embed",), rngs=rngs, dtype=dtype)
    self.scale = h ** -0.5
    self.attention_impl = attention_impl

  @layers.scoped("attention")
  def __call__(self, x_BPD, cos_BPH, sin_BPH, mask_BPP):
    qkv = self.qkv(x_BPD)
    # The rotation runs in fp32 whatever the compute dtype, as in transformers.
    q_BPNH = layers.apply_rope(qkv[:, :, 0].astype(jnp.float32), cos_BPH, sin_BPH).astype(x_BPD.dtype)
    k_BPNH = layers.apply_rope(qkv[:, :, 1].astype(jnp.float32), cos_BPH, sin_BPH).astype(x_BPD.dtype)
    out_BPNH = layers.dot_product_attention(q_BPNH, k_BPNH, qkv[:, :, 2], mask_BPP, scale=self.scale,
                                            implementation=self.attention_impl)
    return self.proj(out_BPNH)


class VisionBlock(nnx.Module):
  """Pre-norm block: RMSNorm, attention, RMSNorm, SwiGLU with biases."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    self.norm1 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype,
                                axes=("vision_embed",))
    self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype,
                                axes=("vision_embed",))
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act, bias=True,
                               rngs=rngs, dtype=dtype, axes_in=("vision_embed", "vision_mlp"),
                               axes_out=("vision_mlp", "vision_embed"))

  def __call__(self, x_BPD, cos_BPH, sin_BPH, mask_BPP):
    x_BPD = x_BPD + self.attn(self.norm1(x_BPD), cos_BPH, sin_BPH, mask_BPP)
    return x_BPD + self.mlp(self.norm2(x_BPD))


class PatchMerger(nnx.Module):
  """RMSNorm, concatenation of each m x m block of patches, Linear, exact GELU, Linear."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype):
    d, mu, o = cfg.hidden_size, cfg.merge_unit, cfg.out_hidden_size
    f = d * mu
    self.merge_unit = mu
    self.ln_q = layers.RMSNorm(d, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype, axes=("vision_embed",))
    self.fc1 = layers.Einsum("BGMD,MDF->BGF", (mu, d, f), (None, "vision_embed", "vision_mlp"), bias_shape=(f,),
                             bias_axes=("vision_mlp",), rngs=rngs, dtype=dtype)
    self.fc2 = layers.Einsum("BGF,FO->BGO", (f, o), ("vision_mlp", "embed"), bias_shape=(o,), bias_axes=("embed",),
                             rngs=rngs, dtype=dtype)

  def __call__(self, x_BPD):
    x_BPD = self.ln_q(x_BPD)
    # The processor emits the patches of one merged token consecutively.
    b, p, d = x_BPD.shape
    x_BGMD = x_BPD.reshape(b, p // self.merge_unit, self.merge_unit, d)
    return self.fc2(jax.nn.gelu(self.fc1(x_BGMD), approximate=False))


class VisionTower(nnx.Module):
  """Patch embedding, windowed / full attention blocks with 2D RoPE, patch merger."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.config = cfg
    # Conv3d with kernel = stride = (t, p, p) over flattened patches is a plain matmul.
    self.patch_embed = layers.Einsum("BPE,ED->BPD", (cfg.patch_dim, cfg.hidden_size), ("vision_patch", "vision_embed"),
                                     rngs=rngs, dtype=param_dtype)
    self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=param_dtype, attention_impl=attention_impl)
                            for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, rngs=rngs, dtype=param_dtype)

  @layers.scoped("vision_tower")
  def __call__(self, pixel_values, grid_thw, *, return_hidden: bool = False):
    """Encodes packed patches.

    Args:
      pixel_values: [P, E] flattened patches of all images (processor order), end-padded; or
        [R, P, E], several such rows.
      grid_thw: int [I, 3] grids of the images, end-padded with zero rows; or [R, I, 3].
      return_hidden: also return the last block's output [R, P, D] (before the merger).

    Returns:
      merged tokens [R, P / M, O] (R = 1 for 2D inputs) in processor order, padding at the end of
      each row; and optionally the pre-merger hidden states.
    """
    cfg = self.config
    if pixel_values.ndim == 2:
      pixel_values, grid_thw = pixel_values[None], jnp.asarray(grid_thw)[None]
    num_patches = pixel_values.shape[1]
    if num_patches % cfg.merge_unit:
      raise ValueError(f"the patch sequence length {num_patches} must be a multiple of {cfg.merge_unit}")
    layout = jax.vmap(lambda g: patch_layout(g, num_patches, cfg))(jnp.asarray(grid_thw))
    cos_BPH, sin_BPH = rope_2d(layout["h_pos"], layout["w_pos"], cfg.head_size, cfg.rope_theta)
    frames_BP, windows_BP = layout["frame_ids"], layout["window_ids"]
    full_mask = layers.attention_mask(frames_BP, frames_BP, causal=False)
    window_mask = layers.attention_mask(windows_BP, windows_BP, causal=False)
    x_BPD = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))
    for i, block in enumerate(self.blocks):
      mask = full_mask if i in cfg.fullatt_block_indexes else window_mask
      with jax.named_scope(f"block_{i}"):
        x_BPD = block(x_BPD, cos_BPH, sin_BPH, mask)
    with jax.named_scope("merger"):
      merged_BGO = self.merger(x_BPD)
    return (merged_BGO, x_BPD) if return_hidden else merged_BGO
