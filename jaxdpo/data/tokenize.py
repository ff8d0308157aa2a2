"""Tokenizing records with the model's own tokenizer and chat template.

Completions are found the way TRL finds them: the prompt is rendered alone (with the
generation prompt) and together with the completion; the completion is what follows the
common prefix. Masks are spans, kept as explicit lengths, never recovered from pad ids.
"""

from __future__ import annotations

import dataclasses
import os

from jaxdpo.data.records import REJECTED_HIT_LIMIT, DataError, Record

TRUNCATION_MODES = ("keep_end", "keep_start", "off")


def load_tokenizer(path: str):
  """`transformers.AutoTokenizer` from a local directory, with a clear error if it is missing."""
  if not path or not os.path.isdir(path):
    raise DataError(f"tokenizer directory {path!r} does not exist (config data.tokenizer)")
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises OSError/ValueError/... for broken dirs
    raise DataError(f"tokenizer directory {path!r} cannot be loaded: {e}") from e
  if tok.eos_token_id is None:
    raise DataError(f"tokenizer {path!r} has no eos_token; set one in tokenizer_config.json")
  return tok


def pad_token_id(tok) -> int:
  """The id batches are padded with: the tokenizer's pad token, else its EOS (many chat models
  ship without a pad token; padded positions are masked, so the choice never reaches a loss)."""
  return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _as_messages(value, role: str):
  return value if isinstance(value, list) else [{"role": role, "content": value}]


