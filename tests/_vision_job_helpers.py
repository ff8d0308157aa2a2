"""Shared helpers for the vision-job tests: tiny tokenizers/processors with image tokens and chat
templates, tiny random HF vision-language checkpoints (converted), PNG images and records.

Everything is built at test time in temp dirs; nothing is stored in the repository.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango red green blue one two three four five six seven cat dog fish tree").split()
EXTRA = ["transcribe", ":", "user", "assistant", "model", "<unk>"]
VOCAB = 331

# Qwen2.5-VL tiny model ids (see _qwen_vl_helpers): pad 0, bos 1, eos 2; image/video/start/end 320-323.
QWEN_SPECIALS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 320: "<|image_pad|>", 321: "<|video_pad|>",
                 322: "<|vision_start|>", 323: "<|vision_end|>"}
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")

# Gemma 3 tiny model ids (see _gemma_helpers): pad 0, eos 1, bos 2; boi 328, eoi 329, image 330.
GEMMA_SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 4: "<start_of_turn>", 5: "<end_of_turn>",
                  328: "<start_of_image>", 329: "<end_of_image>", 330: "<image_soft_token>"}
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}")


def _word_tokenizer(specials: dict[int, str], **kwargs) -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in specials.items()}
  free = (i for i in range(VOCAB) if i not in specials)
  for w in EXTRA + WORDS:
    vocab[w] = next(free)
  for i in free:
    vocab[f"w{i}"] = i
  core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
  return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **kwargs)


def qwen_processor_files(out_dir: str, min_pixels: int = 8 * 8, max_pixels: int = 32 * 32):
  """Tokenizer (ChatML-like template with image parts) + Qwen2VL PIL image processor config."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  tok = _word_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
  tok.chat_template = QWEN_TEMPLATE
  tok.save_pretrained(out_dir)
  Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                           max_pixels=max_pixels).save_pretrained(out_dir)
  return out_dir


def gemma_processor_files(out_dir: str):
  """Tokenizer (Gemma-like template with image parts) + Gemma3 PIL image processor config (27 px)."""
  from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
  tok = _word_tokenizer(GEMMA_SPECIALS, pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>",
                        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                              "image_token": "<image_soft_token>"})
  tok.chat_template = GEMMA_TEMPLATE
  tok.save_pretrained(out_dir)
  Gemma3ImageProcessorPil(size={"height": 27, "width": 27}, resample=2, rescale_factor=1 / 255,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False).save_pretrained(out_dir)
  return out_dir


def hf_processor(family: str, tok_dir: str, monkeypatch):
  """transformers' processor for the family, from the tokenizer dir's files."""
  from transformers import AutoTokenizer, processing_utils
  tok = AutoTokenizer.from_pretrained(tok_dir)
  if family == "qwen2_5_vl":
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    # Only the class check needs torchvision's video processor; images never touch it.
    monkeypatch.setattr(processing_utils.ProcessorMixin, "check_argument_for_proper_class", lambda *a: None)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(tok_dir), tokenizer=tok,
                               video_processor=None, chat_template=tok.chat_template)
  from transformers import Gemma3Processor
  from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
  return Gemma3Processor(image_processor=Gemma3ImageProcessorPil.from_pretrained(tok_dir), tokenizer=tok,
                         chat_template=tok.chat_template, image_seq_length=9)


def build_checkpoint(family: str, root: str, seed: int = 0, embed_std: float = 0.05,
                     qwen_kw: dict | None = None) -> tuple[str, object]:
  """A tiny random HF model saved with `save_pretrained`, processor files added, converted.

  `qwen_kw`: extra `_qwen_vl_helpers.tiny_hf_config` arguments (e.g. a shallower vision tower).
  Returns (converted checkpoint dir, the HF model in eval mode).
  """
  import _gemma_helpers
  import _qwen_vl_helpers
  from jaxdpo.models import io
  hf_dir, ck_dir = os.path.join(root, f"{family}_hf"), os.path.join(root, f"{family}_ck")
  if family == "qwen2_5_vl":
    hf = _qwen_vl_helpers.build_hf_model(hf_dir, seed=seed, init_std=0.3, **(qwen_kw or {}))
    qwen_processor_files(hf_dir)
  else:
    hf = _gemma_helpers.tiny_vlm(seed=seed, embed_std=embed_std)
    hf.save_pretrained(hf_dir)
    gemma_processor_files(hf_dir)
  io.hf_to_jax_dir(hf_dir, ck_dir)
  return ck_dir, hf


def write_png(path: str, size: tuple[int, int], seed: int) -> str:
  """A random RGB PNG of `size` (width, height)."""
  rng = np.random.RandomState(seed)
  Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
  return path


IMAGE_SIZES = [(32, 24), (24, 32), (16, 16), (40, 16)]


def write_images(data_dir: str, n: int = 4) -> list[str]:
  """`n` PNGs in `data_dir/img/`; returns their paths relative to `data_dir`."""
  os.makedirs(os.path.join(data_dir, "img"), exist_ok=True)
  rel = []
  for i in range(n):
    name = f"img/page{i}.png"
    write_png(os.path.join(data_dir, name), IMAGE_SIZES[i % len(IMAGE_SIZES)], seed=100 + i)
    rel.append(name)
  return rel


def words(rng, k: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(k))


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def vision_records(data_dir: str, n: int = 6, seed: int = 0):
  """SFT, prompt and preference records over PNGs in `data_dir` (relative paths).

  Records carry 0, 1 or 2 images (one text-only record), so batches mix image counts.
  Returns (sft path, prompts path, prefs path).
  """
  rng = np.random.RandomState(seed)
  imgs = write_images(data_dir, 4)
  sets = [[imgs[0]], [imgs[1], imgs[2]], [], [imgs[3]], [imgs[2]], [imgs[0], imgs[3]]]
  sft, prompts, prefs = [], [], []
  for i in range(n):
    text = words(rng, 3)
    img = sets[i % len(sets)]
    extra = {"images": img} if img else {}
    sft.append({"prompt": "transcribe :", "completion": text, **extra})
    prompts.append({"prompt": "transcribe :", "reference": text, **extra})
    loop = text.split()[:1] * 6
    prefs.append({"prompt": "transcribe :", "chosen": text, "rejected": " ".join(loop), **extra})
  return (write_jsonl(os.path.join(data_dir, "sft.jsonl"), sft),
          write_jsonl(os.path.join(data_dir, "prompts.jsonl"), prompts),
          write_jsonl(os.path.join(data_dir, "prefs.jsonl"), prefs))
