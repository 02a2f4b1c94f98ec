"""Fusion quality metrics exactly as the reference evaluator defines them (SPEC.md §3).

All metrics work on grayscale float images in 0..255 (RGB files are reduced with
`dmfnet_jax.imageio.metric_gray`, i.e. OpenCV's RGB2GRAY on uint8). F is the fused
image, A the MRI and B the other modality.

Everything is vectorised over a leading stack axis: `_Features` holds what one image
contributes (filtered moments, Sobel responses, histogram codes) so that, when many
fused images share a source pair (several methods) or many pairs share a shape (a
test split), each source is filtered once and every filter runs on a whole stack.
The VIF Gaussian windows are outer products, so 'valid' filtering (with the
scale-change subsampling folded in) is two banded matrix products, which BLAS does
far faster than a 2-D convolution; flat regions still give exact zeros, which the
VIF thresholds (`eps = 1e-10`) rely on.

Degenerate inputs never raise: they give the reference's value where it is finite
and NaN where the definition divides by zero:
- CC and SCD are NaN when an image entering a correlation is constant (zero variance).
- PSNR is NaN when max(F) == 0 (the formula takes log10(0)) and +inf when F equals
  both sources (MSE == 0).
- Qabf is NaN when both sources are flat (no gradient anywhere).
- VIF returns 1.0 for a pair whose reference image is flat (the reference's 0/0 rule).
- EN, SD, SF, AG are 0 and MI is 0 for a flat F.
Images need at least 7 pixels per side (the SSIM window); VIF scales whose 'valid'
windows do not fit (sides below 41 px) contribute nothing, as empty sums.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from dmfnet_jax import imageio

# Table order of SPEC.md §4; higher is better for every one of them.
METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "PSNR", "CC")
# MSE is reported too (the test vectors include it) but is not a table column.
ALL_METRIC_NAMES = METRIC_NAMES + ("MSE",)
HIGHER_IS_BETTER = {name: True for name in METRIC_NAMES}
HIGHER_IS_BETTER["MSE"] = False

MIN_SIDE = 7  # skimage SSIM's 7x7 window.

_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
_SSIM_WIN = 7
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2
_LN10 = math.log(10.0)


# --------------------------------------------------------------------------- input


def to_metric_gray(image: np.ndarray) -> np.ndarray:
  """Any image (HxW or HxWx3, uint8/uint16/float 0..255) -> float64 HxW in 0..255.

  uint8/uint16 RGB goes through `imageio.metric_gray` (cv2 RGB2GRAY, bit exact);
  float RGB uses round(0.299R + 0.587G + 0.114B) as SPEC.md §3 states.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3:
    if image.shape[-1] != 3:
      raise ValueError(f"expected HxW or HxWx3 image, got shape {image.shape}")
    if image.dtype in (np.uint8, np.uint16):
      return imageio.metric_gray(image).astype(np.float64)
    rgb = image.astype(np.float64)
    return np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
  if image.ndim != 2:
    raise ValueError(f"expected HxW or HxWx3 image, got shape {image.shape}")
  if image.dtype in (np.uint8, np.uint16):
    return imageio.metric_gray(image).astype(np.float64)
  return image.astype(np.float64)


def _as_stack(images) -> np.ndarray:
  """Sequence of same-shaped images or an (K, H, W) array -> float64 (K, H, W)."""
  if isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.float64:
    return images
  if isinstance(images, np.ndarray) and images.ndim == 2:
    return to_metric_gray(images)[None]
  return np.stack([to_metric_gray(im) for im in images])


# --------------------------------------------------------------------------- filters


