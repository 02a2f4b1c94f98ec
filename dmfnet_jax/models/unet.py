"""Stage I UNet of DM-FNet (SR3 style), NHWC, numerically faithful to the reference.

The module tree mirrors the reference PyTorch tree so that converting a checkpoint is
a rename plus a transpose: `downs_<i>`, `mid_<i>`, `ups_<i>` are the flat reference
lists (resnet blocks and samplers interleaved), a resnet block holds `block1`,
`block2`, `noise_func`, `res_conv`, an attention layer holds `norm`, `qkv`, `out`.

Reference quirks kept on purpose (see docs/model.md §1):
  * attention is decided by comparing `attn_res` with `image_size` halved per level,
    not with the actual feature size (image_size 256: level 4 and the middle attend;
    image_size 160: only the middle);
  * the decoder feature list is REVERSED (index 0 = last full-resolution block).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax import validation
from dmfnet_jax.config_defaults import MODEL_DEFAULTS, get_setting

Dtype = Any

# PyTorch's GroupNorm default; flax defaults to 1e-6.
GROUP_NORM_EPS = 1e-5

# The reference initialises every conv/linear weight orthogonally (gain 1), biases 0.
_KERNEL_INIT = nn.initializers.orthogonal(scale=1.0)
_BIAS_INIT = nn.initializers.zeros_init()

class PointwiseConv(nn.Module):
  """A 1x1 convolution as a matrix product, with nn.Conv's parameters (`kernel` of shape
  (1, 1, in, out), `bias`) and initialisation: XLA:CPU runs a 1x1 convolution at about
  half the speed of the same matrix product (docs/performance.md)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) \
        if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias if bias is not None else y


def _conv(features: int, kernel: int, *, dtype: Dtype, name: str, stride: int = 1,
          use_bias: bool = True) -> nn.Module:
  if kernel == 1 and stride == 1:
    return PointwiseConv(features, use_bias=use_bias, dtype=dtype, kernel_init=_KERNEL_INIT,
                         bias_init=_BIAS_INIT, name=name)
  # Explicit symmetric padding: XLA's "SAME" pads an even input only at the end when
  # striding, which would shift the Downsample grid relative to PyTorch's padding=1.
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, name=name)


def _dense(features: int, *, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, name=name)


