"""grain training pipelines: shapes, augmentation, determinism, sharding, resumption."""

import itertools

import numpy as np
import pytest
from PIL import Image

from dmfnet_jax import config_defaults, imageio
from dmfnet_jax.data import phantoms
from dmfnet_jax.data import pipeline
from dmfnet_jax.errors import ConfigError, DataError, ImageReadError


def _phantom_cfg(count=6, size=32, crop=16, flip=True):
  cfg = config_defaults.data_config()
  cfg.phantom_count, cfg.phantom_size, cfg.crop_size, cfg.random_flip = count, size, crop, flip
  return cfg


def _take(dataset, n):
  return list(itertools.islice(iter(dataset), n))


def _make(cfg, stage="stage2", batch=2, seed=0, index=0, count=1):
  return pipeline.make_train_dataset(
      cfg, stage=stage, global_batch_size=batch, seed=seed, process_index=index,
      process_count=count)


def test_default_config():
  cfg = config_defaults.data_config()
  assert cfg.root == "" and cfg.split == "train" and cfg.crop_size == 160
  assert list(cfg.tasks) == ["MRI-CT", "MRI-PET", "MRI-SPECT"]
  assert cfg.phantom_count == 64 and cfg.phantom_size == 256
  assert cfg.random_flip is True and cfg.num_workers == 0


def test_stage1_batches_images_of_both_modalities():
  cfg = _phantom_cfg(count=3, size=32, crop=32, flip=False)
  (batch,) = _take(_make(cfg, "stage1", batch=6), 1)
  assert set(batch) == {"image"}
  assert batch["image"].shape == (6, 32, 32, 1) and batch["image"].dtype == np.float32
  # Uncropped, unflipped: the batch holds each pair's MRI then its partner's luma.
  expected = {}
  for index, task in enumerate(cfg.tasks):
    mri, other = phantoms.phantom_pair(index, 32, task, phantoms.split_seed(0, "train"))
    expected[imageio.to_model_range(mri).tobytes()] = imageio.to_model_range(other)
  images = batch["image"][..., 0]
  for mri, other in zip(images[0::2], images[1::2]):
    np.testing.assert_array_equal(other, expected[mri.tobytes()])


def test_stage2_shapes_and_range():
  (batch,) = _take(_make(_phantom_cfg(), "stage2", batch=3), 1)
  assert set(batch) == {"a", "b"}
  for key in ("a", "b"):
    assert batch[key].shape == (3, 16, 16, 1) and batch[key].dtype == np.float32
    assert -1.0 <= batch[key].min() and batch[key].max() <= 1.0


def _write_inverse_pairs(root, count=3, size=24):
  """CT = 255 - MRI, with a pattern whose orientation shows crops and flips."""
  rng = np.random.default_rng(0)
  for i in range(count):
    mri = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    for folder, image in (("MRI", mri), ("CT", 255 - mri)):
      path = root / "MRI-CT" / "train" / folder / f"{i:03d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(path)
  return root


def test_crops_and_flips_are_shared_by_the_pair(tmp_path):
  cfg = _phantom_cfg(crop=8)
  cfg.root, cfg.tasks = str(_write_inverse_pairs(tmp_path)), ["MRI-CT"]
  batches = _take(_make(cfg, "stage2", batch=4), 6)
  originals = [imageio.to_model_range(imageio.read_image(
      tmp_path / "MRI-CT" / "train" / "MRI" / f"{i:03d}.png")) for i in range(3)]
  orientations = set()
  for batch in batches:
    np.testing.assert_allclose(batch["b"], -batch["a"], atol=1e-6)
    for crop in batch["a"][..., 0]:
      orientations.add(_locate(crop, originals))
  assert len(orientations) == 4  # no flip, horizontal, vertical, both


def _locate(crop, originals):
  """Which flip of which original holds `crop`; fails if none does."""
  size = crop.shape[0]
  for image in originals:
    for flip_v, flip_h in itertools.product((False, True), repeat=2):
      view = image[::-1 if flip_v else 1, ::-1 if flip_h else 1]
      windows = np.lib.stride_tricks.sliding_window_view(view, (size, size))
      if np.any(np.all(windows == crop, axis=(-1, -2))):
        return flip_v, flip_h
  raise AssertionError("crop not found in any original")


def test_rgb_partner_is_luma(tmp_path):
  phantoms.write_phantom_dataset(tmp_path, ["MRI-PET"], "train", count=2, size=32)
  cfg = _phantom_cfg(crop=32, flip=False)
  cfg.root, cfg.tasks = str(tmp_path), ["MRI-PET"]
  (batch,) = _take(_make(cfg, "stage2", batch=2), 1)
  lumas = {imageio.to_model_range(imageio.read_image(p)).tobytes()
           for p in (tmp_path / "MRI-PET" / "train" / "PET").iterdir()}
  assert {b[..., 0].tobytes() for b in batch["b"]} == lumas


