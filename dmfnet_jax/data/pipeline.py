"""grain training pipelines for Stage I (diffusion UNet) and Stage II (fusion head).

Records are image pairs: files found by `find_dataset_pairs`, or synthetic phantoms
when `data.root` is empty, so a fresh machine trains without a download. Per host:

  source -> this host's shard -> shuffle(seed) -> repeat() -> crop/flip -> batch

The stream is a pure function of (config, seed, process index and count): the same
seed gives the same batches, and the iterator's `get_state()` / `set_state()` resume
it exactly (grain stores only the next batch index). Elements are dicts of numpy
arrays holding this host's share of the global batch:

- stage1: {"image": (b, crop, crop, 1)}. As in the reference (docs/model.md §2), both
  modalities of a pair go into the same batch as separate grayscale images, so b counts IMAGES (two per pair,
  ordered [mri_0, other_0, mri_1, other_1, ...]) and must be even.
- stage2: {"a": (b, crop, crop, 1), "b": (b, crop, crop, 1)}, b counts pairs; a is
  the MRI, b the other modality (luma for PET / SPECT), identically cropped/flipped.

Values are float32 in [-1, 1] (pixel/255*2-1; 16-bit files use /65535).
"""

from __future__ import annotations

import pathlib
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np

from dmfnet_jax import imageio, validation
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import ConfigError, DataError

STAGES = ("stage1", "stage2")


def _integer_gray(image: np.ndarray) -> np.ndarray:
  """read_image output -> HxW uint8/uint16 such that `to_model_range` of it (or of any
  crop of it) equals `to_model_range` of the original image: RGB becomes its luma."""
  if image.ndim == 2:
    return image
  return imageio.opencv_luma_uint8(imageio.uint16_to_uint8(image))


class PairSource:
  """Random-access source of image pairs as integer grayscale arrays.

  Decoding happens here (in grain's reader threads or worker processes); decoded
  images are cached in memory, which holds the whole Harvard training set in about
  90 MB. Each element is {"a": HxW, "b": HxW} (uint8 or uint16).
  """

  def __init__(self, image_pairs: Sequence[pairs_lib.ImagePair], min_size: int = 0):
    self._pairs = list(image_pairs)
    self._min_size = min_size
    self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  @property
  def pairs(self) -> List[pairs_lib.ImagePair]:
    return list(self._pairs)

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    cached = self._cache.get(index)
    if cached is None:
      pair = self._pairs[index]
      a = _integer_gray(imageio.read_image(pair.path_a))
      b = _integer_gray(imageio.read_image(pair.path_b))
      pairs_lib.check_same_size(pair, a.shape, b.shape)
      check_crop_fits(pair, a.shape, self._min_size)
      cached = (a, b)
      with self._lock:
        self._cache[index] = cached
    return {"a": cached[0], "b": cached[1]}

  def __getstate__(self):
    # Worker processes start with an empty cache (and a fresh lock).
    return {"_pairs": self._pairs, "_min_size": self._min_size}

  def __setstate__(self, state):
    self.__init__(state["_pairs"], state["_min_size"])

  def __repr__(self) -> str:
    return f"PairSource({len(self._pairs)} pairs)"


class PhantomSource:
  """Random-access source of synthetic pairs: pair i is `phantom_pair(i)` of task
  `tasks[i % len(tasks)]`, rendered on first use and cached."""

  def __init__(self, count: int, size: int, tasks: Sequence[str], seed: int):
    self._count, self._size, self._tasks, self._seed = count, size, list(tasks), seed
    self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    cached = self._cache.get(index)
    if cached is None:
      task = self._tasks[index % len(self._tasks)]
      mri, other = phantoms.phantom_pair(index, self._size, task, self._seed)
      cached = (mri, _integer_gray(other))
      with self._lock:
        self._cache[index] = cached
    return {"a": cached[0], "b": cached[1]}

  def __getstate__(self):
    return {"args": (self._count, self._size, self._tasks, self._seed)}

  def __setstate__(self, state):
    self.__init__(*state["args"])

  def __repr__(self) -> str:
    return f"PhantomSource({self._count} pairs of {self._size}px, tasks {self._tasks})"


def check_crop_fits(pair: pairs_lib.ImagePair, size: Tuple[int, int], crop: int) -> None:
  if size[0] < crop or size[1] < crop:
    raise DataError(
        f"{pair.path_a} and {pair.path_b} are {size[0]}x{size[1]} (HxW), smaller than "
        f"the {crop}x{crop} training crop (data.crop_size)"
    )


