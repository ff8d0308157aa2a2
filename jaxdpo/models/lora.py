"""LoRA (issue 13): adapters on the language model's linear layers, the base as the reference.

The adapters are separate `nnx.Param`s (`lora_a`, `lora_b`) on the targeted `layers.Einsum`
modules (`Einsum.add_lora`). The base weights stay where they were; the trainable mask
(`jaxdpo.models.trainable`) selects the adapters only, so gradients and optimizer state cover
them alone. The reference is the same module with the adapters switched off (`disabled`: every
B set to zero, which makes each adapted layer's output exactly the base layer's), so no copy of
the base weights is held.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdpo.errors import ConfigError
from jaxdpo.models import layers
from jaxdpo.models import trainable as trainable_lib

# q, k, v, o and the gated MLP's gate, up, down of every decoder layer of the language model
# (the text model's root, or `language_model/` of a VLM); anchored, so vision towers never match.
DEFAULT_TARGETS = r"^(language_model/)?layers/\d+/(self_attn/(q|k|v|o)|mlp/(gate|up|down))$"
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`config.lora`.

  Attributes:
    rank: adapter rank r; 0 = LoRA off.
    alpha: the adapters' output is scaled by alpha / rank (PEFT's `lora_alpha`).
    dropout: dropout on the adapters' input; only 0 is implemented.
    targets: regex searched in each linear module's "/"-joined path (e.g.
      "language_model/layers/3/self_attn/q"); matching modules get adapters.
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  base_dtype: str = ""  # storage dtype of the frozen base ("" = model.param_dtype); adapters stay float32

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 0:
      raise ConfigError(f"config.lora.rank={self.rank!r}: expected an integer >= 0 (0 = LoRA off)")
    if self.rank and not self.alpha > 0:
      raise ConfigError(f"config.lora.alpha={self.alpha!r}: expected > 0")
    if self.dropout != 0.0:
      raise ConfigError(f"config.lora.dropout={self.dropout!r}: only 0 is implemented (no adapter dropout)")
    if self.base_dtype not in ("", "float32", "bfloat16"):
      raise ConfigError(f"config.lora.base_dtype={self.base_dtype!r}: expected '', float32 or bfloat16")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ConfigError(f"config.lora.targets={self.targets!r} is not a valid regex: {e}") from e


def from_config(lora_cfg) -> LoraConfig:
  """The ConfigDict section `config.lora` as a `LoraConfig` (validated)."""
  return LoraConfig(rank=lora_cfg.rank, alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                    targets=lora_cfg.targets or DEFAULT_TARGETS, base_dtype=lora_cfg.base_dtype)


def _linear_modules(model):
  return [("/".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, layers.Einsum)]


def add_adapters(model, cfg: LoraConfig, rngs: nnx.Rngs) -> list[str]:
  """Adds adapters to every linear module of `model` whose path matches `cfg.targets`.

  Returns:
    The adapted module paths, in graph order. Raises `ConfigError` when none matches.
  """
  pattern = re.compile(cfg.targets)
  linear = _linear_modules(model)
  chosen = [(p, m) for p, m in linear if pattern.search(p)]
  if not chosen:
    examples = [p for p, _ in linear[:4]]
    raise ConfigError(f"config.lora.targets={cfg.targets!r} matches no linear module; module paths look like "
                      f"{examples}")
  for _, m in chosen:
    m.add_lora(cfg.rank, cfg.alpha, rngs)
  return [p for p, _ in chosen]


def build(family, model_cfg, cfg: LoraConfig, rngs: nnx.Rngs, param_dtype, attention_impl=None):
  """The family's module with adapters added (call under `nnx.eval_shape` for an abstract one)."""
  model = family.build(model_cfg, rngs, param_dtype, attention_impl)
  if cfg.enabled:
    add_adapters(model, cfg, rngs)
  return model


def is_adapter_path(path: str) -> bool:
  """A "/"-joined parameter path of an adapter matrix ("layers/0/self_attn/q/lora_a")."""
  return path.rsplit("/", 1)[-1] in ADAPTER_KEYS


def adapter_mask(params):
  """The trainable mask of a LoRA run: True on adapter leaves, False on every base parameter."""
  mask = jax.tree_util.tree_map_with_path(lambda path, _: is_adapter_path(trainable_lib.path_str(path)), params)
  if not any(jax.tree.leaves(mask)):
    raise ConfigError("LoRA is on (config.lora.rank > 0) but the parameter tree holds no adapter")
  return mask


def split_base(params):
  """(base params without adapters, adapters only): two pure dicts; `merge_base` undoes it.

  The adapter tree keeps only the `lora_a` / `lora_b` leaves and the dicts leading to them.
  """
  def base_of(node):
    if not isinstance(node, dict):
      return node
    return {k: base_of(v) for k, v in node.items() if k not in ADAPTER_KEYS}

  def adapters_of(node):
    out = {}
    for k, v in node.items():
      if k in ADAPTER_KEYS:
        out[k] = v
      elif isinstance(v, dict):
        sub = adapters_of(v)
        if sub:
          out[k] = sub
    return out

  return base_of(params), adapters_of(params)


def merge_base(base, adapters):
  """Base params and adapters (from `split_base`) as one pure dict."""
  if not isinstance(adapters, dict):
    return adapters
  out = dict(base)
  for k, v in adapters.items():
    out[k] = merge_base(base.get(k, {}), v) if isinstance(v, dict) else v
  return out


def disabled(params):
  """`params` with the adapters switched off: every B is zero (the adapted layers' outputs are then
  exactly the base layers'). The DPO reference of a LoRA run."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if trainable_lib.path_str(path).endswith("/lora_b") else x, params)


def merged(graphdef, params):
  """The base parameter tree (no adapter leaves) with every adapter folded into its kernel.

  What a LoRA run exports as its model: it loads into the family's plain module.
  """
  model = nnx.merge(graphdef, params)
  base, _ = split_base(params)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Einsum) and node.lora_a is not None:
      target = base
      for k in path:
        target = target[k]
      target["kernel"] = node.merged_kernel()
  return base
