"""The volume layer: NIfTI and DICOM in, windows, colour, slice-wise fusion with a stub.

Every volume is built here from phantom slices (32 px, 10 slices) and written with
nibabel or pydicom; nothing is downloaded. The fuser is a stub (pixel-wise max, or
"return the MRI slice" to check that orientation round-trips exactly).
"""

import gzip
import pathlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dmfnet_jax import imageio, volumes
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import DataError

SIZE = 32
SLICES = 10
# Oblique, anisotropic, with a translation: nothing in the code may assume identity.
_ROTATION = np.array([[np.cos(0.2), -np.sin(0.2), 0.0], [np.sin(0.2), np.cos(0.2), 0.0],
                      [0.0, 0.0, 1.0]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROTATION @ np.diag([0.9, 1.1, 3.0])
AFFINE[:3, 3] = [-14.0, 20.5, -30.0]
# Storage axes permuted and flipped (axis 0 runs inferior, axis 1 left, axis 2
# anterior): canonical axis 2 (axial) is storage axis 0, reversed.
PERMUTED = np.array([[0.0, -1.0, 0.0, 16.0],
                     [0.0, 0.0, 1.0, -16.0],
                     [-3.0, 0.0, 0.0, 20.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _phantom_stack(task, count=SLICES, size=SIZE):
  """(MRI, other) float32 size x size x count volumes, other made scalar (luma)."""
  mri, other = [], []
  for index in range(count):
    a, b = phantoms.phantom_pair(index, size, task)
    mri.append(a)
    other.append(imageio.opencv_luma_uint8(b) if b.ndim == 3 else b)
  return (np.stack(mri, axis=-1).astype(np.float32),
          np.stack(other, axis=-1).astype(np.float32))


def _write_nifti(path, data, affine=AFFINE, dtype=np.float32, slope=None):
  image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
  if slope is not None:
    image.header.set_slope_inter(*slope)
  nib.save(image, str(path))
  return path


def _dicom_slice(pixels, position, orientation, spacing, series_uid, slope, intercept):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = MRImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = MRImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.SeriesInstanceUID = series_uid
  ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
  ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
  ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
  ds.SliceThickness = "3.0"
  ds.RescaleSlope = f"{slope:g}"
  ds.RescaleIntercept = f"{intercept:g}"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 1
  ds.PixelData = pixels.astype("<i2").tobytes()
  return ds


def _write_dicom_series(folder, data, affine=AFFINE, slope=2.0, intercept=-1024.0,
                        series_uid=None, seed=0, skip=(), duplicate=None, prefix="IM"):
  """A DICOM series of `data` (columns x rows x slices, stored units) on `affine` (RAS).

  Files get random names in a shuffled order, so only the positions order them.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  series_uid = series_uid or generate_uid()
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
  column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  orientation = np.concatenate([lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing])
  rng = np.random.default_rng(seed)
  indices = [k for k in range(data.shape[2]) if k not in skip]
  if duplicate is not None:
    indices.append(duplicate)
  names = rng.permutation(len(indices))
  for name, k in zip(names, rng.permutation(indices)):
    stored = np.round((data[:, :, k] - intercept) / slope).T  # rows x columns
    ds = _dicom_slice(stored, lps[:3, :3] @ [0, 0, k] + lps[:3, 3], orientation,
                      (row_spacing, column_spacing), series_uid, slope, intercept)
    ds.save_as(folder / f"{prefix}{name:04d}.dcm", enforce_file_format=True)
  return folder


def _stub_max(batch):
  """Pixel-wise max of the MRI and the other's luma (grey; the pipeline colours it)."""
  return [np.maximum(m, imageio.opencv_luma_uint8(o) if o.ndim == 3 else o) for m, o in batch]


def _stub_mri(batch):
  return [m.copy() for m, _ in batch]


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory):
  folder = tmp_path_factory.mktemp("ct")
  mri, ct = _phantom_stack("MRI-CT")
  mri[:, :, 0] = 0  # the first slice is empty in both sources
  ct[:, :, 0] = 0
  return (_write_nifti(folder / "mri.nii.gz", mri), _write_nifti(folder / "ct.nii", ct * 8 - 1000),
          mri, ct * 8 - 1000)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip(tmp_path, name):
  data = np.random.default_rng(0).integers(0, 300, (12, 10, 8)).astype(np.float32)
  path = _write_nifti(tmp_path / name, data, dtype=np.int16, slope=(0.5, 10.0))
  volume = volumes.read_volume(path)
  assert volume.shape == (12, 10, 8) and volume.data.dtype == np.float32
  np.testing.assert_allclose(volume.data, data.astype(np.int16) * 0.5 + 10.0)
  np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
  assert volume.path == path
  np.testing.assert_allclose(volume.voxel_sizes, [0.9, 1.1, 3.0], atol=1e-6)


def test_nifti_with_a_trailing_length_one_axis_is_3d(tmp_path):
  data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
  assert volumes.read_volume(_write_nifti(tmp_path / "v.nii", data)).shape == (4, 5, 6)


def test_dicom_series_round_trip_shuffled_with_slope_and_intercept(tmp_path):
  data = np.random.default_rng(1).integers(-1000, 2000, (12, 10, 7)).astype(np.float32) * 2
  folder = _write_dicom_series(tmp_path / "series", data, slope=2.0, intercept=-1024.0)
  (folder / "notes.txt").write_text("not DICOM, ignored")
  volume = volumes.read_volume(folder)
  assert volume.shape == (12, 10, 7)
  np.testing.assert_allclose(volume.data, data)
  np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
  assert volumes.is_volume_path(folder)


def test_dicom_affine_follows_the_lps_to_ras_convention(tmp_path):
  """Hand-derived: a plain axial slice, rows along +y (posterior), columns along +x (left)."""
  folder = tmp_path / "axial"
  folder.mkdir()
  uid = generate_uid()
  for k in range(3):
    pixels = np.full((4, 5), 10 * k, np.int16)
    pixels[1, 3] = 500  # row 1, column 3
    ds = _dicom_slice(pixels, (-100.0, -120.0, 5.0 + 3.0 * k), (1, 0, 0, 0, 1, 0),
                      (0.8, 0.9), uid, 1.0, 0.0)
    ds.save_as(folder / f"{2 - k}.dcm", enforce_file_format=True)
  volume = volumes.read_volume(folder)
  expected = np.array([[-0.9, 0, 0, 100.0], [0, -0.8, 0, 120.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
  np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
  assert volume.shape == (5, 4, 3)  # columns, rows, slices
  assert volume.data[3, 1, 0] == 500 and volume.data[0, 0, 2] == 20
  assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")


def _expect_error(path, *fragments):
  with pytest.raises(DataError) as caught:
    volumes.read_volume(path)
  message = str(caught.value)
  assert "\n" not in message
  for fragment in (str(path),) + fragments:
    assert fragment in message, message
  return message


def test_dicom_series_errors(tmp_path):
  data = np.random.default_rng(2).integers(0, 100, (6, 6, 6)).astype(np.float32) * 2
  _expect_error(_write_dicom_series(tmp_path / "gap", data, skip=(3,)), "slice is missing")
  _expect_error(_write_dicom_series(tmp_path / "dup", data, duplicate=2),
                "duplicated slice position")
  mixed = _write_dicom_series(tmp_path / "mixed", data[:, :, :3], series_uid="1.2.3")
  _write_dicom_series(mixed, data[:, :, 3:], series_uid="1.2.4", prefix="B")
  _expect_error(mixed, "mixes 2 DICOM series", "1.2.3", "1.2.4")
  single = _write_dicom_series(tmp_path / "single", data[:, :, :1])
  _expect_error(single, "single DICOM slice", "not a volume")
  _expect_error(next(single.iterdir()), "single DICOM file")
  empty = tmp_path / "no_dicom"
  empty.mkdir()
  (empty / "readme.txt").write_text("hello")
  _expect_error(empty, "no DICOM files")
  assert not volumes.is_volume_path(empty)


def test_nifti_errors(tmp_path):
  _expect_error(_write_nifti(tmp_path / "4d.nii", np.ones((4, 4, 4, 3))), "is 4-D", "4x4x4x3")
  _expect_error(_write_nifti(tmp_path / "2d.nii", np.arange(16.0).reshape(4, 4)), "2-D image")
  nan = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
  nan[0, 0, :3] = np.nan
  nan[1, 1, 1] = np.inf
  _expect_error(_write_nifti(tmp_path / "nan.nii.gz", nan), "4 of 64 voxels are NaN or infinite")
  _expect_error(_write_nifti(tmp_path / "zeros.nii", np.zeros((4, 4, 4))), "is empty")
  text = tmp_path / "text.nii"
  text.write_text("this is not a NIfTI file\n" * 20)
  _expect_error(text, "not a readable NIfTI file")
  whole = _write_nifti(tmp_path / "whole.nii", np.arange(8000.0).reshape(20, 20, 20)).read_bytes()
  truncated = tmp_path / "truncated.nii.gz"
  truncated.write_bytes(gzip.compress(whole[:5000]))
  _expect_error(truncated, "cannot read the voxels")
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(gzip.compress(whole)[:3000])
  _expect_error(cut, "cannot read the voxels")
  other = tmp_path / "data.csv"
  other.write_text("1,2,3\n")
  _expect_error(other, "not a volume")
  png = tmp_path / "slice.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
  _expect_error(png, "is a 2-D image, not a volume")
  renamed = tmp_path / "slice.bin"
  renamed.write_bytes(png.read_bytes())
  _expect_error(renamed, "is a 2-D image, not a volume")
  _expect_error(tmp_path / "missing.nii.gz", "no such volume")


def test_is_volume_path(tmp_path):
  assert volumes.is_volume_path(tmp_path / "a.nii")
  assert volumes.is_volume_path(tmp_path / "A.NII.GZ")
  assert not volumes.is_volume_path(tmp_path / "a.png")
  assert not volumes.is_volume_path(tmp_path)  # an empty folder


# ----------------------------------------------------------------------------- grids, windows


def test_grid_mismatch_names_both_files_and_small_differences_pass(tmp_path):
  data = np.random.default_rng(3).random((6, 7, 8)).astype(np.float32) + 1
  a = volumes.read_volume(_write_nifti(tmp_path / "a.nii", data))
  nearly = AFFINE.copy()
  nearly[:3, 3] += 2e-4
  volumes.check_same_grid(a, volumes.read_volume(_write_nifti(tmp_path / "b.nii", data, nearly)))
  shifted = AFFINE.copy()
  shifted[:3, 3] += [1.0, 0.0, 0.0]
  with pytest.raises(DataError, match=r"a\.nii and .*c\.nii are not on the same grid.*1 mm apart"
                     r".*resample=True"):
    volumes.check_same_grid(a, volumes.read_volume(_write_nifti(tmp_path / "c.nii", data, shifted)))
  with pytest.raises(DataError,
                     match=r"a\.nii and .*d\.nii are not on the same grid.*6x7x8.*6x7x7"):
    volumes.check_same_grid(a, volumes.read_volume(_write_nifti(tmp_path / "d.nii", data[..., :7])))


def test_windows():
  data = np.zeros((10, 10, 11), np.float32)
  data[:, :, 1:] = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
  low, high = volumes.percentile_window(data)
  np.testing.assert_allclose([low, high], np.percentile(np.arange(1, 1001), [0.5, 99.5]))
  ct = np.array([-1000.0, -160.0, 40.0, 240.0, 1500.0])
  np.testing.assert_array_equal(volumes.window_to_uint8(ct, (-160, 240)), [0, 0, 128, 255, 255])
  constant_foreground = np.zeros((4, 4, 4), np.float32)
  constant_foreground[1, 1, 1] = 7.0
  assert volumes.percentile_window(constant_foreground) == (0.0, 7.0)


def test_colour_maps():
  assert set(volumes.DEFAULT_COLOURMAP.items()) == {("CT", "gray"), ("PET", "hot"),
                                                    ("SPECT", "spect")}
  for name, anchors in volumes.COLOURMAPS.items():
    assert anchors[0, 0] == 0.0 and anchors[-1, 0] == 1.0 and np.all(np.diff(anchors[:, 0]) > 0)
    lut = volumes.colour_lookup_table(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    if name != "jet":
      assert lut[0].tolist() == [0, 0, 0], name  # empty background stays black
  assert volumes.colour_lookup_table("jet")[0].tolist() == [0, 0, 128]
  hot_luma = imageio.opencv_luma_uint8(volumes.colour_lookup_table("hot")[None])[0].astype(int)
  assert np.all(np.diff(hot_luma) >= 0) and hot_luma[-1] == 255
  grey = volumes.colour_lookup_table("gray")
  np.testing.assert_array_equal(grey, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1))
  with pytest.raises(DataError, match="unknown colour map 'viridis'"):
    volumes.colourmap_anchors("viridis")


# ----------------------------------------------------------------------------- fusion


def test_ct_pipeline_writes_grey_nifti_on_the_mri_grid_and_skips_empty_slices(ct_pair, tmp_path):
  mri_path, ct_path, mri, ct = ct_pair
  seen = []

  def fuser(batch):
    seen.extend(batch)
    return _stub_max(batch)

  output = tmp_path / "out" / "fused.nii.gz"
  summary = volumes.fuse_volume_pair(mri_path, ct_path, output, fuse_slices=fuser, modality="CT",
                                     window_other=(-1000, 1040), batch_size=4,
                                     show_progress=False)
  assert summary["slices"] == SLICES and summary["fused_slices"] == SLICES - 1
  assert summary["skipped_empty_slices"] == 1 and len(seen) == SLICES - 1
  assert all(m.shape == (SIZE, SIZE) and o.shape == (SIZE, SIZE) and o.dtype == np.uint8
             for m, o in seen)
  assert summary["output"] == str(output) and summary["grey_output"]
  assert summary["window_other"] == [-1000.0, 1040.0]
  montage = pathlib.Path(summary["montage"])
  assert montage == tmp_path / "out" / "fused_montage.png"
  assert imageio.read_image(montage).ndim == 3 and summary["outputs"] == [str(output), str(montage)]
  written = nib.load(str(output))
  np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
  assert written.get_data_dtype() == np.uint8
  fused = np.asarray(written.dataobj)
  expected = np.maximum(volumes.window_to_uint8(mri, volumes.percentile_window(mri)),
                        volumes.window_to_uint8(ct, (-1000, 1040)))
  np.testing.assert_array_equal(fused, expected)
  assert not fused[:, :, 0].any()


@pytest.mark.parametrize("fuser", [_stub_max, "colour"])
def test_pet_pipeline_writes_rgb(tmp_path, fuser):
  mri, pet = _phantom_stack("MRI-PET", count=4)
  mri_path = _write_nifti(tmp_path / "mri.nii", mri)
  pet_path = _write_nifti(tmp_path / "pet.nii", pet)
  if fuser == "colour":  # a fuser that applies the colour rule itself
    fuser = lambda batch: [imageio.colourise(f, o) for f, (_, o) in zip(_stub_max(batch), batch)]
  summary = volumes.fuse_volume_pair(mri_path, pet_path, tmp_path / "fused.nii", fuse_slices=fuser,
                                     modality="pet", show_progress=False)
  assert summary["colormap"] == "hot" and not summary["grey_output"]
  written = nib.load(summary["output"])
  assert written.get_data_dtype() == volumes.RGB_DTYPE
  np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
  rgb = np.asarray(written.dataobj)
  rgb = np.stack([rgb["R"], rgb["G"], rgb["B"]], axis=-1)
  assert rgb.shape == (SIZE, SIZE, 4, 3)
  # The luma is the fused value; the colour is the PET's hot colour.
  lut = volumes.colour_lookup_table("hot")
  pet8 = volumes.window_to_uint8(pet, volumes.percentile_window(pet))
  expected = np.stack([imageio.colourise(
      np.maximum(volumes.window_to_uint8(mri, volumes.percentile_window(mri))[..., k],
                 imageio.opencv_luma_uint8(lut[pet8[..., k]])), lut[pet8[..., k]])
      for k in range(4)], axis=2)
  np.testing.assert_array_equal(rgb, expected)
  grey = volumes.fuse_volume_pair(mri_path, pet_path, tmp_path / "grey.nii.gz", fuse_slices=fuser,
                                  modality="PET", grey_output=True, show_progress=False)
  assert nib.load(grey["output"]).get_data_dtype() == np.uint8 and grey["grey_output"]


@pytest.mark.parametrize("axis, count, shape", [(2, 8, (12, 10)), (1, 12, (8, 10)),
                                                (0, 10, (8, 12))])
def test_axis_is_canonical_and_output_returns_to_the_mri_orientation(tmp_path, axis, count, shape):
  """Storage (8, 10, 12) on PERMUTED is (10, 12, 8) in RAS: axis 2 is storage axis 0.

  Slices are shown rotated (rows = the second canonical axis, reversed).
  """
  rng = np.random.default_rng(4)
  mri = rng.integers(1, 200, (8, 10, 12)).astype(np.float32)
  spect = rng.integers(0, 200, (8, 10, 12)).astype(np.float32)
  mri_path = _write_nifti(tmp_path / "mri.nii", mri, PERMUTED)
  spect_path = _write_nifti(tmp_path / "spect.nii", spect, PERMUTED)
  shapes = []

  def fuser(batch):
    shapes.extend((m.shape, o.shape) for m, o in batch)
    return _stub_mri(batch)

  canonical = nib.as_closest_canonical(nib.Nifti1Image(mri, PERMUTED))
  np.testing.assert_array_equal(volumes.to_canonical(mri, PERMUTED), np.asarray(canonical.dataobj))
  summary = volumes.fuse_volume_pair(mri_path, spect_path, tmp_path / "out.nii", fuse_slices=fuser,
                                     modality="SPECT", axis=axis, grey_output=True,
                                     window_mri=(0, 255), show_progress=False)
  assert summary["slices"] == count and shapes == [(shape, shape + (3,))] * count
  written = nib.load(summary["output"])
  np.testing.assert_allclose(written.affine, PERMUTED, atol=1e-6)
  # The identity fuser gives back the windowed MRI voxel for voxel: no flip, no transpose.
  np.testing.assert_array_equal(np.asarray(written.dataobj),
                                volumes.window_to_uint8(mri, (0, 255)))
  # Colour output goes back the same way: a fuser returning the coloured SPECT slice.
  summary = volumes.fuse_volume_pair(mri_path, spect_path, tmp_path / "rgb.nii",
                                     fuse_slices=lambda batch: [o for _, o in batch],
                                     modality="SPECT", axis=axis, window_other=(0, 255),
                                     show_progress=False)
  rgb = np.asarray(nib.load(summary["output"]).dataobj)
  expected = volumes.colour_lookup_table("spect")[volumes.window_to_uint8(spect, (0, 255))]
  np.testing.assert_array_equal(np.stack([rgb["R"], rgb["G"], rgb["B"]], axis=-1), expected)


def test_axial_slices_are_shown_anterior_up(tmp_path):
  data = np.zeros((6, 8, 3), np.float32)
  data[:, -1, :] = 100.0  # the most anterior row (RAS, identity affine)
  data[0, 0, 0] = 1.0
  path = _write_nifti(tmp_path / "mri.nii", data, np.eye(4))
  seen = []
  volumes.fuse_volume_pair(path, path, tmp_path / "o.nii", fuse_slices=lambda b: seen.extend(b)
                           or _stub_mri(b), modality="CT", show_progress=False)
  assert seen[0][0].shape == (8, 6) and seen[0][0][0].min() == 255


def test_resampling_on_request(tmp_path, ct_pair):
  mri_path, _, _, ct = ct_pair
  shifted = AFFINE.copy()
  shifted[:3, 3] += AFFINE[:3, 0]  # one voxel along storage axis 0
  ct_path = _write_nifti(tmp_path / "ct_shifted.nii", ct[1:], shifted)
  with pytest.raises(DataError, match="not on the same grid.*resample=True"):
    volumes.fuse_volume_pair(mri_path, ct_path, tmp_path / "x.nii", fuse_slices=_stub_max,
                             modality="CT", show_progress=False)
  summary = volumes.fuse_volume_pair(
      mri_path, ct_path, tmp_path / "resampled.nii", fuse_slices=lambda b: [o for _, o in b],
      modality="CT", resample=True, window_other=(-1000, 1040), show_progress=False)
  assert summary["resampled"]
  fused = np.asarray(nib.load(summary["output"]).dataobj)
  expected = volumes.window_to_uint8(ct, (-1000, 1040))
  # Voxel i of the MRI grid is voxel i - 1 of the shifted one: all but the first plane match.
  np.testing.assert_array_equal(fused[1:], expected[1:])
  assert not fused[0].any()  # outside the CT's field of view: its minimum, window floor


def test_pipeline_refuses_bad_requests(ct_pair, tmp_path):
  mri_path, ct_path, _, _ = ct_pair
  before = mri_path.read_bytes()
  call = lambda output, **kw: volumes.fuse_volume_pair(
      mri_path, ct_path, output, fuse_slices=_stub_max, show_progress=False,
      **{"modality": "CT", **kw})
  with pytest.raises(DataError, match=f"{mri_path}: would overwrite the input {mri_path}"):
    call(mri_path)
  assert mri_path.read_bytes() == before
  with pytest.raises(DataError, match=r"out\.png: the output volume must be named .nii or .nii.gz"):
    call(tmp_path / "out.png")
  with pytest.raises(DataError, match="unknown modality 'MRI'"):
    call(tmp_path / "o.nii", modality="MRI")
  with pytest.raises(DataError, match="axis must be"):
    call(tmp_path / "o.nii", axis=3)
  with pytest.raises(DataError, match=r"ct\.nii: a window is \(low, high\) with low < high"):
    call(tmp_path / "o.nii", window_other=(240, -160))
  with pytest.raises(DataError, match="every slice is empty after windowing"):
    call(tmp_path / "o.nii", window_mri=(1e6, 2e6), window_other=(1e6, 2e6))
  with pytest.raises(DataError, match="unknown colour map"):
    call(tmp_path / "o.nii", colormap="viridis")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(DataError, match="a_file: cannot create the output folder"):
    call(blocker / "o.nii")
  assert not (tmp_path / "o.nii").exists()


def test_dicom_mri_fused_with_a_nifti_ct(tmp_path, ct_pair):
  _, ct_path, mri, ct = ct_pair
  folder = _write_dicom_series(tmp_path / "mri_dicom", np.round(mri), slope=1.0, intercept=0.0)
  summary = volumes.fuse_volume_pair(folder, ct_path, tmp_path / "fused.nii.gz",
                                     fuse_slices=_stub_max, modality="CT", show_progress=False)
  written = nib.load(summary["output"])
  np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
  assert written.header["sform_code"] == 1 and summary["fused_slices"] == SLICES - 1
