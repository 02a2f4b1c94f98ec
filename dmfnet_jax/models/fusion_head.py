"""Stage II fusion head of DM-FNet (docs/model.md §4), NHWC.

The head fuses the frozen Stage I UNet's decoder features of two sources (MRI
first, the other modality second), taken at several noise levels, into one
image in [-1, 1]. Per level, coarse to fine:

1. timestep aggregation: the source's features at every timestep, concatenated
   over channels, go through Conv1x1 -> ReLU -> Conv3x3 -> ReLU (one set of
   weights serves both sources);
2. DEA-Net style cross-modal attention gives a per-pixel weight `w` and
   `fea = w*a + (1-w)*b + a + b` (with `w = (a+b) * sigmoid(...)`, as the
   reference computes it; see `CrossModalAttention`);
3. multi-scale decoding adds the upsampled outputs of the previous one or two
   levels before a Conv1x1 -> ReLU -> Conv3x3 -> ReLU block.

An output block (Conv3x3 -> LeakyReLU(0.2) -> Conv3x3 -> tanh) makes the image.

Parameter names mirror the reference module tree so that converting the authors'
checkpoint (`dmfnet_jax.models.torch_convert`) is a plain renaming: level `i` holds `aggregate` (reference `decoder.<2i>`) and
`attention`, `block`, `block1` (reference `decoder.<2i+1>.att|block|block1`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax.config_defaults import DEFAULT_FEAT_SCALES, DEFAULT_TIMESTEPS, get_setting
from dmfnet_jax.errors import ConfigError
from dmfnet_jax.models.unet import PointwiseConv, decoder_channels

_KERNEL_INIT = nn.initializers.orthogonal(scale=1.0)
_BIAS_INIT = nn.initializers.zeros_init()
# Channel reduction of the channel-attention bottleneck (DEA-Net).
CHANNEL_REDUCTION = 8
OUTPUT_HIDDEN_CHANNELS = 64


def level_dims(model_cfg: Any, feat_scales: Sequence[int]) -> list[int]:
  """Channels per head level, coarse to fine (`feat_scales` sorted descending)."""
  channels = decoder_channels(model_cfg)
  dims = []
  for scale in sorted(feat_scales, reverse=True):
    if not 0 <= scale < len(channels):
      raise ConfigError(
          f"fusion.feat_scales: decoder feature index {scale} is out of range "
          f"0..{len(channels) - 1} for this model config")
    dims.append(channels[scale])
  return dims


def upsample2x_bilinear_align_corners(x: jnp.ndarray, origin=None, full_size=None) -> jnp.ndarray:
  """Bilinear x2 with align_corners=True on (..., H, W, C).

  Output pixel `o` of size `2n` samples input coordinate `o*(n-1)/(2n-1)`, as
  PyTorch's `F.interpolate(..., align_corners=True)`; `jax.image.resize` uses
  half-pixel centres instead, so it is written out here.

  The mapping depends on the map's size, not only on the neighbourhood: a tile
  (tiled fusion) passes where it lies, `origin` (row, column of its first pixel, may be
  traced) in the whole map of `full_size` (rows, columns), and gets the whole map's
  upsampling at its pixels (the ones whose sources lie outside it use its edge).
  """

  def along(x, axis, start, size):
    n = x.shape[axis]
    size = n if size is None else size
    scale = np.float32((size - 1) / (2 * size - 1)) if size > 1 else np.float32(0.0)
    shape = [1] * x.ndim
    shape[axis] = 2 * n
    if start is None:
      coord = np.arange(2 * n, dtype=np.float32) * scale
      lo = np.minimum(np.floor(coord).astype(np.int32), n - 1)
      hi = np.minimum(lo + 1, n - 1)
      frac = jnp.asarray((coord - lo).astype(np.float32), x.dtype)
    else:
      coord = (2 * start + jnp.arange(2 * n, dtype=jnp.int32)).astype(jnp.float32) * scale
      lo = jnp.minimum(jnp.floor(coord).astype(jnp.int32), size - 1)
      hi = jnp.minimum(lo + 1, size - 1)
      frac = (coord - lo).astype(x.dtype)
      lo, hi = (jnp.clip(i - start, 0, n - 1) for i in (lo, hi))
    frac = frac.reshape(shape)
    x_lo = jnp.take(x, lo, axis=axis)
    x_hi = jnp.take(x, hi, axis=axis)
    return x_lo * (1 - frac) + x_hi * frac

  if origin is None:
    return along(along(x, x.ndim - 3, None, None), x.ndim - 2, None, None)
  return along(along(x, x.ndim - 3, origin[0], full_size[0]), x.ndim - 2, origin[1],
               full_size[1])


def _reflect_pad(x: jnp.ndarray, pad: int) -> jnp.ndarray:
  """Reflect padding of H and W (PyTorch `padding_mode='reflect'`)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class _Conv(nn.Module):
  """Conv with the head's init; `reflect` pads H, W by reflection first."""
  features: int
  kernel: int
  groups: int = 1
  reflect: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel // 2
    if self.kernel == 1 and self.groups == 1:
      return PointwiseConv(self.features, dtype=self.dtype, kernel_init=_KERNEL_INIT,
                           bias_init=_BIAS_INIT, name="conv")(x)
    if self.reflect and pad:
      x = _reflect_pad(x, pad)
      padding = "VALID"
    else:
      padding = ((pad, pad), (pad, pad))
    return nn.Conv(
        self.features, (self.kernel, self.kernel), padding=padding,
        feature_group_count=self.groups, kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT,
        dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)


