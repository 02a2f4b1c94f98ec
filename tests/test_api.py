"""The Python API: arrays of any type and size, batches, files, volumes, determinism."""

import jax
import numpy as np
import pytest

import dmfnet_jax
from dmfnet_jax import api, imageio
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import DataError


@pytest.fixture(scope="module")
def fuser(micro_stage2_workdir):
  return dmfnet_jax.load(micro_stage2_workdir, batch_size=2)


@pytest.fixture(scope="module")
def pet_pair():
  return phantoms.phantom_pair(0, size=48, task="MRI-PET", seed=5)


@pytest.fixture(scope="module")
def ct_pair():
  return phantoms.phantom_pair(1, size=48, task="MRI-CT", seed=5)


def test_load_reads_the_structure_from_the_checkpoint(fuser):
  assert fuser.config.model.inner_channel == 16 and fuser.batch_size == 2


def test_fuses_grey_and_keeps_colour(fuser, ct_pair, pet_pair):
  grey = fuser.fuse(*ct_pair)
  assert grey.dtype == np.uint8 and grey.shape == (48, 48)
  colour = fuser.fuse(*pet_pair)
  assert colour.dtype == np.uint8 and colour.shape == (48, 48, 3)
  # The second source's chroma is kept (where the RGB result is not clipped).
  unclipped = np.all((colour > 3) & (colour < 252), axis=-1)
  assert unclipped.mean() > 0.3
  np.testing.assert_allclose(imageio.rgb_to_ycrcb(colour)[unclipped][:, 1:].astype(int),
                             imageio.rgb_to_ycrcb(pet_pair[1])[unclipped][:, 1:].astype(int),
                             atol=3)


def test_input_types_map_to_the_same_intensities(fuser, ct_pair):
  mri, ct = ct_pair
  reference = fuser.fuse(mri, ct).astype(int)
  as_uint16 = fuser.fuse(mri.astype(np.uint16) * 257, ct.astype(np.uint16) * 257)
  as_float = fuser.fuse(mri / 255.0, ct.astype(np.float32) / 255.0)
  as_int64 = fuser.fuse(mri.astype(np.int64), ct.astype(np.int64))
  as_rgba_mri = fuser.fuse(np.dstack([mri, mri, mri, np.full_like(mri, 255)]), ct)
  for other in (as_uint16, as_float, as_int64, as_rgba_mri):
    assert np.abs(other.astype(int) - reference).max() <= 1


def test_any_size_and_batches_match_single_pairs(fuser, ct_pair, pet_pair):
  odd = (ct_pair[0][:37, :45], ct_pair[1][:37, :45])
  pairs = [ct_pair, odd, pet_pair, ct_pair]
  batch = fuser.fuse_batch(pairs)
  assert batch[1].shape == (37, 45)
  for pair, fused in zip(pairs, batch):
    np.testing.assert_array_equal(fused, fuser.fuse(*pair))


def test_deterministic_for_a_seed_and_compiled_once_per_shape(micro_stage2_workdir, ct_pair):
  first = dmfnet_jax.load(micro_stage2_workdir, seed=3)
  again = dmfnet_jax.load(micro_stage2_workdir, seed=3)
  other_seed = dmfnet_jax.load(micro_stage2_workdir, seed=4)
  np.testing.assert_array_equal(first.fuse(*ct_pair), again.fuse(*ct_pair))
  assert not np.array_equal(first.fuse(*ct_pair), other_seed.fuse(*ct_pair))
  before = first.model._fuse._cache_size()  # pylint: disable=protected-access
  first.fuse_batch([ct_pair] * 3)
  first.fuse(ct_pair[0][::-1], ct_pair[1][::-1])
  assert first.model._fuse._cache_size() == before  # pylint: disable=protected-access


@pytest.mark.parametrize("mri, other, message", [
    (np.zeros(48), np.zeros(48), "pair 0: MRI: expected a 2-D image"),
    (np.zeros((2, 48, 48, 3)), np.zeros((2, 48, 48, 3)), "pair 0: MRI: expected a 2-D image"),
    (np.zeros((48, 48), complex), np.zeros((48, 48)), "pair 0: MRI: pixels of type complex128"),
    (np.zeros((48, 48), object), np.zeros((48, 48)), "pixels of type object"),
    (np.zeros((48, 48), bool), np.zeros((48, 48)), "pixels of type bool"),
    (np.zeros((48, 48)), np.zeros((40, 48)), "the MRI is 48x48 but the second image is 40x48"),
    (np.full((48, 48), np.nan), np.zeros((48, 48)), "2304 of 2304 pixels are NaN or infinite"),
    (np.zeros((1, 48)), np.zeros((1, 48)), "1x48 pixels is too small"),
])
def test_bad_arrays_are_named(fuser, mri, other, message):
  with pytest.raises(DataError, match=message):
    fuser.fuse(mri, other)


def test_fuse_files(fuser, pet_pair, tmp_path):
  paths = [imageio.write_image_atomic(tmp_path / name, image)
           for name, image in zip(("mri.png", "pet.png"), pet_pair)]
  fused = fuser.fuse_files(*paths, output=tmp_path / "out" / "fused.png")
  assert fused.shape == (48, 48, 3)
  np.testing.assert_array_equal(imageio.read_image(tmp_path / "out" / "fused.png"), fused)


def test_an_output_over_an_input_is_refused(fuser, pet_pair, tmp_path):
  paths = [imageio.write_image_atomic(tmp_path / name, image)
           for name, image in zip(("mri.png", "pet.png"), pet_pair)]
  before = paths[0].read_bytes()
  with pytest.raises(DataError, match="is the input"):
    fuser.fuse_files(*paths, output=paths[0])
  assert paths[0].read_bytes() == before


def test_fuse_volumes(fuser, tmp_path):
  nib = pytest.importorskip("nibabel")
  slices = [phantoms.phantom_pair(i, size=32, task="MRI-PET", seed=1) for i in range(4)]
  affine = np.diag([1.5, 1.5, 3.0, 1.0])
  mri = np.stack([s[0] for s in slices], axis=-1).astype(np.float32)
  pet = np.stack([imageio.opencv_luma_uint8(s[1]) for s in slices], axis=-1).astype(np.float32)
  nib.save(nib.Nifti1Image(mri, affine), tmp_path / "t1.nii.gz")
  nib.save(nib.Nifti1Image(pet, affine), tmp_path / "sub_PET.nii.gz")
  summary = fuser.fuse_volumes(tmp_path / "t1.nii.gz", tmp_path / "sub_PET.nii.gz",
                               tmp_path / "fused.nii.gz", show_progress=False)
  assert summary["modality"] == "PET" and summary["fused_slices"] == 4
  written = nib.load(tmp_path / "fused.nii.gz")
  np.testing.assert_allclose(written.affine, affine)
  assert (tmp_path / "fused_montage.png").is_file()


def test_modality_from_path():
  assert api.modality_from_path("data/sub-01_PET.nii.gz") == "PET"
  assert api.modality_from_path("dicom/SPECT") == "SPECT"
  assert api.modality_from_path("ct_head.nii") == "CT"
  with pytest.raises(DataError, match="cannot tell the modality"):
    api.modality_from_path("scan2.nii.gz")


def test_the_shipped_model_in_one_line(ct_pair):
  fused = dmfnet_jax.load().fuse(*ct_pair)
  assert fused.shape == (48, 48) and fused.dtype == np.uint8 and 0 < fused.mean() < 255
  assert isinstance(dmfnet_jax.load, type(api.load)) and jax.device_count() >= 1
