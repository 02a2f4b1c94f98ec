"""Co-registered 3-D volumes (NIfTI, DICOM series) fused slice by slice.

Clinical data are volumes, the network fuses 2-D slices. This module is the layer
between them, kept free of the network: `fuse_volume_pair` takes the fuser as a
callable (`fuse_slices`), so it runs with a stub in tests and with the trained model
in the CLI. The steps, each with a documented default:

1. Reading (`read_volume`): NIfTI through nibabel; a DICOM series (a folder of
   slices) through pydicom, slices ordered along the slice normal, rescaled with
   RescaleSlope/RescaleIntercept, and given the affine dcm2niix and nibabel would
   give (DICOM's LPS patient axes turned into NIfTI's RAS).
2. Grids: both volumes must share the MRI's voxel grid (`check_same_grid`, within
   `GRID_TOLERANCE_MM`), or the second is resampled onto it on request (trilinear).
   Both are turned to the closest canonical (RAS) orientation before slicing, so
   `axis=2` means axial whatever the storage order; the output goes back to the
   MRI's own orientation, affine and header.
3. Intensities: each source is windowed to 8 bits, the range the model was trained
   on: by default the 0.5-99.5 percentiles of its foreground voxels
   (`DEFAULT_PERCENTILES`), or an explicit window (e.g. a CT brain window in HU,
   `(-160, 240)`).
4. Colour: PET and SPECT are scalar volumes; they go through a named colour map
   (`COLOURMAPS`, defaults in `DEFAULT_COLOURMAP`) before fusion, so the fusion's
   colour rule (luma to the network, the fused luma put back into the source's
   YCrCb) works as for the Harvard data's coloured slices.
5. Output: a NIfTI (grey uint8 or RGB24) on the MRI's grid and header, plus a PNG
   montage of evenly spaced fused slices to look at without a viewer; every file is
   written atomically.

nibabel and pydicom are imported only when a volume is read or written, so the
colour-map table (which `dmfnet_jax.data.phantoms` shares) costs nothing else.
Every mistake a user can make raises `DataError` with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import struct
import time
import types
import zlib
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dmfnet_jax import imageio, runtime
from dmfnet_jax.errors import DataError, DmfnetError

PathLike = Union[str, os.PathLike]
Window = Tuple[float, float]
SlicePair = Tuple[np.ndarray, np.ndarray]
SliceFuser = Callable[[List[SlicePair]], Sequence[np.ndarray]]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Names DICOM files commonly carry; files with a "DICM" preamble are read whatever
# their name (many scanners write files without an extension).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MODALITIES = ("CT", "PET", "SPECT")
# Percentiles of the foreground voxels (those above the volume's minimum, i.e. not
# the background fill: 0 for MRI/PET, -1024 HU for CT) mapped to 0 and 255. Robust
# to a few hot voxels and to how much background a scan has.
DEFAULT_PERCENTILES = (0.5, 99.5)
# Two grids match when every corner voxel centre lies within this many mm, or one
# part in 1e5 of the field of view if that is more (affines are stored as float32).
GRID_TOLERANCE_MM = 1e-3
GRID_TOLERANCE_RELATIVE = 1e-5
# The montage shows this many evenly spaced fused slices, tiles at least this tall.
MONTAGE_SLICES = 9
_MONTAGE_COLUMNS = 3
_MONTAGE_MIN_TILE = 128
# nibabel's RGB24 voxel type.
RGB_DTYPE = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


# ----------------------------------------------------------------------------- colour maps


def _from_channels(red, green, blue) -> np.ndarray:
  """(position, R, G, B) anchors from per-channel breakpoints (matplotlib's segment form)."""
  channels = [np.asarray(c, dtype=np.float64) for c in (red, green, blue)]
  positions = np.unique(np.concatenate([c[:, 0] for c in channels]))
  values = [np.interp(positions, c[:, 0], c[:, 1]) for c in channels]
  return np.stack([positions, *values], axis=-1)


def _frozen(anchors) -> np.ndarray:
  array = np.array(anchors, dtype=np.float64)
  array.setflags(write=False)
  return array


# Colour maps as (position, R, G, B) anchors in [0, 1], interpolated piecewise
# linearly. The one table of the package (the phantoms use it too). A black floor
# (value 0 -> black) keeps an empty background black, as in the Harvard slices.
COLOURMAPS: Mapping[str, np.ndarray] = types.MappingProxyType({
    # No colour: the value as grey.
    "gray": _frozen([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
    # matplotlib's "hot" (black-red-yellow-white) with a pure-black floor (matplotlib
    # starts at a very dark red). Its luma rises with the value.
    "hot": _frozen(_from_channels(
        red=[(0.0, 0.0), (0.365079, 1.0), (1.0, 1.0)],
        green=[(0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)],
        blue=[(0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)])),
    # matplotlib's "jet", exactly: its floor is dark blue, so an empty background
    # comes out blue; "spect" is the rainbow with a black floor.
    "jet": _frozen(_from_channels(
        red=[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)],
        green=[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)],
        blue=[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)])),
    # The phantoms' PET map: a hot-like black-red-orange-yellow-white.
    "pet": _frozen([
        [0.00, 0.0, 0.0, 0.0],
        [0.35, 0.8, 0.0, 0.0],
        [0.65, 1.0, 0.6, 0.0],
        [0.85, 1.0, 1.0, 0.3],
        [1.00, 1.0, 1.0, 1.0],
    ]),
    # The phantoms' SPECT map: a jet-like rainbow (violet, blue, green, yellow, red,
    # white) on a black floor, like the Harvard SPECT slices.
    "spect": _frozen([
        [0.00, 0.0, 0.0, 0.0],
        [0.15, 0.1, 0.0, 0.5],
        [0.35, 0.0, 0.3, 1.0],
        [0.55, 0.0, 0.9, 0.4],
        [0.75, 1.0, 0.9, 0.0],
        [0.90, 1.0, 0.2, 0.0],
        [1.00, 1.0, 1.0, 1.0],
    ]),
})
# The map each second modality gets when the caller names none. "gray" means the
# slices stay scalar (HxW) and the output is grey.
DEFAULT_COLOURMAP: Mapping[str, str] = types.MappingProxyType(
    {"CT": "gray", "PET": "hot", "SPECT": "spect"})


