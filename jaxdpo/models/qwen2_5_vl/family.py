"""Registers the Qwen2 text family and the Qwen2.5-VL family (Qwen2.5-VL-3B, Nanonets-OCR2-3B)."""

from __future__ import annotations

from jaxdpo.models import registry
from jaxdpo.models.qwen2_5_vl import batching as qwen_batching
from jaxdpo.models.qwen2_5_vl import config as qwen_config
from jaxdpo.models.qwen2_5_vl import convert as qwen_convert
from jaxdpo.models.qwen2_5_vl.model import Qwen2Decoder
from jaxdpo.models.qwen2_5_vl.vl_model import Qwen2_5_VL

QWEN2 = registry.register(registry.Family(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",), module_cls=Qwen2Decoder,
    config_cls=qwen_config.Qwen2TextConfig, config_from_hf=qwen_convert.text_config_from_hf,
    rules=qwen_convert.text_rules, normalize_key=qwen_convert.qwen2_normalize_key, presets=qwen_config.PRESETS,
    config_to_hf=qwen_convert.text_config_to_hf))

# Nanonets-OCR2-3B declares the same architecture. Written back in the hub layout (see convert).
QWEN2_5_VL = registry.register(registry.Family(
    name="qwen2_5_vl", hf_architectures=("Qwen2_5_VLForConditionalGeneration",), module_cls=Qwen2_5_VL,
    config_cls=qwen_config.Qwen2_5_VLConfig, config_from_hf=qwen_convert.vl_config_from_hf,
    rules=qwen_convert.vl_rules, normalize_key=qwen_convert.vl_normalize_key, presets=qwen_config.VL_PRESETS,
    denormalize_key=qwen_convert.vl_denormalize_key, model_inputs=qwen_batching.model_inputs,
    vision_adapter="jaxdpo.data.vision.qwen:QwenVLAdapter", row_positions=qwen_batching.row_positions,
    vision_params=("visual",), config_to_hf=qwen_convert.vl_config_to_hf))  # the patch merger (projector) lives inside `visual`
