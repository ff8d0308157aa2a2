"""Mined pairs: a rejected sample cut off at the limit gets no EOS; too-long pairs name the fix."""

from __future__ import annotations

import pytest

from jaxdpo import assets
from jaxdpo.data import records, tokenize

LOOP = " ".join(["red green"] * 10)


@pytest.fixture(scope="module")
def tok():
  return tokenize.load_tokenizer(assets.path("tiny_tokenizer"))


def _pair(**extra):
  return records.validate_preference("pairs.jsonl:1", {"prompt": "transcribe : red green blue", "chosen": "red green blue",
                                                       "rejected": LOOP, **extra})


@pytest.mark.parametrize("chat", [True, False])
def test_rejected_that_hit_the_limit_gets_no_eos(tok, chat):
  eos = tok.eos_token_id
  cut = tokenize.tokenize_preference(tok, _pair(rejected_hit_limit=True), max_length=256, use_chat_template=chat)
  assert eos not in cut.rejected
  loop_ids = tok(LOOP, add_special_tokens=False)["input_ids"]
  assert cut.rejected[-len(loop_ids) + 1:] == loop_ids[1:]  # ends with the loop itself, nothing after it
  assert eos in cut.chosen  # the chosen transcription still ends its turn
  # Without the flag (a rejected sample that did stop), the rejected keeps its EOS.
  stopped = tokenize.tokenize_preference(tok, _pair(rejected_hit_limit=False), max_length=256,
                                         use_chat_template=chat)
  assert eos in stopped.rejected and stopped.chosen == cut.chosen and stopped.prompt == cut.prompt
  unflagged = tokenize.tokenize_preference(tok, _pair(), max_length=256, use_chat_template=chat)
  assert unflagged == stopped


def test_flag_must_be_boolean():
  with pytest.raises(records.DataError, match="pairs.jsonl:1: field 'rejected_hit_limit'"):
    _pair(rejected_hit_limit="yes")


def test_too_long_pair_names_the_key_to_raise(tok):
  full = tokenize.tokenize_preference(tok, _pair(rejected_hit_limit=True), max_length=256)
  need = len(full.prompt) + max(len(full.chosen), len(full.rejected))
  with pytest.raises(records.DataError, match=rf"raise data.max_length to at least {need} .*max_pair_length"):
    tokenize.tokenize_preference(tok, _pair(rejected_hit_limit=True), max_length=need - 1, truncation="off")
  fits = tokenize.tokenize_preference(tok, _pair(rejected_hit_limit=True), max_length=need, truncation="off")
  assert fits == full


def test_shipped_mine_prompts_are_not_the_eval_prompts():
  import importlib.util
  import json
  import os

  def prompts_of(config_name):
    spec = importlib.util.spec_from_file_location(config_name, os.path.join(os.path.dirname(__file__), "..",
                                                                            "configs", f"{config_name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.get_config().data.prompts
    with open(path) as f:
      return path, {json.loads(line)["prompt"] for line in f if line.strip()}

  eval_path, eval_prompts = prompts_of("tiny_eval")
  mine_path, mine_prompts = prompts_of("tiny_mine")
  assert eval_path != mine_path and mine_prompts and eval_prompts
  assert not eval_prompts & mine_prompts
