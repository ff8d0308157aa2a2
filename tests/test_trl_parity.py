"""jaxdpo's DPO loss, metrics and AdamW updates held to TRL's DPOTrainer on the same weights and batch.

TRL 1.16's `sigmoid` loss has no label smoothing; its `robust` loss does. jaxdpo's cDPO
(`sigmoid` with label_smoothing=eps) is checked against TRL through the identity
  cDPO = 2 (1 - eps) L_sigmoid - (1 - 2 eps) L_robust,
which holds per pair, so for batch means too.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxdpo.data import shared_rows
from jaxdpo.data.pipeline import collate_pairs, collate_shared
from jaxdpo.data.tokenize import TokenizedPair
from jaxdpo.objectives import dpo_losses as losses
from jaxdpo.objectives import dpo_step as step_lib
from jaxdpo.models import io
from jaxdpo.train import update
from tests._dpo_helpers import tiny_qwen2_hf, tokenizer

PAIRS = [
    {"prompt": "transcribe : alpha bravo", "chosen": "alpha bravo", "rejected": "alpha alpha alpha alpha alpha"},
    {"prompt": "transcribe : red green blue black white", "chosen": "red green blue black white",
     "rejected": "red green red green red green red green"},
    {"prompt": "transcribe : cat", "chosen": "cat", "rejected": "cat dog"},
    {"prompt": "transcribe : one two three four five six seven", "chosen": "one two three four five six seven",
     "rejected": "one two three three three"},
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _trainer(tmp_path, model, ref, loss_type, *, beta, label_smoothing=0.0, loss_weights=None, max_steps=1,
             lr=1e-3, **extra):
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer
  args = DPOConfig(output_dir=str(tmp_path / f"trl-{'-'.join(loss_type)}"), per_device_train_batch_size=len(PAIRS),
                   learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=max_steps, beta=beta,
                   loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing, bf16=False,
                   fp16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                   max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                   dataset_num_proc=None, gradient_checkpointing=False, max_length=None, **extra)
  return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                    processing_class=tokenizer())


def _trl_metrics(trainer):
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  trainer.model.train()
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, batch)
  got = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  got["loss"] = float(loss)
  return got


def _our_batch(trainer, layout="pairs"):
  pairs = [TokenizedPair(f"pair {i}", list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"]))
           for i, e in enumerate(trainer.train_dataset)]
  t = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs) + 3  # extra padding on purpose
  if layout == "shared":  # one row [prompt | chosen | rejected] per pair (issue 16)
    length, slots = shared_rows.shape_for(pairs)
    return collate_shared(pairs, max_length=t, pad_id=0, length=length, slots=slots)
  return collate_pairs(pairs, max_length=t, pad_id=0)


def _window(batch):
  """The longest completion span of the batch: the step scores that completion window (the job's
  completion-only LM head), not the whole row; it must be shorter than the row to mean anything.
  None for the prefix-shared layout, which scores explicit completion slots (no window)."""
  if shared_rows.is_shared(batch):
    return None
  m = np.asarray(batch["loss_mask"]).reshape(-1, np.shape(batch["loss_mask"])[-1])
  spans = [int(np.flatnonzero(r).max() - np.flatnonzero(r).min() + 1) for r in m if r.any()]
  assert max(spans) < m.shape[1] - 1
  return max(spans)


def _our_metrics(graphdef, params, batch, loss_cfg):
  # A chunk that does not divide T or the window.
  cfg = step_lib.StepConfig(loss=loss_cfg, logprob_chunk=5, completion_window=_window(batch))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  metrics, _ = update.accumulated(step_lib.objective(graphdef, cfg), params, params, batch, 1, with_grad=False)
  return {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("trl")
  tok = tokenizer()
  hf, ckpt = tiny_qwen2_hf(str(tmp), tied=False, vocab=len(tok) + 7, seed=3)
  _, _, graphdef, params = io.load_model(ckpt)
  return tmp, hf, ckpt, graphdef, params.to_pure_dict()


def _copy(hf):
  import copy
  return copy.deepcopy(hf)


def _assert_close(ours, theirs, keys, rtol=1e-4):
  for k in keys:
    assert ours[k] == pytest.approx(theirs[k], rel=rtol, abs=1e-6), (k, ours[k], theirs[k])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_metrics_match_trl(setup, loss_type):
  tmp, hf, _, graphdef, params = setup
  trainer = _trainer(tmp, _copy(hf), _copy(hf), [loss_type], beta=0.1)
  theirs = _trl_metrics(trainer)
  # Policy == reference here (rewards are zero); `test_policy_differs_from_reference` moves it.
  ours = _our_metrics(graphdef, params, _our_batch(trainer), losses.DPOLossConfig(loss_type=loss_type, beta=0.1))
  _assert_close(ours, theirs, ("loss",) + METRICS)


@pytest.fixture(scope="module")
def moved(setup):
  """Policy != reference: the HF policy gets a deterministic perturbation, mirrored into our params."""
  tmp, hf, ckpt, graphdef, params = setup
  policy = _copy(hf)
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for p in policy.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  policy_dir = str(tmp / "policy-hf")
  policy.save_pretrained(policy_dir)
  io.hf_to_jax_dir(policy_dir, str(tmp / "policy-ckpt"))
  _, _, _, pparams = io.load_model(str(tmp / "policy-ckpt"))
  return policy, pparams.to_pure_dict()


def _metrics_moved(setup, moved, loss_type, **kw):
  tmp, hf, _, graphdef, ref_params = setup
  policy, pparams = moved
  trl_kw = {k: v for k, v in kw.items() if k in ("label_smoothing", "loss_weights")}
  trainer = _trainer(tmp, _copy(policy), _copy(hf), loss_type, beta=0.1, **trl_kw)
  theirs = _trl_metrics(trainer)
  return trainer, theirs, graphdef, pparams, ref_params


def _ours_moved(graphdef, pparams, ref_params, batch, loss_cfg):
  cfg = step_lib.StepConfig(loss=loss_cfg, logprob_chunk=5, completion_window=_window(batch))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  metrics, _ = update.accumulated(step_lib.objective(graphdef, cfg), pparams, ref_params, batch, 1, with_grad=False)
  return {k: float(v) for k, v in metrics.items()}


def test_label_smoothing_robust_and_cdpo(setup, moved):
  eps = 0.1
  trainer, robust, graphdef, pparams, ref_params = _metrics_moved(setup, moved, ["robust"], label_smoothing=eps)
  batch = _our_batch(trainer)
  ours_robust = _ours_moved(graphdef, pparams, ref_params, batch,
                            losses.DPOLossConfig(loss_type="robust", beta=0.1, label_smoothing=eps))
  _assert_close(ours_robust, robust, ("loss",) + METRICS)
  _, sigmoid, *_ = _metrics_moved(setup, moved, ["sigmoid"])
  cdpo_from_trl = 2 * (1 - eps) * sigmoid["loss"] - (1 - 2 * eps) * robust["loss"]
  ours_cdpo = _ours_moved(graphdef, pparams, ref_params, batch,
                          losses.DPOLossConfig(loss_type="sigmoid", beta=0.1, label_smoothing=eps))
  assert ours_cdpo["loss"] == pytest.approx(cdpo_from_trl, rel=1e-4)
  assert ours_cdpo["loss"] != pytest.approx(sigmoid["loss"], rel=1e-3)  # smoothing really changed it


@pytest.mark.parametrize("layout", ["pairs", "shared"])
def test_rpo_alpha_matches_trl_sft_term(setup, moved, layout):
  trainer, theirs, graphdef, pparams, ref_params = _metrics_moved(setup, moved, ["sigmoid", "sft"],
                                                                  loss_weights=[1.0, 0.5])
  ours = _ours_moved(graphdef, pparams, ref_params, _our_batch(trainer, layout),
                     losses.DPOLossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=0.5))
  _assert_close(ours, theirs, ("loss",) + METRICS)


def test_three_adamw_steps_match_trl(setup, moved):
  tmp, hf, _, graphdef, ref_params = setup
  policy, pparams = moved
  trainer = _trainer(tmp, _copy(policy), _copy(hf), ["sigmoid"], beta=0.1, max_steps=3, lr=1e-3)
  batch = _our_batch(trainer)
  trainer.train()
  trained = {k: v.detach().numpy() for k, v in trainer.model.state_dict().items()}

  from jaxdpo.train import optim
  from ml_collections import ConfigDict
  ocfg = ConfigDict(dict(lr=1e-3, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999,
                         eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, 3)
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(loss_type="sigmoid", beta=0.1), logprob_chunk=5,
                            completion_window=_window(batch))
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def step(params, opt_state):
    _, grads = update.accumulated(step_lib.objective(graphdef, cfg), params, ref_params, jbatch, 1, with_grad=True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = pparams, tx.init(pparams)
  for _ in range(3):
    params, opt_state = step(params, opt_state)

  # Map our params back to HF names with the converter's own table, then compare every tensor.
  from jaxdpo.models import registry
  fam, cfg_m = registry.get_family("qwen2"), None
  _, cfg_m = io.read_model_meta(str(tmp / "policy-ckpt"))
  from jaxdpo.models.convert_table import jax_to_hf
  ours = jax_to_hf({k: np.asarray(v) for k, v in io.flatten(params).items()}, fam.rules(cfg_m))
  start = {k: v.detach().numpy() for k, v in policy.state_dict().items()}
  moved_any = False
  for name, theirs in trained.items():
    np.testing.assert_allclose(ours[name], theirs, atol=1e-4, rtol=0, err_msg=name)
    moved_any |= float(np.abs(theirs - start[name]).max()) > 1e-3
  assert moved_any  # three steps of lr 1e-3 must have moved the weights


def _trl_gradients(trainer):
  """Torch autograd of TRL's own DPO loss on the whole batch: {HF name: grad}, and TRL's logged
  grad_norm of one real training step (the pre-clipping norm the HF Trainer logs)."""
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  model = trainer.model
  model.train()
  model.zero_grad()
  trainer.compute_loss(model, batch).backward()
  grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}
  model.zero_grad()
  trainer.train()
  logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
  return grads, float(logged[0])


@pytest.mark.parametrize("layout", ["pairs", "shared"])
def test_gradients_and_grad_norm_match_trl(setup, moved, layout):
  """The train step's raw gradient (per tensor, relative to each tensor's max) and its logged
  grad_norm equal TRL's, in both pair layouts. Parameters after clipping + Adam cannot show a
  constant gradient factor."""
  from jaxdpo.models import registry
  from jaxdpo.models.convert_table import jax_to_hf
  from jaxdpo.parallel import sharding as shd
  from tests._dpo_helpers import assert_grads_close, grad_recorder
  tmp, hf, _, graphdef, ref_params = setup
  policy, pparams = moved
  trainer = _trainer(tmp, _copy(policy), _copy(hf), ["sigmoid"], beta=0.1, max_steps=1)
  batch = _our_batch(trainer, layout)
  theirs, trl_grad_norm = _trl_gradients(trainer)

  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  params = jax.device_put(jax.tree.map(np.array, pparams), shd.replicated(mesh))  # a copy: donated
  ref = jax.device_put(ref_params, shd.replicated(mesh))
  tx = grad_recorder()
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  shardings = jax.tree.map(lambda _: shd.replicated(mesh), state)
  cfg = step_lib.StepConfig(loss=losses.DPOLossConfig(loss_type="sigmoid", beta=0.1), logprob_chunk=5,
                            completion_window=_window(batch))
  step = update.make_train_step(step_lib.objective(graphdef, cfg), tx, mesh, shardings,
                                jax.tree.map(lambda _: shd.replicated(mesh), ref))
  state, metrics = step(state, ref, shd.put_batch(batch, mesh))
  assert float(metrics["grad_norm"]) == pytest.approx(trl_grad_norm, rel=1e-4)

  _, cfg_m = io.read_model_meta(str(tmp / "policy-ckpt"))
  ours = jax_to_hf({k: np.asarray(v) for k, v in io.flatten(jax.device_get(state["opt_state"])).items()},
                   registry.get_family("qwen2").rules(cfg_m))
  worst = assert_grads_close(ours, theirs, rel=1e-4, what="jaxdpo vs TRL: ")
  assert worst < 1e-4


# TRL 1.16's 15 loss types, a two-loss combination, LD-DPO and the f-divergences:
# (id, TRL DPOConfig keywords, jaxdpo DPOLossConfig keywords).
def _case(loss_type, **kw):
  trl_kw = dict(kw)
  ours = dict(kw, loss_type=loss_type)
  trl_kw["loss_type"] = loss_type.split(",")
  if "loss_weights" in kw:
    trl_kw["loss_weights"] = [float(w) for w in kw["loss_weights"].split(",")]
  if "ld_alpha" in kw:
    ours["ld_alpha"] = kw["ld_alpha"]
  name = loss_type + "".join(f"-{k}={v}" for k, v in kw.items())
  return pytest.param(trl_kw, ours, id=name)


_EPS = {"exo_pair": 0.01, "aot": 0.1}  # exo_pair needs eps > 0; aot with smoothing exercises that term
LOSS_CASES = ([_case(t, **({"label_smoothing": _EPS[t]} if t in _EPS else {})) for t in losses.LOSS_TYPES]
              + [_case("sigmoid,sft", loss_weights="1,0.5"), _case("sigmoid", ld_alpha=0.5),
                 _case("sigmoid", f_divergence_type="forward_kl"), _case("ipo", f_divergence_type="js_divergence"),
                 _case("sigmoid_norm", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)])
TRAJECTORY_KEYS = ("loss", "grad_norm") + METRICS


def _our_trajectory(graphdef, pparams, ref_params, batch, loss_cfg, steps):
  """jaxdpo's train step (AdamW, constant lr 1e-3, clip 1.0) run `steps` times: the metrics of each step."""
  from ml_collections import ConfigDict
  from jaxdpo.parallel import sharding as shd
  from jaxdpo.train import optim
  ocfg = ConfigDict(dict(lr=1e-3, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999,
                         eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
  tx, _ = optim.make_optimizer(ocfg, steps)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  params = jax.device_put(jax.tree.map(np.array, pparams), shd.replicated(mesh))  # a copy: the state is donated
  ref = jax.device_put(ref_params, shd.replicated(mesh))
  # The whole state on the mesh: the donated output state is, and an input with other shardings
  # (Adam's counts, the step) would compile the step a second time.
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)},
                         shd.replicated(mesh))
  cfg = step_lib.StepConfig(loss=loss_cfg, logprob_chunk=5, completion_window=_window(batch))
  step = update.make_train_step(step_lib.objective(graphdef, cfg), tx, mesh,
                                jax.tree.map(lambda _: shd.replicated(mesh), state),
                                jax.tree.map(lambda _: shd.replicated(mesh), ref))
  out = []
  for _ in range(steps):
    state, metrics = step(state, ref, shd.put_batch(batch, mesh))
    out.append({k: float(v) for k, v in metrics.items()})
  return out


