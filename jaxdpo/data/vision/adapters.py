"""Images in the jobs' data path: per-family adapters, chosen from the model family.

A record's images (`"images": [paths]`, relative to the data file's directory or absolute)
enter a prompt in three steps, the same for every family:

  1. the prompt becomes a user message whose content holds one `{"type": "image"}` part per
     image (in front of the text; chat-message prompts that already hold image parts keep
     them), rendered with the tokenizer's own chat template;
  2. each placeholder the template wrote is expanded to the family's image tokens, as the
     family's transformers processor does (`<|image_pad|>` x grid_t*grid_h*grid_w/merge^2 for
     Qwen2.5-VL; "\\n\\n" boi + mm_tokens_per_image image tokens + eoi "\\n\\n" for Gemma 3);
  3. the text is tokenized without adding special tokens (the template wrote them).

Images are opened and measured when records are tokenized (so a missing or unreadable image
stops a job before any training, naming `file:line` and the field) and preprocessed again
when batches are collated, so a dataset's pixels never sit in memory all at once.

Batches keep a leading batch axis on every leaf, with a static image/patch budget
(`data.max_images`, `data.max_patches`; 0 = the largest need among the job's records), so
the sharding of the text path applies unchanged and a step compiles once. See
`jaxdpo.models.batching` and the family modules for the layouts and their conversion to model inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
from collections.abc import Sequence

from jaxdpo.data.records import DataError, Record, resolve_image_paths
from jaxdpo.data.vision import images as images_lib
from jaxdpo.models import registry

IMAGE_FIELD = "images"


@dataclasses.dataclass(frozen=True)
class Budget:
  """Static vision budget of a batch row: images per record, and vision inputs per record
  (patches for Qwen2.5-VL; unused by Gemma 3, whose images have a fixed size)."""

  max_images: int
  max_patches: int = 0


class VisionAdapter:
  """Family-specific image handling. Subclasses define the class attributes and methods below.

  Attributes:
    family: the registered model family (its `model_inputs` and `row_positions` hooks).
    image_token_id: the id of the (expanded) image tokens.
    placeholder_token: the token the chat template writes once per image, expanded later.
    requested: the configured budget (0 = the largest need among the job's records).
    budget: None until `with_budget` fixes it.
  """

  def __init__(self, family: registry.Family, model_cfg, tok, tokenizer_dir: str, requested: Budget):
    self.family = family
    self.model_cfg = model_cfg
    self.tok = tok
    self.tokenizer_dir = tokenizer_dir
    self.requested = requested
    self.budget: Budget | None = None
    self.image_token_id = model_cfg.image_token_id
    load_chat_template(tok, tokenizer_dir)

  def preprocessor_dir(self) -> str | None:
    """The tokenizer directory when it holds a preprocessor_config.json (the image processor's
    settings), else None: the family's image processor then takes the model's own values."""
    found = bool(self.tokenizer_dir) and os.path.isfile(os.path.join(self.tokenizer_dir, "preprocessor_config.json"))
    return self.tokenizer_dir if found else None

  # ---- per family ----------------------------------------------------------------------------

  image_token_id: int
  placeholder_token: str
  uses_patches: bool = False  # whether the budget counts vision inputs (patches) besides images

  def round_budget(self, budget: Budget) -> Budget:
    """The budget as the family's model needs it (e.g. patches in whole merge units)."""
    return budget

  def plain_placeholder(self) -> str:
    """What one image looks like in a prompt without a chat template."""
    raise NotImplementedError

  def expansion(self, num_tokens: int) -> str:
    """The text that replaces one placeholder for an image of `num_tokens` image tokens."""
    raise NotImplementedError

  def measure(self, path: str) -> tuple[int, int]:
    """(image tokens, vision inputs) of one image file; raises `ImageError` naming it."""
    raise NotImplementedError

  def collate(self, examples: Sequence, text: dict, *, pairs: bool) -> dict:
    """Vision arrays (leading batch axis) for `examples`, given the collated text arrays."""
    raise NotImplementedError

  # ---- shared --------------------------------------------------------------------------------

  def record_images(self, record: Record, base_dir: str) -> "RecordImages | None":
    """Resolves, opens and measures a record's images (None when it has none)."""
    paths = record.fields.get(IMAGE_FIELD) or []
    if not paths:
      return None
    full = resolve_image_paths(record, paths, base_dir)
    tokens, units = [], []
    for p in full:
      try:
        t, u = self.measure(p)
      except images_lib.ImageError as e:
        raise DataError(f"{record.where}: field '{IMAGE_FIELD}': {e}") from None
      tokens.append(t)
      units.append(u)
    return RecordImages(self, record.where, tuple(full), tuple(tokens), tuple(units))

  def token_string(self, token_id: int, what: str) -> str:
    """The tokenizer's string for one of the model's special ids; an error if they disagree."""
    s = self.tok.convert_ids_to_tokens(int(token_id))
    if s is None or self.tok.convert_tokens_to_ids(s) != token_id:
      raise DataError(f"tokenizer {self.tokenizer_dir!r} has no {what} token with id {token_id}, which the "
                      f"{self.family.name} model uses")
    return s

  def with_budget(self, *example_lists: Sequence) -> "VisionAdapter":
    """Fixes the static budget from the job's tokenized examples (explicit values are checked).

    Raises:
      DataError: naming the first record that needs more than an explicit budget.
    """
    examples = [e for lst in example_lists for e in lst]
    need_images = max([len(e.images) for e in examples] + [0])
    need_units = max([sum(e.image_units) for e in examples] + [0])
    req = self.requested
    for e in examples:
      if req.max_images > 0 and len(e.images) > req.max_images:
        raise DataError(f"{e.where}: field '{IMAGE_FIELD}': {len(e.images)} images exceed "
                        f"data.max_images={req.max_images}")
      if req.max_patches > 0 and self.uses_patches and sum(e.image_units) > req.max_patches:
        raise DataError(f"{e.where}: field '{IMAGE_FIELD}': the images need {sum(e.image_units)} patches, more than "
                        f"data.max_patches={req.max_patches}")
    images = req.max_images if req.max_images > 0 else need_images
    units = (req.max_patches if req.max_patches > 0 else need_units) if self.uses_patches and images else 0
    out = copy.copy(self)
    out.budget = self.round_budget(Budget(images, units))
    return out

  def check_budget(self, example, n_images: int, n_units: int):
    """Called by `collate`: an example beyond the fixed budget is an error naming it."""
    b = self.budget
    if b is None:
      raise RuntimeError("VisionAdapter.with_budget must run before batches are collated")
    if n_images > b.max_images or (self.uses_patches and n_units > b.max_patches):
      raise DataError(f"{example.where}: field '{IMAGE_FIELD}': {n_images} images / {n_units} vision inputs exceed the "
                      f"batch budget ({b.max_images} images, {b.max_patches} patches; data.max_images / "
                      "data.max_patches)")


@dataclasses.dataclass(frozen=True)
class RecordImages:
  """One record's images, measured, bound to the adapter that renders them into prompts."""

  adapter: VisionAdapter
  where: str
  paths: tuple[str, ...]
  tokens: tuple[int, ...]  # image tokens per image
  units: tuple[int, ...]   # vision inputs per image (patches for Qwen2.5-VL)

  def messages(self, msgs: list) -> list:
    """Adds one image part per image to the first user message, unless parts are already there."""
    have = sum(1 for m in msgs if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")
    if have:
      if have != len(self.paths):
        raise DataError(f"{self.where}: field '{IMAGE_FIELD}': the prompt's messages hold {have} image parts for "
                        f"{len(self.paths)} images")
      return msgs
    out = [dict(m) for m in msgs]
    for m in out:
      if m.get("role") == "user":
        text = m["content"]
        parts = text if isinstance(text, list) else [{"type": "text", "text": text}]
        m["content"] = [{"type": "image"} for _ in self.paths] + parts
        return out
    raise DataError(f"{self.where}: field 'prompt': images need a user message to go into")

  def plain(self, prompt: str) -> str:
    """A prompt without a chat template: the images' placeholders, then the text."""
    return self.adapter.plain_placeholder() * len(self.paths) + prompt

  def encode(self, text: str) -> list[int]:
    """Expands the placeholders of rendered text and tokenizes it (no special tokens added)."""
    a = self.adapter
    pieces = text.split(a.placeholder_token)
    if len(pieces) - 1 != len(self.paths):
      raise DataError(f"{self.where}: field '{IMAGE_FIELD}': the rendered prompt holds {len(pieces) - 1} image "
                      f"placeholders ({a.placeholder_token!r}) for {len(self.paths)} images; does the chat template "
                      "write image content parts?")
    out = pieces[0]
    for n, piece in zip(self.tokens, pieces[1:]):
      out += a.expansion(n) + piece
    ids = list(a.tok(out, add_special_tokens=False)["input_ids"])
    if sum(1 for i in ids if i == a.image_token_id) != sum(self.tokens):
      raise DataError(f"{self.where}: field '{IMAGE_FIELD}': the tokenizer does not keep image tokens whole "
                      f"(id {a.image_token_id}); is it the model's tokenizer?")
    return ids

  def check_kept(self, prompt: list[int], completions: Sequence[list[int]]):
    """After truncation: every image token is still in the prompt, none in the completions."""
    tid = self.adapter.image_token_id
    kept = sum(1 for i in prompt if i == tid)
    if kept != sum(self.tokens):
      raise DataError(f"{self.where}: field '{IMAGE_FIELD}': truncation cut the prompt's image tokens ({kept} of "
                      f"{sum(self.tokens)} kept); raise data.max_length / data.max_prompt_length (training) or "
                      "generate.max_prompt_length (generation), or shorten the prompt")
    if any(i == tid for c in completions for i in c):
      raise DataError(f"{self.where}: a completion contains image tokens (id {tid})")




def adapter_for(family: registry.Family, model_cfg, tok, tokenizer_dir: str,
                requested: Budget = Budget(0, 0)) -> VisionAdapter | None:
  """The adapter the family registers (`Family.vision_adapter`), or None for text-only families.

  Args:
    family: the model family; its registration names the adapter class.
    model_cfg: the family's model config (image token ids, the vision tower's sizes).
    tok: the model's tokenizer.
    tokenizer_dir: where `tok` came from (preprocessor_config.json, chat_template.json).
    requested: the configured image budget (`data.max_images`, `data.max_patches`).
  """
  if family.vision_adapter is None:
    return None
  module, _, name = family.vision_adapter.partition(":")
  return getattr(importlib.import_module(module), name)(family, model_cfg, tok, tokenizer_dir, requested)


def model_inputs(vision: VisionAdapter | None):
  """The `(batch, rows_per_record) -> model inputs` of the adapter's family (text layout without one)."""
  return vision.family.model_inputs if vision is not None else registry.Family.model_inputs


def record_images(vision: VisionAdapter | None, record: Record, base_dir: str) -> RecordImages | None:
  """A record's images through `vision`; an error naming the record when the model takes none."""
  if not record.fields.get(IMAGE_FIELD):
    return None
  if vision is None:
    with_vision = sorted(f.name for f in registry.families().values() if f.vision_adapter)
    raise DataError(f"{record.where}: field '{IMAGE_FIELD}': the model has no vision tower (use a vision-language "
                    f"family: {' or '.join(with_vision)})")
  return vision.record_images(record, base_dir)


def base_dir_of(source: str) -> str:
  """Directory that relative image paths of `source` are resolved against."""
  return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()


def load_chat_template(tok, tokenizer_dir: str):
  """Older processors keep the chat template in chat_template.json only; the tokenizer gets it."""
  if getattr(tok, "chat_template", None):
    return
  path = os.path.join(tokenizer_dir or "", "chat_template.json")
  if os.path.isfile(path):
    import json
    with open(path) as f:
      tok.chat_template = json.load(f).get("chat_template")
