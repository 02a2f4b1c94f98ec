"""The fusion engine: a trained model's jitted forward, fed in batches or in tiles.

`FusionModel.fuse_images` takes source images of any size (in the networks' [-1, 1]
range) and returns the fused ones. Images of one size share one compiled program and
go through in batches. Before running, the memory an image needs is estimated
(`estimate_bytes`): activations grow with the pixel count and the attention blocks with
its square, so a large image would exhaust the machine; such an image is fused in
overlapping tiles (`plan_tiles`) that share the whole image's noise draw and are blended
with linear ramps, so no seam shows, or refused with a message when even a small tile
would not fit. A failure tied to one image is returned in its place, so a batch job can
report it and carry on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmfnet_jax import config_defaults, diffusion, features, models, validation
from dmfnet_jax.errors import DataError, DmfnetError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import unet as unet_lib

# Bytes of live activations per (channel x pixel) of the UNet's levels, for one image:
# skips kept for the decoder, GroupNorm/swish/conv temporaries, the features the head
# reads. XLA's memory analysis of the compiled programs gives 24.2 (the `cpu` model) and
# 15.2 (`reference`) at every size; tests/test_engine.py checks the estimate stays above.
ACTIVATION_BYTES_PER_CHANNEL_PIXEL = 28.0
# Attention logits and weights (float32) per query-key pair, of the largest attention
# layer (layers run one after another and reuse the memory).
ATTENTION_BYTES_PER_PAIR = 8.0
# Fixed overhead of a fuse call: parameters, the program, the host copies.
FIXED_BYTES = 256 * 2**20
# The share of the machine's memory a fuse job may plan for, when not configured.
DEFAULT_MEMORY_FRACTION = 0.5

FuseResult = Union[np.ndarray, DmfnetError]


def machine_memory_bytes() -> int:
  """The memory fusion runs in: an accelerator's own, else the host's physical memory."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 8 * 2**30


def memory_budget_bytes(fuse_cfg=None) -> int:
  """`fuse.memory_budget_gb` if set (> 0), else a safe share of the machine's memory."""
  configured = float(config_defaults.get_setting(fuse_cfg, "memory_budget_gb", 0) or 0)
  if configured > 0:
    return int(configured * 2**30)
  return int(DEFAULT_MEMORY_FRACTION * machine_memory_bytes())


def estimate_bytes(model_cfg, fusion_cfg, height: int, width: int, pairs: int = 1) -> int:
  """Peak memory of fusing `pairs` images of height x width (already a valid size)."""
  mults = tuple(model_cfg.channel_mults)
  inner = int(model_cfg.inner_channel)
  pixels = [height * width / 4**level for level in range(len(mults))]
  channel_pixels = sum(inner * m * p for m, p in zip(mults, pixels))
  down, up = validation.attention_levels(mults, model_cfg.attn_res, model_cfg.image_size)
  attention_pairs = max(pixels[level] ** 2 for level in {len(mults) - 1, *down, *up})
  images = 2 * len(fusion_cfg.timesteps) * pairs
  per_image = (ACTIVATION_BYTES_PER_CHANNEL_PIXEL * channel_pixels
               + ATTENTION_BYTES_PER_PAIR * attention_pairs)
  return int(images * per_image + FIXED_BYTES)


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """How one padded image is fused: whole (`tile` = None) or in tiles of `tile` px,
  `per_call` of them at once, overlapping by `overlap` px."""
  height: int
  width: int
  tile: Optional[int] = None
  overlap: int = 0
  per_call: int = 1

  def starts(self, size: int) -> list[int]:
    if self.tile is None or size <= self.tile:
      return [0]
    step = self.tile - self.overlap
    count = math.ceil((size - self.tile) / step) + 1
    return [min(i * step, size - self.tile) for i in range(count)]

  @property
  def tiles(self) -> list[tuple[int, int]]:
    return [(y, x) for y in self.starts(self.height) for x in self.starts(self.width)]


