"""Gemma 3's multimodal projector: SigLIP patches -> soft tokens in the decoder's width.

Letters: I images, P patches, M soft tokens per image, E vision width, D text width; Y / X
patch-grid rows / columns, y / x pooled-grid rows / columns, a / b offsets inside a window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.models import layers
from jaxdpo.models.gemma3.config import Gemma3Config


class MultiModalProjector(nnx.Module):
  """k x k average pooling of the patch grid, Gemma RMSNorm, then a raw [E, D] matrix.

  `mm_input_projection_weight` is stored as transformers stores it, [vision width, text width]
  (it is an `nn.Parameter` used with `matmul`, not an `nn.Linear`), so it is never transposed.
  """

  def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    e, d = cfg.vision.hidden_size, cfg.text.hidden_size
    self.side = cfg.vision.patches_per_side
    self.kernel = cfg.pool_kernel
    self.mm_soft_emb_norm = layers.RMSNorm(e, eps=cfg.vision.layer_norm_eps, plus_one=True, rngs=rngs,
                                           dtype=param_dtype)
    self.mm_input_projection = layers.param(rngs, jax.nn.initializers.normal(0.02), (e, d),
                                            ("vision_embed", "embed"), param_dtype)

  @layers.scoped("projector")
  def __call__(self, x_IPE):
    i, _, e = x_IPE.shape
    k, tokens_side = self.kernel, self.side // self.kernel
    x_IyaxbE = x_IPE.reshape(i, tokens_side, k, tokens_side, k, e)
    # Mean in fp32 like AvgPool2d on fp32 inputs; row-major (y, x) token order like flatten(2).
    pooled_IME = jnp.mean(x_IyaxbE.astype(jnp.float32), axis=(2, 4)).astype(x_IPE.dtype)
    pooled_IME = pooled_IME.reshape(i, tokens_side * tokens_side, e)
    normed_IME = self.mm_soft_emb_norm(pooled_IME)
    return jnp.einsum("IME,ED->IMD", normed_IME, self.mm_input_projection[...].astype(normed_IME.dtype))
