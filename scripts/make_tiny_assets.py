"""Builds the embedded demo assets: a tiny word-level tokenizer and a small preference set.

  python scripts/make_tiny_assets.py            # rewrites jaxdpo/assets/

The preference set imitates the OCR degeneration problem in miniature: the prompt asks to
transcribe a few words; *chosen* is the exact transcription (then EOS), *rejected* starts
right and then falls into a loop repeating a fragment, as a degenerate model does. A tiny
model learns to separate them in a couple of hundred steps, which makes the demo converge.
"""

from __future__ import annotations

import json
import os
import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue black white gray "
         "north south east west one two three four five six seven eight nine zero cat dog fish bird tree "
         "river stone cloud rain snow").split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
EXTRA = ["transcribe", ":", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "jaxdpo", "assets")


def build_tokenizer(out_dir: str) -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in enumerate(SPECIALS + EXTRA + list(WORDS))}
  core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(out_dir)
  return tok


def make_pair(rng: random.Random) -> dict:
  k = rng.randint(3, 8)
  words = [rng.choice(WORDS) for _ in range(k)]
  start = rng.randint(1, k - 1)
  period = rng.randint(1, 3)
  fragment = words[max(0, start - period):start] or words[:1]
  loop = words[:start]
  while len(loop) < 2 * k + 8:
    loop += fragment
  return {"prompt": "transcribe : " + " ".join(words), "chosen": " ".join(words), "rejected": " ".join(loop)}


def main():
  os.makedirs(ASSETS, exist_ok=True)
  build_tokenizer(os.path.join(ASSETS, "tiny_tokenizer"))
  rng = random.Random(1234)
  for name, n in (("tiny_prefs.jsonl", 320), ("tiny_prefs_eval.jsonl", 32)):
    with open(os.path.join(ASSETS, name), "w") as f:
      for _ in range(n):
        f.write(json.dumps(make_pair(rng)) + "\n")
  rng = random.Random(99)  # separate stream: the preference files above stay unchanged
  with open(os.path.join(ASSETS, "tiny_sft.jsonl"), "w") as f:
    for _ in range(256):
      p = make_pair(rng)
      f.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n")
  with open(os.path.join(ASSETS, "tiny_prompts.jsonl"), "w") as f:
    for _ in range(24):
      p = make_pair(rng)
      f.write(json.dumps({"prompt": p["prompt"], "reference": p["chosen"]}) + "\n")
  write_mine_prompts()
  print(f"wrote {ASSETS}")


def write_mine_prompts(n: int = 24):
  """Prompts for the mine job, disjoint from tiny_prompts.jsonl (the eval set): mining on the eval
  prompts would train DPO on the very pages it is then scored on."""
  with open(os.path.join(ASSETS, "tiny_prompts.jsonl")) as f:
    taken = {json.loads(line)["prompt"] for line in f if line.strip()}
  rng = random.Random(2024)  # its own stream: the files above stay unchanged
  with open(os.path.join(ASSETS, "tiny_mine_prompts.jsonl"), "w") as f:
    written = 0
    while written < n:
      p = make_pair(rng)
      if p["prompt"] in taken:
        continue
      taken.add(p["prompt"])
      f.write(json.dumps({"prompt": p["prompt"], "reference": p["chosen"]}) + "\n")
      written += 1


if __name__ == "__main__":
  main()