def plan_tiles(model_cfg, fusion_cfg, height: int, width: int, budget: int,
               what: str = "image") -> TilePlan:
  """A plan that fits `budget` bytes for a padded height x width image; DataError when
  even the smallest tile does not fit."""
  if estimate_bytes(model_cfg, fusion_cfg, height, width) <= budget:
    return TilePlan(height, width)
  multiple = 2**(len(model_cfg.channel_mults) - 1)
  smallest = validation.valid_fusion_side(1, len(model_cfg.channel_mults))
  tile = (min(height, width) // multiple) * multiple
  while tile > smallest and estimate_bytes(model_cfg, fusion_cfg, tile, tile) > budget:
    tile -= multiple
  if estimate_bytes(model_cfg, fusion_cfg, tile, tile) > budget:
    need = estimate_bytes(model_cfg, fusion_cfg, tile, tile) / 2**30
    raise DataError(f"{what}: even a {tile}x{tile} tile needs about {need:.1f} GiB, more than "
                    f"the memory budget of {budget / 2**30:.1f} GiB (fuse.memory_budget_gb)")
  # Wide overlaps keep a tile's GroupNorm statistics and attention close to the whole
  # image's; a quarter of the tile, at least one coarsest-level cell on each side.
  overlap = max(multiple, (tile // 4) // multiple * multiple)
  per_tile = estimate_bytes(model_cfg, fusion_cfg, tile, tile) - FIXED_BYTES
  per_call = max(1, int((budget - FIXED_BYTES) // max(per_tile, 1)))
  return TilePlan(height, width, tile, overlap, per_call)


def _ramp(length: int, overlap: int, before: bool, after: bool) -> np.ndarray:
  """Blending weights along one tile axis: linear ramps where it overlaps a neighbour."""
  weights = np.ones(length, np.float32)
  if overlap > 0:
    ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if before:
      weights[:overlap] = np.minimum(weights[:overlap], ramp)
    if after:
      weights[-overlap:] = np.minimum(weights[-overlap:], ramp[::-1])
  return weights


@dataclasses.dataclass
class FusionModel:
  """Both stages' parameters and jitted fuse functions (compiled once per shape)."""
  config: Any
  unet_params: Any
  head_params: Any

  def __post_init__(self):
    from dmfnet_jax import inference  # pylint: disable=g-import-not-at-top
    dtype = models.compute_dtype(self.config.fuse.get("compute_dtype", "float32"),
                                 "fuse.compute_dtype")
    unet = unet_lib.unet_from_config(self.config.model, dtype=dtype)
    head = head_lib.fusion_head_from_config(self.config.model, self.config.fusion, dtype=dtype)
    sqrt_acp_prev = inference.feature_schedule(self.config)
    fuse_one = inference.make_fuse_fn(unet, head, sqrt_acp_prev, self.config.fusion)
    timesteps = tuple(int(t) for t in self.config.fusion.timesteps)
    scales = [int(s) for s in self.config.fusion.feat_scales]
    self.num_levels = len(self.config.model.channel_mults)
    self.budget = memory_budget_bytes(self.config.fuse)

    def fuse_batch(unet_params, head_params, a, b, keys):
      # One key per image: the result of a pair does not depend on its batch mates.
      per_image = lambda a1, b1, k: fuse_one(unet_params, head_params, a1[None], b1[None], k)[0]
      return jax.vmap(per_image)(a, b, keys)

    def noisy(a, b, key):  # the whole image's noise draw, as fuse_one makes it
      return features.noisy_inputs(a[None], b[None], key, sqrt_acp_prev, timesteps)

    def fuse_noisy(unet_params, head_params, x_t, g, norm_fixed):
      """Tiles (S, T, n, h, w, 1) normalised with the whole image's statistics."""
      flat = x_t.reshape((-1,) + x_t.shape[3:])
      fixed = jax.tree.map(lambda a: jnp.repeat(a, x_t.shape[2], axis=0), norm_fixed)
      feats = unet.apply({"params": unet_params, "norm_fixed": fixed}, flat, g.reshape(-1),
                         decoder_feature_indices=tuple(scales))
      feats = [f.reshape(x_t.shape[:3] + f.shape[1:]) for f in feats]
      return head.apply({"params": head_params},
                        head_lib.order_features_coarse_to_fine(feats, scales))

    def norm_statistics(unet_params, a, b, g, key):
      """GroupNorm statistics of a whole (downscaled) image, noised at levels `g`."""
      x0 = jnp.broadcast_to(jnp.stack([a, b])[:, None], g.shape[:2] + a.shape).reshape(
          (-1,) + a.shape)
      x_t = diffusion.q_sample(x0, g.reshape(-1), jax.random.normal(key, x0.shape, x0.dtype))
      _, state = unet.apply({"params": unet_params}, x_t, g.reshape(-1),
                            decoder_feature_indices=tuple(scales), mutable=["norm_stats"])
      return state["norm_stats"]

    # Each batch is split over this process's devices (a multi-host run gives every
    # process its own share of the pairs, so no step needs another host).
    self.devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(self.devices), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._fuse = jax.jit(fuse_batch, in_shardings=(whole, whole, split, split, split),
                         out_shardings=split)
    self._noisy = jax.jit(noisy)
    self._fuse_noisy = jax.jit(fuse_noisy)
    self._norm_statistics = jax.jit(norm_statistics)

  def __call__(self, a: np.ndarray, b: np.ndarray, keys: jax.Array) -> np.ndarray:
    """Fused (B, H, W, 1) in [-1, 1] of sources (B, H, W, 1) whose size the networks take;
    B must be a multiple of the local device count (see `batch_for`)."""
    return np.asarray(self._fuse(self.unet_params, self.head_params, a, b, keys))

  def batch_for(self, size: int) -> int:
    """`size` rounded up to a multiple of the local devices, which share each batch."""
    count = len(self.devices)
    return -(-max(size, 1) // count) * count

  def plan(self, height: int, width: int, what: str = "image") -> TilePlan:
    """The tile plan of a height x width source (padded to a valid size first)."""
    padded = [validation.valid_fusion_side(s, self.num_levels) for s in (height, width)]
    return plan_tiles(self.config.model, self.config.fusion, *padded, self.budget, what)

  def fuse_images(self, a_images: Sequence[np.ndarray], b_images: Sequence[np.ndarray],
                  keys: Sequence[jax.Array], batch_size: int,
                  names: Optional[Sequence[str]] = None) -> list[FuseResult]:
    """Fused HxW images in [-1, 1] of HxW sources in [-1, 1] (MRI first), any sizes.

    Images of one size go through in batches of up to `batch_size` (the last one filled
    up with repeats, so each size compiles once), reflect-padded to a size the networks
    accept and cropped back; images too large for the memory budget go through in tiles.
    An image that cannot be fused gets a DmfnetError (naming `names[i]`) in its place."""
    names = list(names) if names is not None else [f"image {i}" for i in range(len(a_images))]
    fused: list[FuseResult] = [None] * len(a_images)  # type: ignore[list-item]
    by_shape: dict[tuple, list[int]] = {}
    for index, image in enumerate(a_images):
      height, width = np.shape(image)[:2]
      if min(height, width) < 2:
        fused[index] = DataError(f"{names[index]}: {height}x{width} pixels is too small to "
                                 "fuse (at least 2x2)")
        continue
      by_shape.setdefault((height, width), []).append(index)
    for (height, width), indices in by_shape.items():
      try:
        plan = self.plan(height, width, f"{height}x{width} images")
      except DmfnetError as err:
        for index in indices:
          fused[index] = DataError(f"{names[index]}: {err}")
        continue
      if plan.tile is not None:
        logging.info("%dx%d images: fusing in %d tiles of %d px (overlap %d) to stay within "
                     "%.1f GiB", height, width, len(plan.tiles), plan.tile, plan.overlap,
                     self.budget / 2**30)
        for index in indices:
          fused[index] = self._guarded(names[index], self._fuse_tiled, a_images[index],
                                       b_images[index], keys[index], plan)
        continue
      fits = max(1, int((self.budget - FIXED_BYTES)
                        // max(estimate_bytes(self.config.model, self.config.fusion, plan.height,
                                              plan.width) - FIXED_BYTES, 1)))
      size = self.batch_for(min(batch_size, fits))  # every local device gets a share
      for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        try:
          out = self._fuse_chunk([a_images[i] for i in chunk], [b_images[i] for i in chunk],
                                 [keys[i] for i in chunk], size)
        except Exception as err:  # pylint: disable=broad-except
          if len(chunk) == 1:
            fused[chunk[0]] = DataError(f"{names[chunk[0]]}: fusion failed ({_one_line(err)})")
            continue
          logging.warning("A batch of %d failed (%s); fusing its images one by one.",
                          len(chunk), _one_line(err))
          for index in chunk:
            fused[index] = self._guarded(names[index], lambda a, b, k: self._fuse_chunk(
                [a], [b], [k], size)[0], a_images[index], b_images[index], keys[index])
          continue
        for position, index in enumerate(chunk):
          fused[index] = out[position]
    return fused

  @staticmethod
  def _guarded(name: str, fn, *args) -> FuseResult:
    try:
      return fn(*args)
    except DmfnetError as err:
      return err
    except Exception as err:  # pylint: disable=broad-except
      return DataError(f"{name}: fusion failed ({_one_line(err)})")

  def _fuse_chunk(self, a_images, b_images, keys, batch_size: int) -> list[np.ndarray]:
    padded = list(range(len(a_images))) + [len(a_images) - 1] * (batch_size - len(a_images))
    a = np.stack([a_images[i] for i in padded])[..., None]
    b = np.stack([b_images[i] for i in padded])[..., None]
    a_pad, crop = features.pad_to_valid(a, self.num_levels)
    b_pad, _ = features.pad_to_valid(b, self.num_levels)
    out = self(a_pad, b_pad, jnp.stack([keys[i] for i in padded]))
    out = np.asarray(features.crop_back(out, crop))
    return [out[i, ..., 0] for i in range(len(a_images))]

  def _fuse_tiled(self, a: np.ndarray, b: np.ndarray, key: jax.Array, plan: TilePlan
                  ) -> np.ndarray:
    """One image in overlapping tiles blended with ramps.

    The tiles share the whole image's noise draw, and their GroupNorm layers use the
    whole image's statistics, estimated on a downscaled copy that fits the budget (a
    tile's own statistics shift its intensities: about 6% of pixels more than 2 grey
    levels off at 512x512 in 384 px tiles, against 0.5% with shared statistics)."""
    a_pad, crop = features.pad_to_valid(a[None, ..., None], self.num_levels)
    b_pad, _ = features.pad_to_valid(b[None, ..., None], self.num_levels)
    x_t, g = self._noisy(a_pad[0], b_pad[0], key)  # (2, T, 1, H, W, 1), (2, T, 1)
    stats = self._whole_image_statistics(a_pad[0, ..., 0], b_pad[0, ..., 0], g, key)
    x_t = np.asarray(x_t)
    total = np.zeros((plan.height, plan.width), np.float64)
    weight = np.zeros_like(total)
    tile, overlap = plan.tile, plan.overlap
    tiles = plan.tiles
    for start in range(0, len(tiles), plan.per_call):
      chunk = tiles[start:start + plan.per_call]
      filled = chunk + [chunk[-1]] * (plan.per_call - len(chunk))
      crops = np.concatenate([x_t[:, :, :, y:y + tile, x:x + tile] for y, x in filled], axis=2)
      out = np.asarray(self._fuse_noisy(self.unet_params, self.head_params, crops,
                                        jnp.repeat(g, len(filled), axis=2), stats))
      for position, (y, x) in enumerate(chunk):
        w = np.outer(_ramp(tile, overlap, y > 0, y + tile < plan.height),
                     _ramp(tile, overlap, x > 0, x + tile < plan.width))
        total[y:y + tile, x:x + tile] += w * out[position, ..., 0]
        weight[y:y + tile, x:x + tile] += w
    blended = (total / weight).astype(np.float32)[None, ..., None]
    return np.asarray(features.crop_back(blended, crop))[0, ..., 0]

  def _whole_image_statistics(self, a: np.ndarray, b: np.ndarray, g: jax.Array,
                              key: jax.Array):
    """GroupNorm statistics of the whole image at the largest 1/2^k scale that fits."""
    factor = 2
    multiple = 2**(self.num_levels - 1)
    while True:
      height, width = (validation.valid_fusion_side(-(-s // factor), self.num_levels)
                       for s in a.shape)
      if estimate_bytes(self.config.model, self.config.fusion, height, width) <= self.budget:
        break
      if height <= 4 * multiple and width <= 4 * multiple:
        break
      factor *= 2
    small = [_downscale(x, factor, height, width) for x in (a, b)]
    return jax.device_get(self._norm_statistics(self.unet_params, *small, g,
                                                jax.random.fold_in(key, 1)))


def _downscale(image: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
  """Box-filtered 1/factor copy, reflect-padded to height x width."""
  rows, cols = (-(-s // factor) * factor for s in image.shape)
  padded = np.pad(image, ((0, rows - image.shape[0]), (0, cols - image.shape[1])), mode="edge")
  small = padded.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
  pad_h, pad_w = height - small.shape[0], width - small.shape[1]
  return np.pad(small, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)),
                mode="reflect").astype(np.float32)[..., None]


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__
