"""Data loading and tokenization: formats, chat messages, masks from explicit spans."""

import json

import numpy as np
import pytest

from jaxdpo.data import pipeline, records, tokenize
from tests._dpo_helpers import tokenizer


def test_parquet_and_jsonl_load_the_same_records(tmp_path):
  import datasets
  rows = [{"prompt": f"transcribe : cat {i}", "chosen": "cat", "rejected": "cat cat cat"} for i in range(3)]
  jl = tmp_path / "d.jsonl"
  jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  pq = tmp_path / "d.parquet"
  datasets.Dataset.from_list(rows).to_parquet(str(pq))
  a, b = records.load_preferences(str(jl)), records.load_preferences(str(pq))
  assert [r.fields for r in a] == [r.fields for r in b] == rows
  assert a[2].where == f"{jl}:3" and b[2].where == f"{pq}:row 2"


def test_chat_message_records_use_the_chat_template():
  tok = tokenizer()
  rec = records.validate_preference("x:1", {
      "prompt": [{"role": "user", "content": "transcribe : alpha bravo"}],
      "chosen": [{"role": "assistant", "content": "alpha bravo"}],
      "rejected": [{"role": "assistant", "content": "alpha alpha alpha"}]})
  pair = tokenize.tokenize_preference(tok, rec, max_length=64)
  assert tok.decode(pair.prompt).split() == ["<|im_start|>", "user", "transcribe", ":", "alpha", "bravo",
                                              "<|im_end|>", "<|im_start|>", "assistant"]
  assert tok.decode(pair.chosen).split() == ["alpha", "bravo", "<|im_end|>"]
  string_rec = records.validate_preference("x:2", {"prompt": "transcribe : alpha bravo", "chosen": "alpha bravo",
                                                   "rejected": "alpha alpha alpha"})
  assert tokenize.tokenize_preference(tok, string_rec, max_length=64) == tokenize.TokenizedPair(
      "x:2", pair.prompt, pair.chosen, pair.rejected)


def test_masks_come_from_spans_even_when_pad_equals_eos():
  tok = tokenizer()
  pair = tokenize.TokenizedPair("x", [5, 6, 7], [8, tok.eos_token_id], [9, 9, 9, tok.eos_token_id])
  batch = pipeline.collate_pairs([pair], max_length=10, pad_id=tok.eos_token_id)  # pad == EOS on purpose
  np.testing.assert_array_equal(batch["loss_mask"][0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0, 0], [1] * 5 + [0] * 5)
  np.testing.assert_array_equal(batch["positions"][0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 0, 0])


def test_reference_free_and_hinge_losses():
  import jax.numpy as jnp
  from jaxdpo.objectives import dpo_losses as losses
  pc, pr = jnp.array([-5.0, -2.0]), jnp.array([-6.0, -1.0])
  rc, rr = jnp.array([-4.0, -4.0]), jnp.array([-4.0, -4.0])
  n = jnp.array([2.0, 2.0])
  free, ratio_c, _ = losses.pair_losses(pc, pr, rc, rr, n, n, losses.DPOLossConfig(reference_free=True, beta=0.5))
  np.testing.assert_allclose(ratio_c, pc)  # the reference is ignored
  np.testing.assert_allclose(free, -np.log(1 / (1 + np.exp(-0.5 * np.array([1.0, -1.0])))), rtol=1e-6)
  hinge, _, _ = losses.pair_losses(pc, pr, rc, rr, n, n, losses.DPOLossConfig(loss_type="hinge", beta=0.5))
  np.testing.assert_allclose(hinge, [0.5, 1.5])
  with pytest.raises(ValueError, match="loss_type"):
    losses.DPOLossConfig(loss_type="sigmod")


def test_tensorboard_writes_events(tmp_path):
  pytest.importorskip("tensorboardX")
  from jaxdpo.train.metrics import MetricsWriter
  w = MetricsWriter(str(tmp_path), tensorboard=True)
  w.write(1, {"loss": 0.5})
  w.close()
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5
