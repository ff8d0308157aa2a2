"""Vision-model gradients held to torch autograd on the transformers model.

The loss is the DPO step's quantity: the summed completion log-prob of a mixed batch (images in
some rows, left padding in another). Its gradient with respect to every parameter (vision tower,
merger / projector, decoder) must match transformers' within 1e-4 relative to each tensor's
largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import _qwen_vl_helpers as H
from jaxdpo.models import io, registry
from jaxdpo.models.convert_table import jax_to_hf
from jaxdpo.models.qwen2_5_vl import inputs as qin
from tests._dpo_helpers import assert_grads_close

COMPLETION = 4  # the last real, non-image tokens of each row are the "completion"


def _completion_mask(ids, mask, image_token):
  out = np.zeros_like(mask)
  for r in range(ids.shape[0]):
    real = [t for t in range(ids.shape[1]) if mask[r, t] and ids[r, t] != image_token]
    out[r, real[-COMPLETION:]] = 1
  return out


def _summed_logp_np(logits_lp, ids, comp):
  """sum over completion tokens t of log p(ids[t] | < t), from log-softmaxed logits."""
  return (logits_lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * comp[:, 1:]).sum()


def test_qwen2_5_vl_gradients_match_torch_autograd(tmp_path):
  hf = H.build_hf_model(str(tmp_path / "hf"))
  io.hf_to_jax_dir(str(tmp_path / "hf"), str(tmp_path / "ck"))
  family, cfg, graphdef, params = io.load_model(str(tmp_path / "ck"))
  ids, mask, vision = H.mixed_batch()
  comp = _completion_mask(ids, mask, H.IMAGE)
  assert comp.sum() == COMPLETION * ids.shape[0]

  hf.zero_grad()
  logits = hf(**H.hf_inputs(ids, mask, vision)).logits
  lp = torch.log_softmax(logits.double(), dim=-1)  # log-softmax in fp64: the comparison's reference
  loss = _summed_logp_np(lp, torch.tensor(ids, dtype=torch.long), torch.tensor(comp, dtype=torch.float64))
  loss.backward()
  theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}

  inputs = {k: jnp.asarray(x) for k, x in qin.make_inputs(cfg, ids, mask, vision["pixel_values"],
                                                           vision["image_grid_thw"]).items()}
  from flax import nnx
  pure = nnx.to_pure_dict(params)

  @jax.jit
  def grad(pure):
    def summed(pure):
      state = jax.tree.map(lambda x: x, params)
      nnx.replace_by_pure_dict(state, pure)
      model = nnx.merge(graphdef, state)
      logp = jax.nn.log_softmax(H.full_logits(model, inputs), axis=-1)
      tok = jnp.take_along_axis(logp[:, :-1], jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
      return (tok * jnp.asarray(comp)[:, 1:]).sum()
    return jax.value_and_grad(summed)(pure)

  value, g = grad(pure)
  assert float(value) == pytest.approx(float(loss), rel=1e-5)
  ours = jax_to_hf({k: np.asarray(v) for k, v in io.flatten(jax.device_get(g)).items()}, family.rules(cfg))
  assert any(k.startswith("model.visual.") for k in theirs) and any(k.startswith("model.language_model.") for k in theirs)
  worst = assert_grads_close(ours, theirs, rel=1e-4, what="Qwen2.5-VL: ")
  print(f"Qwen2.5-VL worst per-tensor gradient rel err: {worst:.2e}")


def test_gemma3_gradients_match_torch_autograd(tmp_path):
  import _gemma_helpers as G
  from flax import nnx
  hf = G.tiny_vlm(seed=0)
  G.save_in_layout(hf, str(tmp_path / "hf"), "save_pretrained")
  io.hf_to_jax_dir(str(tmp_path / "hf"), str(tmp_path / "ck"))
  family, cfg, graphdef, params = io.load_model(str(tmp_path / "ck"))
  ids, seg, pos = G.pad_batch(G.mm_rows(seed=1), 36, left=True)
  pixels = G.random_pixels(3, seed=2)
  comp = _completion_mask(ids, seg, G.IMAGE_TOKEN)

  hf.zero_grad()
  logits = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels),
              attention_mask=torch.tensor(seg), position_ids=torch.tensor(pos, dtype=torch.long),
              token_type_ids=torch.tensor((ids == G.IMAGE_TOKEN).astype(np.int64))).logits
  lp = torch.log_softmax(logits.double(), dim=-1)
  loss = _summed_logp_np(lp, torch.tensor(ids, dtype=torch.long), torch.tensor(comp, dtype=torch.float64))
  loss.backward()
  canonical = family.normalize_key(cfg)
  theirs = {canonical(name): p.grad.numpy() for name, p in hf.named_parameters()}

  inputs = dict(input_ids=jnp.asarray(ids), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos),
                pixel_values=jnp.asarray(pixels))
  pure = nnx.to_pure_dict(params)

  @jax.jit
  def grad(pure):
    def summed(pure):
      state = jax.tree.map(lambda x: x, params)
      nnx.replace_by_pure_dict(state, pure)
      model = nnx.merge(graphdef, state)
      logp = jax.nn.log_softmax(model.logits(model.hidden_states(inputs)), axis=-1)
      tok = jnp.take_along_axis(logp[:, :-1], jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
      return (tok * jnp.asarray(comp)[:, 1:]).sum()
    return jax.value_and_grad(summed)(pure)

  value, g = grad(pure)
  assert float(value) == pytest.approx(float(loss), rel=1e-5)
  ours = jax_to_hf({k: np.asarray(v) for k, v in io.flatten(jax.device_get(g)).items()}, family.rules(cfg))
  assert any(k.startswith("model.vision_tower.") for k in theirs)
  assert any(k.startswith("model.multi_modal_projector.") for k in theirs)
  # A key bias adds the same q.b to every logit of a query: softmax cancels it, so its true gradient
  # is 0 and both sides hold only rounding noise, which a relative comparison cannot judge. Those are
  # held to be negligible next to the same layer's query-bias gradient instead.
  key_bias = [k for k in theirs if k.endswith("self_attn.k_proj.bias")]
  assert key_bias
  for k in key_bias:
    q_scale = np.abs(theirs[k.replace("k_proj", "q_proj")]).max()
    assert max(np.abs(ours.pop(k)).max(), np.abs(theirs.pop(k)).max()) <= 1e-5 * q_scale, k
  worst = assert_grads_close(ours, theirs, rel=1e-4, what="Gemma 3: ")
  print(f"Gemma 3 worst per-tensor gradient rel err: {worst:.2e}")
