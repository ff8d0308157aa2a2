"""Flax nnx port of the SigLIP vision tower used by Gemma 3 (transformers' `SiglipVisionModel`
without the pooling head).

Letters beyond the shared vocabulary: I images, C colour channels, P patches (Y * X), Y / X
patch-grid rows / columns, p / q pixel row / column inside a patch. Within the encoder an image
is a sequence, so attention uses the usual T/S letters with B = I.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import layers
from jaxdpo.models.gemma3.config import SiglipVisionConfig


class PatchEmbedding(nnx.Module):
  """Conv2d(kernel = stride = patch, with bias) written as an einsum over non-overlapping patches,
  plus learned position embeddings."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype):
    c, p, d = cfg.num_channels, cfg.patch_size, cfg.hidden_size
    self.patch_size = p
    self.kernel = layers.param(rngs, jax.nn.initializers.normal(0.02), (c, p, p, d),
                               (None, None, None, "vision_embed"), dtype)
    self.bias = layers.param(rngs, jax.nn.initializers.zeros, (d,), ("vision_embed",), dtype)
    self.position_embedding = layers.param(rngs, jax.nn.initializers.normal(0.02), (cfg.num_patches, d),
                                           (None, "vision_embed"), dtype)

  def __call__(self, pixels_ICHW):
    kernel = self.kernel[...]
    i, c, height, width = pixels_ICHW.shape
    p = self.patch_size
    # Cut the image into a Y x X grid of p x p patches (a view, no data movement in XLA).
    patches_ICYpXq = pixels_ICHW.astype(kernel.dtype).reshape(i, c, height // p, p, width // p, p)
    x_IYXD = jnp.einsum("ICYpXq,CpqD->IYXD", patches_ICYpXq, kernel) + self.bias[...]
    x_IPD = x_IYXD.reshape(i, -1, x_IYXD.shape[-1])  # row-major patches, as Conv2d + flatten(2)
    return x_IPD + self.position_embedding[...].astype(x_IPD.dtype)


class Attention(nnx.Module):
  """Bidirectional multi-head attention with biases (no RoPE, no mask)."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    proj = dict(bias_shape=(n, h), bias_axes=("vision_heads", "head_dim"), rngs=rngs, dtype=dtype)
    axes = ("vision_embed", "vision_heads", "head_dim")
    self.q = layers.Einsum("BTD,DNH->BTNH", (d, n, h), axes, **proj)
    self.k = layers.Einsum("BTD,DNH->BTNH", (d, n, h), axes, **proj)
    self.v = layers.Einsum("BTD,DNH->BTNH", (d, n, h), axes, **proj)
    self.o = layers.Einsum("BTNH,NHD->BTD", (n, h, d), ("vision_heads", "head_dim", "vision_embed"),
                           bias_shape=(d,), bias_axes=("vision_embed",), rngs=rngs, dtype=dtype)
    self.scale = h ** -0.5
    self.attention_impl = attention_impl

  @layers.scoped("attention")
  def __call__(self, x_BTD):
    out_BTNH = layers.dot_product_attention(self.q(x_BTD), self.k(x_BTD), self.v(x_BTD), None, scale=self.scale,
                                            implementation=self.attention_impl)
    return self.o(out_BTNH)


class MLP(nnx.Module):
  """fc2(act(fc1(x))), both with bias (not gated)."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.fc1 = layers.Einsum("BTD,DF->BTF", (d, f), ("vision_embed", "vision_mlp"), bias_shape=(f,),
                             bias_axes=("vision_mlp",), rngs=rngs, dtype=dtype)
    self.fc2 = layers.Einsum("BTF,FD->BTD", (f, d), ("vision_mlp", "vision_embed"), bias_shape=(d,),
                             bias_axes=("vision_embed",), rngs=rngs, dtype=dtype)
    self.activation = cfg.hidden_act

  @layers.scoped("mlp")
  def __call__(self, x_BTD):
    return self.fc2(layers.activation(self.activation)(self.fc1(x_BTD)))


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype, attention_impl):
    norm = dict(eps=cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, **norm)
    self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x_BTD):
    x_BTD = x_BTD + self.self_attn(self.layer_norm1(x_BTD))
    return x_BTD + self.mlp(self.layer_norm2(x_BTD))


class SiglipVisionModel(nnx.Module):
  """Pixels [I, C, H, W] (already normalised by the image processor) -> patch features [I, P, D]."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               attention_impl: str | None = None):
    self.config = cfg
    self.embeddings = PatchEmbedding(cfg, rngs=rngs, dtype=param_dtype)
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs, dtype=param_dtype, attention_impl=attention_impl)
                            for _ in range(cfg.num_layers)])
    self.post_layernorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, dtype=param_dtype)

  @layers.scoped("vision_tower")
  def __call__(self, pixels_ICHW):
    cfg = self.config
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if tuple(pixels_ICHW.shape[1:]) != expected:
      raise ValueError(f"pixel_values must be [I, {', '.join(map(str, expected))}], got {pixels_ICHW.shape}")
    x_IPD = self.embeddings(pixels_ICHW)
    for i, layer in enumerate(self.layers):
      with jax.named_scope(f"block_{i}"):
        x_IPD = layer(x_IPD)
    return self.post_layernorm(x_IPD)