@functools.lru_cache(maxsize=64)
def _vif_band(size: int, n: int, step: int) -> np.ndarray:
  """Banded matrix of the 1-D 'valid' Gaussian correlation, every `step`-th output.

  The reference's NxN window (sd N/5, values below eps*max zeroed, normalised) is
  the outer product of this normalised 1-D window: its smallest entry, at the
  corners, is far above eps, so no entry is zeroed.
  """
  half = (n - 1) / 2.0
  sd = n / 5.0
  taps = np.exp(-((np.arange(n) - half) ** 2) / (2.0 * sd * sd))
  taps /= taps.sum()
  out = max(size - n + 1, 0)
  rows = np.arange(0, out, step)
  band = np.zeros((len(rows), size))
  for i, r in enumerate(rows):
    band[i, r:r + n] = taps
  band.setflags(write=False)
  return band


def _vif_filter(x: np.ndarray, n: int, step: int = 1) -> np.ndarray:
  """'valid' NxN Gaussian correlation of (..., H, W), keeping every step-th output."""
  band_w = _vif_band(x.shape[-1], n, step)
  band_h = _vif_band(x.shape[-2], n, step)
  return np.matmul(band_h, np.matmul(x, band_w.T))


def _uniform(x: np.ndarray) -> np.ndarray:
  """skimage SSIM's 7x7 mean filter (scipy uniform_filter, mode 'reflect')."""
  y = ndimage.uniform_filter1d(x, _SSIM_WIN, axis=-1, mode="reflect")
  return ndimage.uniform_filter1d(y, _SSIM_WIN, axis=-2, mode="reflect")


def _sobel(x: np.ndarray):
  """True 2-D convolution ('same', zero padding) with h3 (x) and h1 (y) of SPEC §3."""
  # h3 = [1,2,1]^T (x) [-1,0,1]; h1 = [1,0,-1]^T (x) [1,2,1]; both separable.
  sx = ndimage.convolve1d(x, [-1.0, 0.0, 1.0], axis=-1, mode="constant")
  sx = ndimage.convolve1d(sx, [1.0, 2.0, 1.0], axis=-2, mode="constant")
  sy = ndimage.convolve1d(x, [1.0, 2.0, 1.0], axis=-1, mode="constant")
  sy = ndimage.convolve1d(sy, [1.0, 0.0, -1.0], axis=-2, mode="constant")
  return sx, sy


# --------------------------------------------------------------------------- features


class _Features:
  """What one stack of images contributes to every metric, computed once."""

  def __init__(self, x: np.ndarray):
    if x.ndim != 3:
      raise ValueError(f"expected a (K, H, W) stack, got shape {x.shape}")
    if min(x.shape[-2:]) < MIN_SIDE:
      raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {x.shape[-2:]}")
    self.x = x
    self.size = x.shape[-1] * x.shape[-2]
    self.centered = x - x.mean(axis=(-2, -1), keepdims=True)
    self.ssq = np.einsum("kij,kij->k", self.centered, self.centered)
    # SSIM moments (sample covariance, 7x7 uniform window).
    cov_norm = _SSIM_WIN ** 2 / (_SSIM_WIN ** 2 - 1.0)
    self.ssim_mu = _uniform(x)
    self.ssim_var = cov_norm * (_uniform(x * x) - self.ssim_mu * self.ssim_mu)
    # VIF: per scale, the (subsampled) image, its local mean and clipped variance.
    self.vif = []
    image = x
    for scale in range(1, 5):
      n = 2 ** (5 - scale) + 1
      if scale > 1:
        image = _vif_filter(image, n, step=2)
      mu = _vif_filter(image, n)
      var = np.maximum(_vif_filter(image * image, n) - mu * mu, 0.0)
      self.vif.append((n, image, mu, var))
    # Qabf: gradient strength and the arctan (not arctan2) orientation.
    sx, sy = _sobel(x)
    self.grad = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    self.angle = np.where(zero, math.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    # Histogram codes: integer 0..255 images take a 256-bin bincount fast path.
    integral = bool(np.all((x >= 0) & (x <= 255) & (x == np.round(x))))
    self.codes = x.astype(np.int64) if integral else None
    self.en = _entropy(x)


def _entropy(x: np.ndarray) -> np.ndarray:
  k = x.shape[0]
  codes = np.clip(np.round(x), 0, 255).astype(np.int64).reshape(k, -1)
  counts = np.bincount((codes + 256 * np.arange(k)[:, None]).ravel(), minlength=256 * k)
  p = counts.reshape(k, 256) / codes.shape[1]
  return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=1)


