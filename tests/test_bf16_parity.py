"""bf16 compute held to transformers, for Qwen2 text, Qwen2.5-VL with images and Gemma 3 with images.

For each family, a DPO pair batch (chosen / rejected rows sharing their prompt's images) is run
through jaxdpo with bf16 parameters and compute, and through transformers in fp32 and in bf16.
Both the logits of every real token and the summed completion log-probs of every row (through
`dpo_step.pair_logps`, the training path) are compared. The bound: jaxdpo-bf16's error against HF
fp32 is at most 1.5x HF-bf16's own error against HF fp32.

Metric: relative L2, ||x - ref|| / ||ref||. bf16 logits are quantised to a bf16 ulp, so the max
error of two bf16 runs is often the very same rounding step; the L2 error sees every element.

Negative control (the bound can fail): a deliberately wrong cast, rotary angles (position x inverse
frequency) formed in bf16 where transformers forms them in fp32, applied by a monkeypatch of
`layers.rope_cos_sin`, must break the bound for both metrics and every family. It does so robustly
(4x to 22x HF's error over three seeds per family, BUILD_NOTES issue 11) because every row starts with
a long text prefix (positions past 256, where bf16 stops holding integers) and the Qwen decoders'
query/key weights are scaled up (transformers' std-0.02 init attends almost uniformly, blind to
positions). A log-softmax on bf16 logits was tried as well and is not used: it broke the log-prob
bound by 1.75x to 13x for the Qwen families but not for Gemma 3 (0.5x to 1.4x), whose large random
logits already give HF-bf16 log-probs a ~1e-3 error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdpo.models import io, layers
from jaxdpo.objectives import dpo_losses, dpo_step
from tests._dpo_helpers import tiny_qwen2_hf

BOUND = 1.5
# Every row starts with this many text tokens, so positions reach past 256, where bf16 stops holding
# integers (a long prompt; the fp32 parity tests' rows are short).
PREFIX = 400
FAMILIES = ("qwen2", "qwen2_5_vl", "gemma3")


def _other_completions(rows, n, rng, lo=3, hi=300):
  """Each row with its last n tokens replaced: the rejected rows of the chosen `rows`."""
  return [r[:-n] + list(rng.randint(lo, hi, n)) for r in rows]


def _interleave(chosen, rejected):
  return [r for pair in zip(chosen, rejected) for r in pair]  # c0, r0, c1, r1, ...


def _pairs(rows_RT):
  """[R, ...] rows ordered c0, r0, c1, r1, ... -> [R/2, 2, ...]."""
  return rows_RT.reshape((rows_RT.shape[0] // 2, 2) + rows_RT.shape[1:])


def _right_padded(rows, total):
  ids = np.zeros((len(rows), total), np.int32)
  seg = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, :len(r)], seg[i, :len(r)] = r, 1
  return ids, seg


def _last_real(seg, n):
  """loss mask: the last n real tokens of each row."""
  out = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    out[r, np.flatnonzero(seg[r])[-n:]] = 1
  return out


def _hf_both(hf, inputs, float_keys=("pixel_values",)):
  """HF logits (fp64 numpy) in fp32, then in bf16."""
  with torch.no_grad():
    ref32 = hf(**inputs).logits.double().numpy()
    hf16 = hf.to(torch.bfloat16)
    ref16 = hf16(**{k: (v.to(torch.bfloat16) if k in float_keys else v) for k, v in inputs.items()}).logits
  hf.to(torch.float32)
  return ref32, ref16.double().numpy()


def _sharpened(hf, root):
  """Scales the decoder's query and key weights by 10, saves and converts the model: with transformers'
  init (std 0.02) the tiny Qwen models attend almost uniformly, so positions would barely matter."""
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) and "visual" not in name:
        p.mul_(10.0)
  hf.save_pretrained(f"{root}/hf-sharp")
  io.hf_to_jax_dir(f"{root}/hf-sharp", f"{root}/ck-sharp")
  return f"{root}/ck-sharp"


def _qwen2_text(root, seed=0):
  hf, _ = tiny_qwen2_hf(root, tied=False, vocab=96, seed=5 + seed)
  ckpt = _sharpened(hf, root)
  rng = np.random.RandomState(seed)
  t = PREFIX + 40
  chosen = [list(rng.randint(1, 96, t)) for _ in range(2)]
  ids = np.asarray(_interleave(chosen, _other_completions(chosen, 20, rng, 1, 96)), np.int32)
  seg = np.ones_like(ids)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape).copy()
  batch = dict(input_ids=_pairs(ids), segment_ids=_pairs(seg), positions=_pairs(pos),
               loss_mask=_pairs(_last_real(seg, 20)))
  ref32, ref16 = _hf_both(hf, dict(input_ids=torch.tensor(ids, dtype=torch.long)))
  return ckpt, batch, ref32, ref16


def _qwen2_5_vl(root, seed=0):
  import _qwen_vl_helpers as H
  from jaxdpo.models.qwen2_5_vl import batching as qbatching
  hf = H.build_hf_model(f"{root}/hf", seed=seed)
  ckpt = _sharpened(hf, root)
  _, cfg, _, _ = io.load_model(ckpt)
  # Rows with 1, 2 and 0 images after a long text prefix.
  ids3, mask3, vision = H.mixed_batch(seed, text_len=(PREFIX, 6, PREFIX, 2, 6, PREFIX + 12))
  rng = np.random.RandomState(1 + seed)
  chosen = [list(r[m == 1]) for r, m in zip(ids3, mask3)]
  rows = _interleave(chosen, _other_completions(chosen, 5, rng))
  t = ids3.shape[1]
  ids = np.zeros((6, t), np.int64)
  mask = np.zeros((6, t), np.int64)
  for i, r in enumerate(rows):  # left padded, as the fp32 parity fixture
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  grid = vision["image_grid_thw"]
  per_image = np.split(vision["pixel_values"], np.cumsum(grid.prod(axis=1))[:-1])
  record_images = [[0], [1, 2], []]
  row_images = [record_images[r // 2] for r in range(6)]
  hf_in = H.hf_inputs(ids, mask, dict(
      pixel_values=np.concatenate([per_image[j] for imgs in row_images for j in imgs]),
      image_grid_thw=np.asarray([grid[j] for imgs in row_images for j in imgs])))
  ref32, ref16 = _hf_both(hf, hf_in)
  patches = max(sum(len(per_image[j]) for j in imgs) for imgs in record_images)
  pixels = np.zeros((3, patches, per_image[0].shape[1]), np.float32)
  grids = np.zeros((3, 2, 3), np.int32)
  for b, imgs in enumerate(record_images):
    if imgs:
      flat = np.concatenate([per_image[j] for j in imgs])
      pixels[b, :len(flat)] = flat
      grids[b, :len(imgs)] = grid[imgs]
  pos = np.stack([qbatching.row_positions(cfg, ids[r], mask[r], grid[row_images[r]].reshape(-1, 3))
                  for r in range(6)])
  batch = dict(input_ids=_pairs(ids.astype(np.int32)), segment_ids=_pairs(mask.astype(np.int32)),
               positions=_pairs(pos.astype(np.int32)), loss_mask=_pairs(_last_real(mask, 5).astype(np.int32)),
               pixel_values=pixels, image_grid_thw=grids)
  return ckpt, batch, ref32, ref16


def _gemma3(root, seed=0):
  import _gemma_helpers as G
  hf = G.tiny_vlm(seed=seed)
  G.save_in_layout(hf, f"{root}/hf", "save_pretrained")
  io.hf_to_jax_dir(f"{root}/hf", f"{root}/ck")
  rng = np.random.RandomState(1 + seed)
  chosen = [list(rng.randint(3, 300, PREFIX)) + r for r in G.mm_rows(seed=1 + seed)]  # 1, 2 and 0 images
  ids, seg, pos = G.pad_batch(_interleave(chosen, _other_completions(chosen, 4, rng)), PREFIX + 36, left=False)
  pixels = G.random_pixels(3, seed=2 + seed)
  row_images = [0, 0, 1, 2, 1, 2]  # c0 r0 show image 0; c1 r1 images 1 and 2; c2 r2 none
  hf_in = dict(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels[row_images]),
               attention_mask=torch.tensor(seg), position_ids=torch.tensor(pos, dtype=torch.long),
               token_type_ids=torch.tensor((ids == G.IMAGE_TOKEN).astype(np.int64)))
  ref32, ref16 = _hf_both(hf, hf_in)
  per_record = np.zeros((3, 2) + pixels.shape[1:], np.float32)
  per_record[0, 0], per_record[1, 0], per_record[1, 1] = pixels[0], pixels[1], pixels[2]
  batch = dict(input_ids=_pairs(ids), segment_ids=_pairs(seg), positions=_pairs(pos),
               loss_mask=_pairs(_last_real(seg, 4)), pixel_values=per_record,
               num_images=np.array([1, 2, 0], np.int32))
  return f"{root}/ck", batch, ref32, ref16


BUILDERS = dict(qwen2=_qwen2_text, qwen2_5_vl=_qwen2_5_vl, gemma3=_gemma3)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
  ckpt, batch, ref32, ref16 = BUILDERS[request.param](str(tmp_path_factory.mktemp(request.param)))
  family, _, graphdef, params = io.load_model(ckpt)
  rows = lambda k: batch[k].reshape((-1,) + batch[k].shape[2:])
  ids, seg, comp = rows("input_ids"), rows("segment_ids"), rows("loss_mask")
  return dict(name=request.param, graphdef=graphdef, params=params, model_inputs=family.model_inputs,
              batch=batch, ids=ids, real=seg.astype(bool), comp=comp, ref32=ref32, ref16=ref16)


def rel_l2(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def summed_logps(logits_RTV, ids_RT, comp_RT):
  """Per row: sum over completion tokens t of log p(ids[t] | < t), log-softmax in fp64."""
  x = np.asarray(logits_RTV, np.float64)[:, :-1]
  m = x.max(-1, keepdims=True)
  lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  tok = np.take_along_axis(lp, ids_RT[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
  return (tok * comp_RT[:, 1:]).sum(-1)


def ours_logits(c):
  """jaxdpo's logits [R, T, V] with bf16 parameters and compute, through the family's batch layout."""
  @jax.jit
  def run(params, batch):
    model = nnx.merge(c["graphdef"], jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    return model.logits(model.hidden_states(c["model_inputs"](batch, 2))).astype(jnp.float32)
  return np.asarray(run(c["params"], c["batch"]), np.float64)


def ours_pair_logps(c):
  """Summed completion log-probs [R] from the DPO step's `pair_logps` in bf16 compute."""
  scfg = dpo_step.StepConfig(loss=dpo_losses.DPOLossConfig(), compute_dtype=jnp.bfloat16,
                             model_inputs=c["model_inputs"])
  seq, _, _ = jax.jit(lambda p, b: dpo_step.pair_logps(c["graphdef"], p, b, scfg))(c["params"], c["batch"])
  return np.asarray(seq, np.float64).reshape(-1)