class GroupNorm(nn.Module):
  """GroupNorm as PyTorch computes it (float32 statistics, eps 1e-5), with parameters
  `scale` and `bias` as flax's.

  Tiled fusion (dmfnet_jax.engine) needs the statistics of the whole image rather than
  of a tile: with `sow_stats` the layer records its per-group (mean, mean of squares)
  in the `norm_stats` collection (per pixel in `norm_maps`), and when a `norm_fixed`
  variable `stats` is given it normalises with those instead of its input's."""
  groups: int
  epsilon: float = GROUP_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    grouped = x.reshape(x.shape[:-1] + (self.groups, channels // self.groups))
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    # One pass over the input (the mean and the mean of squares in one fusion): the
    # normalisation is memory-bound on CPU, and the difference to the two-pass variance
    # stays within the parity tolerance (tests/test_unet.py).
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    mean_sq = jnp.mean(jnp.square(grouped), axis=axes, keepdims=True)
    var = jnp.maximum(mean_sq - mean**2, 0.0)
    # Recorded as the value itself (not sow's default tuple of every call): each layer
    # runs once per forward.
    self.sow("norm_stats", "stats", (jnp.squeeze(mean, axes), jnp.squeeze(mean_sq, axes)),
             init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if self.is_mutable_collection("norm_maps"):
      # Per pixel, the group's mean and mean of squares: a tiled run adds them up over
      # the pixels each tile owns, which gives the whole image's statistics.
      self.sow("norm_maps", "stats",
               jnp.stack([jnp.mean(grouped, -1), jnp.mean(jnp.square(grouped), -1)], -1),
               init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if self.has_variable("norm_fixed", "stats"):
      fixed_mean, fixed_mean_sq = self.get_variable("norm_fixed", "stats")
      mean = fixed_mean.reshape(mean.shape)
      var = fixed_mean_sq.reshape(mean.shape) - mean**2
    normed = (grouped - mean) * jax.lax.rsqrt(var + self.epsilon)
    return normed.reshape(x.shape) * scale + bias


def _group_norm(groups: int, name: str) -> GroupNorm:
  # Always float32 statistics, whatever the compute dtype: bf16
  # statistics drift visibly from the reference.
  return GroupNorm(groups, name=name)


def noise_level_encoding(noise_level: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal encoding of the continuous noise level g: (B,) -> (B, dim), sin first."""
  count = dim // 2
  step = jnp.arange(count, dtype=jnp.float32) / count
  angles = noise_level.astype(jnp.float32)[:, None] * jnp.exp(-math.log(1e4) * step)[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLevelMLP(nn.Module):
  """Positional encoding -> Linear(C, 4C) -> swish -> Linear(4C, C)."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, noise_level: jax.Array) -> jax.Array:
    h = noise_level_encoding(noise_level, self.dim)
    h = _dense(self.dim * 4, dtype=self.dtype, name="dense_in")(h)
    h = nn.swish(h)
    return _dense(self.dim, dtype=self.dtype, name="dense_out")(h)


class Block(nn.Module):
  """GroupNorm -> swish -> (dropout) -> Conv3x3."""
  features: int
  groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = _group_norm(self.groups, "norm")(x.astype(jnp.float32))
    h = nn.swish(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return _conv(self.features, 3, dtype=self.dtype, name="conv")(h)


class ResnetBlock(nn.Module):
  """Two Blocks with the additive noise-level embedding between, plus a residual."""
  features: int
  groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array],
               train: bool = False) -> jax.Array:
    h = Block(self.features, self.groups, dtype=self.dtype, name="block1")(x, train)
    if temb is not None:
      shift = _dense(self.features, dtype=self.dtype, name="noise_func")(temb)
      h = h + shift[:, None, None, :]
    h = Block(self.features, self.groups, self.dropout, dtype=self.dtype,
              name="block2")(h, train)
    if x.shape[-1] != self.features:
      residual = _conv(self.features, 1, dtype=self.dtype, name="res_conv")(x)
    else:
      residual = x.astype(h.dtype)
    return h + residual


class SelfAttention(nn.Module):
  """One-head self-attention over all positions, logits scaled by 1/sqrt(channels).

  The logits grow with the square of the positions (a 512x512 map: 256 GiB); with
  `query_chunk` the queries go through in chunks of that many positions, one after
  another, each against every key: the same numbers in chunk x positions memory."""
  groups: int
  dtype: Dtype = jnp.float32
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    normed = _group_norm(self.groups, "norm")(x.astype(jnp.float32))
    qkv = _conv(3 * channels, 1, use_bias=False, dtype=self.dtype, name="qkv")(normed)
    qkv = qkv.reshape(batch, height * width, 3 * channels)
    query, key, value = jnp.split(qkv, 3, axis=-1)

    def attend(query):
      logits = jnp.einsum("bqc,bkc->bqk", query, key,
                          preferred_element_type=jnp.float32) / math.sqrt(channels)
      weights = jax.nn.softmax(logits, axis=-1)
      return jnp.einsum("bqk,bkc->bqc", weights.astype(value.dtype), value)

    positions = height * width
    chunk = self.query_chunk
    if chunk and chunk < positions:
      count = -(-positions // chunk)  # the last chunk filled up with zero queries
      padded = jnp.pad(query, ((0, 0), (0, count * chunk - positions), (0, 0)))
      chunks = padded.reshape(batch, count, chunk, channels).swapaxes(0, 1)
      attended = jax.lax.map(attend, chunks).swapaxes(0, 1).reshape(batch, -1, channels)
      attended = attended[:, :positions]
    else:
      attended = attend(query)
    attended = attended.reshape(batch, height, width, channels)
    out = _conv(channels, 1, dtype=self.dtype, name="out")(attended)
    return out + x.astype(out.dtype)


class ResnetBlocWithAttn(nn.Module):
  features: int
  groups: int
  dropout: float = 0.0
  with_attn: bool = False
  dtype: Dtype = jnp.float32
  attention_query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array],
               train: bool = False) -> jax.Array:
    x = ResnetBlock(self.features, self.groups, self.dropout, dtype=self.dtype,
                    name="res_block")(x, temb, train)
    if self.with_attn:
      x = SelfAttention(self.groups, dtype=self.dtype, query_chunk=self.attention_query_chunk,
                        name="attn")(x)
    return x


class Downsample(nn.Module):
  """Conv3x3 stride 2, padding 1 on every side."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(self.features, 3, stride=2, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then Conv3x3 (computed on the coarse grid, see below)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _UpsampleConv3x3(self.features, dtype=self.dtype, name="conv")(x)


class _UpsampleConv3x3(nn.Module):
  """Conv3x3 (padding 1) of the nearest-neighbour x2 upsampled input, as the reference
  computes it, without making the upsampled input.

  Every output pixel of phase (p, q) (its row and column parity) reads a 2x2 window of
  the coarse input whose taps are sums of the 3x3 kernel's taps: rows (k0, k1+k2) for
  even rows, (k0+k1, k2) for odd ones, and likewise for columns. One 2x2 convolution with
  the four phases' kernels stacked along the outputs, over the coarse input padded by 1,
  gives all four phases: 16 instead of 36 multiply-adds per coarse pixel and channel pair.
  The parameters are the 3x3 conv's (`kernel`, `bias`), so checkpoints are unchanged."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", _KERNEL_INIT, (3, 3, channels, self.features), jnp.float32)
    bias = self.param("bias", _BIAS_INIT, (self.features,), jnp.float32)
    rows = [jnp.stack([kernel[0], kernel[1] + kernel[2]]),  # even output rows
            jnp.stack([kernel[0] + kernel[1], kernel[2]])]  # odd output rows
    phases = []
    for p in range(2):
      for q in range(2):
        k = rows[p]
        phases.append(jnp.stack([k[:, 0], k[:, 1] + k[:, 2]], axis=1) if q == 0 else
                      jnp.stack([k[:, 0] + k[:, 1], k[:, 2]], axis=1))
    stacked = jnp.concatenate(phases, axis=-1).astype(self.dtype)  # (2, 2, C, 4F)
    out = jax.lax.conv_general_dilated(
        x.astype(self.dtype), stacked, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (B, H+1, W+1, 4F)
    out = out.reshape(batch, height + 1, width + 1, 4, self.features)
    grid = [[out[:, p:p + height, q:q + width, 2 * p + q] for q in range(2)] for p in range(2)]
    up = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)  # (B, H, 2, W, 2, F)
    return up.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


# The pieces `UNet(part=...)` computes; see the class docstring.
PARTS = ("fine_down", "coarse", "fine_up")


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One entry of the reference's flat `downs`/`ups` list."""
  kind: str  # "res", "down" or "up"
  features: int
  with_attn: bool = False
  # The level (0 = full resolution) the layer reads; a sampler writes the next one.
  level: int = 0


def _layout(inner_channel: int, channel_mults: Sequence[int], attn_res: Sequence[int],
            res_blocks: int, image_size: int) -> tuple[list[_Layer], list[_Layer]]:
  """The reference's `downs` and `ups` lists, attention decided by the image_size quirk."""
  levels = len(channel_mults)
  down_attn, up_attn = validation.attention_levels(channel_mults, attn_res, image_size)
  downs, ups = [], []
  for level in range(levels):
    width = inner_channel * channel_mults[level]
    downs += [_Layer("res", width, level in down_attn, level)] * res_blocks
    if level != levels - 1:
      downs.append(_Layer("down", width, level=level))
  for level in reversed(range(levels)):
    width = inner_channel * channel_mults[level]
    ups += [_Layer("res", width, level in up_attn, level)] * (res_blocks + 1)
    if level != 0:
      ups.append(_Layer("up", width, level=level))
  return downs, ups


class UNet(nn.Module):
  """SR3 UNet predicting x0 from (x_t, g); optionally exposes encoder/decoder features.

  Call modes:
    * default: (B, H, W, out_channel) output, float32;
    * `return_features=True`: (enc_feats, dec_feats, out) with dec_feats REVERSED
      as in the reference;
    * `decoder_feature_indices=[...]` (indices into the reversed decoder list): only
      those features, in the given order; nothing after the last needed up-path block
      is computed (no remaining full-resolution blocks, no final_conv).
    * `part=` with `split_level=s` (tiled fusion, dmfnet_jax.engine): the network in
      three pieces around level s, the first level computed for the whole image.
      "fine_down": the map entering level s; "coarse" (given that map): (the output of
      the last decoder block at level s, those decoder features in forward order);
      "fine_up" (given the image and `coarse_out`, what "coarse" returned): what the
      whole network returns. The finer levels (< s) only ever see a local window (convolutions),
      so they can run tile by tile; the global layers (attention) sit at s and coarser.
  Features are in the compute dtype. Dropout draws from the 'dropout' rng when train.
  """
  in_channel: int = MODEL_DEFAULTS["in_channel"]
  out_channel: int = MODEL_DEFAULTS["out_channel"]
  inner_channel: int = MODEL_DEFAULTS["inner_channel"]
  norm_groups: int = MODEL_DEFAULTS["norm_groups"]
  channel_mults: Sequence[int] = MODEL_DEFAULTS["channel_mults"]
  attn_res: Sequence[int] = MODEL_DEFAULTS["attn_res"]
  res_blocks: int = MODEL_DEFAULTS["res_blocks"]
  dropout: float = MODEL_DEFAULTS["dropout"]
  image_size: int = MODEL_DEFAULTS["image_size"]
  with_noise_level_emb: bool = MODEL_DEFAULTS["with_noise_level_emb"]
  dtype: Dtype = jnp.float32
  # Attention queries per chunk (None: all at once); see SelfAttention.
  attention_query_chunk: Optional[int] = None

  def layout(self) -> tuple[list[_Layer], list[_Layer]]:
    return _layout(self.inner_channel, tuple(self.channel_mults), tuple(self.attn_res),
                   self.res_blocks, self.image_size)

  @nn.compact
  def __call__(self, x: jax.Array, noise_level: jax.Array, *, train: bool = False,
               return_features: bool = False,
               decoder_feature_indices: Optional[Sequence[int]] = None,
               part: Optional[str] = None, split_level: Optional[int] = None,
               coarse_out: Optional[tuple[jax.Array, Sequence[jax.Array]]] = None):
    downs, ups = self.layout()
    levels = len(self.channel_mults)
    if part is not None:
      if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
      if split_level is None or not 0 < split_level < levels:
        raise ValueError(f"part={part!r} needs 0 < split_level < {levels}, got {split_level}")
      if return_features:
        raise ValueError("return_features is for the whole network (part=None)")
      if part == "fine_up" and coarse_out is None:
        raise ValueError("part='fine_up' needs the coarse part's output (coarse_out)")
    if part != "coarse" and (x.ndim != 4 or x.shape[-1] != self.in_channel):
      raise ValueError(f"UNet expects (B, H, W, {self.in_channel}) input, got {x.shape}")
    num_up_blocks = sum(layer.kind == "res" for layer in ups)
    last_needed_block = num_up_blocks - 1  # forward-order index of the last block to run
    if decoder_feature_indices is not None:
      if return_features:
        raise ValueError("Pass either return_features or decoder_feature_indices, not both")
      indices = [int(i) for i in decoder_feature_indices]
      if not indices or any(not 0 <= i < num_up_blocks for i in indices):
        raise ValueError(f"decoder_feature_indices must lie in [0, {num_up_blocks}), "
                         f"got {list(decoder_feature_indices)}")
      last_needed_block = num_up_blocks - 1 - min(indices)

    def runs(layer: _Layer, down: bool) -> bool:
      """Whether this part computes the layer (the split level's upsampler is fine)."""
      if part is None:
        return True
      coarse = layer.level >= split_level if down or layer.kind == "res" else (
          layer.level > split_level)
      return coarse == (part == "coarse")

    batch = x.shape[0]
    noise_level = jnp.broadcast_to(jnp.reshape(noise_level, (-1,)), (batch,))
    temb = None
    if self.with_noise_level_emb:
      temb = NoiseLevelMLP(self.inner_channel, dtype=self.dtype,
                           name="noise_level_mlp")(noise_level)

    # The coarse part starts from the fine part's last downsampled map, which the
    # coarse decoder also reads as its first skip.
    h = x if part == "coarse" else _conv(self.inner_channel, 3, dtype=self.dtype,
                                         name="init_conv")(x)
    skips = [h]
    for i, layer in enumerate(downs):
      if not runs(layer, down=True):
        continue
      if layer.kind == "res":
        h = ResnetBlocWithAttn(layer.features, self.norm_groups, self.dropout,
                               layer.with_attn, dtype=self.dtype,
                               attention_query_chunk=self.attention_query_chunk,
                               name=f"downs_{i}")(h, temb, train)
      else:
        h = Downsample(layer.features, dtype=self.dtype, name=f"downs_{i}")(h)
      skips.append(h)
    encoder_features = list(skips)
    if part == "fine_down":
      return h

    decoder_features = []  # forward order
    if part == "fine_up":
      skips.pop()  # the coarse part's skip
      h, coarse_features = coarse_out
      decoder_features = list(coarse_features)
    else:
      mid_width = downs[-1].features
      h = ResnetBlocWithAttn(mid_width, self.norm_groups, self.dropout, True,
                             dtype=self.dtype, attention_query_chunk=self.attention_query_chunk,
                             name="mid_0")(h, temb, train)
      h = ResnetBlocWithAttn(mid_width, self.norm_groups, self.dropout, False,
                             dtype=self.dtype, name="mid_1")(h, temb, train)

    for i, layer in enumerate(ups):
      if not runs(layer, down=False) or len(decoder_features) > last_needed_block:
        continue
      if layer.kind == "res":
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = ResnetBlocWithAttn(layer.features, self.norm_groups, self.dropout,
                               layer.with_attn, dtype=self.dtype,
                               attention_query_chunk=self.attention_query_chunk,
                               name=f"ups_{i}")(h, temb, train)
        decoder_features.append(h)
      else:
        h = Upsample(layer.features, dtype=self.dtype, name=f"ups_{i}")(h)

    if part == "coarse":
      return h, decoder_features
    if decoder_feature_indices is not None:
      return [decoder_features[num_up_blocks - 1 - i] for i in indices]

    out = Block(self.out_channel, self.norm_groups, dtype=self.dtype,
                name="final_conv")(h, train).astype(jnp.float32)
    if return_features:
      return encoder_features, decoder_features[::-1], out
    return out


def unet_kwargs(model_cfg: Any) -> dict[str, Any]:
  """The UNet attributes from a model config (ConfigDict, dict or None = defaults)."""
  kwargs = {key: get_setting(model_cfg, key, default) for key, default in MODEL_DEFAULTS.items()}
  for key in ("channel_mults", "attn_res"):
    kwargs[key] = tuple(int(v) for v in kwargs[key])
  for key in ("in_channel", "out_channel", "inner_channel", "norm_groups", "res_blocks",
              "image_size"):
    kwargs[key] = int(kwargs[key])
  kwargs["dropout"] = float(kwargs["dropout"])
  kwargs["with_noise_level_emb"] = bool(kwargs["with_noise_level_emb"])
  validation.validate_model(kwargs)
  return kwargs


def unet_from_config(model_cfg: Any, dtype: Dtype = jnp.float32) -> UNet:
  return UNet(**unet_kwargs(model_cfg), dtype=dtype)


def _decoder_blocks(model_cfg: Any) -> list[_Layer]:
  kwargs = unet_kwargs(model_cfg)
  _, ups = _layout(kwargs["inner_channel"], kwargs["channel_mults"], kwargs["attn_res"],
                   kwargs["res_blocks"], kwargs["image_size"])
  return [layer for layer in ups if layer.kind == "res"][::-1]


def decoder_channels(model_cfg: Any) -> list[int]:
  """Channels of each decoder feature, in the reference's reversed order."""
  return [layer.features for layer in _decoder_blocks(model_cfg)]


def decoder_levels(model_cfg: Any) -> list[int]:
  """The level (0 = full resolution) of each decoder feature, in the same order."""
  return [layer.level for layer in _decoder_blocks(model_cfg)]


def abstract_params(model_cfg: Any) -> Any:
  """Parameter shapes (ShapeDtypeStructs) without initialising anything."""
  kwargs = unet_kwargs(model_cfg)
  model = UNet(**kwargs)
  levels = len(kwargs["channel_mults"])
  size = 2 ** (levels - 1)  # smallest input the down path accepts
  x = jax.ShapeDtypeStruct((1, size, size, kwargs["in_channel"]), jnp.float32)
  g = jax.ShapeDtypeStruct((1,), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                                jnp.zeros(g.shape)))
  return variables["params"]
