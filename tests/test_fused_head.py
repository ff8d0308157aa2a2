"""The fused LM head (`objectives.logprobs.token_logps`, custom VJP) held to a plain log-softmax.

fp32 throughout. Bounds relative to scale: log-probs max|a-b| <= 1e-6 max|b|; dh and dW
max|a-b| <= 1e-5 max|b| per tensor. Cases: with and without a soft cap, a chunk that does not
divide the positions, one chunk (no loop), the unrolled loops. Negative controls: a backward
that drops the soft cap's chain factor, or the one-hot term, fails the same comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.objectives import logprobs


def _plain(h_BTD, w_VD, t_BT, softcap):
  z = jnp.einsum("BTD,VD->BTV", h_BTD, w_VD, precision="highest")
  if softcap:
    z = softcap * jnp.tanh(z / softcap)
  return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), t_BT[..., None], axis=-1)[..., 0]


def _inputs(b=3, t=37, d=24, v=101, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(k[0], (b, t, d), jnp.float32)
  w = jax.random.normal(k[1], (v, d), jnp.float32) * 0.7
  tg = jax.random.randint(k[2], (b, t), 0, v)
  g = jax.random.normal(k[3], (b, t), jnp.float32)  # an arbitrary upstream cotangent
  return h, w, tg, g


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(b))), 1e-30))


def _errors(softcap, chunk, unroll=False):
  h, w, tg, g = _inputs()
  fused = lambda h_, w_: logprobs.token_logps(h_, w_, tg, chunk_size=chunk, logit_softcap=softcap, unroll=unroll)
  plain = lambda h_, w_: _plain(h_, w_, tg, softcap)
  lp_f, lp_p = fused(h, w), plain(h, w)
  dh_f, dw_f = jax.grad(lambda h_, w_: (fused(h_, w_) * g).sum(), argnums=(0, 1))(h, w)
  dh_p, dw_p = jax.grad(lambda h_, w_: (plain(h_, w_) * g).sum(), argnums=(0, 1))(h, w)
  return _rel(lp_f, lp_p), _rel(dh_f, dh_p), _rel(dw_f, dw_p)


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("chunk,unroll", [(8, False), (8, True), (64, False), (37, False)])
def test_fused_head_matches_plain_log_softmax(softcap, chunk, unroll):
  # chunk 8 does not divide 37 (padded last chunk); 64 and 37 give one chunk (no loop).
  e_lp, e_dh, e_dw = _errors(softcap, chunk, unroll)
  assert e_lp <= 1e-6, e_lp
  assert e_dh <= 1e-5, e_dh
  assert e_dw <= 1e-5, e_dw


def test_gathered_positions_score_like_the_full_rows():
  h, w, tg, _ = _inputs()
  index = jnp.asarray([[3, 4, 5, 36], [0, 1, 2, 3], [10, 20, 30, 35]])
  got = logprobs.token_logps(logprobs.gather_positions(h, index), w, jnp.take_along_axis(tg, index, axis=1),
                             chunk_size=3)
  want = jnp.take_along_axis(_plain(h, w, tg, None), index, axis=1)
  assert _rel(got, want) <= 1e-6


def test_reduced_precision_grads_have_input_dtypes():
  h, w, tg, g = _inputs()
  h, w = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  dh, dw = jax.grad(lambda h_, w_: (logprobs.token_logps(h_, w_, tg, chunk_size=8) * g).sum(), argnums=(0, 1))(h, w)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(dw, np.float32)).all() and float(jnp.abs(dw.astype(jnp.float32)).max()) > 0


def _no_cap_chain(logits, lse, t, g, softcap):
  return _true_dlogits(logits, lse, t, g, None)


def _no_onehot(logits, lse, t, g, softcap):
  d = -g[..., None] * jnp.exp(logits - lse[..., None])
  return d * (1.0 - jnp.square(logits / softcap)) if softcap else d


_true_dlogits = logprobs._dlogits


@pytest.mark.parametrize("wrong,softcap", [(_no_cap_chain, 2.5), (_no_onehot, None)])
def test_negative_control_wrong_backward_fails(monkeypatch, wrong, softcap):
  monkeypatch.setattr(logprobs, "_dlogits", wrong)
  e_lp, e_dh, e_dw = _errors(softcap, 8)
  assert e_lp <= 1e-6  # the forward is untouched
  assert e_dh > 1e-5 and e_dw > 1e-5, (e_dh, e_dw)