def logits_errors(c):
  """(jaxdpo-bf16, HF-bf16) relative L2 error of the real tokens' logits against HF fp32."""
  real = c["real"]
  return rel_l2(ours_logits(c)[real], c["ref32"][real]), rel_l2(c["ref16"][real], c["ref32"][real])


def logp_errors(c):
  """(jaxdpo-bf16 through `pair_logps`, HF-bf16) relative L2 error of the summed completion log-probs."""
  ref = summed_logps(c["ref32"], c["ids"], c["comp"])
  return rel_l2(ours_pair_logps(c), ref), rel_l2(summed_logps(c["ref16"], c["ids"], c["comp"]), ref)


def test_batch_is_a_pair_batch_with_images(case):
  ids, comp = case["ids"], case["comp"]
  assert ids.shape[0] == (4 if case["name"] == "qwen2" else 6)
  chosen, rejected = ids[0::2], ids[1::2]
  c = comp[0::2].astype(bool)
  assert (chosen[~c] == rejected[~c]).all() and (chosen[c] != rejected[c]).any()  # same prompts, other completions
  assert (comp.sum(-1) > 0).all()
  if case["name"] != "qwen2":
    assert "pixel_values" in case["model_inputs"](case["batch"], 2)


def test_logits_within_hf_bf16_error(case):
  ours, hf = logits_errors(case)
  print(f"{case['name']} bf16 logits rel L2: jaxdpo {ours:.3e}, HF {hf:.3e} (ratio {ours / hf:.2f})")
  assert hf > 1e-4  # bf16 really is coarser: the comparison is not at the fp32 floor
  assert ours <= BOUND * hf


