"""Attention described by structure (issue 16 item 1): the dense reference, the flash routes held
to it, and the GPU dispatch lowered for CUDA without a GPU (acceptance 4: no [B, T, S] mask).

The flash routes run here with XLA's kernel (`attention.flash_route(kernel="xla")`): the same
causal calls with lengths and windows, the same gathers and scatters as on cuDNN, so the route's
index arithmetic and its gradients are held to the dense mask on CPU. The cuDNN kernel itself
cannot run on this machine; its dispatch is traced and lowered for the "cuda" platform instead.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.models import attention

B, T, N, K, H = 3, 24, 4, 2, 8
# (prompt, chosen, rejected) per row of the shared batch; the last row has a 1-token prompt.
ROWS = [(5, 7, 4), (9, 3, 8), (1, 6, 6)]


def _shared_structure():
  seg = np.zeros((B, T), np.int32)
  order = np.zeros((B, T), np.int32)
  branch = np.zeros((B, T), np.int32)
  for i, (p, c, r) in enumerate(ROWS):
    seg[i, :p + c + r] = 1
    order[i, :p + c] = np.arange(p + c)
    order[i, p + c:p + c + r] = p + np.arange(r)
    branch[i, p:p + c], branch[i, p + c:p + c + r] = attention.CHOSEN, attention.REJECTED
  return attention.self_attention(jnp.asarray(seg), order=jnp.asarray(order), branch=jnp.asarray(branch)), seg


def test_shared_mask_is_prompt_plus_own_branch():
  """Element by element: a completion token sees the prompt and its own earlier tokens, never the
  other completion; prompt tokens see the prompt causally; padding is seen by nobody."""
  st, seg = _shared_structure()
  mask = np.asarray(st.dense_mask())
  for i, (p, c, r) in enumerate(ROWS):
    want = np.zeros((T, T), bool)
    for q in range(p + c + r):
      for s in range(p + c + r):
        q_branch = 0 if q < p else (1 if q < p + c else 2)
        s_branch = 0 if s < p else (1 if s < p + c else 2)
        q_pos = q if q < p + c else q - c
        s_pos = s if s < p + c else s - c
        want[q, s] = s_pos <= q_pos and (s_branch == 0 or s_branch == q_branch)
    np.testing.assert_array_equal(mask[i], want)


def _qkv(seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
  return q, k, v


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("layout", ["rows", "shared"])
@pytest.mark.parametrize("window", [None, 4])
def test_flash_route_matches_the_dense_mask(layout, window):
  """Outputs on real tokens and gradients of q, k, v: relative 1e-5 of the dense reference."""
  if layout == "shared":
    st, seg = _shared_structure()
  else:
    seg = np.zeros((B, T), np.int32)
    for i, n in enumerate((T, 11, 1)):
      seg[i, :n] = 1
    st = attention.self_attention(jnp.asarray(seg))
  st = st.windowed(window)
  q, k, v = _qkv()
  weight = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)) * seg[:, :, None, None], jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)
  dense = lambda q, k, v: attention.attend(q, k, v, st, scale=0.3, implementation="xla")
  route = lambda q, k, v: attention.flash_route(q, k, v, st, scale=0.3, kernel="xla")
  real = seg.astype(bool)
  assert _rel(np.asarray(route(q, k, v))[real], np.asarray(dense(q, k, v))[real]) <= 1e-5
  g_dense = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  g_route = jax.grad(loss(route), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g_route, g_dense):
    assert np.abs(np.asarray(b)).max() > 0, name
    assert _rel(a, b) <= 1e-5, name


def test_flash_route_negative_control():
  """The shared route with the rejected gather skipped (R attending over the [P | C] row, as a
  plain causal row would) is far from the reference: the comparison above can fail."""
  st, seg = _shared_structure()
  q, k, v = _qkv()
  plain = attention.flash_route(q, k, v, attention.self_attention(st.q_segment_ids), scale=0.3, kernel="xla")
  dense = attention.attend(q, k, v, st, scale=0.3, implementation="xla")
  real = seg.astype(bool)
  assert _rel(np.asarray(plain)[real], np.asarray(dense)[real]) > 1e-2


# ------------------------------------------------------------------------------------------------
# Acceptance 4: the GPU dispatch, lowered for CUDA on this CPU-only machine.

_TENSOR = re.compile(r"tensor<((?:\d+x)+)(i1|bf16|f16|f32)>")


def dense_mask_tensors(hlo_text: str, t: int, s: int) -> set[str]:
  """Tensor types in an HLO text whose last two dims are [T, S] (a mask, a bias or logits of
  the whole row): what the flash path must never build."""
  found = set()
  for dims, dtype in _TENSOR.findall(hlo_text):
    shape = [int(d) for d in dims.rstrip("x").split("x")]
    if len(shape) >= 3 and shape[-2:] == [t, s]:
      found.add(f"{shape}{dtype}")
  return found


@pytest.fixture
def pretend_cudnn(monkeypatch):
  """jax checks the cuDNN version and the GPU's compute capability while tracing; on a CPU-only
  machine we answer as an H200 (cuDNN 9.10, capability 9.0) so that the dispatch can be traced
  and lowered for the "cuda" platform. Nothing is executed."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


