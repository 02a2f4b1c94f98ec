"""The fusion engine: a trained model's jitted forward, fed in batches or in tiles.

`FusionModel.fuse_images` takes source images of any size (in the networks' [-1, 1]
range) and returns the fused ones. Images of one size share one compiled program and
go through in batches: a batch's UNet inputs (six per pair) are split over the local
devices, each device running one at a time on a CPU (`unet_inputs_at_once`), and each
device runs the head on its own pairs. Before running, the memory an image needs is estimated
(`estimate_bytes`): activations grow with the pixel count and the attention blocks with
its square, so a large image would exhaust the machine. Such an image is fused whole
with its six UNet inputs one after another and the attention in query chunks (the same
result in much less memory), or, when even that does not fit, in overlapping tiles
(`plan_tiles`), or refused with a message when even a small tile would not fit.

Tiles reproduce the whole image's result because only layers with a local reach run
tile by tile, on pixels well inside the tile (`TILE_MARGIN`). Everything that sees the
whole image is computed for the whole image: the UNet's levels from its first attention
level down (`split_level`; for a 4096x4096 image a 256x256 map) run once on the map
assembled from the pixels each tile owns, with the attention in query chunks; the head
pools its channel attention over the whole image and upsamples on the whole image's
grid; the GroupNorm statistics are the whole image's (measured one UNet input at a time
when that fits, else estimated: see `FusionModel._fuse_tiled`); every tile shares the
whole image's noise draw. Tiles are blended with linear ramps. A failure tied to one
image is returned in its place, so a batch job can report it and carry on.
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
from dmfnet_jax.errors import ConfigError, DataError, DmfnetError
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
# The least distance (px) from a tile's cut edges to the pixels it owns: the zero padding
# at a cut reaches about this far into the fine levels. A 512x512 pair in 304 px tiles
# with 48 px: up to 3 grey levels off; with 96 px: 1.
TILE_MARGIN = 96
# Rounds of measuring the fine levels' GroupNorm statistics on the tiles when they can
# only be estimated (see FusionModel._fuse_tiled). On a 512x512 MRI-CT pair in 304 px
# tiles, the pixels more than 2 grey levels off: one round 0.25%, two 0.68%, none (the
# head then pooling per tile too) 1.04%. A round makes one more layer exact and
# disturbs the deeper ones: rounds do not converge.
STATISTICS_ROUNDS = 1
# `unet_inputs_at_once` on an accelerator: every input of a device's share at once.
UNLIMITED_INPUTS = 1 << 30
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


def estimate_bytes(model_cfg, fusion_cfg, height: int, width: int, pairs: int = 1, *,
                   levels: Optional[Sequence[int]] = None, attention_queries: Optional[int] = None,
                   images: Optional[int] = None) -> int:
  """Peak memory of fusing `pairs` images of height x width (already a valid size).

  `levels`: the UNet levels the program holds (all by default); `attention_queries`:
  the queries one attention chunk takes (all positions by default; 0: no attention);
  `images`: how many UNet inputs are live at once (2 x timesteps x pairs by default)."""
  mults = tuple(model_cfg.channel_mults)
  inner = int(model_cfg.inner_channel)
  levels = range(len(mults)) if levels is None else tuple(levels)
  pixels = [height * width / 4**level for level in range(len(mults))]
  channel_pixels = sum(inner * mults[level] * pixels[level] for level in levels)
  down, up = validation.attention_levels(mults, model_cfg.attn_res, model_cfg.image_size)
  attending = {len(mults) - 1, *down, *up} & set(levels)
  queries = (lambda level: pixels[level]) if attention_queries is None else (
      lambda level: min(attention_queries, pixels[level]))
  attention_pairs = max([queries(level) * pixels[level] for level in attending], default=0)
  if images is None:
    images = 2 * len(fusion_cfg.timesteps) * pairs
  per_image = (ACTIVATION_BYTES_PER_CHANNEL_PIXEL * channel_pixels
               + ATTENTION_BYTES_PER_PAIR * attention_pairs)
  return int(images * per_image + FIXED_BYTES)


def estimate_one_at_a_time_bytes(model_cfg, fusion_cfg, height: int, width: int,
                                 attention_queries: Optional[int]) -> int:
  """Peak memory of fusing one image whole with its UNet inputs one after another (the
  attention in chunks of `attention_queries`): one input's activations, plus the
  decoder features the head reads for all of them and half as much again for the head's
  own (XLA's memory analysis: 0.48 GiB at 512x512 for the `cpu` model, this estimate
  0.69 without the fixed part; tests/test_engine.py keeps it above)."""
  one_input = estimate_bytes(model_cfg, fusion_cfg, height, width, images=1,
                             attention_queries=attention_queries) - FIXED_BYTES
  channels = unet_lib.decoder_channels(model_cfg)
  levels = unet_lib.decoder_levels(model_cfg)
  feature_pixels = sum(channels[s] * height * width / 4**levels[s]
                       for s in fusion_cfg.feat_scales)
  features_bytes = 4 * feature_pixels * 2 * len(fusion_cfg.timesteps)
  return int(one_input + 1.5 * features_bytes + FIXED_BYTES)


def unet_inputs_at_once(fuse_cfg, platform: str) -> int:
  """How many UNet inputs a device runs at once (`fuse.unet_inputs_at_once`; 0 = auto:
  one on a CPU, whose caches then hold a layer's activations, and all on an
  accelerator, which needs the parallel work). Same numbers either way."""
  configured = int(config_defaults.get_setting(fuse_cfg, "unet_inputs_at_once", 0) or 0)
  if configured < 0:
    raise ConfigError(f"fuse.unet_inputs_at_once must be >= 0 (0 = automatic), got {configured}")
  if configured:
    return configured
  return 1 if platform == "cpu" else UNLIMITED_INPUTS


def split_level(model_cfg) -> int:
  """The finest UNet level with a layer that sees the whole map (attention, or the
  coarsest level's middle block); the levels above it only see local windows."""
  mults = tuple(model_cfg.channel_mults)
  down, up = validation.attention_levels(mults, model_cfg.attn_res, model_cfg.image_size)
  return min({len(mults) - 1, *down, *up})


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """How one padded image is fused: whole (`tile` = None: with its UNet inputs in one
  batch, or with `query_chunk` set one after another, the attention taking that many
  queries at a time), or in tiles of `tile` px, `per_call` of them at once, overlapping
  by `overlap` px, the whole image's coarse levels then run in `query_chunk` chunks."""
  height: int
  width: int
  tile: Optional[int] = None
  overlap: int = 0
  per_call: int = 1
  query_chunk: Optional[int] = None

  def starts(self, size: int) -> list[int]:
    if self.tile is None or size <= self.tile:
      return [0]
    step = self.tile - self.overlap
    count = math.ceil((size - self.tile) / step) + 1
    return [min(i * step, size - self.tile) for i in range(count)]

  def owned(self, size: int, multiple: int) -> list[tuple[int, int]]:
    """The [begin, end) each tile along an axis owns: up to the middle of its overlaps
    (on the coarsest grid), so every pixel is computed well inside some tile."""
    starts = self.starts(size)
    tile = size if self.tile is None else self.tile
    bounds = [0] + [(following + start + tile) // 2 // multiple * multiple
                    for start, following in zip(starts, starts[1:])] + [size]
    return list(zip(bounds, bounds[1:]))

  @property
  def tiles(self) -> list[tuple[int, int]]:
    return [(y, x) for y in self.starts(self.height) for x in self.starts(self.width)]


def plan_tiles(model_cfg, fusion_cfg, height: int, width: int, budget: int,
               what: str = "image") -> TilePlan:
  """A plan that fits `budget` bytes for a padded height x width image; DataError when
  even the smallest tile, or the whole image's coarse levels, do not fit."""
  if estimate_bytes(model_cfg, fusion_cfg, height, width) <= budget:
    return TilePlan(height, width)
  levels = len(model_cfg.channel_mults)
  split = split_level(model_cfg)
  rows, cols = height // 2**split, width // 2**split
  query_chunk = _query_chunk(lambda queries: estimate_one_at_a_time_bytes(
      model_cfg, fusion_cfg, height, width, queries) <= budget, rows, cols)
  if query_chunk is not None:  # whole, exact, in less memory
    return TilePlan(height, width, query_chunk=query_chunk)
  if split == 0:
    need = estimate_bytes(model_cfg, fusion_cfg, height, width) / 2**30
    raise DataError(f"{what}: needs about {need:.1f} GiB, more than the memory budget of "
                    f"{budget / 2**30:.1f} GiB (fuse.memory_budget_gb), and this model attends "
                    "at full resolution, so it cannot be tiled")
  tile_bytes = lambda side: estimate_bytes(model_cfg, fusion_cfg, side, side, attention_queries=0)
  multiple = 2**(levels - 1)
  smallest = validation.valid_fusion_side(1, levels)
  tile = (min(height, width) // multiple) * multiple
  while tile > smallest and tile_bytes(tile) > budget:
    tile -= multiple
  if tile_bytes(tile) > budget:
    raise DataError(f"{what}: even a {tile}x{tile} tile needs about "
                    f"{tile_bytes(tile) / 2**30:.1f} GiB, more than the memory budget of "
                    f"{budget / 2**30:.1f} GiB (fuse.memory_budget_gb)")
  query_chunk = _query_chunk(lambda queries: estimate_bytes(
      model_cfg, fusion_cfg, height, width, levels=range(split, levels), images=1,
      attention_queries=queries) <= budget, rows, cols)
  if query_chunk is None:
    need = estimate_bytes(model_cfg, fusion_cfg, height, width, levels=range(split, levels),
                          attention_queries=width // 2**split, images=1)
    raise DataError(f"{what}: the whole image's coarse levels need about {need / 2**30:.1f} GiB "
                    f"even in chunks, more than the memory budget of {budget / 2**30:.1f} GiB "
                    "(fuse.memory_budget_gb)")
  # Each tile owns the pixels up to the middle of its overlaps, so they lie half an
  # overlap from its cut edges: at least TILE_MARGIN px where the tile allows it.
  overlap = min(max(2 * TILE_MARGIN, tile // 4), 2 * tile // 3)
  overlap = max(multiple, overlap // multiple * multiple)
  per_call = max(1, int((budget - FIXED_BYTES) // max(tile_bytes(tile) - FIXED_BYTES, 1)))
  return TilePlan(height, width, tile, overlap, per_call, query_chunk)


def _query_chunk(fits, rows: int, cols: int) -> Optional[int]:
  """The most attention queries per chunk, in whole rows of a rows x cols map, for
  which `fits(queries)`; None if not even one row does."""
  for per_chunk in sorted((r for r in range(1, rows + 1) if rows % r == 0), reverse=True):
    if fits(per_chunk * cols):
      return per_chunk * cols
  return None


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
    timesteps = tuple(int(t) for t in self.config.fusion.timesteps)
    scales = [int(s) for s in self.config.fusion.feat_scales]
    self.num_levels = len(self.config.model.channel_mults)
    self.budget = memory_budget_bytes(self.config.fuse)

    self.devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(self.devices), ("data",))
    self.unet_inputs_at_once = unet_inputs_at_once(self.config.fuse, self.devices[0].platform)

    def one_input_at_a_time(query_chunk, unet_params, x, g, keep=lambda result: result,
                            **kwargs):
      """`keep` of the UNet's result on inputs x (N, H, W, C) at levels g (N,), one after
      another (lax.map), its attention in chunks of `query_chunk` queries: a sixth of the
      activations."""
      chunked = unet.clone(attention_query_chunk=query_chunk)
      run = lambda args: keep(chunked.apply({"params": unet_params}, args[0][None],
                                            args[1][None], **kwargs))
      return jax.lax.map(lambda args: jax.tree.map(lambda r: r[0], run(args)), (x, g))

    def unet_features(unet_params, x, g, at_once, query_chunk, split):
      """The decoder features the head reads, of UNet inputs x (N, H, W, 1) at levels g
      (N,): the inputs split over this process's devices if `split` (the last one
      repeated to fill the shares), each device running `at_once` of its share at a time
      (lax.map) and the attention in chunks of `query_chunk` queries (None: all)."""
      count, total = len(self.devices) if split else 1, x.shape[0]
      padded = -(-total // count) * count
      if padded != total:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], padded - total, axis=0)])
        g = jnp.concatenate([g, jnp.repeat(g[-1:], padded - total, axis=0)])
      model = unet.clone(attention_query_chunk=query_chunk)
      run = lambda xs, gs: model.apply({"params": unet_params}, xs, gs,
                                       decoder_feature_indices=tuple(scales))

      def share(x, g):
        if at_once >= x.shape[0]:
          return run(x, g)
        if at_once == 1:
          return one_input_at_a_time(query_chunk, unet_params, x, g,
                                     decoder_feature_indices=tuple(scales))
        one = lambda args: [f[0] for f in run(args[0][None], args[1][None])]
        return jax.lax.map(one, (x, g), batch_size=at_once)

      if not split:
        return share(x, g)
      spec = jax.sharding.PartitionSpec("data")
      feats = jax.shard_map(share, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                            check_vma=False)(x, g)
      return [f[:total] for f in feats]

    def fuse_batch(unet_params, head_params, a, b, keys, at_once=None, query_chunk=None,
                   split=True):
      """Fused (B, H, W, 1) of sources (B, H, W, 1), one noise key per pair: a result does
      not depend on its batch mates or on how the UNet inputs are split and sequenced.
      `split=False` keeps everything on one device (images too large for one input per
      device)."""
      pairs, steps = a.shape[0], len(timesteps)
      at_once = at_once or self.unet_inputs_at_once
      x_t, g = jax.vmap(lambda a1, b1, k: features.noisy_inputs(
          a1[None], b1[None], k, sqrt_acp_prev, timesteps))(a, b, keys)
      feats = unet_features(unet_params, x_t.reshape((-1,) + x_t.shape[4:]), g.reshape(-1),
                            at_once, query_chunk, split)
      feats = [f.reshape((pairs, 2, steps) + f.shape[1:]) for f in feats]

      def heads(*feats):
        """The head on pairs [pair, source, timestep, ...]: all at once, or one pair after
        another where the UNet inputs go one at a time (then a pair's result is the same
        program's whatever its batch)."""
        run = lambda fs: head.apply({"params": head_params}, head_lib.order_features_coarse_to_fine(
            [jnp.moveaxis(f, 0, 2) for f in fs], scales))
        if at_once >= UNLIMITED_INPUTS:
          return run(feats)
        return jax.lax.map(lambda fs: run([f[None] for f in fs])[0], feats)

      if not split or pairs % len(self.devices):  # else too few to share out: each runs all
        return heads(*feats)
      spec = jax.sharding.PartitionSpec("data")
      return jax.shard_map(heads, mesh=mesh, in_specs=spec, out_specs=spec,
                           check_vma=False)(*feats)

    def fuse_one_at_a_time(unet_params, head_params, a, b, key, query_chunk):
      """fuse_batch of one (H, W, 1) pair on one device, with the UNet inputs one after
      another and the attention in query chunks: the same numbers in about a third of
      the memory (on a CPU, devices share the memory: one input runs at a time)."""
      return fuse_batch(unet_params, head_params, a[None], b[None], key[None], at_once=1,
                        query_chunk=query_chunk, split=False)[0]

    def noisy(a, b, key):  # the whole image's noise draw, as fuse_batch makes it
      return features.noisy_inputs(a[None], b[None], key, sqrt_acp_prev, timesteps)

    self.split_level = split_at = split_level(self.config.model)

    def unet_variables(unet_params, stats, tiles):
      """The UNet's variables with the whole image's statistics for each of its tiles."""
      return {"params": unet_params,
              "norm_fixed": jax.tree.map(lambda a: jnp.repeat(a, tiles, axis=0), stats)}

    def fine_down(unet_params, x_t, g, stats):
      """The map entering the split level, of tiles (2T, n, h, w, 1)."""
      h = unet.apply(unet_variables(unet_params, stats, x_t.shape[1]),
                     x_t.reshape((-1,) + x_t.shape[2:]), g.repeat(x_t.shape[1]),
                     part="fine_down", split_level=split_at)
      return h.reshape(x_t.shape[:2] + h.shape[1:])

    def fine_statistics(unet_params, head_params, x_t, g, stats, pooled, coarse_out,
                        coarse_features, origins, full_size, owned):
      """Sums over the pixels each tile owns (`owned`: (n, 4) rows and columns) of the
      fine levels' GroupNorm statistics and of the head's channel-attention inputs."""
      unet_maps, head_maps = fine_fuse(unet_params, head_params, x_t, g, stats, pooled,
                                       coarse_out, coarse_features, origins, full_size,
                                       record=True)
      head_maps = jax.tree.map(lambda m: m.reshape((-1,) + m.shape[2:]), head_maps)
      sums = lambda maps: jax.tree.map(lambda m: _owned_sums(m, owned, x_t.shape[2]), maps)
      return sums(unet_maps), sums(head_maps)

    def fine_fuse(unet_params, head_params, x_t, g, stats, pooled, coarse_out,
                  coarse_features, origins, full_size, record=False):
      """Fused tiles (n, h, w, 1) from their noised inputs (2T, n, h, w, 1), the coarse
      levels' crops and where the tiles lie (`origins`: (n, 2) pixels; `full_size`: the
      padded image's); with `record`, the per-pixel maps `fine_statistics` sums."""
      flat = lambda a: a.reshape((-1,) + a.shape[2:])
      feats = unet.apply(unet_variables(unet_params, stats, x_t.shape[1]),
                         flat(x_t), g.repeat(x_t.shape[1]), part="fine_up",
                         split_level=split_at,
                         coarse_out=(flat(coarse_out), [flat(f) for f in coarse_features]),
                         decoder_feature_indices=tuple(scales),
                         mutable=["norm_maps"] if record else False)
      if record:
        feats, unet_maps = feats
      lead = (2, len(timesteps), x_t.shape[1])
      feats = head_lib.order_features_coarse_to_fine(
          [f.reshape(lead + f.shape[1:]) for f in feats], scales)
      variables = {"params": head_params}
      if pooled is not None:
        variables["pool_fixed"] = pooled
      factor = x_t.shape[2] // feats[-1].shape[3]  # pixels per finest head level cell

      def one_tile(tile_feats, origin):
        return head.apply(variables, [f[:, :, None] for f in tile_feats],
                          tile_origin=origin // factor,
                          full_size=[s // factor for s in full_size],
                          mutable=["pool_maps"] if record else False)

      out = jax.vmap(one_tile, in_axes=(2, 0))(feats, origins)
      if record:
        return unet_maps["norm_maps"], out[1]["pool_maps"]
      return out[:, 0]

    def norm_statistics(unet_params, x_t, g, query_chunk):
      """GroupNorm statistics of whole noised UNet inputs (2T, H, W, 1)."""
      return one_input_at_a_time(query_chunk, unet_params, x_t, g,
                                 keep=lambda result: result[1]["norm_stats"],
                                 decoder_feature_indices=tuple(scales), mutable=["norm_stats"])

    def coarse(unet_params, h, g, query_chunk):
      """The whole image's coarse levels: (last output, decoder features), per input."""
      return one_input_at_a_time(query_chunk, unet_params, h, g, part="coarse",
                                 split_level=split_at)

    # The UNet inputs of each batch are split over this process's devices (a multi-host
    # run gives every process its own share of the pairs, so no step needs another host).
    self._fuse = jax.jit(fuse_batch, static_argnames=("at_once", "query_chunk", "split"))
    self._noisy = jax.jit(noisy)
    self._fuse_one_at_a_time = jax.jit(fuse_one_at_a_time, static_argnums=5)
    self._fine_down = jax.jit(fine_down)
    self._fine_statistics = jax.jit(fine_statistics, static_argnums=9)
    self._fine_fuse = jax.jit(fine_fuse, static_argnums=9, static_argnames="record")
    self._coarse = jax.jit(coarse, static_argnums=3)
    self._norm_statistics = jax.jit(norm_statistics, static_argnums=3)

  def __call__(self, a: np.ndarray, b: np.ndarray, keys: jax.Array) -> np.ndarray:
    """Fused (B, H, W, 1) in [-1, 1] of sources (B, H, W, 1) whose size the networks take."""
    return np.asarray(self._fuse(self.unet_params, self.head_params, a, b, keys))

  def batch_for(self, size: int) -> int:
    """`size` rounded up to a multiple of the local devices: each fuses pairs of its own
    (any batch runs: its UNet inputs are split over the devices, the head on each)."""
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
    accept and cropped back; images too large for the memory budget go through whole with
    their UNet inputs one after another (exact), or else in tiles.
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
      if plan.tile is not None or plan.query_chunk is not None:  # one image at a time
        how = (f"in {len(plan.tiles)} tiles of {plan.tile} px (overlap {plan.overlap})"
               if plan.tile else "whole, their UNet inputs one after another,")
        logging.info("%dx%d images: fusing %s to stay within %.1f GiB", height, width, how,
                     self.budget / 2**30)
        fuse_one = self._fuse_tiled if plan.tile else self._fuse_whole_one_at_a_time
        for index in indices:
          fused[index] = self._guarded(names[index], fuse_one, a_images[index],
                                       b_images[index], keys[index], plan)
        continue
      fits = max(1, int((self.budget - FIXED_BYTES)
                        // max(estimate_bytes(self.config.model, self.config.fusion, plan.height,
                                              plan.width) - FIXED_BYTES, 1)))
      # Every local device gets pairs of its own when there are enough of them.
      size = min(self.batch_for(min(batch_size, fits)), len(indices), fits)
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

  def _fuse_whole_one_at_a_time(self, a: np.ndarray, b: np.ndarray, key: jax.Array,
                                plan: TilePlan) -> np.ndarray:
    a_pad, crop = features.pad_to_valid(a[None, ..., None], self.num_levels)
    b_pad, _ = features.pad_to_valid(b[None, ..., None], self.num_levels)
    out = self._fuse_one_at_a_time(self.unet_params, self.head_params, a_pad[0], b_pad[0], key,
                                   plan.query_chunk)
    return np.asarray(features.crop_back(out[None], crop))[0, ..., 0]

  def _fuse_tiled(self, a: np.ndarray, b: np.ndarray, key: jax.Array, plan: TilePlan
                  ) -> np.ndarray:
    """One image in overlapping tiles, as the whole image would be fused (module doc).

    The GroupNorm statistics are the whole image's when one of its UNet inputs fits the
    budget whole; else they start from a downscaled copy's and the fine levels' are then
    measured on the tiles themselves (STATISTICS_ROUNDS times): each round sums, over
    the pixels each tile owns, the statistics its layers see with the previous round's.
    A round also sums the head's channel-attention inputs, which the final pass pools."""
    a_pad, crop = features.pad_to_valid(a[None, ..., None], self.num_levels)
    b_pad, _ = features.pad_to_valid(b[None, ..., None], self.num_levels)
    x_t, g = self._noisy(a_pad[0], b_pad[0], key)  # (2, T, 1, H, W, 1), (2, T, 1)
    x_t = np.asarray(x_t)[:, :, 0]
    x_t = x_t.reshape((-1,) + x_t.shape[2:])  # (2T, H, W, 1)
    g = jnp.reshape(g, (-1,))
    stats, exact = self._whole_image_statistics(a_pad[0, ..., 0], b_pad[0, ..., 0], x_t, g, key)
    pooled = None  # the head's channel attention: each tile's own mean at first
    coarse_out, coarse_features = self._coarse_levels(x_t, g, stats, plan)
    for _ in range(STATISTICS_ROUNDS):
      sums = None
      for chunk, crops, owned in self._tile_batches(x_t, plan):
        part = jax.device_get(self._fine_statistics(
            self.unet_params, self.head_params, crops, g, stats, pooled,
            _crop_tiles(coarse_out, chunk, plan),
            [_crop_tiles(f, chunk, plan) for f in coarse_features],
            np.asarray(chunk, np.int32), (plan.height, plan.width), owned))
        sums = part if sums is None else jax.tree.map(np.add, sums, part)
      mean = lambda total: total[0] / total[1]
      pooled = jax.tree.map(lambda total: mean(total).reshape(1, 1, 1, -1), sums[1],
                            is_leaf=_is_sum)
      if not exact:
        stats = jax.tree.map(lambda total: (mean(total)[..., 0], mean(total)[..., 1]),
                             sums[0], is_leaf=_is_sum)
        coarse_out, coarse_features = self._coarse_levels(x_t, g, stats, plan)
    total = np.zeros((plan.height, plan.width), np.float64)
    weight = np.zeros_like(total)
    tile, overlap = plan.tile, plan.overlap
    for chunk, crops, _ in self._tile_batches(x_t, plan):
      out = np.asarray(self._fine_fuse(
          self.unet_params, self.head_params, crops, g, stats, pooled,
          _crop_tiles(coarse_out, chunk, plan),
          [_crop_tiles(f, chunk, plan) for f in coarse_features],
          np.asarray(chunk, np.int32), (plan.height, plan.width)))
      for position, (y, x) in enumerate(chunk):
        w = np.outer(_ramp(tile, overlap, y > 0, y + tile < plan.height),
                     _ramp(tile, overlap, x > 0, x + tile < plan.width))
        total[y:y + tile, x:x + tile] += w * out[position, ..., 0]
        weight[y:y + tile, x:x + tile] += w
    blended = (total / weight).astype(np.float32)[None, ..., None]
    return np.asarray(features.crop_back(blended, crop))[0, ..., 0]

  def _tile_batches(self, x_t: np.ndarray, plan: TilePlan):
    """(tiles, their noised inputs (2T, n, tile, tile, 1), the rows and columns each owns
    relative to itself (n, 4)), `plan.per_call` tiles at a time (the last batch filled
    up with repeats that own nothing)."""
    rows, cols = self._owned(plan)
    tiles, tile = plan.tiles, plan.tile
    for start in range(0, len(tiles), plan.per_call):
      chunk = tiles[start:start + plan.per_call]
      filled = chunk + [chunk[-1]] * (plan.per_call - len(chunk))
      crops = np.stack([x_t[:, y:y + tile, x:x + tile] for y, x in filled], axis=1)
      owned = np.asarray([(rows[y][0] - y, rows[y][1] - y, cols[x][0] - x, cols[x][1] - x)
                          for y, x in chunk] + [(0, 0, 0, 0)] * (len(filled) - len(chunk)),
                         np.int32)
      yield filled, crops, owned

  def _owned(self, plan: TilePlan) -> tuple[dict, dict]:
    """{tile start: the [begin, end) it owns}, for the rows and for the columns."""
    multiple = 2**(self.num_levels - 1)
    return tuple(dict(zip(plan.starts(size), plan.owned(size, multiple)))
                 for size in (plan.height, plan.width))

  def _coarse_levels(self, x_t: np.ndarray, g: jax.Array, stats, plan: TilePlan):
    """The coarse levels of the whole image, from the split-level map each tile owns:
    (the last coarse decoder output, the coarse decoder features), (2T, h, w, c) each."""
    scale = 2**self.split_level
    rows, cols = self._owned(plan)
    assembled = None
    for chunk, crops, _ in self._tile_batches(x_t, plan):
      maps = np.asarray(self._fine_down(self.unet_params, crops, g, stats))
      if assembled is None:
        assembled = np.zeros((maps.shape[0], plan.height // scale, plan.width // scale,
                              maps.shape[-1]), maps.dtype)
      for position, (y, x) in enumerate(chunk):
        (y0, y1), (x0, x1) = rows[y], cols[x]
        assembled[:, y0 // scale:y1 // scale, x0 // scale:x1 // scale] = maps[
            :, position, (y0 - y) // scale:(y1 - y) // scale, (x0 - x) // scale:(x1 - x) // scale]
    coarse_out, coarse_features = self._coarse(self.unet_params, assembled, g, plan.query_chunk)
    return np.asarray(coarse_out), [np.asarray(f) for f in coarse_features]

  def _whole_image_statistics(self, a: np.ndarray, b: np.ndarray, x_t: np.ndarray,
                              g: jax.Array, key: jax.Array):
    """(GroupNorm statistics of the whole image, whether exact): exact when one of its UNet
    inputs fits the budget whole, else those of the largest 1/2^k copy that does (with
    its own noise draw)."""
    height, width = x_t.shape[1:3]
    scale = 2**split_level(self.config.model)
    factor = 1
    while True:
      small = [validation.valid_fusion_side(-(-s // factor), self.num_levels)
               for s in (height, width)]
      query_chunk = _query_chunk(lambda queries: estimate_bytes(
          self.config.model, self.config.fusion, *small, images=1,
          attention_queries=queries) <= self.budget, small[0] // scale, small[1] // scale)
      if query_chunk is not None or max(small) <= 4 * 2**(self.num_levels - 1):
        break
      factor *= 2
    if factor > 1:
      x0 = np.repeat(np.stack([_downscale(image, factor, *small) for image in (a, b)]),
                     x_t.shape[0] // 2, axis=0)  # (2T, h, w, 1), as x_t: source, timestep
      noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
      x_t = diffusion.q_sample(x0, g, noise)
    logging.info("GroupNorm statistics from the whole image%s", f" at 1/{factor}" if factor > 1
                 else "")
    stats = jax.device_get(self._norm_statistics(self.unet_params, x_t, g, query_chunk))
    return stats, factor == 1


def _crop_tiles(whole: np.ndarray, tiles: Sequence[tuple[int, int]], plan: TilePlan
                ) -> np.ndarray:
  """(2T, n, ...) crops of a (2T, h, w, c) map of the whole image at the tiles."""
  scale = plan.height // whole.shape[1]
  side = plan.tile // scale
  return np.stack([whole[:, y // scale:y // scale + side, x // scale:x // scale + side]
                   for y, x in tiles], axis=1)


def _owned_sums(maps: jax.Array, owned: jax.Array, tile: int):
  """(sums over the pixels the tiles own, their count) of per-pixel maps
  (k * n, h, w, ...) of k images' n tiles each; owned: (n, 4) rows and columns."""
  tiles = owned.shape[0]
  maps = maps.reshape((-1, tiles) + maps.shape[1:])
  scale = tile // maps.shape[2]
  inside = lambda size, begin, end: ((jnp.arange(size)[None] * scale >= owned[:, begin:begin + 1])
                                     & (jnp.arange(size)[None] * scale < owned[:, end:end + 1]))
  mask = (inside(maps.shape[2], 0, 1)[:, :, None]
          & inside(maps.shape[3], 2, 3)[:, None, :]).astype(jnp.float32)  # (n, h, w)
  return jnp.einsum("knhw...,nhw->k...", maps.astype(jnp.float32), mask), jnp.sum(mask)


def _is_sum(node) -> bool:
  return isinstance(node, tuple) and len(node) == 2 and not isinstance(node[0], tuple)


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