def colourmap_anchors(colourmap: Union[str, np.ndarray]) -> np.ndarray:
  """A colour map's (position, R, G, B) anchors, by name (`COLOURMAPS`) or as given."""
  if isinstance(colourmap, str):
    try:
      return COLOURMAPS[colourmap]
    except KeyError:
      raise DataError(f"unknown colour map '{colourmap}'; known maps are "
                      f"{', '.join(sorted(COLOURMAPS))}") from None
  anchors = np.asarray(colourmap, dtype=np.float64)
  if anchors.ndim != 2 or anchors.shape[1] != 4 or anchors.shape[0] < 2:
    raise DataError(f"a colour map is (position, R, G, B) anchor rows, got shape {anchors.shape}")
  return anchors


def apply_colourmap(values: np.ndarray, colourmap: Union[str, np.ndarray]) -> np.ndarray:
  """float values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), piecewise linear."""
  anchors = colourmap_anchors(colourmap)
  values = np.clip(values, 0.0, 1.0)
  channels = [np.interp(values, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)]
  rgb = np.stack(channels, axis=-1)
  return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def colour_lookup_table(colourmap: Union[str, np.ndarray]) -> np.ndarray:
  """uint8 (256, 3): the colour of each 8-bit value, so a windowed slice is one lookup."""
  return apply_colourmap(np.arange(256, dtype=np.float64) / 255.0, colourmap)


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """A scalar 3-D volume as read: float32 voxels, voxel-to-RAS affine and a header.

  `header` is a nibabel NIfTI header (the file's own for NIfTI, a fresh one for
  DICOM), reused when an output is written on this volume's grid.
  """

  data: np.ndarray
  affine: np.ndarray
  header: object
  path: pathlib.Path

  @property
  def shape(self) -> Tuple[int, int, int]:
    return tuple(int(n) for n in self.data.shape)

  @property
  def voxel_sizes(self) -> np.ndarray:
    return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def _nib():
  """nibabel, imported on first use (an optional dependency of the volume layer)."""
  try:
    import nibabel  # pylint: disable=g-import-not-at-top
    import nibabel.processing  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as err:
    raise DataError(f"reading volumes needs nibabel ({err}); pip install nibabel") from err
  return nibabel


def _pydicom():
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(f"reading DICOM series needs pydicom ({err}); pip install pydicom") from err
  return pydicom


def _reader_errors() -> tuple:
  """What nibabel, pydicom and numpy raise on a malformed file (never a user's bug)."""
  errors = [OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            NotImplementedError, RuntimeError, MemoryError, struct.error, zlib.error]
  nib = _nib()
  errors += [nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError]
  try:
    import pydicom.errors  # pylint: disable=g-import-not-at-top
    errors.append(pydicom.errors.InvalidDicomError)
  except ImportError:
    pass
  return tuple(errors)