def _ids(tok, text_or_messages, *, add_generation_prompt: bool = False, chat: bool, images=None) -> list[int]:
  if images is not None:
    # Render to text, expand each image placeholder to the family's image tokens, tokenize.
    text = (tok.apply_chat_template(text_or_messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            if chat else text_or_messages)
    return images.encode(text)
  if chat:
    out = tok.apply_chat_template(text_or_messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
      out = out["input_ids"]
    return list(out)
  return list(tok(text_or_messages, add_special_tokens=False)["input_ids"])


def prompt_and_completion(tok, prompt, completion, *, use_chat_template: bool, images=None,
                          ends_turn: bool = True) -> tuple[list[int], list[int]]:
  """Token ids of the prompt and of the completion that follows it.

  With a chat template, string prompts/completions become a user/assistant turn. Without
  one, the text is concatenated and the EOS token is appended to the completion (TRL's
  convention), so that the model learns to stop. `images` (a `multimodal.RecordImages`) adds
  the record's image placeholders to the prompt and expands them to image tokens.

  `ends_turn=False` is for a sample that was cut off at the generation limit: the model never
  emitted EOS, so the completion stops at its last text token (the template's end-of-turn and
  whatever follows it are dropped; no EOS is appended).
  """
  chat = use_chat_template and (isinstance(prompt, list) or bool(getattr(tok, "chat_template", None)))
  if chat:
    p_msgs = _as_messages(prompt, "user")
    if images is not None:
      p_msgs = images.messages(p_msgs)
    c_msgs = _as_messages(completion, "assistant")
    prompt_ids = _ids(tok, p_msgs, add_generation_prompt=True, chat=True, images=images)
    full_ids = _ids(tok, p_msgs + c_msgs, chat=True, images=images)
  else:
    if isinstance(prompt, list) or isinstance(completion, list):
      raise DataError("chat-message records need a tokenizer with a chat template")
    if images is not None:
      prompt = images.plain(prompt)
    text = completion if completion.endswith(tok.eos_token) or not ends_turn else completion + tok.eos_token
    prompt_ids = _ids(tok, prompt, chat=False, images=images)
    full_ids = _ids(tok, prompt + text, chat=False, images=images)
  n = _common_prefix(prompt_ids, full_ids)
  completion_ids = full_ids[n:]
  if not ends_turn and tok.eos_token_id in completion_ids:
    completion_ids = completion_ids[:completion_ids.index(tok.eos_token_id)]
  return prompt_ids[:n], completion_ids


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
  """Token ids of one preference pair (the prompt is shared by both completions)."""

  where: str
  prompt: list[int]
  chosen: list[int]
  rejected: list[int]
  images: tuple[str, ...] = ()  # resolved image paths
  ref_logps: tuple[float, float] | None = None  # cached reference log-probs (chosen, rejected)
  image_tokens: tuple[int, ...] = ()  # image tokens per image in the prompt
  image_units: tuple[int, ...] = ()   # vision inputs per image (Qwen2.5-VL patches; 1 for Gemma 3)


def fit(prompt: list[int], completions: list[list[int]], *, max_length: int, truncation: str,
        max_prompt_length: int | None, where: str):
  """Truncates a prompt (and if needed the completions) so every prompt+completion fits.

  `keep_end` drops the start of the prompt (the end is nearest the answer); `keep_start` drops
  its end. With `off`, an over-long record is an error naming the record.
  """
  if truncation not in TRUNCATION_MODES:
    raise DataError(f"data.truncation={truncation!r}; expected one of {TRUNCATION_MODES}")
  longest = max(len(c) for c in completions)
  if len(prompt) + longest <= max_length:
    return prompt, completions
  if truncation == "off":
    raise DataError(f"{where}: field 'prompt': prompt ({len(prompt)} tokens) plus completion ({longest} tokens) "
                    f"exceeds max_length={max_length} and data.truncation is 'off'; raise data.max_length to at "
                    f"least {len(prompt) + longest} (for mined pairs, mine_summary.json's max_pair_length)")
  budget = max(max_length - longest, min(len(prompt), max_prompt_length or max_length // 2), 1)
  budget = min(budget, len(prompt), max_length - 1)
  prompt = prompt[len(prompt) - budget:] if truncation == "keep_end" else prompt[:budget]
  completions = [c[:max_length - len(prompt)] for c in completions]
  return prompt, completions


def _image_fields(images) -> dict:
  if images is None:
    return {}
  return dict(images=images.paths, image_tokens=images.tokens, image_units=images.units)


def tokenize_preference(tok, record: Record, *, max_length: int, truncation: str = "keep_end",
                        max_prompt_length: int | None = None, use_chat_template: bool = True,
                        images=None) -> TokenizedPair:
  """Tokenizes and fits one validated preference record.

  `images`: the record's measured images (`multimodal.record_images`), for vision models.
  """
  f = record.fields
  p_c, chosen = prompt_and_completion(tok, f["prompt"], f["chosen"], use_chat_template=use_chat_template,
                                      images=images)
  p_r, rejected = prompt_and_completion(tok, f["prompt"], f["rejected"], use_chat_template=use_chat_template,
                                        images=images, ends_turn=not f.get(REJECTED_HIT_LIMIT, False))
  prompt = p_c[:_common_prefix(p_c, p_r)]
  chosen = p_c[len(prompt):] + chosen
  rejected = p_r[len(prompt):] + rejected
  if not chosen or not rejected:
    raise DataError(f"{record.where}: field '{'chosen' if not chosen else 'rejected'}' tokenizes to nothing")
  prompt, (chosen, rejected) = fit(prompt, [chosen, rejected], max_length=max_length, truncation=truncation,
                                   max_prompt_length=max_prompt_length, where=record.where)
  if images is not None:
    images.check_kept(prompt, [chosen, rejected])
    return TokenizedPair(record.where, prompt, chosen, rejected, **_image_fields(images))
  return TokenizedPair(record.where, prompt, chosen, rejected, tuple(f.get("images", ())))


@dataclasses.dataclass(frozen=True)
class TokenizedSeq:
  """Token ids of one prompt + completion (SFT), or of a prompt alone (generation)."""

  where: str
  prompt: list[int]
  completion: list[int]
  images: tuple[str, ...] = ()  # resolved image paths
  image_tokens: tuple[int, ...] = ()
  image_units: tuple[int, ...] = ()


def tokenize_completion(tok, record: Record, *, max_length: int, truncation: str = "keep_end",
                        max_prompt_length: int | None = None, use_chat_template: bool = True,
                        completion_field: str = "completion", images=None) -> TokenizedSeq:
  """Tokenizes and fits one validated SFT record (`images` as in `tokenize_preference`)."""
  f = record.fields
  prompt, completion = prompt_and_completion(tok, f["prompt"], f[completion_field],
                                             use_chat_template=use_chat_template, images=images)
  if not completion:
    raise DataError(f"{record.where}: field '{completion_field}' tokenizes to nothing")
  prompt, (completion,) = fit(prompt, [completion], max_length=max_length, truncation=truncation,
                              max_prompt_length=max_prompt_length, where=record.where)
  if images is not None:
    images.check_kept(prompt, [completion])
    return TokenizedSeq(record.where, prompt, completion, **_image_fields(images))
  return TokenizedSeq(record.where, prompt, completion, tuple(f.get("images", ())))


def tokenize_prompt(tok, record: Record, *, max_prompt_length: int, truncation: str = "keep_end",
                    use_chat_template: bool = True, images=None) -> TokenizedSeq:
  """Tokenizes a prompt for generation (with the chat template's generation prompt)."""
  prompt = record.fields["prompt"]
  chat = use_chat_template and (isinstance(prompt, list) or bool(getattr(tok, "chat_template", None)))
  if chat:
    msgs = _as_messages(prompt, "user")
    ids = _ids(tok, msgs if images is None else images.messages(msgs), add_generation_prompt=True, chat=True,
               images=images)
  else:
    ids = _ids(tok, prompt if images is None else images.plain(prompt), chat=False, images=images)
  if len(ids) > max_prompt_length:
    if truncation == "off":
      raise DataError(f"{record.where}: field 'prompt' has {len(ids)} tokens, more than "
                      f"max_prompt_length={max_prompt_length}, and data.truncation is 'off'")
    ids = ids[len(ids) - max_prompt_length:] if truncation == "keep_end" else ids[:max_prompt_length]
  if images is not None:
    images.check_kept(ids, [])
    return TokenizedSeq(record.where, ids, [], **_image_fields(images))
  return TokenizedSeq(record.where, ids, [], tuple(record.fields.get("images", ())))
