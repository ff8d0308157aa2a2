"""The generation protocol (init_cache / prefill / decode) of Qwen2.5-VL and of the Qwen2 decoder,
against transformers' generate with left padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import _qwen_vl_helpers as H
from jaxdpo.models import io
from jaxdpo.models.qwen2_5_vl import inputs as qin

STEPS = 12


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
  d = tmp_path_factory.mktemp("qvl_gen")
  hf = H.build_hf_model(str(d / "hf"), init_std=0.3)  # large weights: varied, non-repeating greedy output
  _, cfg, graphdef, params = io.load_hf_model(str(d / "hf"))
  ids, mask, vision = H.mixed_batch()
  with torch.no_grad():
    out = hf.generate(**H.hf_inputs(ids, mask, vision), do_sample=False, max_new_tokens=STEPS, eos_token_id=-1,
                      pad_token_id=H.PAD, output_logits=True, return_dict_in_generate=True)
  inputs = qin.make_inputs(cfg, ids, mask, vision["pixel_values"], vision["image_grid_thw"], num_patches=288,
                           num_images=4)
  return dict(model=nnx.merge(graphdef, params), inputs=inputs, tokens=out.sequences[:, ids.shape[1]:].numpy(),
              logits=np.stack([x.numpy() for x in out.logits], axis=1))


def test_greedy_generation_with_images_equals_transformers(vl):
  from jaxdpo.generation.decode import generate
  ref = vl["tokens"]
  assert ref.shape == (3, STEPS) and len(np.unique(ref)) > 10  # a meaningful sequence, not one repeated token
  out = generate(vl["model"], vl["inputs"], max_new_tokens=STEPS, eos_token_id=-1, pad_token_id=H.PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_prefill_and_decode_logits_match_transformers(vl):
  """Teacher-forced through the protocol methods: every step's logits agree, not just the argmax."""
  def run(model, inputs, tokens):
    b, t = inputs["input_ids"].shape
    cache = model.init_cache(b, t + STEPS, jnp.float32)
    first, cache = model.prefill(inputs, cache)

    def step(cache, token_B):
      logits, cache = model.decode(token_B, cache)
      return cache, logits
    cache, rest = jax.lax.scan(step, cache, tokens[:, :-1].T)
    return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1), cache

  logits, cache = H.jitted(vl["model"], run)({k: jnp.asarray(v) for k, v in vl["inputs"].items()},
                                             jnp.asarray(vl["tokens"], jnp.int32))
  ref = vl["logits"]
  assert float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()) < 1e-4
  # Next positions carry the rope deltas: real length + generated + delta, on all three streams.
  real = vl["inputs"]["segment_ids"].sum(axis=1)
  expected = real + STEPS - 1 + vl["inputs"]["rope_deltas"][:, 0]
  np.testing.assert_array_equal(np.asarray(cache["next_positions"]), np.broadcast_to(expected, (3, 3)))


def test_text_decoder_protocol_matches_transformers_forward(tmp_path):
  """Qwen2Decoder (1D RoPE): prefill + decode of given tokens equals HF's full forward pass."""
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(0)
  hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                    num_key_value_heads=1, intermediate_size=72, head_dim=8,
                                    tie_word_embeddings=False, attn_implementation="eager")).eval()
  hf.save_pretrained(tmp_path / "hf")
  _, _, graphdef, params = io.load_hf_model(str(tmp_path / "hf"))
  rng = np.random.RandomState(0)
  full = rng.randint(3, 97, (2, 9))
  seg = np.ones((2, 9), np.int64)
  seg[1, :3] = 0  # row 1 is left-padded by 3
  prompt_len, new = 6, 3
  pos = np.where(seg > 0, np.cumsum(seg, axis=1) - 1, 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(full), attention_mask=torch.tensor(seg),
             position_ids=torch.tensor(pos)).logits.numpy()

  def run(model, ids, seg):
    cache = model.init_cache(2, prompt_len + new, jnp.float32)
    logits, cache = model.prefill({"input_ids": ids[:, :prompt_len], "segment_ids": seg[:, :prompt_len]}, cache)
    steps = [logits]
    for i in range(new):
      logits, cache = model.decode(ids[:, prompt_len + i], cache)
      steps.append(logits)
    return jnp.stack(steps, axis=1)

  out = np.asarray(H.jitted(nnx.merge(graphdef, params), run)(jnp.asarray(full, jnp.int32),
                                                              jnp.asarray(seg, jnp.int32)))
  want = ref[:, prompt_len - 1:]
  assert out.shape == want.shape == (2, new + 1, 97)
  assert float(np.abs(out - want).max() / np.abs(want).max()) < 1e-5