def _has_nifti_suffix(path: pathlib.Path) -> bool:
  name = path.name.lower()
  return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def _has_dicom_preamble(path: pathlib.Path) -> bool:
  """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def _is_dicom_file(path: pathlib.Path) -> bool:
  return path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path)


def _dicom_candidates(folder: pathlib.Path) -> List[pathlib.Path]:
  """Files of a folder that are DICOM by preamble or name (hidden files and DICOMDIR not)."""
  try:
    entries = sorted(folder.iterdir())
  except OSError as err:
    raise DataError(f"{folder}: cannot list the folder ({err.strerror or err})") from err
  return [p for p in entries
          if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
          and _is_dicom_file(p)]


def is_volume_path(path: PathLike) -> bool:
  """Whether `path` names a volume: a .nii/.nii.gz file or a folder holding DICOM files.

  NIfTI is recognised by name, existing or not, so a CLI dispatching on it reports a
  missing volume through `read_volume` rather than as a bad 2-D image.
  """
  path = pathlib.Path(path)
  if _has_nifti_suffix(path):
    return True
  if not path.is_dir():
    return False
  try:
    return any(p.is_file() and not p.name.startswith(".") and _is_dicom_file(p)
               for p in path.iterdir())
  except OSError:
    return False


def _looks_like_2d_image(path: pathlib.Path) -> bool:
  if imageio.is_image_file(path):
    return True
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path):
      return True
  except (OSError, ValueError, SyntaxError):
    return False  # not an image PIL knows: the caller says what it is instead


def read_volume(path: PathLike) -> Volume:
  """Reads a NIfTI file (.nii, .nii.gz) or a DICOM series (a folder of slices).

  Returns float32 voxels (DICOM rescaled to stored units, e.g. HU), the voxel-to-RAS
  affine and a NIfTI header. Raises `DataError` naming the file for anything that is
  not a finite, non-empty, scalar 3-D volume.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    data, affine, header = _read_dicom_series(path)
  elif not path.exists():
    raise DataError(f"{path}: no such volume file or DICOM folder")
  elif _has_nifti_suffix(path):
    data, affine, header = _read_nifti(path)
  elif _looks_like_2d_image(path):
    raise DataError(f"{path}: is a 2-D image, not a volume (give a .nii/.nii.gz file "
                    "or a folder of DICOM slices)")
  elif _is_dicom_file(path):
    raise DataError(f"{path}: is a single DICOM file; give the folder holding the whole "
                    "series")
  else:
    raise DataError(f"{path}: not a volume (expected a .nii/.nii.gz file or a folder of "
                    "DICOM slices)")
  _check_voxels(path, data)
  return Volume(data=data, affine=affine, header=header, path=path)


def _check_voxels(path: pathlib.Path, data: np.ndarray) -> None:
  """Finite and not constant: a NaN poisons every window, an empty scan fuses nothing."""
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    raise DataError(f"{path}: {bad} of {data.size} voxels are NaN or infinite")
  low, high = float(data.min()), float(data.max())
  if low == high:
    raise DataError(f"{path}: is empty (every voxel is {low:g})")


def _describe_shape(shape) -> str:
  return "x".join(str(int(n)) for n in shape)