def _lower_for_cuda(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_cudnn_dispatch_builds_no_mask(pretend_cudnn, layout):
  st, _ = _shared_structure()
  if layout == "rows":
    st = attention.self_attention(st.q_segment_ids)
  st = st.windowed(6)
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())

  def loss(q, k, v):
    return attention.attend(q, k, v, st, scale=0.3, implementation="cudnn").astype(jnp.float32).sum()
  hlo = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  calls = 1 if layout == "rows" else 2
  assert hlo.count("custom_call @__cudnn$fmhaSoftmax(") == calls
  assert hlo.count("custom_call @__cudnn$fmhaSoftmaxBackward(") == calls
  assert dense_mask_tensors(hlo, T, T) == set()
  # Negative control: the xla backend on the same structure does build the mask.
  dense = lambda q, k, v: attention.attend(q, k, v, st, scale=0.3, implementation="xla").astype(jnp.float32).sum()
  assert dense_mask_tensors(_lower_for_cuda(jax.grad(dense, argnums=(0, 1, 2)), q, k, v), T, T)


def test_splash_is_refused_not_run_densely():
  st, _ = _shared_structure()
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="splash"):
    attention.attend(q, k, v, st, scale=0.3, implementation="splash")


@pytest.mark.parametrize("layout", ["pairs", "shared"])
def test_dpo_step_on_cudnn_builds_no_mask(pretend_cudnn, layout):
  """The whole DPO loss and gradient of the bench's ocr-tiny workload (bf16 compute, cuDNN
  attention, live reference), lowered for CUDA: flash calls in every layer, forward and backward,
  and no tensor ending in [T, T] anywhere in the program. (ocr-tiny: T = 160 two-row, 224 shared,
  unlike any model width; "tiny" has T = 128 = its MLP width, whose activations would match.)"""
  from flax import nnx

  from jaxdpo.cli import bench
  from jaxdpo.models import registry
  from jaxdpo.objectives import dpo_losses, dpo_step
  from jaxdpo.train import update
  w = bench.WORKLOADS["ocr-tiny"]()
  fam = registry.get_family(w.family)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: fam.build(w.model, nnx.Rngs(0), jnp.float32, "cudnn")),
                                 nnx.Param)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract))
  batch, _ = bench.synthetic_batches(w, 2, 1, w.model.vocab_size, layout=layout)[0]
  t = batch["input_ids"].shape[-1]
  assert t not in (w.model.hidden_size, w.model.intermediate_size, w.model.vocab_size)
  cfg = dpo_step.StepConfig(loss=dpo_losses.DPOLossConfig(beta=0.1), compute_dtype=jnp.bfloat16, logprob_chunk=64)

  def grads(params, ref, batch):
    return update.accumulated(dpo_step.objective(graphdef, cfg), params, ref, batch, 1, with_grad=True)
  hlo = _lower_for_cuda(grads, params, params, {k: jnp.asarray(v) for k, v in batch.items()})
  layers = w.model.num_layers
  calls = (1 if layout == "pairs" else 2) * layers
  # Policy forward + reference forward, and the policy's backward.
  assert hlo.count("custom_call @__cudnn$fmhaSoftmax(") == 2 * calls
  assert hlo.count("custom_call @__cudnn$fmhaSoftmaxBackward(") == calls
  assert dense_mask_tensors(hlo, t, t) == set()
