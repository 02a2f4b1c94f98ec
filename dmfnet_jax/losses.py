"""Stage II hybrid fusion loss (docs/model.md §5).

`loss = 1.5 * L1(F, max(A, B)) + [L1(S(F), max(S(A), S(B))) + 0.5 * (1 - Q)]`
with A = MRI, B = the other modality, F = fused, all (B, H, W, 1) in [-1, 1].
The bracket is what the reference logs as `loss_grad`; `Q` as `ssim_term`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax.config_defaults import REFERENCE_LOSS_WEIGHTS

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)
WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
C2 = 0.03**2


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> np.ndarray:
  """Normalised 2-D Gaussian window (outer product of a normalised 1-D one)."""
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  g = g / g.sum()
  return np.outer(g, g).astype(np.float32)


def _depthwise_correlate(x: jnp.ndarray, kernels: np.ndarray) -> jnp.ndarray:
  """Zero-padded 'same' cross-correlation of every channel of x with every kernel.

  x: (N, H, W, C); kernels: (K, kh, kw). Returns (N, H, W, C*K), channel c*K + k.
  """
  channels = x.shape[-1]
  num_kernels, kh, kw = kernels.shape
  # HWIO with feature_group_count=C: I = 1, O = C*K (group c owns outputs c*K..c*K+K-1).
  rhs = np.broadcast_to(kernels.transpose(1, 2, 0)[:, :, None, None, :],
                        (kh, kw, 1, channels, num_kernels)).reshape(kh, kw, 1, -1)
  return jax.lax.conv_general_dilated(
      x, jnp.asarray(rhs, x.dtype), window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST)


def sobel_magnitude(x: jnp.ndarray) -> jnp.ndarray:
  """`|x * Kx| + |x * Ky|` per channel (cross-correlation, zero padding 1)."""
  responses = _depthwise_correlate(x, np.stack([SOBEL_X, SOBEL_Y]))
  responses = responses.reshape(x.shape + (2,))
  return jnp.abs(responses).sum(axis=-1)


def fusion_quality(fused: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """The reference's SSIM-like term Q: per pixel `q_FA` where A's local std is at
  least B's, else `q_FB`; mean over all pixels.

  Variances are E[x^2] - mu^2 and can come out slightly negative in flat regions;
  the reference compares `sqrt` of them, so a NaN (negative variance of A) makes
  the comparison False and picks `q_FB`. That quirk is kept.
  """
  maps = jnp.concatenate([fused, a, b, fused * fused, a * a, b * b, fused * a, fused * b], axis=-1)
  stats = _depthwise_correlate(maps, gaussian_window()[None])
  mu_f, mu_a, mu_b, e_ff, e_aa, e_bb, e_fa, e_fb = jnp.split(stats, 8, axis=-1)
  var_f = e_ff - mu_f * mu_f
  var_a = e_aa - mu_a * mu_a
  var_b = e_bb - mu_b * mu_b
  cov_fa = e_fa - mu_f * mu_a
  cov_fb = e_fb - mu_f * mu_b
  q_fa = (2 * cov_fa + C2) / (var_f + var_a + C2)
  q_fb = (2 * cov_fb + C2) / (var_f + var_b + C2)
  return jnp.mean(select_quality(var_a, var_b, q_fa, q_fb))


def select_quality(var_a, var_b, q_fa, q_fb):
  """`q_FA` where `sqrt(var_A) >= sqrt(var_B)`, else `q_FB`.

  NaN >= x is False, as in the reference: a (rounding-)negative variance of A
  picks `q_FB` even against an equally flat B. Keep the sqrt; do not simplify
  to `var_a >= var_b`.
  """
  return jnp.where(jnp.sqrt(var_a) >= jnp.sqrt(var_b), q_fa, q_fb)


def fusion_loss(fused: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray,
                intensity_weight: float = REFERENCE_LOSS_WEIGHTS["intensity_weight"],
                gradient_weight: float = REFERENCE_LOSS_WEIGHTS["gradient_weight"],
                ssim_weight: float = REFERENCE_LOSS_WEIGHTS["ssim_weight"]):
  """Hybrid loss of the fused image F against A (MRI) and B (other modality).

  The weights default to the reference's (1.5, 1, 0.5); `config.loss` can change
  them (e.g. to fine-tune a model that under-fits the intensity term).

  Args:
    fused, a, b: (B, H, W, 1) in [-1, 1].
  Returns:
    (total, {"loss_in", "loss_grad", "ssim_term"}), all float32 scalars.
  """
  fused = fused.astype(jnp.float32)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  loss_in = intensity_weight * jnp.mean(jnp.abs(fused - jnp.maximum(a, b)))
  grads = sobel_magnitude(jnp.concatenate([fused, a, b], axis=-1))
  grad_f, grad_a, grad_b = jnp.split(grads, 3, axis=-1)
  sobel_term = jnp.mean(jnp.abs(grad_f - jnp.maximum(grad_a, grad_b)))
  ssim_term = fusion_quality(fused, a, b)
  loss_grad = gradient_weight * sobel_term + ssim_weight * (1 - ssim_term)
  total = loss_in + loss_grad
  return total, {"loss_in": loss_in, "loss_grad": loss_grad, "ssim_term": ssim_term}