def _read_nifti(path: pathlib.Path):
  nib = _nib()
  errors = _reader_errors()
  try:
    image = nib.load(str(path))
  except errors as err:
    raise DataError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from err
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: not a NIfTI file (nibabel reads it as {type(image).__name__})")
  shape = tuple(int(n) for n in image.shape)
  # Trailing length-1 axes (e.g. X x Y x Z x 1 from some converters) are still 3-D.
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) < 3:
    raise DataError(f"{path}: is a 2-D image (shape {_describe_shape(image.shape)}), not a volume")
  if len(shape) > 3:
    raise DataError(f"{path}: is {len(shape)}-D (shape {_describe_shape(image.shape)}); give one "
                    "3-D volume (e.g. a single frame)")
  if min(shape) < 1:
    raise DataError(f"{path}: has an empty axis (shape {_describe_shape(image.shape)})")
  if image.get_data_dtype().fields is not None:
    raise DataError(f"{path}: holds {image.get_data_dtype()} (colour) voxels; give a scalar "
                    "volume")
  try:
    data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
  except errors as err:
    raise DataError(f"{path}: cannot read the voxels ({_one_line(err)})") from err
  affine = np.asarray(image.affine, dtype=np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(f"{path}: has no usable voxel-to-world affine")
  return data, affine, image.header.copy()


def _one_line(err: BaseException) -> str:
  text = " ".join(str(err).split()) or type(err).__name__
  return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- DICOM


def _read_dicom_series(folder: pathlib.Path):
  """A folder of DICOM slices of one series -> (float32 data, RAS affine, header)."""
  pydicom = _pydicom()
  errors = _reader_errors()
  files = _dicom_candidates(folder)
  if not files:
    raise DataError(f"{folder}: holds no DICOM files (give a .nii/.nii.gz file or a folder of "
                    "DICOM slices)")
  slices = []
  for file in files:
    try:
      dataset = pydicom.dcmread(str(file), force=not _has_dicom_preamble(file))
    except errors as err:
      raise DataError(f"{file}: not a readable DICOM file ({_one_line(err)})") from err
    slices.append((file, dataset))
  _check_one_series(folder, slices)
  if len(slices) < 2:
    raise DataError(f"{folder}: holds a single DICOM slice ({files[0].name}), a 2-D image, not "
                    "a volume")

  geometry = [_slice_geometry(file, ds) for file, ds in slices]
  orientation = geometry[0][0]
  for (file, _), (other_orientation, _, _, _) in zip(slices, geometry):
    if np.abs(other_orientation - orientation).max() > 1e-4:
      raise DataError(f"{folder}: slices have different orientations (ImageOrientationPatient of "
                      f"{file.name} differs from {slices[0][0].name}); give one stack per folder")
  row_cosine, column_cosine = orientation[:3], orientation[3:]
  normal = np.cross(row_cosine, column_cosine)
  # Slice order is the position along the normal, never the file name or InstanceNumber.
  positions = np.array([g[1] for g in geometry])
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  slices = [slices[i] for i in order]
  geometry = [geometry[i] for i in order]
  positions, along = positions[order], along[order]
  _check_spacing(folder, [f for f, _ in slices], along)

  spacing = geometry[0][2]
  size = geometry[0][3]
  for (file, _), (_, _, other_spacing, other_size) in zip(slices, geometry):
    if other_size != size:
      raise DataError(f"{file}: is {other_size[0]}x{other_size[1]} pixels but "
                      f"{slices[0][0].name} is {size[0]}x{size[1]}; slices of one volume share "
                      "a size")
    if np.abs(np.asarray(other_spacing) - spacing).max() > 1e-4:
      raise DataError(f"{file}: PixelSpacing {list(other_spacing)} differs from "
                      f"{list(spacing)} of {slices[0][0].name}")

  volume = np.empty((size[0], size[1], len(slices)), dtype=np.float32)  # columns, rows, slices
  for k, (file, ds) in enumerate(slices):
    volume[:, :, k] = _slice_pixels(file, ds, size, errors).T

  # Voxel (i=column, j=row, k=slice) -> LPS mm, then LPS -> RAS (negate x and y), as
  # dcm2niix and nibabel do. The slice step is the actual position step, which is the
  # normal times the spacing unless the gantry was tilted (then the affine is sheared).
  row_spacing, column_spacing = spacing
  lps = np.eye(4)
  lps[:3, 0] = row_cosine * column_spacing
  lps[:3, 1] = column_cosine * row_spacing
  lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
  lps[:3, 3] = positions[0]
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  return volume, affine, new_header(volume.shape, affine)


def _check_one_series(folder: pathlib.Path, slices) -> None:
  series: dict = {}
  for file, ds in slices:
    series.setdefault(str(ds.get("SeriesInstanceUID", "") or "(none)"), []).append(file)
  if len(series) > 1:
    listed = "; ".join(f"{uid} ({len(files)} files, e.g. {files[0].name})"
                       for uid, files in list(series.items())[:4])
    raise DataError(f"{folder}: mixes {len(series)} DICOM series (SeriesInstanceUID {listed}); "
                    "put each series in its own folder")


def _slice_geometry(file: pathlib.Path, ds):
  """(orientation 6-vector, position 3-vector, (row, column) spacing, (columns, rows))."""
  values = {}
  for tag, count in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3),
                     ("PixelSpacing", 2)):
    raw = ds.get(tag)
    try:
      value = np.array([float(v) for v in raw], dtype=np.float64)
    except (TypeError, ValueError):
      value = None
    if value is None or value.shape != (count,) or not np.all(np.isfinite(value)):
      raise DataError(f"{file}: has no valid {tag} ({raw!r}); cannot place the slice in the volume")
    values[tag] = value
  if "PixelData" not in ds:
    raise DataError(f"{file}: has no pixel data (not an image slice)")
  orientation = values["ImageOrientationPatient"]
  row_cosine, column_cosine = orientation[:3], orientation[3:]
  if (abs(np.linalg.norm(row_cosine) - 1) > 1e-3 or abs(np.linalg.norm(column_cosine) - 1) > 1e-3
      or abs(row_cosine @ column_cosine) > 1e-3):
    raise DataError(f"{file}: ImageOrientationPatient {list(orientation)} is not two orthogonal "
                    "unit vectors")
  spacing = values["PixelSpacing"]
  if np.any(spacing <= 0):
    raise DataError(f"{file}: PixelSpacing {list(spacing)} is not positive")
  size = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
  return orientation, values["ImagePositionPatient"], tuple(spacing), size


