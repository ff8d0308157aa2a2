"""Gradients through Qwen2.5-VL (the DPO step differentiates through image splicing)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import _qwen_vl_helpers as H
from jaxdpo.models.qwen2_5_vl import config as qcfg
from jaxdpo.models.qwen2_5_vl import inputs as qin
from jaxdpo.models.qwen2_5_vl.vl_model import Qwen2_5_VL


def test_gradients_are_finite_and_reach_every_image():
  cfg = qcfg.tiny_vl()
  assert (cfg.image_token_id, cfg.vision.patch_size) == (H.IMAGE, 4)
  model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  ids, mask, v = H.mixed_batch()
  # Padding patches, padding grid rows and left-padded text rows must not leak NaNs.
  inputs = {k: jnp.asarray(x) for k, x in qin.make_inputs(cfg, ids, mask, v["pixel_values"], v["image_grid_thw"],
                                                           num_patches=300, num_images=5).items()}
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def grads(params, pixels):
    def loss(params, pixels):
      h = nnx.merge(graphdef, params).hidden_states(dict(inputs, pixel_values=pixels))
      return jnp.sum(jnp.where(inputs["segment_ids"][..., None] > 0, h, 0.0) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, pixels)

  g_params, g_pixels = grads(params, inputs["pixel_values"])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g_params))
  assert float(jnp.abs(g_params["visual"]["patch_embed"]["kernel"]).max()) > 0
  per_patch = np.abs(np.asarray(g_pixels)).sum(axis=1)
  starts = np.cumsum([0] + [int(np.prod(g)) for g in v["image_grid_thw"]])
  for a, b in zip(starts[:-1], starts[1:]):  # every real image influences the loss ...
    assert per_patch[a:b].min() > 0
  assert per_patch[starts[-1]:].max() == 0  # ... and padding patches do not