def test_same_seed_same_stream_other_seed_differs():
  cfg = _phantom_cfg()
  first = _take(_make(cfg, "stage1", batch=4, seed=3), 4)
  second = _take(_make(cfg, "stage1", batch=4, seed=3), 4)
  other = _take(_make(cfg, "stage1", batch=4, seed=4), 4)
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(first, other))


def test_host_shards_are_disjoint():
  assert sorted(itertools.chain(*(pipeline.host_shard(10, i, 3) for i in range(3)))) == list(
      range(10))
  cfg = _phantom_cfg(count=8, size=32, crop=32, flip=False)
  seen = []
  for index in range(2):
    batches = _take(_make(cfg, "stage2", batch=4, index=index, count=2), 4)  # 2 per host
    seen.append({a.tobytes() for batch in batches for a in batch["a"]})
  assert len(seen[0]) == len(seen[1]) == 4  # each host cycles through its 4 records
  assert not seen[0] & seen[1]


def test_iterator_state_resumes_exact_stream():
  dataset = _make(_phantom_cfg(), "stage1", batch=2, seed=11)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])


@pytest.mark.slow
def test_worker_processes_give_the_same_stream():
  cfg = _phantom_cfg(count=4)
  expected = _take(_make(cfg, "stage2", batch=2), 4)
  cfg.num_workers = 2
  iterator = iter(_make(cfg, "stage2", batch=2))
  try:
    for want in expected:
      got = next(iterator)
      np.testing.assert_array_equal(got["a"], want["a"])
      np.testing.assert_array_equal(got["b"], want["b"])
  finally:
    iterator.close()


def test_default_process_index_and_count():
  dataset = pipeline.make_train_dataset(_phantom_cfg(), stage="stage2", global_batch_size=2,
                                        seed=0)
  assert _take(dataset, 1)[0]["a"].shape == (2, 16, 16, 1)


# ----- errors -----------------------------------------------------------------------


def test_batch_size_errors():
  cfg = _phantom_cfg()
  with pytest.raises(ConfigError, match="multiple of the process count 4"):
    _make(cfg, "stage2", batch=6, index=0, count=4)
  with pytest.raises(ConfigError, match="must be even"):
    _make(cfg, "stage1", batch=6, index=0, count=2)
  with pytest.raises(ConfigError, match="stage must be"):
    _make(cfg, "stage3")
  with pytest.raises(ConfigError, match="seed"):
    _make(cfg, "stage2", seed=-1)
  with pytest.raises(ConfigError, match="process index 2"):
    _make(cfg, "stage2", batch=2, index=2, count=2)


def test_config_errors():
  cfg = _phantom_cfg(size=32, crop=64)
  with pytest.raises(ConfigError, match="phantom_size"):
    _make(cfg)
  cfg = _phantom_cfg()
  cfg.tasks = ["MRI-XR"]
  with pytest.raises(ConfigError, match="data.tasks.*MRI-XR"):
    _make(cfg)


def test_more_hosts_than_records():
  with pytest.raises(DataError, match="2 training pairs"):
    _make(_phantom_cfg(count=2), "stage2", batch=4, index=0, count=4)


def test_missing_data_root(tmp_path):
  cfg = _phantom_cfg()
  cfg.root = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="nowhere"):
    _make(cfg)


def test_empty_data_root(tmp_path):
  cfg = _phantom_cfg()
  cfg.root = str(tmp_path)
  with pytest.raises(DataError, match="empty"):
    _make(cfg)


def test_image_smaller_than_crop(tmp_path):
  cfg = _phantom_cfg(crop=32)
  cfg.root, cfg.tasks = str(_write_inverse_pairs(tmp_path, size=24)), ["MRI-CT"]
  with pytest.raises(DataError, match=r"000\.png.* 24x24 .*smaller than the 32x32"):
    _make(cfg)


def test_corrupt_file_stops_before_training(tmp_path):
  cfg = _phantom_cfg(crop=8)
  cfg.root, cfg.tasks = str(_write_inverse_pairs(tmp_path)), ["MRI-CT"]
  bad = tmp_path / "MRI-CT" / "train" / "CT" / "001.png"
  bad.write_bytes(b"garbage")
  with pytest.raises(ImageReadError, match="001.png"):
    _make(cfg)


def test_pair_size_mismatch(tmp_path):
  cfg = _phantom_cfg(crop=8)
  cfg.root, cfg.tasks = str(_write_inverse_pairs(tmp_path)), ["MRI-CT"]
  Image.fromarray(np.zeros((20, 24), np.uint8)).save(
      tmp_path / "MRI-CT" / "train" / "CT" / "002.png")
  with pytest.raises(DataError, match=r"002\.png is 24x24 but .*002\.png is 20x24"):
    _make(cfg)