def _check_spacing(folder: pathlib.Path, files: Sequence[pathlib.Path], along: np.ndarray) -> None:
  """Sorted slice positions must be distinct and evenly spaced (one affine fits them)."""
  steps = np.diff(along)
  tolerance = 1e-3 * max(float(np.abs(steps).max()), 1.0)
  duplicate = np.flatnonzero(steps <= tolerance)
  if duplicate.size:
    i = int(duplicate[0])
    raise DataError(f"{folder}: duplicated slice position {along[i]:.3f} mm ({files[i].name} and "
                    f"{files[i + 1].name}): several echoes, time points or copies in one folder?")
  spacing = float(steps.min())
  gaps = np.flatnonzero(steps >= 1.5 * spacing)
  if gaps.size:
    i = int(gaps[0])
    raise DataError(f"{folder}: a slice is missing: {steps[i]:.3f} mm between {files[i].name} and "
                    f"{files[i + 1].name} (at {along[i]:.3f} and {along[i + 1]:.3f} mm) where the "
                    f"spacing is {spacing:.3f} mm")
  uneven = np.flatnonzero(np.abs(steps - spacing) > 0.01 * spacing + 0.01)
  if uneven.size:
    i = int(uneven[0])
    raise DataError(f"{folder}: uneven slice spacing: {steps[i]:.3f} mm between {files[i].name} "
                    f"and {files[i + 1].name}, {spacing:.3f} mm elsewhere")


def _slice_pixels(file: pathlib.Path, ds, size, errors) -> np.ndarray:
  """One slice's stored values: pixels x RescaleSlope + RescaleIntercept (float64)."""
  if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
    raise DataError(f"{file}: is a colour DICOM image; give a scalar series")
  if int(ds.get("NumberOfFrames", 1) or 1) > 1:
    raise DataError(f"{file}: is a multi-frame DICOM ({ds.NumberOfFrames} frames); convert it to "
                    "NIfTI first (e.g. with dcm2niix)")
  try:
    pixels = np.asarray(ds.pixel_array)
  except errors as err:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    named = f" (transfer syntax {syntax.name})" if syntax is not None else ""
    raise DataError(f"{file}: cannot decode the pixel data{named}: {_one_line(err)}") from err
  if pixels.shape != (size[1], size[0]):
    raise DataError(f"{file}: pixel data of shape {pixels.shape} where Rows x Columns is "
                    f"{size[1]}x{size[0]}")
  try:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
  except (TypeError, ValueError) as err:
    raise DataError(f"{file}: bad RescaleSlope/RescaleIntercept ({_one_line(err)})") from err
  return pixels.astype(np.float64) * slope + intercept


# ----------------------------------------------------------------------------- grids


def new_header(shape=None, affine=None):
  """A NIfTI-1 header in millimetres (for volumes that come without one: DICOM, phantoms)."""
  header = _nib().Nifti1Header()
  if shape is not None:
    header.set_data_shape(shape)
  if affine is not None:
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
  header.set_xyzt_units("mm")
  return header


def _corners(shape) -> np.ndarray:
  """Homogeneous voxel coordinates of a grid's eight corner voxel centres (4 x 8)."""
  ranges = [(0, n - 1) for n in shape]
  grid = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).astype(np.float64)
  return np.vstack([grid, np.ones((1, grid.shape[1]))])


def grid_difference_mm(a: Volume, b: Volume) -> float:
  """Largest distance (mm) between where the two affines put the same corner voxel."""
  corners = _corners(a.shape)
  return float(np.linalg.norm((a.affine @ corners - b.affine @ corners)[:3], axis=0).max())


def _grid_tolerance(volume: Volume) -> float:
  corners = volume.affine @ _corners(volume.shape)
  extent = float(np.ptp(corners[:3], axis=1).max())
  return max(GRID_TOLERANCE_MM, GRID_TOLERANCE_RELATIVE * extent)


def _describe_grid(volume: Volume) -> str:
  sizes = "x".join(f"{s:.3g}" for s in volume.voxel_sizes)
  origin = ", ".join(f"{x:.1f}" for x in volume.affine[:3, 3])
  return f"{_describe_shape(volume.shape)} voxels of {sizes} mm at ({origin})"


def check_same_grid(mri: Volume, other: Volume) -> None:
  """Raises `DataError` naming both files unless they share one voxel grid.

  Same shape, and every corner voxel centre within `GRID_TOLERANCE_MM` (or one part
  in `1 / GRID_TOLERANCE_RELATIVE` of the field of view): slice k of one is then
  slice k of the other, which is what fusing slice pairs assumes.
  """
  hint = (f"; register them first, or pass resample=True to resample {other.path.name} onto "
          "the MRI's grid")
  if mri.shape != other.shape:
    raise DataError(f"{mri.path} and {other.path} are not on the same grid: "
                    f"{_describe_grid(mri)} vs {_describe_grid(other)}{hint}")
  difference = grid_difference_mm(mri, other)
  if difference > _grid_tolerance(mri):
    raise DataError(f"{mri.path} and {other.path} are not on the same grid: their affines place "
                    f"voxels up to {difference:.3g} mm apart ({_describe_grid(mri)} vs "
                    f"{_describe_grid(other)}){hint}")


