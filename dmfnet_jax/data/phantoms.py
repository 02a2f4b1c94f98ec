"""Synthetic head phantoms: the built-in data set when no data root is configured.

Every job (tests, demo, smoke training) then runs on a fresh machine without a
download. Each phantom is a random but deterministic head: scalp, skull ring,
CSF rim, folded cortex over white matter, ventricles and a few deep structures,
rendered three ways from one anatomy so that the pair is registered, as in the
Harvard data:
- MRI: grayscale, T1- or T2-like contrast (chosen per index), with texture;
- CT: grayscale, bright bone, dim soft tissue;
- PET / SPECT: smooth functional uptake (cortex and hot spots) through a
  colour map to 8-bit RGB, black outside the head (the "pet" and "spect" maps of
  `dmfnet_jax.volumes.COLOURMAPS`, the package's one colour-map table).
All rendering is vectorised numpy on the full grid.
"""

from __future__ import annotations

import os
import pathlib
import zlib
from typing import List, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from dmfnet_jax import imageio, volumes
from dmfnet_jax.data import pairs as pairs_lib

PathLike = Union[str, os.PathLike]


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  """Zero-mean, unit-std band-limited noise (texture and shape perturbations)."""
  # Periodic Gaussian filtering in the Fourier domain: cost independent of sigma.
  frequencies_y = np.fft.fftfreq(size)[:, None]
  frequencies_x = np.fft.rfftfreq(size)[None, :]
  transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (frequencies_y ** 2 + frequencies_x ** 2))
  noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((size, size))) * transfer, s=(size, size))
  return noise / (noise.std() + 1e-8)


def _ellipse(x, y, cx, cy, ax, ay, angle) -> np.ndarray:
  """Normalised elliptic radius: < 1 inside the ellipse."""
  cos, sin = np.cos(angle), np.sin(angle)
  u = (x - cx) * cos + (y - cy) * sin
  v = -(x - cx) * sin + (y - cy) * cos
  return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _soft(inside_distance: np.ndarray, width: float) -> np.ndarray:
  """Partial-volume edge: 1 inside (negative distance), 0 outside."""
  return 1.0 / (1.0 + np.exp(np.clip(inside_distance / width, -50.0, 50.0)))


def _anatomy(rng: np.random.Generator, size: int) -> dict:
  """Soft tissue-class maps (values in [0, 1]) of one random head."""
  coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
  y, x = np.meshgrid(coords, coords, indexing="ij")
  edge = 1.5 / size  # about one pixel of partial volume
  cx, cy = rng.uniform(-0.05, 0.05, size=2)
  ax, ay = rng.uniform(0.68, 0.80), rng.uniform(0.80, 0.92)
  angle = rng.uniform(-0.25, 0.25)
  r = _ellipse(x, y, cx, cy, ax, ay, angle)
  theta = np.arctan2(y - cy, x - cx)
  # Slightly irregular outline so heads differ beyond their ellipse parameters.
  r = r * (1.0 + 0.015 * _smooth_noise(rng, size, size / 16))
  scale = min(ax, ay)
  skull_out = rng.uniform(0.93, 0.96)
  skull_in = skull_out - rng.uniform(0.06, 0.10)
  brain_out = skull_in - rng.uniform(0.015, 0.03)
  head = _soft(r - 1.0, edge / scale)
  inside_skull_out = _soft(r - skull_out, edge / scale)
  inside_skull_in = _soft(r - skull_in, edge / scale)
  brain = _soft(r - brain_out, edge / scale)
  scalp = head - inside_skull_out
  skull = inside_skull_out - inside_skull_in
  csf = inside_skull_in - brain
  # Gyri: the white-matter boundary folds with angle, plus random wobble.
  folds = rng.integers(9, 16)
  phase = rng.uniform(0, 2 * np.pi)
  wm_radius = (
      brain_out * rng.uniform(0.68, 0.76)
      + 0.05 * np.sin(folds * theta + phase)
      + 0.025 * np.sin((folds * 2 + 3) * theta + 2 * phase)
      + 0.02 * _smooth_noise(rng, size, size / 24)
  )
  white = brain * _soft(r - wm_radius, 2 * edge / scale)
  # Sulci: thin CSF lines cutting into the cortex between folds.
  wavy_theta = theta + 0.08 * _smooth_noise(rng, size, size / 20)
  sulci = brain * (np.cos(folds * wavy_theta + phase) > rng.uniform(0.9, 0.95)) * (r > wm_radius)
  sulci = ndimage.gaussian_filter(sulci.astype(np.float64), 0.6)
  # Ventricles: a butterfly of two tilted ellipses, random size, plus a third one.
  vent_scale = rng.uniform(0.7, 1.3)
  tilt = rng.uniform(0.35, 0.6)
  dx = rng.uniform(0.06, 0.10)
  vcx, vcy = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.08, 0.04)
  ventricles = np.zeros_like(r)
  for side in (-1.0, 1.0):  # two ventricles, not a pixel loop
    ventricles = np.maximum(ventricles, _soft(
        _ellipse(x, y, vcx + side * dx, vcy, 0.05 * vent_scale, 0.17 * vent_scale,
                 side * tilt) - 1.0, 0.03))
  ventricles = np.maximum(ventricles, _soft(
      _ellipse(x, y, vcx, vcy + 0.24 * vent_scale, 0.035 * vent_scale, 0.05 * vent_scale,
               0.0) - 1.0, 0.05))
  ventricles *= brain
  # Deep grey nuclei and a few random blobs (lesion-like) with their own contrast.
  blob_count = rng.integers(2, 6)
  blob_centre = rng.uniform(-0.45, 0.45, size=(blob_count, 2)) * np.array([ax, ay])
  blob_axes = rng.uniform(0.03, 0.09, size=(blob_count, 2))
  blob_angle = rng.uniform(0, np.pi, size=blob_count)
  blob_sign = rng.choice([-1.0, 1.0], size=blob_count)
  xb, yb = x[None], y[None]
  cos, sin = np.cos(blob_angle)[:, None, None], np.sin(blob_angle)[:, None, None]
  u = (xb - cx - blob_centre[:, 0, None, None]) * cos + (yb - cy - blob_centre[:, 1, None, None]) * sin
  v = -(xb - cx - blob_centre[:, 0, None, None]) * sin + (yb - cy - blob_centre[:, 1, None, None]) * cos
  blob_r = np.sqrt((u / blob_axes[:, 0, None, None]) ** 2 + (v / blob_axes[:, 1, None, None]) ** 2)
  blobs = (_soft(blob_r - 1.0, 0.08) * blob_sign[:, None, None]).sum(axis=0) * brain
  grey = np.clip(brain - white - ventricles - sulci, 0.0, 1.0)
  white = np.clip(white - ventricles, 0.0, 1.0)
  csf_all = np.clip(csf + ventricles + sulci, 0.0, 1.0)
  return dict(
      x=x, y=y, r=r, head=head, scalp=scalp, skull=skull, brain=brain, grey=grey,
      white=white, csf=csf_all, blobs=blobs, cx=cx, cy=cy, ax=ax, ay=ay,
  )


