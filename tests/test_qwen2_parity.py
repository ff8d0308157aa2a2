"""The Qwen2 decoder port against transformers' Qwen2ForCausalLM (fp32, tiny odd sizes)."""

import numpy as np
import pytest
import torch
from flax import nnx

from jaxdpo.models import io
from tests._dpo_helpers import max_rel_err, tiny_qwen2_hf


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tmp_path, tied):
  hf, ckpt = tiny_qwen2_hf(tmp_path, tied=tied)
  _, cfg, graphdef, params = io.load_model(ckpt)
  model = nnx.merge(graphdef, params)
  rng = np.random.RandomState(1)
  b, t = 3, 13
  ids = rng.randint(0, cfg.vocab_size, (b, t))
  lengths = np.array([13, 9, 4])
  seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(seg)).logits.numpy()
  pos = np.broadcast_to(np.arange(t), (b, t))
  h = model.hidden_states({"input_ids": ids, "positions": pos, "segment_ids": seg})
  out = np.asarray(model.logits(h))
  assert out.shape == ref.shape
  assert max_rel_err(out, ref, seg.astype(bool)) < 1e-5


def test_3b_text_preset_matches_hf_parameter_count():
  """The full Qwen2.5-3B text shape, counted with eval_shape (nothing allocated)."""
  import jax
  from transformers import Qwen2Config, Qwen2ForCausalLM
  from jaxdpo.models import registry
  from jaxdpo.models.qwen2_5_vl.config import qwen2_5_3b_text
  cfg = qwen2_5_3b_text()
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
          cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (2048, 36, 16, 2, 11008, 151936, 1e6, True)
  _, abstract = io.build_abstract(registry.get_family("qwen2"), cfg)
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.to_pure_dict()))
  hf_cfg = Qwen2Config(vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, tie_word_embeddings=True)
  with torch.device("meta"):
    hf = Qwen2ForCausalLM(hf_cfg)
  theirs = sum(p.numel() for p in hf.parameters())
  assert ours == theirs == 3_085_938_688
