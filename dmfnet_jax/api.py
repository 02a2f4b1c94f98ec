"""The Python API: fuse arrays, files, folders and volumes with a trained DM-FNet.

    import dmfnet_jax
    fuser = dmfnet_jax.load()                 # the shipped model (MODEL_CARD.md)
    fused = fuser.fuse(mri, pet)              # numpy arrays in, uint8 array out

`load(path)` takes any checkpoint this project reads (a Stage II workdir, an exported
model, an import of the authors' weights); the checkpoint says what the model is. The
fuse job, the `dmfnet-jax` command and the demo all fuse through `Fuser`, so they give
the same pixels for the same inputs and seed.

Inputs are 2-D arrays or images: uint8, uint16, bool-free integer or float; grey (HxW)
or colour (HxWx3, or HxWx4 whose alpha is dropped). Float images are taken as
intensities in [0, 1] when they lie there, else mapped linearly from their own minimum
and maximum to [0, 1] (see README, "Python"); NaN or infinite pixels are refused. The
networks see grey: a colour MRI becomes its luma; a colour second source (PET, SPECT)
gives a colour result, its luma replaced by the fused one (docs/model.md §6).

Every result depends only on the model, the seed and the pair itself (not on the batch
it was fused in): arrays draw their noise from their content, files from their name.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import time
import zlib
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from dmfnet_jax import config_defaults, engine, imageio, inference, runtime
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.errors import DataError, DmfnetError

PathLike = Union[str, os.PathLike]
ArrayPair = tuple[np.ndarray, np.ndarray]
# Threads that decode inputs and encode and write outputs beside the networks.
IO_THREADS = 4
# In an output folder: what made its outputs, so a rerun can resume safely.
RUN_STATE_FILE = ".dmfnet_fuse_run.json"
# Test hook (tests/test_fuse.py): seconds to wait after each output is written, so a
# test can kill a run between two outputs. Unset in normal use.
WRITE_DELAY_ENV = "DMFNET_TEST_WRITE_DELAY"


def load(checkpoint: Optional[PathLike] = None, *, batch_size: int = 1,
         compute_dtype: str = "float32", seed: int = 0, memory_budget_gb: float = 0.0) -> "Fuser":
  """A `Fuser` for `checkpoint` (default: the shipped model).

  `batch_size` pairs of one size go through the networks at once; `compute_dtype`
  "bfloat16" computes in bf16 with float32 parameters; `seed` picks the noise;
  `memory_budget_gb` (0: half the machine's) bounds what a fuse may use: larger images
  are fused whole one UNet input at a time, or else in tiles."""
  return Fuser.from_config(fuse_config(checkpoint, batch_size=batch_size,
                                       compute_dtype=compute_dtype, seed=seed,
                                       memory_budget_gb=float(memory_budget_gb)))


def fuse_config(checkpoint: Optional[PathLike] = None, **fuse_settings):
  """The fuse job's config for `checkpoint`, its structure read from the checkpoint."""
  config = config_defaults.base_config(job="fuse")
  config.seed = int(fuse_settings.pop("seed", 0))
  config.checkpoint = str(checkpoint) if checkpoint else config_defaults.shipped_model_dir()
  config.model = config_defaults.model_config_from_checkpoint()
  config.diffusion = config_defaults.diffusion_config("linear")
  config.fusion = config_defaults.fusion_config_from_checkpoint()
  config.data = config_defaults.data_config()
  config.fuse = config_defaults.fuse_config()
  config.fuse.update(fuse_settings)
  return inference.resolve_structure(config)


@dataclasses.dataclass
class Prepared:
  """A source image as the networks take it, plus what its colour needs."""
  model_range: np.ndarray  # float32 HxW in [-1, 1]
  colour: Optional[np.ndarray]  # uint8 HxWx3 when the image is colour, else None


def prepare(image: Any, what: str = "image") -> Prepared:
  """Any supported array (see the module docstring) -> network input and colour source."""
  array = np.asarray(image)
  if array.dtype == object or array.dtype.kind not in "uif":
    raise DataError(f"{what}: pixels of type {array.dtype} are not supported "
                    "(use uint8, uint16, another integer type or float)")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 3 and array.shape[-1] == 4:
    array = array[..., :3]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
    raise DataError(f"{what}: expected a 2-D image, HxW or HxWx3 (or x4), got shape {array.shape}")
  if min(array.shape[:2]) < 2:
    raise DataError(f"{what}: {array.shape[0]}x{array.shape[1]} pixels is too small to fuse "
                    "(at least 2x2)")
  unit = imageio.to_unit_range(array, what)  # float32 in [0, 1], same shape
  if array.ndim == 3:
    colour = np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)
    grey = imageio.opencv_luma_uint8(colour).astype(np.float32) / 255.0
    return Prepared(grey * 2.0 - 1.0, colour)
  return Prepared(unit * 2.0 - 1.0, None)


