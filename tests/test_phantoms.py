"""Synthetic head phantoms: deterministic, in range, registered, colour where expected."""

import numpy as np
import pytest

from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import DataError

SIZE = 64


@pytest.mark.parametrize("task", pairs_lib.TASKS)
def test_deterministic(task):
  first = phantoms.phantom_pair(3, SIZE, task, seed=7)
  second = phantoms.phantom_pair(3, SIZE, task, seed=7)
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)


def test_varies_with_index_and_seed():
  base = phantoms.phantom_pair(0, SIZE, "MRI-CT", seed=0)[0]
  assert not np.array_equal(base, phantoms.phantom_pair(1, SIZE, "MRI-CT", seed=0)[0])
  assert not np.array_equal(base, phantoms.phantom_pair(0, SIZE, "MRI-CT", seed=1)[0])


def test_same_anatomy_across_tasks():
  """The MRI depends on (seed, index) only; the task picks the partner's rendering."""
  mri_ct, ct = phantoms.phantom_pair(2, SIZE, "MRI-CT")
  mri_pet, _ = phantoms.phantom_pair(2, SIZE, "MRI-PET")
  np.testing.assert_array_equal(mri_ct, mri_pet)
  # Registered: the head covers the same pixels in both images.
  head_mri, head_ct = mri_ct > 10, ct > 10
  assert (head_mri & head_ct).sum() / (head_mri | head_ct).sum() > 0.8


@pytest.mark.parametrize("task, channels", [("MRI-CT", None), ("MRI-PET", 3), ("MRI-SPECT", 3)])
def test_shapes_types_and_range(task, channels):
  mri, other = phantoms.phantom_pair(5, SIZE, task)
  assert mri.shape == (SIZE, SIZE) and mri.dtype == np.uint8
  expected = (SIZE, SIZE) if channels is None else (SIZE, SIZE, channels)
  assert other.shape == expected and other.dtype == np.uint8
  for image in (mri, other):
    assert image.max() > 150  # uses the range
    assert image[:2, :2].max() == 0 and image[-2:, -2:].max() == 0  # dark outside the head
    assert image[SIZE // 2 - 4:SIZE // 2 + 4, SIZE // 2 - 4:SIZE // 2 + 4].mean() > 5


@pytest.mark.parametrize("task", ["MRI-PET", "MRI-SPECT"])
def test_functional_images_are_colour(task):
  _, rgb = phantoms.phantom_pair(1, SIZE, task)
  r, g, b = (rgb[..., c].astype(int) for c in range(3))
  inside = rgb.max(axis=-1) > 20
  # Truly coloured: channels differ substantially inside the head.
  assert np.mean(np.abs(r - g)[inside] + np.abs(g - b)[inside]) > 40


def test_ct_bone_is_brightest():
  _, ct = phantoms.phantom_pair(4, 128, "MRI-CT")
  head = ct > 10
  assert np.percentile(ct[head], 99) > 200  # skull
  assert np.median(ct[head]) < 120  # soft tissue is dim


def test_bad_arguments():
  with pytest.raises(DataError, match="MRI-MR"):
    phantoms.phantom_pair(0, SIZE, "MRI-MR")
  with pytest.raises(ValueError):
    phantoms.phantom_pair(0, 8, "MRI-CT")
  with pytest.raises(ValueError):
    phantoms.phantom_pair(-1, SIZE, "MRI-CT")


def test_write_dataset_round_trip(tmp_path):
  written = phantoms.write_phantom_dataset(tmp_path, ["MRI-CT", "MRI-SPECT"], "test", count=2,
                                           size=32, seed=3)
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT", "MRI-SPECT"], "test")
  assert found == written
  assert (tmp_path / "MRI-SPECT" / "test" / "SPECT" / "phantom_00001.png").is_file()
  loaded = pairs_lib.load_pair(found[-1])
  assert loaded.b_raw.shape == (32, 32, 3)
  assert loaded.a.shape == loaded.b.shape == (32, 32)
  assert -1.0 <= loaded.a.min() < loaded.a.max() <= 1.0
  # Splits and tasks get different anatomies.
  other_split = phantoms.write_phantom_dataset(tmp_path, ["MRI-CT"], "train", count=1, size=32,
                                               seed=3)
  train_mri = pairs_lib.load_pair(other_split[0]).a
  assert not np.array_equal(train_mri, pairs_lib.load_pair(found[0]).a)
  assert not np.array_equal(pairs_lib.load_pair(found[0]).a, pairs_lib.load_pair(found[2]).a)