class _ConvBlock(nn.Module):
  """Conv1x1(-> out) -> ReLU -> Conv3x3(out -> out) -> ReLU (reference `Block`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_Conv(self.features, 1, dtype=self.dtype, name="conv0")(x))
    return nn.relu(_Conv(self.features, 3, dtype=self.dtype, name="conv2")(x))


class CrossModalAttention(nn.Module):
  """DEA-Net attention on `s = a + b`; returns the fusion weight `w = s * sigmoid(pa)`.

  The reference's attention block (DEA-Net's `res * pattn2`) multiplies the
  pixel-attention map by its input, so `w` is NOT confined to (0, 1): only
  `s * sigmoid` reproduces the reference outputs (max error ~2e-6, against ~0.46 for
  the bare sigmoid the paper's prose suggests); see docs/model.md §4.
  """
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, s):
    # Channel attention: global average pool -> 1x1 bottleneck. Tiled fusion
    # (dmfnet_jax.engine) adds `s` up over the pixels each tile owns (`pool_maps`) and
    # gives every tile the whole image's mean (`pool_fixed`).
    pooled = jnp.mean(s, axis=(1, 2), keepdims=True)
    if self.is_mutable_collection("pool_maps"):
      self.sow("pool_maps", "mean", s, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if self.has_variable("pool_fixed", "mean"):
      pooled = jnp.broadcast_to(self.get_variable("pool_fixed", "mean"),
                                pooled.shape).astype(pooled.dtype)
    ca = nn.relu(_Conv(self.dim // CHANNEL_REDUCTION, 1, dtype=self.dtype, name="ca0")(pooled))
    ca = _Conv(self.dim, 1, dtype=self.dtype, name="ca2")(ca)
    # Spatial attention: [mean, max] over channels -> 7x7 reflect-padded conv.
    stats = jnp.concatenate(
        [jnp.mean(s, axis=-1, keepdims=True), jnp.max(s, axis=-1, keepdims=True)], axis=-1)
    sa = _Conv(1, 7, reflect=True, dtype=self.dtype, name="sa")(stats)
    p1 = ca + sa
    # Pixel attention: a grouped 3x3 conv over the interleaved channels
    # [s_0, p1_0, s_1, p1_1, ...] (groups = dim), i.e. output c sees only s_c and p1_c.
    logits = _PixelAttention(self.dim, dtype=self.dtype, name="pa")(
        s, jnp.broadcast_to(p1, s.shape))
    return s * jax.nn.sigmoid(logits)


class _PixelAttention(nn.Module):
  """Holds the grouped conv's parameters under `conv` (kernel (3, 3, 2, dim), as a
  grouped `nn.Conv` would); see `_PairGroupedConv3x3` for why it is not one."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, s, p1):
    return _PairGroupedConv3x3(self.dim, dtype=self.dtype, name="conv")(s, p1)