# --------------------------------------------------------------------------- metrics


def _mi_from_joint(joint: np.ndarray) -> float:
  """scikit-learn's mutual_info_score from a contingency table (natural log)."""
  pi = joint.sum(axis=1)
  pj = joint.sum(axis=0)
  if np.count_nonzero(pi) <= 1 or np.count_nonzero(pj) <= 1:
    return 0.0
  nzx, nzy = np.nonzero(joint)
  nz_val = joint[nzx, nzy].astype(np.float64)
  total = nz_val.sum()
  contingency_nm = nz_val / total
  outer = pi[nzx].astype(np.int64) * pj[nzy].astype(np.int64)
  log_outer = -np.log(outer) + math.log(pi.sum()) + math.log(pj.sum())
  mi = contingency_nm * (np.log(nz_val) - math.log(total)) + contingency_nm * log_outer
  mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
  return float(max(mi.sum(), 0.0))


def _mutual_information(f: _Features, s: _Features) -> np.ndarray:
  k = max(f.x.shape[0], s.x.shape[0])
  if f.codes is not None and s.codes is not None:
    fc = np.broadcast_to(f.codes, (k,) + f.x.shape[1:]).reshape(k, -1)
    sc = np.broadcast_to(s.codes, (k,) + s.x.shape[1:]).reshape(k, -1)
    index = (np.arange(k)[:, None] * 65536 + fc * 256 + sc).ravel()
    joint = np.bincount(index, minlength=65536 * k).reshape(k, 256, 256)
    return np.array([_mi_from_joint(j) for j in joint])
  out = []
  for i in range(k):
    fi = f.x[min(i, f.x.shape[0] - 1)].ravel()
    si = s.x[min(i, s.x.shape[0] - 1)].ravel()
    _, fl = np.unique(fi, return_inverse=True)
    sv, sl = np.unique(si, return_inverse=True)
    joint = np.bincount(fl.ravel() * len(sv) + sl.ravel(), minlength=(fl.max() + 1) * len(sv))
    out.append(_mi_from_joint(joint.reshape(-1, len(sv))))
  return np.array(out)