class RandomCropFlip(grain.transforms.RandomMap):
  """One random crop and the same random flips for both images of a pair."""

  def __init__(self, crop_size: int, random_flip: bool):
    self.crop_size = crop_size
    self.random_flip = random_flip

  def random_map(self, element, rng: np.random.Generator):
    a, b = element["a"], element["b"]
    height, width = a.shape
    top = int(rng.integers(0, height - self.crop_size + 1))
    left = int(rng.integers(0, width - self.crop_size + 1))
    flip_h, flip_v = rng.random(2) < 0.5
    window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
    step_v = -1 if (self.random_flip and flip_v) else 1
    step_h = -1 if (self.random_flip and flip_h) else 1
    out = {}
    for key, image in (("a", a), ("b", b)):
      patch = image[window][::step_v, ::step_h]
      out[key] = imageio.to_model_range(np.ascontiguousarray(patch))[..., None]
    return out


class PairToImages(grain.transforms.Map):
  """Stage I: a pair becomes two grayscale training images, MRI first."""

  def map(self, element):
    return {"image": np.stack([element["a"], element["b"]], axis=0)}


def _concatenate_images(elements):
  return {"image": np.concatenate([e["image"] for e in elements], axis=0)}


def host_shard(num_records: int, process_index: int, process_count: int) -> range:
  """Record indices of one host: disjoint across hosts, together all records."""
  return range(num_records)[process_index::process_count]


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags, which fail unparsed in scripts that do
  not start through absl.app (google/grain#1355); their defaults are what we want."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _derived_seed(*entropy: int) -> int:
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def make_source(data_cfg):
  """The record source the config names: phantoms if `data.root` is empty, else files.

  Files are checked up front from their headers (readable, pair sizes equal, at
  least one crop large), so a bad file stops the job before training starts.
  """
  validation.validate_data(data_cfg)
  split = data_cfg.get("split", "train") or "train"
  if not data_cfg.root:
    return PhantomSource(
        data_cfg.phantom_count, data_cfg.phantom_size, list(data_cfg.tasks),
        phantoms.split_seed(data_cfg.get("phantom_seed", 0), split),
    )
  image_pairs = pairs_lib.find_dataset_pairs(
      pathlib.Path(data_cfg.root), list(data_cfg.tasks), split
  )
  for pair in image_pairs:
    size_a = imageio.image_size(pair.path_a)
    pairs_lib.check_same_size(pair, size_a, imageio.image_size(pair.path_b))
    check_crop_fits(pair, size_a, data_cfg.crop_size)
  return PairSource(image_pairs, min_size=data_cfg.crop_size)


def make_train_dataset(
    data_cfg,
    *,
    stage: str,
    global_batch_size: int,
    seed: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.IterDataset:
  """Infinite, shuffled, augmented batches for this host; see the module docstring.

  `global_batch_size` counts images for stage1 (two per pair) and pairs for stage2.
  Host `process_index` of `process_count` (default: JAX's) reads a disjoint shard
  of the records and yields `global_batch_size // process_count` per batch.
  """
  if stage not in STAGES:
    raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got '{stage}'")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
    raise ConfigError(f"data seed must be a non-negative integer, got {seed!r}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(f"process index {process_index} is not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
        f"global batch size {global_batch_size} must be a positive multiple of the "
        f"process count {process_count}"
    )
  host_batch = global_batch_size // process_count
  if stage == "stage1" and host_batch % 2:
    raise ConfigError(
        f"stage1 batch size counts images, two per pair: the per-host batch "
        f"{host_batch} (global {global_batch_size} / {process_count} processes) must be even"
    )

  source = make_source(data_cfg)
  if len(source) < process_count:  # checked on every host, so all of them stop
    raise DataError(
        f"{len(source)} training pairs cannot give each of {process_count} processes a record"
    )
  shard = host_shard(len(source), process_index, process_count)
  dataset = grain.MapDataset.source(source)[shard.start:shard.stop:shard.step]
  dataset = dataset.shuffle(seed=_derived_seed(seed, process_index, 0))
  dataset = dataset.repeat()
  dataset = dataset.random_map(
      RandomCropFlip(data_cfg.crop_size, bool(data_cfg.random_flip)),
      seed=_derived_seed(seed, process_index, 1),
  )
  if stage == "stage1":
    dataset = dataset.map(PairToImages())
    dataset = dataset.batch(host_batch // 2, drop_remainder=True, batch_fn=_concatenate_images)
  else:
    dataset = dataset.batch(host_batch, drop_remainder=True)
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(
          num_threads=data_cfg.get("read_threads", 2),
          prefetch_buffer_size=data_cfg.get("prefetch_buffer_size", 4),
      )
  )
  if data_cfg.get("num_workers", 0) > 0:
    _ensure_absl_flags_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers,
            per_worker_buffer_size=data_cfg.get("worker_buffer_size", 2),
        )
    )
  return iter_dataset