def _render_mri(anatomy: dict, rng: np.random.Generator, size: int) -> np.ndarray:
  t2_like = rng.random() < 0.5
  if t2_like:
    levels = dict(scalp=0.55, skull=0.08, grey=0.62, white=0.42, csf=0.95, blobs=0.2)
  else:
    levels = dict(scalp=0.80, skull=0.06, grey=0.50, white=0.78, csf=0.12, blobs=-0.15)
  image = sum(levels[name] * anatomy[name] for name in ("scalp", "skull", "grey", "white", "csf"))
  image = image + levels["blobs"] * anatomy["blobs"]
  texture = 0.05 * _smooth_noise(rng, size, size / 64) + 0.02 * rng.standard_normal((size, size))
  # Coil shading: a smooth intensity ramp across the head.
  bias = 1.0 + 0.12 * (np.cos(rng.uniform(0, 2 * np.pi)) * anatomy["x"]
                       + np.sin(rng.uniform(0, 2 * np.pi)) * anatomy["y"])
  image = (image * bias + texture * anatomy["head"]) * anatomy["head"]
  return _to_uint8(image)


def _render_ct(anatomy: dict, rng: np.random.Generator, size: int) -> np.ndarray:
  bone_texture = 0.08 * _smooth_noise(rng, size, size / 96)
  image = (
      anatomy["skull"] * (0.92 + bone_texture)
      + 0.26 * anatomy["scalp"] + 0.30 * anatomy["grey"] + 0.27 * anatomy["white"]
      + 0.16 * anatomy["csf"] + 0.05 * anatomy["blobs"]
  )
  # Small calcifications: a few bright dots.
  dots = np.zeros((size, size))
  count = rng.integers(0, 4)
  rows = ((anatomy["cy"] + rng.uniform(-0.3, 0.3, count)) + 1.0) * size / 2.0
  cols = ((anatomy["cx"] + rng.uniform(-0.3, 0.3, count)) + 1.0) * size / 2.0
  dots[np.clip(rows.astype(int), 0, size - 1), np.clip(cols.astype(int), 0, size - 1)] = 1.0
  dots = ndimage.gaussian_filter(dots, 1.0) * 6.0 * anatomy["brain"]
  noise = 0.015 * rng.standard_normal((size, size))
  return _to_uint8((image + dots + noise) * anatomy["head"])


