"""bf16 compute held to transformers: jaxdpo-bf16's error against HF fp32 (relative L2) is at most 1.5x
HF-bf16's own.

Built for Qwen2 text so far (logits and DPO pair log-probs); Qwen2.5-VL and Gemma 3 with images are
not yet covered, and the negative control (a wrong cast must break the bound) does not yet work: it
is a strict xfail recording that gap (see BUILD_NOTES, issue 11).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdpo.models import io, layers
from tests._dpo_helpers import tiny_qwen2_hf

BOUND = 1.5


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  hf, ckpt = tiny_qwen2_hf(str(tmp_path_factory.mktemp("bf16")), tied=False, vocab=96, seed=5)
  _, _, graphdef, params = io.load_model(ckpt)
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 96, (4, 40)).astype(np.int32)
  seg = np.ones_like(ids)
  pos = np.broadcast_to(np.arange(40, dtype=np.int32), ids.shape).copy()
  with torch.no_grad():
    ref32 = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.double().numpy()
    hf16 = hf.to(torch.bfloat16)
    ref16 = hf16(input_ids=torch.tensor(ids, dtype=torch.long)).logits.double().numpy()
    hf.to(torch.float32)
  return dict(graphdef=graphdef, params=params, ids=ids, seg=seg, pos=pos, ref32=ref32, ref16=ref16)


def _ours_bf16(s):
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), s["params"])

  @jax.jit
  def logits(state, inputs):
    model = nnx.merge(s["graphdef"], state)
    return model.logits(model.hidden_states(inputs)).astype(jnp.float32)
  inputs = dict(input_ids=jnp.asarray(s["ids"]), segment_ids=jnp.asarray(s["seg"]), positions=jnp.asarray(s["pos"]))
  return np.asarray(logits(bf16, inputs), np.float64)


def _summed_logps(logits, ids):
  """Per row: sum over the second half of log p(token | prefix), in fp64 from the given logits."""
  lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  tok = np.take_along_axis(lp[:, :-1], ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
  return tok[:, ids.shape[1] // 2:].sum(-1)


def rel_l2(x, ref):
  """||x - ref|| / ||ref||. bf16 logits are quantised to a bf16 ulp, so the max error of two bf16
  runs is often the very same rounding step; the L2 error sees every element."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _errors(s, ours):
  return rel_l2(ours, s["ref32"]), rel_l2(s["ref16"], s["ref32"])


def test_qwen2_bf16_logits_and_pair_logps_within_hf_bf16_error(qwen2):
  ours = _ours_bf16(qwen2)
  ours_err, hf_err = _errors(qwen2, ours)
  print(f"Qwen2 bf16 logits: jaxdpo {ours_err:.3e}, HF {hf_err:.3e}")
  assert hf_err > 1e-4  # bf16 really is coarser: the comparison is not at the fp32 floor
  assert ours_err <= BOUND * hf_err
  ids = qwen2["ids"]
  ref = _summed_logps(qwen2["ref32"], ids)
  ours_lp, hf_lp = _summed_logps(ours, ids), _summed_logps(qwen2["ref16"], ids)
  lp_ours, lp_hf = rel_l2(ours_lp, ref), rel_l2(hf_lp, ref)
  print(f"Qwen2 bf16 pair log-probs: jaxdpo {lp_ours:.3e}, HF {lp_hf:.3e}")
  assert lp_ours <= BOUND * lp_hf


@pytest.mark.xfail(strict=True, reason="known gap (BUILD_NOTES issue 11 item 3): on this tiny model the bf16 "
                   "rounding of the logits dominates the error, so a bf16 attention softmax moves the relative L2 "
                   "error by <1% and does not break the 1.5x bound; a control that does is not built yet")
def test_wrong_cast_breaks_the_bound(qwen2, monkeypatch):
  """Negative control: attention probabilities rounded to bf16 before the value product (softmax
  must accumulate in fp32) fail the bound."""
  def attention_softmax_in_bf16(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale, implementation=None):
    n, k = q_BTNH.shape[2], k_BSKH.shape[2]
    k_BSNH, v_BSNH = jnp.repeat(k_BSKH, n // k, axis=2), jnp.repeat(v_BSKH, n // k, axis=2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH).astype(jnp.float32) * scale
    if mask_BTS is not None:
      s = jnp.where(mask_BTS[:, None], s, -1e30)
    p = jax.nn.softmax(s.astype(jnp.bfloat16), axis=-1)  # the wrong cast
    return jnp.einsum("BNTS,BSNH->BTNH", p, v_BSNH.astype(jnp.bfloat16)).astype(q_BTNH.dtype)
  monkeypatch.setattr(layers, "dot_product_attention", attention_softmax_in_bf16)
  ours_err, hf_err = _errors(qwen2, _ours_bf16(qwen2))
  print(f"Qwen2 bf16 logits with the attention softmax in bf16: jaxdpo {ours_err:.3e}, HF {hf_err:.3e}")
  assert ours_err > BOUND * hf_err