def resample_onto(volume: Volume, target: Volume) -> Volume:
  """`volume` resampled (trilinear) onto `target`'s grid.

  Outside its field of view it takes its own minimum (air, background), not 0 (which
  would be water in HU). "grid-constant" interpolates towards that value across the
  edge: scipy's "constant" would drop a whole edge plane that lies on the boundary
  but a rounding error outside it.
  """
  nib = _nib()
  image = nib.Nifti1Image(volume.data, volume.affine)
  try:
    resampled = nib.processing.resample_from_to(
        image, (target.shape, target.affine), order=1, mode="grid-constant",
        cval=float(volume.data.min()))
  except _reader_errors() as err:
    raise DataError(f"{volume.path}: cannot resample onto the grid of {target.path} "
                    f"({_one_line(err)})") from err
  data = np.asarray(resampled.dataobj, dtype=np.float32)
  return dataclasses.replace(volume, data=data, affine=target.affine.copy(), header=target.header)


def _canonical_orientation(affine: np.ndarray) -> np.ndarray:
  """nibabel orientation (axis, flip) taking the stored axes to the closest RAS ones."""
  return _nib().orientations.io_orientation(affine)


def _inverse_orientation(orientation: np.ndarray) -> np.ndarray:
  inverse = np.empty_like(orientation)
  for axis, (new_axis, flip) in enumerate(orientation):
    inverse[int(new_axis)] = (axis, flip)
  return inverse


def to_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Voxels reordered as `nibabel.as_closest_canonical` would (RAS: axis 2 is axial)."""
  return _nib().orientations.apply_orientation(data, _canonical_orientation(affine))


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Inverse of `to_canonical`: back to the storage order `affine` belongs to."""
  orientation = _inverse_orientation(_canonical_orientation(affine))
  return _nib().orientations.apply_orientation(data, orientation)


# ----------------------------------------------------------------------------- intensities