def _corr(xc: np.ndarray, x_ssq: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation of centred x (with its sum of squares) and raw y."""
  yc = y - y.mean(axis=(-2, -1), keepdims=True)
  num = np.sum(xc * yc, axis=(-2, -1))
  den = np.sqrt(x_ssq * np.sum(yc * yc, axis=(-2, -1)))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ssim(f: _Features, s: _Features) -> np.ndarray:
  cov_norm = _SSIM_WIN ** 2 / (_SSIM_WIN ** 2 - 1.0)
  cov = cov_norm * (_uniform(f.x * s.x) - f.ssim_mu * s.ssim_mu)
  a1 = 2.0 * f.ssim_mu * s.ssim_mu + _SSIM_C1
  a2 = 2.0 * cov + _SSIM_C2
  b1 = f.ssim_mu ** 2 + s.ssim_mu ** 2 + _SSIM_C1
  b2 = f.ssim_var + s.ssim_var + _SSIM_C2
  ssim_map = (a1 * a2) / (b1 * b2)
  pad = (_SSIM_WIN - 1) // 2
  return ssim_map[..., pad:-pad, pad:-pad].mean(axis=(-2, -1))


def _vif(ref: _Features, dist: _Features) -> np.ndarray:
  """vifp(ref, dist), 4-scale pixel-domain VIF with the reference's branch rules."""
  num = 0.0
  den = 0.0
  for (n, r, mu1, s1), (_, d, mu2, s2) in zip(ref.vif, dist.vif):
    s12 = _vif_filter(r * d, n) - mu1 * mu2
    with np.errstate(divide="ignore", invalid="ignore"):
      g = s12 / (s1 + _VIF_EPS)
    sv = s2 - g * s12
    low1 = s1 < _VIF_EPS
    g = np.where(low1, 0.0, g)
    sv = np.where(low1, s2, sv)
    s1 = np.where(low1, 0.0, s1)
    low2 = s2 < _VIF_EPS
    g = np.where(low2, 0.0, g)
    sv = np.where(low2, 0.0, sv)
    neg = g < 0
    sv = np.where(neg, s2, sv)
    g = np.where(neg, 0.0, g)
    sv = np.maximum(sv, _VIF_EPS)
    num = num + np.sum(np.log1p(g * g * s1 / (sv + _VIF_SIGMA_NSQ)), axis=(-2, -1)) / _LN10
    den = den + np.sum(np.log1p(s1 / _VIF_SIGMA_NSQ), axis=(-2, -1)) / _LN10
  with np.errstate(divide="ignore", invalid="ignore"):
    vif = np.asarray(num / den, dtype=np.float64)
  return np.where(np.isnan(vif), 1.0, vif)


def _qabf_source(src: _Features, f: _Features) -> np.ndarray:
  g_s, g_f = src.grad, f.grad
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(g_s > g_f, g_f / np.where(g_s > g_f, g_s, 1.0),
                     np.where(g_s < g_f, g_s / np.where(g_s < g_f, g_f, 1.0), g_f))
  angle = 1.0 - np.abs(src.angle - f.angle) / (math.pi / 2)
  q_g = 0.9994 / (1.0 + np.exp(-15.0 * (ratio - 0.5)))
  q_a = 0.9879 / (1.0 + np.exp(-22.0 * (angle - 0.8)))
  return q_g * q_a


def _qabf(f: _Features, a: _Features, b: _Features) -> np.ndarray:
  q_af = _qabf_source(a, f)
  q_bf = _qabf_source(b, f)
  num = np.sum(q_af * a.grad + q_bf * b.grad, axis=(-2, -1))
  den = np.sum(a.grad + b.grad, axis=(-2, -1))
  den = np.broadcast_to(den, num.shape)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _evaluate_features(f: _Features, a: _Features, b: _Features) -> Dict[str, np.ndarray]:
  """All metrics for stacks that broadcast along the leading axis (K or 1)."""
  x = f.x
  k = max(x.shape[0], a.x.shape[0], b.x.shape[0])
  full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (k,)).copy()
  dx = x[..., :, 1:] - x[..., :, :-1]
  dy = x[..., 1:, :] - x[..., :-1, :]
  sf = np.sqrt(np.mean(dx * dx, axis=(-2, -1)) + np.mean(dy * dy, axis=(-2, -1)))
  gx, gy = np.gradient(x, axis=(-1, -2))
  ag = np.mean(np.sqrt((gx * gx + gy * gy) / 2.0), axis=(-2, -1))
  mse = (np.mean((a.x - x) ** 2, axis=(-2, -1)) + np.mean((b.x - x) ** 2, axis=(-2, -1))) / 2.0
  peak = np.max(x, axis=(-2, -1))
  with np.errstate(divide="ignore", invalid="ignore"):
    psnr = np.where(peak > 0, 10.0 * np.log10(peak * peak / mse), np.nan)
  out = {
      "EN": f.en,
      "SD": np.sqrt(f.ssq / f.size),
      "SF": sf,
      "AG": ag,
      "MI": _mutual_information(f, a) + _mutual_information(f, b),
      "SCD": _corr(a.centered, a.ssq, x - b.x) + _corr(b.centered, b.ssq, x - a.x),
      "VIF": _vif(a, f) + _vif(b, f),
      "Qabf": _qabf(f, a, b),
      "SSIM": _ssim(f, a) + _ssim(f, b),
      "PSNR": psnr,
      "CC": (_corr(a.centered, a.ssq, x) + _corr(b.centered, b.ssq, x)) / 2.0,
      "MSE": mse,
  }
  return {name: full(value) for name, value in out.items()}


