"""Configuration of the Qwen2.5 text decoder (the text tower of Qwen2.5-VL / Nanonets-OCR2)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Qwen2TextConfig:
  """Shape and numerics of a Qwen2 / Qwen2.5 decoder.

  Attributes mirror transformers' `Qwen2Config` (or the `text_config` of Qwen2.5-VL).
  `mrope_section` is None for plain 1D RoPE and e.g. (16, 24, 24) for Qwen2.5-VL's M-RoPE.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  hidden_act: str = "silu"
  mrope_section: tuple[int, ...] | None = None
  # Token ids: the model needs none of them, but generation and data do.
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.mrope_section is not None and sum(self.mrope_section) * 2 != self.head_size:
      raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2={self.head_size // 2}")


def tiny() -> Qwen2TextConfig:
  """A tiny decoder with deliberately odd sizes, for tests and the embedded demo."""
  return Qwen2TextConfig(vocab_size=512, hidden_size=40, num_layers=2, num_heads=5, num_kv_heads=1,
                         intermediate_size=72, head_dim=8, rope_theta=10_000.0, tie_word_embeddings=False)


def qwen2_5_3b_text() -> Qwen2TextConfig:
  """The Qwen2.5-3B text shape (also the text tower of Qwen2.5-VL-3B and Nanonets-OCR2-3B)."""
  return Qwen2TextConfig(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                         intermediate_size=11008, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643)


PRESETS = {"tiny": tiny, "qwen2_5_3b_text": qwen2_5_3b_text}