def test_pair_logps_within_hf_bf16_error(case):
  ours, hf = logp_errors(case)
  print(f"{case['name']} bf16 pair log-probs rel L2: jaxdpo {ours:.3e}, HF {hf:.3e} (ratio {ours / hf:.2f})")
  assert hf > 1e-6
  assert ours <= BOUND * hf


def rope_angles_in_bf16(positions, inv_freq, mrope_section=None):
  """`layers.rope_cos_sin` with the wrong cast: position x inverse frequency formed in bf16."""
  if positions.ndim == 2 and mrope_section is not None:
    positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
  freqs = positions.astype(jnp.bfloat16)[..., None] * inv_freq.astype(jnp.bfloat16)  # the wrong cast
  if mrope_section is not None:
    chunks, start = [], 0
    for i, width in enumerate(mrope_section):
      chunks.append(freqs[i % 3, ..., start:start + width])
      start += width
    freqs = jnp.concatenate(chunks, axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1).astype(jnp.float32)
  return jnp.cos(emb), jnp.sin(emb)


def test_rope_angles_in_bf16_break_the_bound(case, monkeypatch):
  """Negative control: both metrics fail the bound when the rotary angles are formed in bf16."""
  monkeypatch.setattr(layers, "rope_cos_sin", rope_angles_in_bf16)
  ours, hf = logits_errors(case)
  lp_ours, lp_hf = logp_errors(case)
  print(f"{case['name']} rotary angles in bf16: logits {ours / hf:.2f}x HF, pair log-probs {lp_ours / lp_hf:.2f}x HF")
  assert ours > BOUND * hf
  assert lp_ours > BOUND * lp_hf