class _PairGroupedConv3x3(nn.Module):
  """Reflect-padded 3x3 conv with groups=dim over pairs (s_c, p1_c).

  Written as nine shifted multiply-adds: XLA's CPU kernel-gradient of a grouped
  convolution is ~70x slower than this (1.7 s vs 0.02 s at 64x64x32), and the
  arithmetic is identical.
  """
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, s, p1):
    kernel = self.param("kernel", _KERNEL_INIT, (3, 3, 2, self.dim), jnp.float32)
    bias = self.param("bias", _BIAS_INIT, (self.dim,), jnp.float32)
    kernel = kernel.astype(self.dtype)
    s_pad = _reflect_pad(s.astype(self.dtype), 1)
    p_pad = _reflect_pad(p1.astype(self.dtype), 1)
    height, width = s.shape[1], s.shape[2]
    out = bias.astype(self.dtype)
    for i in range(3):
      for j in range(3):
        out = out + (s_pad[:, i:i + height, j:j + width] * kernel[i, j, 0]
                     + p_pad[:, i:i + height, j:j + width] * kernel[i, j, 1])
    return out


class FusionHead(nn.Module):
  """The Stage II fusion head.

  Attributes:
    dims: channels per level, coarse to fine (see `level_dims`).
    num_timesteps: how many noise levels each source's features come at.
    skip_aggregation_for_single_timestep: reference quirk, on by default: with a
      single timestep the aggregation block is bypassed (its weights still exist,
      so checkpoints keep their keys).
    dtype: compute dtype; parameters stay float32.

  The output layer takes `dims[-1]` channels. The reference hard-codes 128,
  which equals `dims[-1]` exactly when `inner_channel * channel_mults[0] == 128`
  (the published models); any other width cannot run in the reference, so
  `dims[-1]` is used unconditionally.
  """
  dims: Sequence[int]
  num_timesteps: int
  skip_aggregation_for_single_timestep: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], tile_origin=None,
               full_size=None) -> jnp.ndarray:
    """Fuses per-level features into an image.

    Args:
      features: one array per level, coarse to fine, of shape
        (2, T, B, h, w, dims[i]): [source (MRI, other), timestep, batch, ...].
      tile_origin, full_size: for a tile of a larger image (tiled fusion), where its
        first pixel lies (row, column; may be traced) and the image's size, both in
        pixels of the finest level; see `upsample2x_bilinear_align_corners`.
    Returns:
      fused image (B, H, W, 1) in [-1, 1].
    """
    finest = features[-1].shape[3]

    def upsample(x):
      if tile_origin is None:
        return upsample2x_bilinear_align_corners(x)
      factor = finest // x.shape[-3]
      return upsample2x_bilinear_align_corners(
          x, [o // factor for o in tile_origin], [s // factor for s in full_size])

    dims = list(self.dims)
    if len(features) != len(dims):
      raise ValueError(f"FusionHead: got {len(features)} feature levels, expected {len(dims)}")
    multi_scale = []  # earlier levels' outputs, upsampled x2
    out = None
    for i, (feature, dim) in enumerate(zip(features, dims)):
      sources, steps, batch, h, w, c = feature.shape
      if sources != 2 or steps != self.num_timesteps or c != dim:
        raise ValueError(
            f"FusionHead level {i}: features of shape {feature.shape}, expected "
            f"(2, {self.num_timesteps}, B, h, w, {dim})")
      feature = feature.astype(self.dtype)
      # Timestep-major channel concat, both sources in one batch (shared weights).
      stacked = jnp.moveaxis(feature, 1, -2).reshape(2 * batch, h, w, steps * c)
      aggregated = _ConvBlock(dim, dtype=self.dtype, name=f"level{i}_aggregate")(stacked)
      if steps == 1 and self.skip_aggregation_for_single_timestep:
        aggregated = stacked
      a, b = aggregated[:batch], aggregated[batch:]

      w_att = CrossModalAttention(dim, dtype=self.dtype, name=f"level{i}_attention")(a + b)
      fea = w_att * a + (1 - w_att) * b + a + b

      if i >= 1:
        fea = fea + multi_scale[i - 1]
      if i >= 2:
        skip = _ConvBlock(dim, dtype=self.dtype, name=f"level{i}_block1")(multi_scale[i - 2])
        fea = fea + upsample(skip)
      dim_out = dims[i + 1] if i + 1 < len(dims) else dim
      out = _ConvBlock(dim_out, dtype=self.dtype, name=f"level{i}_block")(fea)
      if i + 1 < len(dims):
        multi_scale.append(upsample(out))

    x = nn.leaky_relu(
        _Conv(OUTPUT_HIDDEN_CHANNELS, 3, dtype=self.dtype, name="out_conv0")(out),
        negative_slope=0.2)
    x = _Conv(1, 3, dtype=self.dtype, name="out_conv1")(x)
    return jnp.tanh(x).astype(jnp.float32)


def fusion_head_from_config(model_cfg: Any, fusion_cfg: Any, dtype: Any = jnp.float32) -> FusionHead:
  feat_scales = list(get_setting(fusion_cfg, "feat_scales", DEFAULT_FEAT_SCALES))
  timesteps = list(get_setting(fusion_cfg, "timesteps", DEFAULT_TIMESTEPS))
  if not timesteps:
    raise ConfigError("fusion.timesteps is empty: the head needs at least one timestep")
  if not feat_scales:
    raise ConfigError("fusion.feat_scales is empty: the head needs at least one level")
  return FusionHead(
      dims=tuple(level_dims(model_cfg, feat_scales)),
      num_timesteps=len(timesteps),
      skip_aggregation_for_single_timestep=bool(
          get_setting(fusion_cfg, "skip_aggregation_for_single_timestep", True)),
      dtype=dtype)


def order_features_coarse_to_fine(features: Sequence[Any], feat_scales: Sequence[int]) -> list:
  """Reorders a per-scale list (in `feat_scales` order) to the head's coarse-to-fine order."""
  order = sorted(range(len(feat_scales)), key=lambda k: -feat_scales[k])
  return [features[k] for k in order]


def abstract_head_params(head: FusionHead) -> Any:
  """Parameter shapes (ShapeDtypeStructs) without initialising anything."""
  return jax.eval_shape(
      head.init, jax.random.PRNGKey(0), _dummy_features(head.dims, head.num_timesteps))["params"]


def _dummy_features(dims: Sequence[int], num_timesteps: int, batch: int = 1,
                    coarsest: int = 4) -> list[jax.ShapeDtypeStruct]:
  """Feature shapes for init / eval_shape: level i has side `coarsest * 2**i`."""
  return [
      jax.ShapeDtypeStruct((2, num_timesteps, batch, coarsest * 2**i, coarsest * 2**i, d),
                           jnp.float32)
      for i, d in enumerate(dims)
  ]


def init_head_params(head: FusionHead, key: jax.Array, coarsest: int = 4) -> dict:
  """Initial parameters (orthogonal kernels, zero biases) without real features."""
  shapes = _dummy_features(head.dims, head.num_timesteps, coarsest=coarsest)
  dummy = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  return jax.jit(head.init)(key, dummy)["params"]
