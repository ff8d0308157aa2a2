"""LoRA adapters (issue 13): placement, axes, the trainable mask, and acceptance 1 (B = 0 -> base logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdpo.errors import ConfigError
from jaxdpo.models import lora, registry
from jaxdpo.models import trainable as trainable_lib
from jaxdpo.parallel import sharding as shd

CFG = lora.LoraConfig(rank=4, alpha=8.0)


def _pure(model):
  return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


def _text_inputs(vocab, b=2, t=11):
  ids = jax.random.randint(jax.random.key(1), (b, t), 0, vocab)
  seg = jnp.ones((b, t), jnp.int32).at[1, -3:].set(0)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return {"input_ids": ids, "positions": pos, "segment_ids": seg}


def _logits(graphdef, params, inputs):
  model = nnx.merge(graphdef, params)
  return model.logits(model.hidden_states(inputs))


@pytest.mark.parametrize("family,preset", [("qwen2", "tiny"), ("gemma3_text", "tiny_text")])
def test_zero_b_gives_the_base_logits_exactly(family, preset):
  fam = registry.get_family(family)
  cfg = fam.presets[preset]()
  base = fam.build(cfg, nnx.Rngs(0), jnp.float32)
  adapted = lora.build(fam, cfg, CFG, nnx.Rngs(0), jnp.float32)
  g_base, g_lora = nnx.graphdef(base), nnx.graphdef(adapted)
  params = _pure(adapted)
  base_params, adapters = lora.split_base(params)
  jax.tree.map(np.testing.assert_array_equal, base_params, _pure(base))  # adapters come after the base init
  inputs = _text_inputs(cfg.vocab_size)
  want = _logits(g_base, base_params, inputs)
  got = _logits(g_lora, params, inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Negative control: a non-zero B moves the logits, so the adapters are really in the forward pass.
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if trainable_lib.path_str(p).endswith("lora_b") else x, params)
  diff = np.abs(np.asarray(_logits(g_lora, moved, inputs) - want)).max()
  assert diff > 1e-3 * np.abs(np.asarray(want)).max()
  # ... and `disabled` switches them off again, exactly.
  np.testing.assert_array_equal(np.asarray(_logits(g_lora, lora.disabled(moved), inputs)), np.asarray(want))
  assert lora.merge_base(base_params, adapters).keys() == params.keys()
  adapter_paths = [trainable_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
  assert adapter_paths and all(lora.is_adapter_path(p) for p in adapter_paths)  # no base leaf in the adapters


def test_default_targets_and_axes_on_a_vlm():
  fam = registry.get_family("qwen2_5_vl")
  cfg = fam.presets["tiny_vl"]()
  model = nnx.eval_shape(lambda: fam.build(cfg, nnx.Rngs(0), jnp.float32))
  paths = lora.add_adapters(model, CFG, nnx.Rngs(0))
  n = cfg.text.num_layers
  assert len(paths) == 7 * n and all(p.startswith("language_model/layers/") for p in paths)
  names = sorted({p.rsplit("/", 1)[-1] for p in paths})
  assert names == ["down", "gate", "k", "o", "q", "up", "v"]
  axes = shd.logical_axes_tree(nnx.split(model, nnx.Param)[1])
  q = axes["language_model"]["layers"][0]["self_attn"]["q"]
  assert tuple(q["lora_a"]) == ("embed", "lora_rank") and tuple(q["lora_b"]) == ("lora_rank", "heads", "head_dim")
  o = axes["language_model"]["layers"][0]["self_attn"]["o"]
  assert tuple(o["lora_a"]) == ("heads", "head_dim", "lora_rank") and tuple(o["lora_b"]) == ("lora_rank", "embed")
  mask = lora.adapter_mask(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
  flat = {trainable_lib.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert sum(flat.values()) == 2 * 7 * n
  assert all(lora.is_adapter_path(p) == m for p, m in flat.items())
  assert not any(m for p, m in flat.items() if p.startswith("visual/"))


def test_bad_lora_settings_are_refused():
  with pytest.raises(ConfigError, match="config.lora.dropout"):
    lora.LoraConfig(rank=4, dropout=0.1)
  with pytest.raises(ConfigError, match="config.lora.rank"):
    lora.LoraConfig(rank=-1)
  with pytest.raises(ConfigError, match="config.lora.targets"):
    lora.LoraConfig(rank=4, targets="(")
  fam = registry.get_family("qwen2")
  model = nnx.eval_shape(lambda: fam.build(fam.presets["tiny"](), nnx.Rngs(0), jnp.float32))
  with pytest.raises(ConfigError, match="matches no linear module"):
    lora.add_adapters(model, lora.LoraConfig(rank=4, targets="nothing_here"), nnx.Rngs(0))


def test_config_keys_are_validated_early():
  from jaxdpo.jobs import defaults, validate
  def check(**kw):
    c = defaults.base()
    for k, v in kw.items():
      if k == "job":
        c.job = v
        continue
      section, key = k.split("__")
      c[section][key] = v
    validate.check(c)
  check(lora__rank=4)  # the defaults with LoRA on pass
  with pytest.raises(ConfigError, match="config.lora.dropout"):
    check(lora__rank=4, lora__dropout=0.1)
  with pytest.raises(ConfigError, match="config.lora.rank"):
    check(lora__rank=-2)
  with pytest.raises(ConfigError, match="config.lora.targets"):
    check(lora__rank=4, lora__targets="[")
  with pytest.raises(ConfigError, match="config.lora.base_dtype"):
    check(lora__rank=4, lora__base_dtype="float16")
  with pytest.raises(ConfigError, match="job='eval'"):
    check(lora__rank=4, job="eval")
  with pytest.raises(ConfigError, match="config.model.trainable"):
    check(lora__rank=4, model__trainable="layers/0")


def test_planner_on_the_3b_preset_has_no_reference_and_adapter_only_optimizer_state():
  """Acceptance 4: no reference copy, optimizer bytes for the adapters only, the base at `lora.base_dtype`."""
  import importlib.util
  import os
  from jaxdpo.jobs import dpo as dpo_job
  from jaxdpo.jobs import model_setup
  from jaxdpo.parallel import memory
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("c", os.path.join(root, "configs", "qwen2_5_vl_3b_dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  mesh = shd.make_mesh(config.mesh)
  assert mesh.size == 8
  rules = model_setup.parse_rules(config.sharding_rules)
  full = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  config.lora.rank = 16
  planned = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  assert full.reference > 0 and planned.reference == 0
  family = model_setup.resolve_model(config.model)[0]
  abstract = memory._abstract_lora_params(family.name, family.presets[config.model.preset](), np.dtype("float32"),
                                          lora.from_config(config.lora))
  params = memory.with_shardings(nnx.to_pure_dict(abstract), shd.param_shardings(abstract, rules, mesh))
  adapters = sum(memory._leaf_bytes(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                 if lora.is_adapter_path(trainable_lib.path_str(p)))
  assert 0 < adapters < 0.1 * full.params  # rank 16: 4.8% per device (R and tensor-mapped dims replicate)
  assert planned.gradients == adapters and planned.opt_state - 2 * adapters < 64  # AdamW mu + nu (+ counts)
  assert planned.params == full.params + adapters
  config.lora.base_dtype = "bfloat16"  # the base stored in bf16, the adapters (and their state) in fp32
  half = memory.plan_dpo(dpo_job.memory_run(config), mesh, rules)
  assert half.params == full.params // 2 + adapters
  assert (half.opt_state, half.gradients, half.reference) == (planned.opt_state, planned.gradients, 0)
