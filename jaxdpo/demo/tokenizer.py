"""The demo's word-level tokenizer and image-processor config, written next to the pages.

Ids are contiguous (0..63, no gaps), so `len(tokenizer)` equals the `demo_vl` preset's
vocabulary and generation's `vocab_limit` masks nothing that the tokenizer has: vision ids
60-63 match the preset's image / video / vision-start / vision-end ids. The Gemma 3 variant
(`write_gemma`, preset `demo_gemma`) has 66 contiguous ids, its image tokens at 63-65.
"""

from __future__ import annotations

from jaxdpo.demo import script

SPECIALS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<unk>"}
PROMPT_WORDS = ("transcribe", ":", "user", "assistant", script.LINE_BREAK)
VISION = {60: "<|image_pad|>", 61: "<|video_pad|>", 62: "<|vision_start|>", 63: "<|vision_end|>"}
VOCAB_SIZE = 64

# ChatML-like; an image content part becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the Qwen2.5-VL adapter expands to one <|image_pad|> per merged vision token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


# The Gemma 3 variant: Gemma's special tokens first, its "model" role word, then the same words; the three
# image tokens last (ids 63-65 = `demo_gemma`'s boi / eoi / image soft token), 66 ids in all.
GEMMA_SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<start_of_turn>", 5: "<end_of_turn>"}
GEMMA_IMAGE = {63: "<start_of_image>", 64: "<end_of_image>", 65: "<image_soft_token>"}
GEMMA_VOCAB_SIZE = 66
# Gemma's turn format; an image part becomes <start_of_image>, which the Gemma 3 adapter expands to
# boi + one <image_soft_token> per pooled vision token + eoi.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}")


def _contiguous(specials: dict[int, str], words, tail: dict[int, str], size: int) -> dict[str, int]:
  vocab = {t: i for i, t in specials.items()}
  for w in words:
    vocab[w] = len(vocab)
  vocab.update({t: i for i, t in tail.items()})
  assert sorted(vocab.values()) == list(range(size)), "demo tokenizer ids must be contiguous"
  return vocab


def gemma_vocabulary() -> dict[str, int]:
  return _contiguous(GEMMA_SPECIALS, PROMPT_WORDS + ("model",) + script.WORDS, GEMMA_IMAGE, GEMMA_VOCAB_SIZE)


def vocabulary() -> dict[str, int]:
  return _contiguous(SPECIALS, PROMPT_WORDS + script.WORDS, VISION, VOCAB_SIZE)


def write(out_dir: str, *, patch_size: int, merge_size: int, temporal_patch_size: int, min_pixels: int,
          max_pixels: int) -> str:
  """Writes the tokenizer (with chat template) and a Qwen2-VL PIL image-processor config.

  `min_pixels` / `max_pixels` are the smallest and largest page areas over the splits: a page
  whose sides are multiples of `patch_size * merge_size` and whose area lies between them is
  never resized, so each glyph stays on its own merged vision token.
  """
  if not 0 < min_pixels <= max_pixels:
    raise ValueError(f"demo tokenizer: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in list(SPECIALS.values()) + list(VISION.values())])
  tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                eos_token="<|im_end|>")
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(out_dir)
  Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
                           min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out_dir)
  return out_dir


def write_gemma(out_dir: str, *, image_size: int) -> str:
  """Writes the Gemma 3 variant's tokenizer (with chat template) and a Gemma 3 PIL image-processor config.

  SigLIP sees a fixed `image_size` square: the variant's pages are rendered at exactly that size, so the
  processor's resize keeps every pixel and each glyph stays on its own pooled image token.
  """
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

  core = Tokenizer(models.WordLevel(vocab=gemma_vocabulary(), unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in list(GEMMA_SPECIALS.values()) + list(GEMMA_IMAGE.values())])
  tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                eos_token="<end_of_turn>",
                                extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                      "image_token": "<image_soft_token>"})
  tok.chat_template = GEMMA_CHAT_TEMPLATE
  tok.save_pretrained(out_dir)
  Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2, rescale_factor=1 / 255,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False).save_pretrained(out_dir)
  return out_dir
