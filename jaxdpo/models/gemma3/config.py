"""Configurations of Gemma 3: the text decoder, the SigLIP vision tower and the multimodal model.

Values of the `gemma3_4b()` preset come from google/gemma-3-4b-it's config.json (written by
transformers 4.50.0.dev0). That file names only a few text fields (hidden 2560, intermediate
10240, 34 layers, linear rope scaling 8, sliding window 1024) and the SigLIP fields; every other
value is a default of transformers' `Gemma3TextConfig` / `Gemma3Config` (checked at 5.24.0):
vocab 262208, 8 heads, 4 kv heads, head_dim 256, query_pre_attn_scalar 256, global rope theta
1e6, local rope theta 1e4, a full-attention layer every 6th layer, mm_tokens_per_image 256,
image token 262144, boi 255999, eoi 256000. `tests/test_gemma3_shapes.py` checks the parameter
count against transformers' own model built from that config.
"""

from __future__ import annotations

import dataclasses

from jaxdpo.models import nested_config

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig:
  """Shape and numerics of the Gemma 3 decoder (transformers' `Gemma3TextConfig`).

  Attributes:
    layer_types: one of "sliding_attention" / "full_attention" per layer.
    sliding_window: local layers attend to keys with `q_index - kv_index < sliding_window`.
    rope_global_theta, rope_global_linear_factor: RoPE of full-attention layers (Gemma 3 4B:
      1e6 with linear scaling 8, i.e. positions divided by 8).
    rope_local_theta, rope_local_linear_factor: RoPE of sliding-window layers (1e4, no scaling).
    query_pre_attn_scalar: attention logits are scaled by `query_pre_attn_scalar ** -0.5`.
    final_logit_softcapping: if set, logits are `c * tanh(logits / c)`. transformers applies it in
      `Gemma3ForCausalLM` only, never in `Gemma3ForConditionalGeneration`, so the multimodal
      parser leaves it None (see `convert.py`).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  layer_types: tuple[str, ...]
  sliding_window: int
  query_pre_attn_scalar: float = 256.0
  rope_global_theta: float = 1_000_000.0
  rope_global_linear_factor: float = 1.0
  rope_local_theta: float = 10_000.0
  rope_local_linear_factor: float = 1.0
  rms_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  attention_bias: bool = False
  tie_word_embeddings: bool = True
  final_logit_softcapping: float | None = None
  # Token ids: the model needs none of them, but generation and data do.
  bos_token_id: int | None = 2
  eos_token_ids: tuple[int, ...] = (1,)
  pad_token_id: int | None = 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    bad = sorted(set(self.layer_types) - {SLIDING, FULL})
    if bad:
      raise ValueError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """The SigLIP vision tower as Gemma 3 uses it (no pooling head)."""

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.patches_per_side ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """`Gemma3ForConditionalGeneration`: SigLIP -> pool + project -> Gemma 3 decoder.

  Sub-configs may be given as dicts (that is how converted checkpoints store them).
  """

  text: Gemma3TextConfig
  vision: SiglipVisionConfig
  mm_tokens_per_image: int = 256
  image_token_id: int = 262_144
  boi_token_id: int = 255_999
  eoi_token_id: int = 256_000

  def __post_init__(self):
    nested_config.rebuild_sub_configs(self, text=Gemma3TextConfig, vision=SiglipVisionConfig)
    side = int(round(self.mm_tokens_per_image ** 0.5))
    if side * side != self.mm_tokens_per_image:
      raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a square")
    if self.vision.patches_per_side % side:
      # transformers' AvgPool2d would silently drop the remainder rows; no real checkpoint does this.
      raise ValueError(f"{self.vision.patches_per_side} patches per side cannot be average-pooled to {side}")

  @property
  def pool_kernel(self) -> int:
    """Side of the average-pooling window (4 for 64x64 patches -> 16x16 tokens)."""
    return self.vision.patches_per_side // int(round(self.mm_tokens_per_image ** 0.5))


def layer_types_from_pattern(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Every `pattern`-th layer (1-based) is global, the rest are local."""
  return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def gemma3_4b_text() -> Gemma3TextConfig:
  """The text tower of gemma-3-4b-it (see the module docstring for the source of each value)."""
  return Gemma3TextConfig(
      vocab_size=262_208, hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
      intermediate_size=10240, layer_types=layer_types_from_pattern(34, 6), sliding_window=1024,
      query_pre_attn_scalar=256.0, rope_global_theta=1_000_000.0, rope_global_linear_factor=8.0,
      rope_local_theta=10_000.0, rope_local_linear_factor=1.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      final_logit_softcapping=None, bos_token_id=2, eos_token_ids=(1, 106), pad_token_id=0)


def siglip_gemma3() -> SiglipVisionConfig:
  """SigLIP-So400m/14 at 896 px, as in every Gemma 3 multimodal checkpoint."""
  return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=896,
                            patch_size=14, layer_norm_eps=1e-6)


def gemma3_4b() -> Gemma3Config:
  """gemma-3-4b-it / gemma-3-4b-pt."""
  return Gemma3Config(text=gemma3_4b_text(), vision=siglip_gemma3(), mm_tokens_per_image=256,
                      image_token_id=262_144, boi_token_id=255_999, eoi_token_id=256_000)


def tiny_text() -> Gemma3TextConfig:
  """A tiny decoder with odd sizes: 7 layers (pattern 6, so both layer types), window 5."""
  return Gemma3TextConfig(
      vocab_size=331, hidden_size=45, num_layers=7, num_heads=3, num_kv_heads=1, head_dim=10,
      intermediate_size=70, layer_types=layer_types_from_pattern(7, 6), sliding_window=5,
      query_pre_attn_scalar=13.0, rope_global_theta=1_000_000.0, rope_global_linear_factor=8.0,
      rope_local_theta=10_000.0, eos_token_ids=(1, 7))


def tiny() -> Gemma3Config:
  """A tiny multimodal model: 27 px images, patch 3 (9x9 patches), pooled 3x3 to 9 tokens per image."""
  vision = SiglipVisionConfig(hidden_size=30, intermediate_size=46, num_layers=2, num_heads=3, image_size=27,
                              patch_size=3)
  return Gemma3Config(text=tiny_text(), vision=vision, mm_tokens_per_image=9, image_token_id=330,
                      boi_token_id=328, eoi_token_id=329)


def demo_gemma() -> Gemma3Config:
  """The demo's Gemma 3 reader (`configs/demo_degeneration.py:gemma3`): 64x64 px pages, patch 4 (16x16
  patches) pooled 2x2 to 8x8 = 64 image tokens, one per 8-px glyph cell; vocabulary 66 and image ids
  63-65 match `jaxdpo.demo.tokenizer.write_gemma`. One local and one global layer (the window covers a
  whole demo sequence, so both kinds see the page)."""
  text = Gemma3TextConfig(
      vocab_size=66, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      intermediate_size=128, layer_types=(SLIDING, FULL), sliding_window=256, query_pre_attn_scalar=16.0,
      rope_global_theta=1_000_000.0, rope_global_linear_factor=1.0, rope_local_theta=10_000.0,
      eos_token_ids=(1, 5), bos_token_id=2, pad_token_id=0)
  vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=64,
                              patch_size=4)
  return Gemma3Config(text=text, vision=vision, mm_tokens_per_image=64, image_token_id=65, boi_token_id=63,
                      eoi_token_id=64)


PRESETS = {"gemma3_4b": gemma3_4b, "tiny": tiny, "demo_gemma": demo_gemma}
TEXT_PRESETS = {"gemma3_4b_text": gemma3_4b_text, "tiny_text": tiny_text}
