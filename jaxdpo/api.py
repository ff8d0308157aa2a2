"""The public Python API: load a converted checkpoint, build inputs, run logits, generate, score pairs.

These names are stable; everything else in the package may move. Inputs are plain dicts of
arrays (the layout every family's `hidden_states` and `prefill` take), so they can be inspected,
padded or batched by hand.

    jaxdpo.api.convert("hf/Qwen2.5-0.5B", "runs/qwen2")          # once
    family, config, model = jaxdpo.api.load("runs/qwen2")
    tok = transformers.AutoTokenizer.from_pretrained("runs/qwen2/tokenizer")
    inputs = jaxdpo.api.model_inputs(family, tok, ["The capital of France is"])
    logits = jaxdpo.api.logits(model, inputs)                    # [B, T, V] fp32
    out = jaxdpo.api.generate(model, inputs, max_new_tokens=16)  # greedy
    text = tok.batch_decode(out.tokens, skip_special_tokens=True)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdpo.data import pipeline, records, tokenize, tokenizer_check
from jaxdpo.generation import decode
from jaxdpo.generation.decode import GenerationOutput
from jaxdpo.models import io, registry
from jaxdpo.objectives import logprobs

__all__ = ["GenerationOutput", "convert", "families", "generate", "load", "logits", "model_inputs", "pair_logps",
           "preference_batch"]


def families() -> list[str]:
  """Names of the model families a checkpoint can hold (e.g. "qwen2", "qwen2_5_vl", "gemma3")."""
  return sorted(registry.families())


def convert(hf_dir: str, out_dir: str, *, overwrite: bool = False, tokenizer: str | bool = True) -> str:
  """Converts an HF checkpoint directory (config.json + safetensors, tokenizer files) into a
  jaxdpo checkpoint directory, as `python -m jaxdpo.convert hf-to-jax` does; returns `out_dir`.

  `tokenizer`: True checks that the tokenizer (and a vision model's image processor) loads from
  `hf_dir` and copies it; a directory takes those files from there instead; False converts the
  weights only. A tokenizer that does not load raises `TokenizerSourceError` before anything is
  written."""
  check = functools.partial(tokenizer_check.require, given=isinstance(tokenizer, str),
                            pass_dir="tokenizer=DIR", skip="tokenizer=False")
  return io.hf_to_jax_dir(hf_dir, out_dir, overwrite=overwrite, tokenizer=tokenizer, check_tokenizer=check)


def load(checkpoint_dir: str, *, param_dtype=jnp.float32) -> tuple[str, Any, nnx.Module]:
  """Loads a converted checkpoint (`python -m jaxdpo.convert hf-to-jax`, or a job's `DIR/model`).

  Args:
    checkpoint_dir: the converted checkpoint directory.
    param_dtype: dtype to hold the parameters in.

  Returns:
    (family name, the family's frozen config, the nnx model with its parameters).
  """
  family, cfg, graphdef, params = io.load_model(checkpoint_dir, param_dtype=param_dtype)
  return family.name, cfg, nnx.merge(graphdef, params)


def _text_config(config):
  return getattr(config, "text", config)


def model_inputs(family: str, tokenizer, texts: str | Sequence, images=None, *, chat: bool = False,
                 length: int | None = None) -> dict[str, np.ndarray]:
  """Tokenizes prompts into a left-padded batch that `logits` and `generate` take.

  Args:
    family: a family name (as `load` returns it).
    tokenizer: the checkpoint's `transformers` tokenizer (its `tokenizer/` folder).
    texts: one prompt or a list of prompts; a prompt is a string, or a list of chat messages
      ({"role", "content"}) rendered with the tokenizer's chat template.
    images: not supported here yet; image inputs are built by the jobs' data path.
    chat: render string prompts as a user turn with the chat template (and the generation prompt).
    length: padded length (default: the longest prompt).

  Returns:
    {"input_ids", "segment_ids", "positions"}: int32 [B, T], left-padded; segment 0 marks
    padding, positions count real tokens.

  Raises:
    ValueError: for an unknown family, images, or an empty prompt.
  """
  registry.get_family(family)  # names the known families when this one is not
  if images is not None:
    raise ValueError("model_inputs does not build image inputs yet; use the jobs' data path "
                     "(jaxdpo.data.vision) for images")
  prompts = [texts] if isinstance(texts, str) or _is_messages(texts) else list(texts)
  ids = []
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, list) or chat:
      messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
      out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
      row = list(out["input_ids"] if hasattr(out, "keys") else out)
    else:
      row = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not row:
      raise ValueError(f"prompt {i} tokenizes to nothing")
    ids.append(row)
  pad = tokenize.pad_token_id(tokenizer)
  batch = pipeline.collate_prompts_left(ids, length=length or max(map(len, ids)), pad_id=pad)
  seg = batch["segment_ids"]
  batch["positions"] = np.where(seg > 0, np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  return batch


def _is_messages(x) -> bool:
  return isinstance(x, list) and bool(x) and isinstance(x[0], dict)


@nnx.jit
def _logits(model, inputs):
  return model.logits(model.hidden_states(inputs)).astype(jnp.float32)


def logits(model: nnx.Module, inputs: dict) -> jax.Array:
  """Full fp32 logits [B, T, V] of a batch (from `model_inputs`, or any dict in the family's layout)."""
  return _logits(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def generate(model: nnx.Module, inputs: dict, max_new_tokens: int, *, eos_token_id=None, pad_token_id=None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> GenerationOutput:
  """Continues each left-padded prompt; greedy unless `temperature` > 0.

  Args:
    model: from `load`.
    inputs: left-padded prompts (`model_inputs`); `input_ids` and `segment_ids` at least.
    max_new_tokens: tokens per row, EOS included.
    eos_token_id: an id or ids that end a row (default: the model config's).
    pad_token_id: emitted after a row ends (default: the config's pad id, else the first EOS).
    temperature, top_p, top_k: sampling controls (see `jaxdpo.generation.decode.generate`).
    seed: PRNG seed when sampling.

  Returns:
    `GenerationOutput`: `tokens` int32 [B, max_new_tokens] (new tokens only), `num_generated`,
    `hit_limit`.
  """
  cfg = _text_config(model.config)
  if eos_token_id is None:
    eos_token_id = getattr(cfg, "eos_token_ids", None) or getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
      raise ValueError("the model config has no eos token id; pass eos_token_id")
  if pad_token_id is None:
    pad_token_id = getattr(cfg, "pad_token_id", None)
    if pad_token_id is None:
      pad_token_id = int(np.atleast_1d(eos_token_id)[0])
  rng = jax.random.key(seed) if temperature > 0 else None
  return decode.generate(model, dict(inputs), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, rng=rng, temperature=temperature, top_p=top_p, top_k=top_k)


def preference_batch(tokenizer, pairs: Sequence[dict], *, max_length: int, use_chat_template: bool = False,
                     truncation: str = "keep_end") -> dict[str, np.ndarray]:
  """Tokenizes text preference pairs into the [B, 2, T] batch that `pair_logps` scores.

  Args:
    tokenizer: the checkpoint's tokenizer.
    pairs: dicts with "prompt", "chosen" and "rejected" (strings, or chat messages with
      `use_chat_template`), as in the DPO job's JSONL records.
    max_length: padded length of each row; longer pairs are truncated as `truncation` says.
    use_chat_template: render with the tokenizer's chat template (as the DPO job does by default).
    truncation: "keep_end", "keep_start" or "off" (too long is then an error).

  Returns:
    {"input_ids", "segment_ids", "positions", "loss_mask"}: int32 [B, 2, T]; row 0 chosen,
    row 1 rejected; `loss_mask` marks completion tokens.
  """
  tokenized = []
  for i, fields in enumerate(pairs):
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in fields]
    if missing:
      raise ValueError(f"pair {i} lacks {missing}")
    record = records.Record(where=f"pair {i}", fields=dict(fields))
    tokenized.append(tokenize.tokenize_preference(tokenizer, record, max_length=max_length, truncation=truncation,
                                                  use_chat_template=use_chat_template))
  return pipeline.collate_pairs(tokenized, max_length=max_length, pad_id=tokenize.pad_token_id(tokenizer))


def _family_of(model: nnx.Module) -> registry.Family:
  for family in registry.families().values():
    if type(model) is family.module_cls:
      return family
  raise ValueError(f"{type(model).__name__} is not the model of a registered family; load it with jaxdpo.api.load")


@functools.partial(nnx.jit, static_argnums=0)
def _pair_logps(family_name: str, model, batch):
  inputs = registry.get_family(family_name).model_inputs(batch, 2)  # rows c0, r0, c1, r1, ...
  h_BTD = model.hidden_states(inputs)
  seq = logprobs.completion_logps(h_BTD, model.unembedding(), inputs["input_ids"], inputs["loss_mask"],
                                  logit_softcap=logprobs.resolve_softcap(None, model)).sums
  return seq.reshape(batch["input_ids"].shape[0], 2)


def pair_logps(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Summed completion log-probs of DPO pairs, as the DPO loss sees them.

  Args:
    model: from `load`.
    batch: [B, 2, T] arrays from `preference_batch`, or a DPO job's collated batch (images
      included, in the family's layout).

  Returns:
    (chosen [B], rejected [B]) fp32: the sum over completion tokens of log p(token | prefix).
  """
  seq = _pair_logps(_family_of(model).name, model, {k: jnp.asarray(v) for k, v in batch.items()})
  return seq[:, 0], seq[:, 1]
