"""Noise schedules, the predict-x0 training loss and the ancestral sampler (SR3 style).

The UNet is conditioned on a continuous noise level g = sqrt(alpha_cumprod), drawn
uniformly between two neighbouring steps' values. Schedules are computed in float64
with numpy, as the reference does, and cast to float32 only where they enter JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax.errors import ConfigError

SCHEDULE_KINDS = ("linear", "cosine")
COSINE_S = 8e-3


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Float64 diffusion schedule; arrays have length T except sqrt_alphas_cumprod_prev (T+1)."""
  betas: np.ndarray
  alphas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  posterior_log_variance_clipped: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_betas(kind: str, num_timesteps: int, linear_start: float,
               linear_end: float) -> np.ndarray:
  if num_timesteps < 1:
    raise ConfigError(f"the number of diffusion timesteps must be >= 1, got {num_timesteps}")
  if kind == "linear":
    return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
  if kind == "cosine":
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + COSINE_S
    alphas_bar = np.cos(steps / (1 + COSINE_S) * np.pi / 2) ** 2
    alphas_bar = alphas_bar / alphas_bar[0]
    return np.minimum(1 - alphas_bar[1:] / alphas_bar[:-1], 0.999)
  raise ConfigError(f"unknown noise schedule '{kind}'; expected one of {SCHEDULE_KINDS}")


def make_schedule(kind: str, num_timesteps: int, linear_start: float = 1e-6,
                  linear_end: float = 1e-2) -> Schedule:
  betas = make_betas(kind, int(num_timesteps), float(linear_start), float(linear_end))
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  return Schedule(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod_prev=np.sqrt(np.append(1.0, alphas_cumprod)),
      posterior_variance=posterior_variance,
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
      posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
  )


def schedule_from_config(diffusion_cfg) -> Schedule:
  """The schedule a config's `diffusion` group names."""
  return make_schedule(diffusion_cfg.schedule, diffusion_cfg.num_timesteps,
                       diffusion_cfg.linear_start, diffusion_cfg.linear_end)


def noise_levels_for_steps(key: jax.Array, sqrt_acp_prev: jax.Array, t: Any,
                           batch_shape: Sequence[int]) -> jax.Array:
  """g ~ Uniform(sqrt_acp_prev[t-1], sqrt_acp_prev[t]), one draw per batch element.

  `t` (integer, 1..T) may be a scalar or an array broadcastable to `batch_shape`."""
  sqrt_acp_prev = jnp.asarray(sqrt_acp_prev, jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), tuple(batch_shape))
  upper = sqrt_acp_prev[t - 1]  # the schedule decreases: [t-1] is the larger end
  lower = sqrt_acp_prev[t]
  u = jax.random.uniform(key, tuple(batch_shape), jnp.float32)
  return upper + (lower - upper) * u


def _per_sample(g: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.reshape(g, g.shape + (1,) * (x.ndim - g.ndim))


def q_sample(x0: jax.Array, g: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = g * x0 + sqrt(1 - g^2) * noise, g (B,) broadcast over H, W, C."""
  g = _per_sample(jnp.asarray(g, x0.dtype), x0)
  return g * x0 + jnp.sqrt(1.0 - g * g) * noise


def sample_training_inputs(key: jax.Array, x0: jax.Array, sqrt_acp_prev: jax.Array):
  """(x_t, g, t) of one training step: one t ~ U{1..T} for the batch, per-sample g."""
  num_timesteps = sqrt_acp_prev.shape[0] - 1
  key_t, key_g, key_noise = jax.random.split(key, 3)
  t = jax.random.randint(key_t, (), 1, num_timesteps + 1)
  g = noise_levels_for_steps(key_g, sqrt_acp_prev, t, (x0.shape[0],))
  noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  return q_sample(x0, g, noise), g, t


def x0_loss(apply_fn: Callable[..., jax.Array], params: Any, x0: jax.Array, key: jax.Array,
            sqrt_acp_prev: jax.Array) -> jax.Array:
  """Mean squared error of the UNet's x0 prediction (the reference's sum / (B*C*H*W)).

  apply_fn(params, x_t, g, dropout_key) -> x0_hat."""
  key_inputs, key_dropout = jax.random.split(key)
  x_t, g, _ = sample_training_inputs(key_inputs, x0, sqrt_acp_prev)
  x0_hat = apply_fn(params, x_t, g, key_dropout)
  return jnp.mean(jnp.square(x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)))


def ancestral_sample(apply_fn: Callable[..., jax.Array], params: Any, key: jax.Array,
                     shape: Sequence[int], schedule: Schedule) -> jax.Array:
  """Samples x0 from pure noise, t = T-1 .. 0, as ONE lax.fori_loop (jit the caller).

  apply_fn(params, x, level) -> x0_hat (eval mode), level (B,) = sqrt_acp_prev[t+1]."""
  shape = tuple(shape)
  num_timesteps = schedule.num_timesteps
  levels = jnp.asarray(schedule.sqrt_alphas_cumprod_prev[1:], jnp.float32)
  coef1 = jnp.asarray(schedule.posterior_mean_coef1, jnp.float32)
  coef2 = jnp.asarray(schedule.posterior_mean_coef2, jnp.float32)
  std = jnp.asarray(np.exp(0.5 * schedule.posterior_log_variance_clipped), jnp.float32)
  key_init, key_steps = jax.random.split(key)

  def step(i, x):
    t = num_timesteps - 1 - i
    level = jnp.full((shape[0],), levels[t], jnp.float32)
    x0_hat = jnp.clip(apply_fn(params, x, level).astype(jnp.float32), -1.0, 1.0)
    mean = coef1[t] * x0_hat + coef2[t] * x
    noise = jax.random.normal(jax.random.fold_in(key_steps, t), shape, jnp.float32)
    return mean + jnp.where(t > 0, std[t], 0.0) * noise

  x_T = jax.random.normal(key_init, shape, jnp.float32)
  return jax.lax.fori_loop(0, num_timesteps, step, x_T)