@pytest.mark.parametrize("trl_kw,our_kw", LOSS_CASES)
def test_loss_family_matches_trl_over_two_adamw_steps(setup, moved, trl_kw, our_kw):
  """Loss, TRL's metrics and the pre-clipping grad_norm of 3 train steps (the last one after 2
  AdamW updates) equal TRL's DPOTrainer logs, within 1e-4 relative, for every loss setting."""
  tmp, hf, _, graphdef, ref_params = setup
  policy, pparams = moved
  trl_kw = dict(trl_kw)
  trainer = _trainer(tmp, _copy(policy), _copy(hf), trl_kw.pop("loss_type"), beta=0.1, max_steps=3, lr=1e-3,
                     **trl_kw)
  batch = _our_batch(trainer)
  trainer.train()
  theirs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
  assert len(theirs) == 3
  ours = _our_trajectory(graphdef, pparams, ref_params, batch, losses.DPOLossConfig(beta=0.1, **our_kw), 3)
  for i, (o, t) in enumerate(zip(ours, theirs)):
    # rewards/* are differences of nearly equal log-probs: relative to the step's reward scale.
    # After an Adam step they inherit fp32 noise from the few weights whose gradient is near
    # Adam's eps (one embedding entry, |g| = 5e-8, moved 1.4e-4 apart in the alpha-divergence
    # case), which is ~4e-4 of a small rewards/chosen but ~3e-5 of the rewards' scale.
    reward_scale = max(abs(t[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    for k in TRAJECTORY_KEYS:
      scale = reward_scale if k in ("rewards/chosen", "rewards/rejected", "rewards/margins") else abs(t[k])
      assert abs(o[k] - t[k]) <= 1e-4 * max(scale, 1e-6), (f"step {i + 1}", k, o[k], t[k])
  assert abs(theirs[0]["rewards/margins"]) > 1e-3  # policy != reference, so the rewards are not all zero
  assert theirs[2]["logps/chosen"] != pytest.approx(theirs[0]["logps/chosen"], rel=1e-4)  # the updates moved it
