"""The demo's word-level tokenizer and image-processor config, written next to the pages.

Ids are contiguous (0..63, no gaps), so `len(tokenizer)` equals the `demo_vl` preset's
vocabulary and generation's `vocab_limit` masks nothing that the tokenizer has: vision ids
60-63 match the preset's image / video / vision-start / vision-end ids.
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


def vocabulary() -> dict[str, int]:
  vocab = {t: i for i, t in SPECIALS.items()}
  for w in PROMPT_WORDS + script.WORDS:
    vocab[w] = len(vocab)
  vocab.update({t: i for i, t in VISION.items()})
  assert sorted(vocab.values()) == list(range(VOCAB_SIZE)), "demo tokenizer ids must be contiguous"
  return vocab


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
