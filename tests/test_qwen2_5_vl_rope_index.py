"""The host M-RoPE index against transformers' `get_rope_index` on random layouts."""

import functools
import types

import numpy as np
import pytest
import torch

from jaxdpo.models.qwen2_5_vl import rope_index

IMAGE, VIDEO, START, END = 20, 21, 22, 23
MERGE, TPS = 2, 2


def _hf_rope_index(ids, mask, image_grid, video_grid, seconds):
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
  fake = types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=TPS)))
  fake.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, fake)
  types_ = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
  t = lambda x: None if x is None else torch.tensor(x)
  pos, deltas = Qwen2_5_VLModel.get_rope_index(fake, torch.tensor(ids), torch.tensor(types_), t(image_grid),
                                               t(video_grid), t(seconds), attention_mask=torch.tensor(mask))
  return pos.numpy(), deltas.numpy()


def _random_batch(rng, rows=4):
  images, videos, seconds, seqs = [], [], [], []
  for _ in range(rows):
    seq = list(rng.randint(0, 20, rng.randint(1, 5)))
    for _ in range(rng.randint(0, 4)):
      kind = rng.choice(["image", "video"], p=[0.7, 0.3])
      grid = [int(rng.randint(2, 4)) if kind == "video" else 1, 2 * int(rng.randint(1, 5)), 2 * int(rng.randint(1, 5))]
      (videos if kind == "video" else images).append(grid)
      if kind == "video":
        seconds.append(float(rng.choice([0.5, 0.75, 1.0, 2.0])))
      seq += [START] + [IMAGE if kind == "image" else VIDEO] * (int(np.prod(grid)) // MERGE ** 2) + [END]
      seq += list(rng.randint(0, 20, rng.randint(0, 4)))
    seqs.append(seq)
  t = max(map(len, seqs)) + 2
  ids = np.full((rows, t), 7)
  mask = np.zeros((rows, t), np.int64)
  for i, seq in enumerate(seqs):
    start = 0 if i % 2 else t - len(seq)  # alternate right and left padding
    ids[i, start:start + len(seq)] = seq
    mask[i, start:start + len(seq)] = 1
  as_array = lambda g: np.array(g, np.int64).reshape(-1, 3) if g else None
  return ids, mask, as_array(images), as_array(videos), (np.array(seconds) if seconds else None)


@pytest.mark.parametrize("seed", range(6))
def test_random_layouts_match_transformers(seed):
  rng = np.random.RandomState(seed)
  ids, mask, image_grid, video_grid, seconds = _random_batch(rng)
  if image_grid is None and video_grid is None:
    image_grid = np.zeros((0, 3), np.int64)
  want_pos, want_deltas = _hf_rope_index(ids, mask, image_grid, video_grid, seconds)
  pos, deltas = rope_index.get_rope_index(ids, mask, image_grid, spatial_merge_size=MERGE, image_token_id=IMAGE,
                                          video_token_id=VIDEO, video_grid_thw=video_grid,
                                          second_per_grid_ts=seconds, tokens_per_second=TPS)
  np.testing.assert_array_equal(pos, want_pos)
  np.testing.assert_array_equal(deltas, want_deltas)


def test_packed_segments_restart_positions():
  one = [5, 6, START] + [IMAGE] * 4 + [END, 9, 8]
  ids = np.array([one + one + [0, 0]])
  seg = np.array([[1] * 10 + [2] * 10 + [0, 0]])
  grid = np.array([[1, 4, 4], [1, 4, 4]])
  pos, deltas = rope_index.get_rope_index(ids, seg, grid, spatial_merge_size=2, image_token_id=IMAGE)
  single, single_delta = rope_index.get_rope_index(np.array([one]), None, grid[:1], spatial_merge_size=2,
                                                   image_token_id=IMAGE)
  np.testing.assert_array_equal(pos[:, 0, :10], single[:, 0])
  np.testing.assert_array_equal(pos[:, 0, 10:20], single[:, 0])
  np.testing.assert_array_equal(pos[:, 0, 20:], 0)
  assert single[:, 0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 5, 6, 7], [0, 1, 2, 3, 3, 4, 4, 5, 6, 7],
                                   [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]]
  assert deltas.tolist() == single_delta.tolist() == [[-2]]


def test_missing_grid_is_an_error():
  ids = np.array([[1, START, IMAGE, IMAGE, IMAGE, IMAGE, END]])
  with pytest.raises(ValueError, match="row 0: a run of 4 image placeholder tokens has no image_grid_thw entry"):
    rope_index.get_rope_index(ids, None, None, spatial_merge_size=2, image_token_id=IMAGE)
  with pytest.raises(ValueError, match=r"4 consecutive image placeholder tokens, but grid \(1, 2, 4\) needs 2"):
    rope_index.get_rope_index(ids, None, [[1, 2, 4]], spatial_merge_size=2, image_token_id=IMAGE)
