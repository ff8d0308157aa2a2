"""Configurations of the Qwen2.5 text decoder and of Qwen2.5-VL (vision tower + decoder).

Presets and where their numbers come from:
  * `qwen2_5_3b_text`: the Qwen2.5-3B decoder shape.
  * `qwen2_5_vl_3b`: Qwen/Qwen2.5-VL-3B-Instruct. Its config.json gives the vision tower's
    depth 32, hidden 1280, intermediate 3420, 16 heads, patch 14, temporal patch 2, spatial merge
    2, window 112, fullatt_block_indexes [7, 15, 23, 31], out_hidden_size 2048,
    tokens_per_second 2, in_chans 3, hidden_act silu; values it omits fall back to transformers'
    `Qwen2_5_VLVisionConfig` defaults (vision rope theta 10000 from the "axial" rope default) and
    `Qwen2_5_VLConfig` defaults (image / video / vision-start / vision-end token ids
    151655 / 151656 / 151652 / 151653). Text: the Qwen2.5-3B shape with M-RoPE sections
    (16, 24, 24), vocab 151936, tied embeddings, rope theta 1e6, rms eps 1e-6.
  * `nanonets_ocr2_3b`: nanonets/Nanonets-OCR2-3B, a full fine-tune of Qwen2.5-VL-3B with the
    same architecture and shapes (its config.json declares `Qwen2_5_VLForConditionalGeneration`).
  * `tiny`, `tiny_vl`: deliberately odd sizes for tests.
  * `demo_vl`: the built-in OCR study (jaxdpo/demo): 64 ids (its tokenizer's), 8-px glyph cells
    = one merged vision token (patch 4, merge 2), small enough to train on two CPU cores.
"""

from __future__ import annotations

import dataclasses

from jaxdpo.models import nested_config


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




@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The Qwen2.5-VL vision tower (mirrors transformers' `Qwen2_5_VLVisionConfig`).

  `window_size` is in pixels; a window spans window_size // (patch_size * spatial_merge_size)
  merged tokens per side. Blocks listed in `fullatt_block_indexes` attend over the whole image,
  the others only within their window.
  """

  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  hidden_act: str = "silu"
  tokens_per_second: int = 2
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch as the image processor emits it: C * t * p * p."""
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
    if self.head_size % 4:
      raise ValueError(f"vision head size {self.head_size} must be a multiple of 4 (2D rotary embedding)")
    if self.window_merged < 1:
      raise ValueError(f"window_size={self.window_size} is smaller than one merged token "
                       f"({self.patch_size * self.spatial_merge_size} pixels)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """Qwen2.5-VL: vision tower + Qwen2 decoder with M-RoPE.

  Converted checkpoints store this as nested dicts; `__post_init__` rebuilds the sub-configs.
  """

  text: Qwen2TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    nested_config.rebuild_sub_configs(self, text=Qwen2TextConfig, vision=VisionConfig)
    if self.text.mrope_section is None:
      raise ValueError("Qwen2.5-VL needs text.mrope_section (M-RoPE), e.g. (16, 24, 24)")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(f"vision out_hidden_size={self.vision.out_hidden_size} must equal text hidden_size="
                       f"{self.text.hidden_size}")


def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
  """Qwen/Qwen2.5-VL-3B-Instruct (see the module docstring for the sources of each value)."""
  text = dataclasses.replace(qwen2_5_3b_text(), mrope_section=(16, 24, 24))
  vision = VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                        fullatt_block_indexes=(7, 15, 23, 31), in_channels=3, hidden_act="silu",
                        tokens_per_second=2, rope_theta=10_000.0)
  return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=151655, video_token_id=151656,
                          vision_start_token_id=151652, vision_end_token_id=151653)


def nanonets_ocr2_3b() -> Qwen2_5_VLConfig:
  """nanonets/Nanonets-OCR2-3B: a Qwen2.5-VL-3B fine-tune, identical shapes and token ids."""
  return qwen2_5_vl_3b()


def tiny_vl() -> Qwen2_5_VLConfig:
  """A tiny Qwen2.5-VL with odd sizes; windows of 2x2 merged tokens and two full-attention blocks."""
  text = Qwen2TextConfig(vocab_size=331, hidden_size=60, num_layers=2, num_heads=5, num_kv_heads=1,
                         intermediate_size=92, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         mrope_section=(2, 2, 2))
  vision = VisionConfig(depth=4, hidden_size=36, intermediate_size=52, num_heads=3, out_hidden_size=60,
                        patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                        fullatt_block_indexes=(1, 3), tokens_per_second=2)
  return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=320, video_token_id=321,
                          vision_start_token_id=322, vision_end_token_id=323)


def demo_vl() -> Qwen2_5_VLConfig:
  """The demo's reader: vision ids 60-63 and vocabulary 64 match `jaxdpo.demo.tokenizer`."""
  text = Qwen2TextConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         mrope_section=(4, 2, 2), eos_token_id=2, pad_token_id=0)
  vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                        fullatt_block_indexes=(1,), tokens_per_second=2)
  return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=60, video_token_id=61,
                          vision_start_token_id=62, vision_end_token_id=63)


PRESETS = {"tiny": tiny, "qwen2_5_3b_text": qwen2_5_3b_text}
VL_PRESETS = {"tiny_vl": tiny_vl, "demo_vl": demo_vl, "qwen2_5_vl_3b": qwen2_5_vl_3b, "nanonets_ocr2_3b": nanonets_ocr2_3b}
