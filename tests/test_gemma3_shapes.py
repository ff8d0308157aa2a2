"""Full-size Gemma 3 4B: abstract parameter shapes agree with transformers' model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

import _gemma_helpers as H
from jaxdpo.models import io, registry
from jaxdpo.models.gemma3 import config as gcfg
from jaxdpo.models.gemma3 import convert as gconv


@pytest.fixture(scope="module")
def hf_meta():
  cfg = transformers.Gemma3Config(**{k: v for k, v in H.GEMMA3_4B_IT_CONFIG.items()
                                     if k not in ("architectures", "torch_dtype", "transformers_version")})
  with torch.device("meta"):
    return transformers.Gemma3ForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def abstract():
  # Note: building the abstract 4B model takes ~15 s of CPU, mostly in jax tracing overhead.
  _, params = io.build_abstract(registry.get_family("gemma3"), gcfg.gemma3_4b())
  return params


def test_gemma3_4b_parameter_count_matches_transformers(hf_meta, abstract):
  hf_count = sum(p.numel() for p in hf_meta.parameters())  # the tied head is counted once
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  print(f"gemma3_4b parameters: jaxdpo {ours:,} transformers {hf_count:,}")
  assert ours == hf_count == 4_300_079_472


def test_gemma3_4b_every_tensor_maps_with_its_size(hf_meta, abstract):
  """Each HF tensor of the 4B model maps onto exactly one jaxdpo parameter of the same size
  (keys and sizes only: no 17 GB of data is materialised)."""
  cfg = gcfg.gemma3_4b()
  expected = {k: tuple(v.shape) for k, v in io.flatten(abstract.to_pure_dict()).items()}
  rules, normalize = gconv.rules(cfg), gconv.normalize_key(cfg)
  mapped = {}
  for key, value in hf_meta.state_dict().items():
    canon = normalize(key)
    if canon is None:
      continue
    [path] = [r.jax.format(*m.groups()) for r in rules if (m := r.match(canon))]
    assert np.prod(expected[path]) == value.numel(), (key, path)
    mapped[path] = key
  assert set(mapped) == set(expected)
  assert expected["language_model.embed_tokens"] == (262_208, 2560)
  assert expected["multi_modal_projector.mm_input_projection"] == (1152, 2560)
  assert expected["vision_tower.embeddings.kernel"] == (3, 14, 14, 1152)