def _content_key(root: jax.Array, a: Prepared, b: Prepared) -> jax.Array:
  digest = zlib.crc32(a.model_range.tobytes())
  digest = zlib.crc32(b.model_range.tobytes(), digest)
  return jax.random.fold_in(root, digest & 0x7FFFFFFF)


def pair_key(root: jax.Array, pair: pairs_lib.ImagePair) -> jax.Array:
  """The noise key of a file pair: depends only on the seed and the pair's name."""
  return jax.random.fold_in(root, zlib.crc32(f"{pair.task}/{pair.pair_id}".encode()) & 0x7FFFFFFF)


def _finish(fused: np.ndarray, colour: Optional[np.ndarray]) -> np.ndarray:
  return imageio.colourise(imageio.from_model_range(fused), colour)


class Fuser:
  """A trained DM-FNet, ready to fuse (see the module docstring)."""

  def __init__(self, model: "engine.FusionModel", *, seed: int = 0, batch_size: int = 1):
    self.model = model
    self.seed = int(seed)
    self.batch_size = int(batch_size)
    self._root = jax.random.PRNGKey(self.seed)

  @classmethod
  def from_config(cls, config) -> "Fuser":
    """From a fuse-job config (`config.checkpoint`, `config.fuse`, `config.seed`)."""
    config = inference.resolve_structure(config)
    return cls(inference.load_fusion_model(config), seed=config.seed,
               batch_size=int(config.fuse.batch_size))

  @property
  def config(self):
    return self.model.config

  # --------------------------------------------------------------------------- arrays

  def fuse(self, mri: Any, other: Any) -> np.ndarray:
    """The fused image (uint8; HxWx3 when `other` is colour) of one pair of arrays."""
    return self.fuse_batch([(mri, other)])[0]

  def fuse_batch(self, pairs: Sequence[ArrayPair]) -> list[np.ndarray]:
    """Fused images of many pairs of arrays (any mix of sizes), in order."""
    prepared = [self._prepare_pair(a, b, f"pair {i}") for i, (a, b) in enumerate(pairs)]
    keys = [_content_key(self._root, a, b) for a, b in prepared]
    fused = self.model.fuse_images([a.model_range for a, _ in prepared],
                                   [b.model_range for _, b in prepared], keys, self.batch_size,
                                   names=[f"pair {i}" for i in range(len(prepared))])
    for result in fused:
      if isinstance(result, DmfnetError):
        raise result
    return [_finish(f, b.colour) for f, (_, b) in zip(fused, prepared)]

  @staticmethod
  def _prepare_pair(mri: Any, other: Any, what: str) -> tuple[Prepared, Prepared]:
    a, b = prepare(mri, f"{what}: MRI"), prepare(other, f"{what}: second image")
    if a.model_range.shape != b.model_range.shape:
      raise DataError(f"{what}: the MRI is {a.model_range.shape[0]}x{a.model_range.shape[1]} "
                      f"but the second image is {b.model_range.shape[0]}x"
                      f"{b.model_range.shape[1]} (HxW); fusion needs registered images of one size")
    return a, b

  # --------------------------------------------------------------------------- files

  def fuse_files(self, mri_path: PathLike, other_path: PathLike,
                 output: Optional[PathLike] = None) -> np.ndarray:
    """Fuses two image files; writes `output` (atomically) when given."""
    pair = pairs_lib.pairs_from_list([(mri_path, other_path)])[0]
    if output is not None:
      runtime.refuse_writing_inputs([mri_path, other_path], [output])
    loaded = pairs_lib.load_pair(pair)
    fused = self.model.fuse_images([loaded.a], [loaded.b], [pair_key(self._root, pair)],
                                   self.batch_size, names=[describe(pair)])[0]
    if isinstance(fused, DmfnetError):
      raise fused
    image = _finish(fused, loaded.b_raw if loaded.b_raw.ndim == 3 else None)
    if output is not None:
      imageio.write_image_atomic(output, image)
    return image

  def fingerprint(self) -> dict:
    """What decides the pixels of a run: the model, the seed, the precision."""
    config = self.config
    return {"checkpoint": os.path.realpath(str(config.checkpoint)), "seed": self.seed,
            "compute_dtype": config.fuse.get("compute_dtype", "float32"),
            "model": config.model.to_dict(), "fusion": config.fusion.to_dict()}

  def fuse_pairs(self, pairs: Sequence[pairs_lib.ImagePair],
                 output_path: Callable[[pairs_lib.ImagePair], PathLike], *,
                 output_root: Optional[PathLike] = None, overwrite: bool = False,
                 show_progress: bool = True) -> dict:
    """Fuses and writes every pair it can; a bad pair is reported and skipped.

    `output_path(pair)` names each output. Nothing is written when an output would
    touch an input (refused before any work). A rerun into the same `output_root`
    resumes: pairs whose output exists are not fused again, unless `overwrite`; outputs
    of another model or seed there are refused rather than mixed. Reading and writing
    run on threads beside the networks. Returns a summary: counts, the outputs written
    and, per skipped pair, its paths and the reason."""
    start = time.perf_counter()
    targets = [pathlib.Path(output_path(pair)) for pair in pairs]
    runtime.refuse_writing_inputs([p for pair in pairs for p in (pair.path_a, pair.path_b)],
                                  targets, {t.parent for t in targets})
    todo = self._resume(pairs, targets, output_root, overwrite)
    skipped: list[dict] = []
    written: list[str] = []
    progress = (tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="fuse", unit="pair",
                     dynamic_ncols=True, disable=None)
                if show_progress and runtime.is_chief() else None)

    def skip(pair, err):
      skipped.append({"pair": describe(pair), "reason": str(err)})
      logging.error("Skipping %s: %s", describe(pair), err)

    def load(index):
      try:
        return pairs_lib.load_pair(pairs[index])
      except DmfnetError as err:
        return err

    def write(index, image, item):
      try:
        if isinstance(image, DmfnetError):
          raise image
        colour = item.b_raw if item.b_raw.ndim == 3 else None
        imageio.write_image_atomic(targets[index], _finish(image, colour))
        time.sleep(float(os.environ.get(WRITE_DELAY_ENV) or 0))
        return None
      except (DmfnetError, OSError, ValueError) as err:
        return err

    chunk_size = max(self.batch_size * 4, 1)
    chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
      pending_reads = [pool.submit(lambda c=c: [load(i) for i in c]) for c in chunks[:2]]
      pending_writes = []
      for number, chunk in enumerate(chunks):
        items = pending_reads[number].result()
        if number + 2 < len(chunks):  # decode ahead while the networks run
          pending_reads.append(pool.submit(lambda c=chunks[number + 2]: [load(i) for i in c]))
        loaded = []
        for index, item in zip(chunk, items):
          if isinstance(item, DmfnetError):
            skip(pairs[index], item)
            if progress is not None:
              progress.update(1)
          else:
            loaded.append((index, item))
        if not loaded:
          continue
        fused = self.model.fuse_images(
            [item.a for _, item in loaded], [item.b for _, item in loaded],
            [pair_key(self._root, pairs[i]) for i, _ in loaded], self.batch_size,
            names=[describe(pairs[i]) for i, _ in loaded])
        for (index, item), image in zip(loaded, fused):
          pending_writes.append((index, pool.submit(write, index, image, item)))
        while pending_writes and (pending_writes[0][1].done() or len(pending_writes) > chunk_size):
          index, future = pending_writes.pop(0)
          self._account(future.result(), pairs[index], targets[index], written, skip, progress)
      for index, future in pending_writes:
        self._account(future.result(), pairs[index], targets[index], written, skip, progress)
    if progress is not None:
      progress.close()
    return {"fused": len(written), "skipped": len(skipped), "skipped_pairs": skipped,
            "already_done": len(pairs) - len(todo),
            "seconds": round(time.perf_counter() - start, 3), "outputs": written}

  @staticmethod
  def _account(error, pair, target, written, skip, progress) -> None:
    if error is None:
      written.append(str(target))
    else:
      skip(pair, error)
    if progress is not None:
      progress.update(1)

  def _resume(self, pairs, targets, output_root, overwrite: bool) -> list[int]:
    """Indices of the pairs to fuse: all with `overwrite`, else those whose output is
    missing, provided the existing outputs come from this model and seed."""
    if output_root is None:
      return list(range(len(pairs)))
    state_file = pathlib.Path(output_root) / RUN_STATE_FILE
    for folder in {t.parent for t in targets}:
      runtime.remove_stale_temporaries(folder)  # what a killed run was writing
    existing = [i for i, target in enumerate(targets) if target.exists()]
    if existing and not overwrite:
      try:
        previous = json.loads(state_file.read_text())
      except (OSError, ValueError):
        previous = None
      if previous != runtime.json_safe(self.fingerprint()):
        raise DataError(f"{targets[existing[0]]} (and {len(existing) - 1} more outputs) exist "
                        "from another run (another model, seed or precision, or an older "
                        "version); fuse into another folder, or overwrite them "
                        "(--config.fuse.overwrite=True, --overwrite)")
      logging.info("Resuming: %d of %d outputs exist already.", len(existing), len(pairs))
    if runtime.is_chief():
      runtime.write_json_atomic(state_file, self.fingerprint())
    done = set() if overwrite else set(existing)
    return [i for i in range(len(pairs)) if i not in done]

  # --------------------------------------------------------------------------- volumes

  def fuse_volumes(self, mri: PathLike, other: PathLike, output: PathLike, *,
                   modality: Optional[str] = None, **options) -> dict:
    """Fuses two co-registered volumes (NIfTI files or DICOM series folders) slice by
    slice and writes a NIfTI (and a PNG montage beside it); see README, "Volumes".

    `modality` ("CT", "PET" or "SPECT") defaults to the one the second path names.
    `options` go to `dmfnet_jax.volumes.fuse_volume_pair` (axis, resample, windows,
    colormap, grey_output, show_progress)."""
    from dmfnet_jax import volumes  # pylint: disable=g-import-not-at-top
    modality = modality or modality_from_path(other)
    return volumes.fuse_volume_pair(mri, other, output, fuse_slices=self.fuse_batch,
                                    modality=modality, batch_size=self.batch_size, **options)


def modality_from_path(path: PathLike) -> str:
  """CT, PET or SPECT as the path's name says it (e.g. `sub01_PET.nii.gz`, `SPECT/`)."""
  parts = [p.upper() for p in pathlib.PurePath(os.fspath(path)).parts[-2:]]
  tokens = {t for part in parts for t in
            "".join(c if c.isalnum() else " " for c in part.replace(".NII", "")).split()}
  found = [m for m in ("SPECT", "PET", "CT") if m in tokens]
  if len(found) != 1:
    raise DataError(f"{path}: cannot tell the modality from the name; say which "
                    "(modality='CT', 'PET' or 'SPECT'; --modality on the command line)")
  return found[0]


def describe(pair: pairs_lib.ImagePair) -> str:
  return f"{pair.path_a} + {pair.path_b}"