def _render_functional(
    anatomy: dict, rng: np.random.Generator, size: int, colourmap: str, blur: float
) -> np.ndarray:
  """Uptake mostly in grey matter plus hot spots, blurred to the scanner's resolution."""
  spots = rng.integers(3, 8)
  centres = rng.uniform(-0.6, 0.6, size=(spots, 2)) * np.array([anatomy["ax"], anatomy["ay"]])
  widths = rng.uniform(0.05, 0.15, size=spots)
  strengths = rng.uniform(0.3, 0.8, size=spots)
  dx = anatomy["x"][None] - anatomy["cx"] - centres[:, 0, None, None]
  dy = anatomy["y"][None] - anatomy["cy"] - centres[:, 1, None, None]
  hot = (strengths[:, None, None]
         * np.exp(-(dx ** 2 + dy ** 2) / (2 * widths[:, None, None] ** 2))).sum(axis=0)
  uptake = (0.65 * anatomy["grey"] + 0.3 * anatomy["white"] + 0.05 * anatomy["csf"]
            + hot * anatomy["brain"] + 0.08 * anatomy["scalp"])
  uptake = uptake * (1.0 + 0.15 * _smooth_noise(rng, size, size / 20))
  uptake = ndimage.gaussian_filter(uptake, blur * size / 256.0)
  uptake = uptake / (uptake.max() + 1e-8)
  return volumes.apply_colourmap(uptake * anatomy["head"], colourmap)


def phantom_pair(
    index: int, size: int = 256, task: str = "MRI-CT", seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
  """(MRI uint8 HxW, partner) for phantom number `index`.

  The partner is uint8 HxW for CT and uint8 HxWx3 RGB for PET / SPECT. The anatomy
  depends only on `(seed, index, size)`; `task` picks how the partner is rendered.
  """
  modality = pairs_lib.modality_of(task)
  if size < 16:
    raise ValueError(f"phantom size must be at least 16 pixels, got {size}")
  if index < 0 or seed < 0:
    raise ValueError(f"phantom index and seed must be non-negative, got {index}, {seed}")
  anatomy_rng = np.random.default_rng([seed, index, size])
  anatomy = _anatomy(anatomy_rng, size)
  mri = _render_mri(anatomy, np.random.default_rng([seed, index, size, 1]), size)
  other_rng = np.random.default_rng([seed, index, size, 2])
  if modality == "CT":
    other = _render_ct(anatomy, other_rng, size)
  elif modality == "PET":
    other = _render_functional(anatomy, other_rng, size, "pet", blur=3.0)
  else:
    other = _render_functional(anatomy, other_rng, size, "spect", blur=5.0)
  return mri, other


def split_seed(seed: int, split: str) -> int:
  """Per-split seed, so 'train' and 'test' phantoms never share an anatomy."""
  return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


def write_phantom_dataset(
    root: PathLike,
    tasks: Sequence[str] = pairs_lib.TASKS,
    split: str = "train",
    count: int = 8,
    size: int = 256,
    seed: int = 0,
) -> List[pairs_lib.ImagePair]:
  """Writes `count` phantom pairs per task as `ROOT/<task>/<split>/<modality>/<id>.png`.

  Returns the written pairs (as `find_dataset_pairs` would list them). Tasks get
  different anatomies (index offset per task), splits different seeds.
  """
  if isinstance(tasks, str):
    tasks = [tasks]
  root = pathlib.Path(root)
  effective_seed = split_seed(seed, split)
  written = []
  for task_position, task in enumerate(tasks):
    modality = pairs_lib.modality_of(task)
    folder = root / task / split
    for i in range(count):
      mri, other = phantom_pair(task_position * count + i, size, task, effective_seed)
      pair_id = f"phantom_{i:05d}"
      path_a = imageio.write_image_atomic(folder / pairs_lib.MRI_FOLDER / f"{pair_id}.png", mri)
      path_b = imageio.write_image_atomic(folder / modality / f"{pair_id}.png", other)
      written.append(pairs_lib.ImagePair(pair_id, task, path_a, path_b, modality))
  return written


def write_phantom_volumes(folder: PathLike, task: str = "MRI-PET", size: int = 64,
                          slices: int = 8, seed: int = 0) -> Tuple[pathlib.Path, pathlib.Path]:
  """A small co-registered phantom volume pair as NIfTI: `folder/mri.nii.gz` and
  `folder/<modality>.nii.gz` (scalar: PET/SPECT as their uptake's luma), 1 x 1 x 3 mm
  voxels, for the demo and tests of the volume path."""
  from dmfnet_jax import volumes  # pylint: disable=g-import-not-at-top
  modality = pairs_lib.modality_of(task)
  pairs = [phantom_pair(i, size, task, seed) for i in range(slices)]
  grey = lambda image: image if image.ndim == 2 else imageio.opencv_luma_uint8(image)
  # Slices are stored as shown (anterior at the top), voxel arrays as x, y, z.
  mri = np.stack([np.rot90(a, -1) for a, _ in pairs], axis=-1).astype(np.float32)
  other = np.stack([np.rot90(grey(b), -1) for _, b in pairs], axis=-1).astype(np.float32)
  affine = np.diag([1.0, 1.0, 3.0, 1.0])
  grid = volumes.Volume(mri, affine, volumes.new_header(mri.shape, affine),
                        pathlib.Path(folder) / "mri.nii.gz")
  folder = pathlib.Path(folder)
  paths = (folder / "mri.nii.gz", folder / f"{modality.lower()}.nii.gz")
  for path, data in zip(paths, (mri, other)):
    volumes.write_nifti(path, data, grid, description=f"dmfnet-jax phantom {task}")
  return paths
