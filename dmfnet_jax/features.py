"""Stage II feature extraction and fusion (docs/model.md §3).

The reference noises each source at each timestep and runs the frozen Stage I
UNet six times, one pass after another. The passes are independent, so here
they are one UNet call on a stacked batch of 2 * T * B images, laid out
[source (MRI, other), timestep, batch]. The UNet is asked only for the decoder
features the head uses, so the full-resolution blocks after the last of them
and `final_conv` are never traced.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dmfnet_jax import diffusion, validation
from dmfnet_jax.config_defaults import DEFAULT_FEAT_SCALES, DEFAULT_TIMESTEPS
from dmfnet_jax.errors import DataError
from dmfnet_jax.models.fusion_head import FusionHead, order_features_coarse_to_fine
from dmfnet_jax.models.unet import UNet


def noisy_inputs(a: jax.Array, b: jax.Array, key: jax.Array, sqrt_acp_prev: jax.Array,
                 timesteps: Sequence[int] = DEFAULT_TIMESTEPS):
  """Both sources noised at every timestep, in one draw.

  Per image and timestep `t`: `g ~ Uniform(sqrt_acp_prev[t-1], sqrt_acp_prev[t])`,
  `x_t = g*x0 + sqrt(1-g^2)*eps`.

  Args:
    a, b: (B, H, W, C) sources in [-1, 1] (a = MRI).
    key: PRNG key; the result is a pure function of it.
    sqrt_acp_prev: (T_schedule + 1,) of the LINEAR schedule.
    timesteps: integer steps in 1..T_schedule.
  Returns:
    x_t: (2, T, B, H, W, C) and g: (2, T, B), [source, timestep, batch].
  """
  if a.shape != b.shape:
    raise DataError(f"the two sources differ in shape: {a.shape} vs {b.shape}")
  num_steps = len(timesteps)
  x0 = jnp.broadcast_to(jnp.stack([a, b])[:, None], (2, num_steps) + a.shape)
  key_level, key_noise = jax.random.split(key)
  steps = jnp.asarray(timesteps, jnp.int32)[None, :, None]
  g = diffusion.noise_levels_for_steps(key_level, jnp.asarray(sqrt_acp_prev), steps,
                                       (2, num_steps, a.shape[0]))
  g = jnp.asarray(g, x0.dtype)
  noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  flat = (-1,) + a.shape[1:]
  x_t = diffusion.q_sample(x0.reshape(flat), g.reshape(-1), noise.reshape(flat))
  return x_t.reshape(x0.shape), g


def features_from_noisy(unet: UNet, unet_params: Any, x_t: jax.Array, g: jax.Array,
                        feat_scales: Sequence[int] = DEFAULT_FEAT_SCALES) -> list[jax.Array]:
  """Decoder features of already-noised inputs, in ONE UNet call.

  x_t: (S, T, B, H, W, C), g: (S, T, B). Returns, per entry of `feat_scales` (in
  the given order), an array (S, T, B, h, w, c). The UNet is frozen: no gradient
  flows into it.
  """
  lead = x_t.shape[:3]
  features = unet.apply({"params": unet_params}, x_t.reshape((-1,) + x_t.shape[3:]),
                        g.reshape(-1), train=False,
                        decoder_feature_indices=tuple(int(s) for s in feat_scales))
  return [jax.lax.stop_gradient(f).reshape(lead + f.shape[1:]) for f in features]


def extract_features(unet: UNet, unet_params: Any, a: jax.Array, b: jax.Array, key: jax.Array,
                     sqrt_acp_prev: jax.Array, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                     feat_scales: Sequence[int] = DEFAULT_FEAT_SCALES) -> list[jax.Array]:
  """Noises both sources at every timestep and runs the frozen UNet once.

  Returns a list over `feat_scales` (given order) of (2, T, B, h, w, c) arrays,
  [source (a, b), timestep]. jit with `unet`, `timesteps`, `feat_scales` static.
  """
  x_t, g = noisy_inputs(a, b, key, sqrt_acp_prev, timesteps)
  return features_from_noisy(unet, unet_params, x_t, g, feat_scales)


def fuse_images(unet: UNet, unet_params: Any, head: FusionHead, head_params: Any,
                a: jax.Array, b: jax.Array, key: jax.Array, sqrt_acp_prev: jax.Array,
                timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                feat_scales: Sequence[int] = DEFAULT_FEAT_SCALES) -> jax.Array:
  """Fused image (B, H, W, 1) in [-1, 1] of sources a (MRI) and b, both (B, H, W, 1).

  H and W must be valid (see `pad_to_valid`). Meant to be jitted by the caller,
  e.g. `jax.jit(fuse_images, static_argnums=(0, 2, 8, 9))`.
  """
  features = extract_features(unet, unet_params, a, b, key, sqrt_acp_prev, timesteps,
                              feat_scales)
  return head.apply({"params": head_params},
                    order_features_coarse_to_fine(features, list(feat_scales)))


def pad_to_valid(x: jax.Array, levels: int):
  """Reflect-pads (B, H, W, C) images to a size the UNet and head accept.

  The padding is split between both sides (the extra pixel at the bottom/right).
  Returns (padded, crop_info); crop_info is static (Python ints), so this works
  under jit. Undo with `crop_back`.
  """
  if x.ndim != 4:
    raise DataError(f"pad_to_valid expects (B, H, W, C) images, got shape {x.shape}")
  if levels < 1:
    raise ValueError(f"levels must be >= 1, got {levels}")
  height, width = x.shape[1], x.shape[2]
  if min(height, width) < 2:
    raise DataError(f"image of {height}x{width} pixels is too small to reflect-pad")
  pad_h = validation.valid_fusion_side(height, levels) - height
  pad_w = validation.valid_fusion_side(width, levels) - width
  top, left = pad_h // 2, pad_w // 2
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)), mode="reflect")
  return x, (top, left, height, width)


def crop_back(x: jax.Array, crop_info) -> jax.Array:
  """Inverse of `pad_to_valid` on (B, H', W', C) outputs."""
  top, left, height, width = crop_info
  return x[:, top:top + height, left:left + width]