def _rows(values: Dict[str, np.ndarray]) -> List[Dict[str, float]]:
  k = len(next(iter(values.values())))
  return [{name: float(values[name][i]) for name in ALL_METRIC_NAMES} for i in range(k)]


def _check_shapes(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
  if not (f.shape[-2:] == a.shape[-2:] == b.shape[-2:]):
    raise ValueError(
        f"fused {f.shape[-2:]} and sources {a.shape[-2:]}, {b.shape[-2:]} differ in size")


# --------------------------------------------------------------------------- public API


def evaluate_pair(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
  """Metrics of one fused image against its sources (A = MRI, B = other).

  Inputs are HxW grayscale floats in 0..255 (or images as read; RGB is reduced).
  Returns {metric name: float} for `ALL_METRIC_NAMES`.
  """
  f, a, b = (to_metric_gray(im)[None] for im in (fused, a, b))
  _check_shapes(f, a, b)
  return _rows(_evaluate_features(_Features(f), _Features(a), _Features(b)))[0]


def evaluate_methods(fused_by_method: Mapping[str, np.ndarray], a: np.ndarray,
                     b: np.ndarray) -> Dict[str, Dict[str, float]]:
  """Metrics of several fused images of the same pair; the sources are filtered once."""
  if not fused_by_method:
    return {}
  names = list(fused_by_method)
  a, b = to_metric_gray(a)[None], to_metric_gray(b)[None]
  f = np.stack([to_metric_gray(fused_by_method[n]) for n in names])
  _check_shapes(f, a, b)
  rows = _rows(_evaluate_features(_Features(f), _Features(a), _Features(b)))
  return dict(zip(names, rows))


def evaluate_batch(fused: Sequence[np.ndarray], a: Sequence[np.ndarray],
                   b: Sequence[np.ndarray], num_workers: Optional[int] = None,
                   chunk_size: int = 8) -> List[Dict[str, float]]:
  """Metrics of many (fused, A, B) triples, in input order.

  Same-shaped triples are stacked into chunks of `chunk_size` that are evaluated
  as one vectorised batch; chunks run on `num_workers` threads (numpy, scipy and
  BLAS release the GIL). `num_workers=None` uses every CPU core, 0 or 1 runs inline.
  """
  if not (len(fused) == len(a) == len(b)):
    raise ValueError(f"got {len(fused)} fused images for {len(a)} A and {len(b)} B sources")
  grays = [tuple(to_metric_gray(im) for im in triple) for triple in zip(fused, a, b)]
  for f, sa, sb in grays:
    _check_shapes(f, sa, sb)
  by_shape: Dict[tuple, List[int]] = {}
  for i, (f, _, _) in enumerate(grays):
    by_shape.setdefault(f.shape, []).append(i)
  chunks = [idx[s:s + chunk_size] for idx in by_shape.values()
            for s in range(0, len(idx), chunk_size)]

  def run_chunk(idx):
    stacks = [np.stack([grays[i][j] for i in idx]) for j in range(3)]
    return idx, _rows(_evaluate_features(*(_Features(s) for s in stacks)))

  workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  results: List[Optional[Dict[str, float]]] = [None] * len(grays)
  if workers <= 1 or len(chunks) <= 1:
    done = map(run_chunk, chunks)
  else:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    done = pool.map(run_chunk, chunks)
  try:
    for idx, rows in done:
      for i, row in zip(idx, rows):
        results[i] = row
  finally:
    if workers > 1 and len(chunks) > 1:
      pool.shutdown()
  return results  # type: ignore[return-value]
