"""Registers Gemma 3: `gemma3` (vision-language) and `gemma3_text` (text-only checkpoints)."""

from __future__ import annotations

from jaxdpo.models import registry
from jaxdpo.models.gemma3 import batching as gemma3_batching
from jaxdpo.models.gemma3 import config as gemma3_config
from jaxdpo.models.gemma3 import convert as gemma3_convert
from jaxdpo.models.gemma3.model import Gemma3TextModel
from jaxdpo.models.gemma3.vlm import Gemma3VLM

GEMMA3 = registry.register(registry.Family(
    name="gemma3", hf_architectures=("Gemma3ForConditionalGeneration",), module_cls=Gemma3VLM,
    config_cls=gemma3_config.Gemma3Config, config_from_hf=gemma3_convert.config_from_hf,
    rules=gemma3_convert.rules, normalize_key=gemma3_convert.normalize_key, presets=gemma3_config.PRESETS,
    model_inputs=gemma3_batching.model_inputs, vision_adapter="jaxdpo.data.vision.gemma:Gemma3Adapter",
    vision_params=("vision_tower", "multi_modal_projector"), config_to_hf=gemma3_convert.config_to_hf))

GEMMA3_TEXT = registry.register(registry.Family(
    name="gemma3_text", hf_architectures=("Gemma3ForCausalLM",), module_cls=Gemma3TextModel,
    config_cls=gemma3_config.Gemma3TextConfig, config_from_hf=gemma3_convert.causal_lm_config_from_hf,
    rules=gemma3_convert.causal_lm_rules, normalize_key=gemma3_convert.causal_lm_normalize_key,
    presets=gemma3_config.TEXT_PRESETS, config_to_hf=gemma3_convert.causal_lm_config_to_hf))