def _check_window(window, what: str) -> Window:
  try:
    low, high = (float(v) for v in window)
  except (TypeError, ValueError):
    raise DataError(f"{what}: a window is (low, high), got {window!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise DataError(f"{what}: a window is (low, high) with low < high, got {window!r}")
  return low, high


def percentile_window(data: np.ndarray, percentiles: Tuple[float, float] = DEFAULT_PERCENTILES
                      ) -> Window:
  """(low, high) at `percentiles` of the foreground voxels (those above the minimum).

  Excluding the background fill keeps a scan's field of view from deciding the
  contrast. A foreground too uniform to give low < high falls back to min..max.
  """
  data = np.asarray(data)
  floor = data.min()
  foreground = data[data > floor]
  low = high = float(floor)
  if foreground.size:
    low, high = (float(v) for v in np.percentile(foreground, percentiles))
  if not low < high:
    low, high = float(floor), float(data.max())
  return low, high


def window_to_uint8(data: np.ndarray, window: Window) -> np.ndarray:
  """Linear map of `window` to 0..255 (clipped, rounded): the model's 8-bit range."""
  low, high = window
  scaled = (np.asarray(data, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
  return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def resolve_window(volume: Volume, window: Optional[Window]) -> Window:
  """The explicit window (checked), or the default percentile window of `volume`."""
  if window is None:
    return percentile_window(volume.data)
  return _check_window(window, str(volume.path))


# ----------------------------------------------------------------------------- writing


def write_nifti(path: PathLike, data: np.ndarray, reference: Volume,
                description: str = "") -> pathlib.Path:
  """Writes `data` (uint8 XxYxZ grey, uint8 XxYxZx3 RGB, or float) atomically as NIfTI on
  `reference`'s grid: its affine and a copy of its header (units, codes, extensions).

  `.nii.gz` is gzip-compressed (with no timestamp, so equal data give equal bytes).
  """
  nib = _nib()
  path = pathlib.Path(path)
  data = np.asarray(data)
  if data.shape[:3] != reference.shape:
    raise ValueError(f"{path}: data of shape {data.shape} on a grid of shape {reference.shape}")
  header = reference.header.copy()
  klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
  if data.ndim == 4 and data.shape[3] == 3:
    data = np.ascontiguousarray(data, dtype=np.uint8).view(RGB_DTYPE).reshape(data.shape[:3])
  image = klass(data, reference.affine, header=header)
  image.header.set_data_dtype(data.dtype)
  image.header.set_slope_inter(1.0, 0.0)
  if data.dtype == np.uint8:
    image.header["cal_min"], image.header["cal_max"] = 0, 255
  if description:
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
  payload = image.to_bytes()
  if path.name.lower().endswith(".gz"):
    payload = gzip.compress(payload, compresslevel=6, mtime=0)
  try:
    return runtime.write_bytes_atomic(path, payload)
  except (DmfnetError, OSError) as err:
    raise DataError(f"{path}: cannot write the volume ({_one_line(err)})") from err


def _display(slice_2d: np.ndarray) -> np.ndarray:
  """A canonical (RAS) slice as it is shown, and as the training images look: rotated
  so anterior (axial) or superior (sagittal, coronal) is at the top."""
  return np.rot90(slice_2d)


def _undisplay(image: np.ndarray) -> np.ndarray:
  return np.rot90(image, -1)


def montage_path(output: PathLike) -> pathlib.Path:
  """`<dir>/<name>_montage.png` beside `<dir>/<name>.nii[.gz]`."""
  output = pathlib.Path(output)
  name = output.name
  for suffix in (".nii.gz", ".nii"):
    if name.lower().endswith(suffix):
      name = name[: -len(suffix)]
      break
  return output.with_name(f"{name}_montage.png")


def _montage(tiles: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
  """Tiles in rows of `_MONTAGE_COLUMNS`, small slices enlarged (nearest) to be seen."""
  from dmfnet_jax import report  # pylint: disable=g-import-not-at-top
  factor = max(1, math.ceil(_MONTAGE_MIN_TILE / max(1, tiles[0].shape[0])))
  tiles = [np.repeat(np.repeat(t, factor, axis=0), factor, axis=1) for t in tiles]
  rows = [report.make_montage(tiles[i:i + _MONTAGE_COLUMNS], captions[i:i + _MONTAGE_COLUMNS])
          for i in range(0, len(tiles), _MONTAGE_COLUMNS)]
  width = max(r.shape[1] for r in rows)
  gap = np.full((4, width, 3), 255, np.uint8)
  padded = []
  for row in rows:
    pad = np.full((row.shape[0], width - row.shape[1], 3), 255, np.uint8)
    padded += [np.concatenate([row, pad], axis=1), gap]
  return np.concatenate(padded[:-1], axis=0)


# ----------------------------------------------------------------------------- fusion


def _as_volume(source: Union[PathLike, Volume]) -> Volume:
  return source if isinstance(source, Volume) else read_volume(source)


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
  try:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
  except OSError:
    return False


def _check_output(output: pathlib.Path, inputs: Sequence[pathlib.Path]) -> pathlib.Path:
  if not _has_nifti_suffix(output):
    raise DataError(f"{output}: the output volume must be named .nii or .nii.gz")
  if output.is_dir():
    raise DataError(f"{output}: the output is a folder; name a .nii or .nii.gz file")
  montage = montage_path(output)
  for source in inputs:
    for target in (output, montage):
      if _same_file(target, source):
        raise DataError(f"{target}: would overwrite the input {source}; choose another output name")
  # Checked before fusing, so a long run does not fail at the end for want of a folder.
  try:
    output.parent.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise DataError(f"{output.parent}: cannot create the output folder ({_one_line(err)})") from err
  if not os.access(output.parent, os.W_OK):
    raise DataError(f"{output.parent}: the output folder is not writable")
  return montage


def _check_fused(fused: Sequence[np.ndarray], batch: Sequence[SlicePair]) -> None:
  if len(fused) != len(batch):
    raise ValueError(f"fuse_slices returned {len(fused)} slices for {len(batch)} pairs")
  for image, (mri_slice, _) in zip(fused, batch):
    image = np.asarray(image)
    if (image.dtype != np.uint8 or image.shape[:2] != mri_slice.shape
        or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3)):
      raise ValueError(f"fuse_slices must return uint8 HxW or HxWx3 slices of the inputs' size "
                       f"{mri_slice.shape}, got {image.dtype} {image.shape}")


def fuse_volume_pair(
    mri: Union[PathLike, Volume],
    other: Union[PathLike, Volume],
    output: PathLike,
    *,
    fuse_slices: SliceFuser,
    modality: str,
    axis: int = 2,
    resample: bool = False,
    window_mri: Optional[Window] = None,
    window_other: Optional[Window] = None,
    colormap: Optional[str] = None,
    grey_output: bool = False,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
  """Fuses an MRI volume with a co-registered CT, PET or SPECT volume, slice by slice.

  Both volumes are read (paths or `Volume`s), put on the MRI's grid (an error unless
  they share it, or trilinear resampling if `resample`), windowed to uint8
  (`window_*`: `(low, high)` in stored units, default `DEFAULT_PERCENTILES` of the
  foreground), the second coloured by `colormap` (default `DEFAULT_COLOURMAP` of
  `modality`; "gray" keeps it scalar) and reoriented to the closest canonical
  (RAS) orientation. Slices along `axis` (2 axial, 1 coronal, 0 sagittal) are shown
  to `fuse_slices` as images are (anterior or superior up), `batch_size` pairs per
  call: `fuse_slices([(mri uint8 HxW, other uint8 HxW or HxWx3), ...])` returns one
  uint8 HxW or HxWx3 per pair (a HxW fusion of a coloured pair is put back into the
  pair's colour here, by the YCrCb rule). Slices empty in both sources (all 0 after
  windowing) are not fused but left 0.

  Writes `output` (.nii or .nii.gz: grey uint8, or RGB24 for a coloured pair unless
  `grey_output`) with the MRI's orientation, affine and header, and
  `<name>_montage.png` of up to `MONTAGE_SLICES` evenly spaced fused slices.
  Returns a summary: slice counts, windows, seconds, output paths.
  """
  start = time.perf_counter()
  modality = str(modality).upper()
  if modality not in MODALITIES:
    raise DataError(f"unknown modality '{modality}'; the second volume is one of "
                    f"{', '.join(MODALITIES)}")
  if axis not in (0, 1, 2):
    raise DataError(f"axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
  colormap_name = DEFAULT_COLOURMAP[modality] if colormap is None else colormap
  if not isinstance(colormap_name, str):
    raise DataError(f"colormap is the name of one of {', '.join(sorted(COLOURMAPS))}, "
                    f"got {type(colormap_name).__name__}")
  lookup = colour_lookup_table(colormap_name) if colormap_name != "gray" else None
  output = pathlib.Path(output)
  sources = [pathlib.Path(s.path if isinstance(s, Volume) else s) for s in (mri, other)]
  montage = _check_output(output, sources)

  mri, other = _as_volume(mri), _as_volume(other)
  resampled = False
  if resample:
    if mri.shape != other.shape or grid_difference_mm(mri, other) > _grid_tolerance(mri):
      other = resample_onto(other, mri)
      resampled = True
  else:
    check_same_grid(mri, other)
  windows = {"mri": resolve_window(mri, window_mri), "other": resolve_window(other, window_other)}
  mri8 = to_canonical(window_to_uint8(mri.data, windows["mri"]), mri.affine)
  other8 = to_canonical(window_to_uint8(other.data, windows["other"]), mri.affine)
  colour_output = lookup is not None and not grey_output
  fused_volume = np.zeros(mri8.shape + ((3,) if colour_output else ()), np.uint8)

  count = mri8.shape[axis]
  fused_indices: List[int] = []
  pending: List[Tuple[int, SlicePair]] = []

  def flush():
    batch = [pair for _, pair in pending]
    fused = list(fuse_slices(batch))
    _check_fused(fused, batch)
    for (k, (_, other_slice)), image in zip(pending, fused):
      image = np.asarray(image)
      if image.ndim == 2 and colour_output:
        image = imageio.colourise(image, other_slice)
      elif image.ndim == 3 and not colour_output:
        image = imageio.opencv_luma_uint8(image)
      index = [slice(None)] * 3
      index[axis] = k
      fused_volume[tuple(index)] = _undisplay(image)
      fused_indices.append(k)
    pending.clear()

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=count, desc="fuse volume", unit="slice", dynamic_ncols=True,
            disable=None if show_progress else True) as progress:
    for k in range(count):
      mri_slice = _display(np.take(mri8, k, axis=axis))
      other_slice = _display(np.take(other8, k, axis=axis))
      if mri_slice.any() or other_slice.any():
        if lookup is not None:
          other_slice = lookup[other_slice]
        pending.append((k, (np.ascontiguousarray(mri_slice), np.ascontiguousarray(other_slice))))
        if len(pending) >= batch_size:
          flush()
          progress.update(batch_size)
      else:
        progress.update(1)
    if pending:
      done = len(pending)
      flush()
      progress.update(done)
  if not fused_indices:
    raise DataError(f"{mri.path} and {other.path}: every slice is empty after windowing "
                    f"(windows {windows['mri']} and {windows['other']}); check window_mri / "
                    "window_other")

  fused_indices.sort()
  written = write_nifti(output, from_canonical(fused_volume, mri.affine), mri,
                        description=f"dmfnet_jax MRI-{modality} fusion")
  picks = sorted({fused_indices[int(round(i))] for i in
                  np.linspace(0, len(fused_indices) - 1, min(MONTAGE_SLICES, len(fused_indices)))})
  tiles = [_display(np.take(fused_volume, k, axis=axis)) for k in picks]
  try:
    montage_written = imageio.write_image_atomic(
        montage, _montage(tiles, [f"slice {k}/{count}" for k in picks]))
  except (DmfnetError, OSError) as err:
    raise DataError(f"{montage}: cannot write the montage ({_one_line(err)})") from err
  skipped = count - len(fused_indices)
  return {
      "mri": str(mri.path), "other": str(other.path), "modality": modality,
      "axis": axis, "slices": count, "fused_slices": len(fused_indices),
      "skipped_empty_slices": skipped, "resampled": resampled,
      "window_mri": list(windows["mri"]), "window_other": list(windows["other"]),
      "colormap": colormap_name,
      "grey_output": not colour_output,
      "seconds": round(time.perf_counter() - start, 3),
      "output": str(written), "montage": str(montage_written),
      "outputs": [str(written), str(montage_written)],
  }
