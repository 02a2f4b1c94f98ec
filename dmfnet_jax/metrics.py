"""Fusion quality metrics exactly as the reference evaluator defines them (docs/model.md §7).

All metrics work on grayscale float images in 0..255 (RGB files are reduced with
`dmfnet_jax.imageio.metric_gray`, i.e. OpenCV's RGB2GRAY on uint8). F is the fused
image, A the MRI and B the other modality.

Everything is vectorised over a leading stack axis: `_Features` holds what one image
contributes (filtered moments, Sobel responses, histogram codes) so that, when many
fused images share a source pair (several methods, `evaluate_methods`), each source
is filtered once and every filter runs on the whole stack of fused images.
The VIF Gaussian windows are outer products, so 'valid' filtering (with the
scale-change subsampling folded in) is two 1-D passes in real space (float64):
unlike FFT filtering, flat regions still give exact zeros, which the VIF thresholds
(`eps = 1e-10`) rely on. SSIM and Qabf run in float32 as the reference does on its
float32 images (their window sums of integer images are exact there).

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

import functools
import math
from typing import Dict, List, Mapping

import numpy as np
from scipy import ndimage

from dmfnet_jax import imageio

# Table order of docs/model.md §7; higher is better for every one of them.
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
_SSIM_COV_NORM = _SSIM_WIN ** 2 / (_SSIM_WIN ** 2 - 1.0)
_LN10 = math.log(10.0)


# --------------------------------------------------------------------------- input


def to_metric_gray(image: np.ndarray) -> np.ndarray:
  """Any image (HxW or HxWx3, uint8/uint16/float 0..255) -> float64 HxW in 0..255.

  uint8/uint16 RGB goes through `imageio.metric_gray` (cv2 RGB2GRAY, bit exact);
  float RGB uses round(0.299R + 0.587G + 0.114B) as docs/model.md §7 states.
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


# --------------------------------------------------------------------------- filters


@functools.lru_cache(maxsize=8)
def _vif_taps(n: int) -> np.ndarray:
  """1-D factor of the reference's NxN VIF window (sd N/5, normalised).

  The 2-D window is the outer product of these taps; its smallest entry (a corner)
  is far above eps*max, so the reference's zeroing step changes nothing.
  """
  half = (n - 1) / 2.0
  sd = n / 5.0
  taps = np.exp(-((np.arange(n) - half) ** 2) / (2.0 * sd * sd))
  return taps / taps.sum()


def _valid_rows(x: np.ndarray, n: int, step: int) -> np.ndarray:
  """'valid' 1-D Gaussian correlation along the last axis, every step-th output."""
  m = (n - 1) // 2
  return ndimage.correlate1d(x, _vif_taps(n), axis=-1, mode="constant")[
      ..., m:x.shape[-1] - m:step]


def _vif_filter(x: np.ndarray, n: int, step: int = 1) -> np.ndarray:
  """'valid' NxN Gaussian correlation of (..., H, W), keeping every step-th output,
  returned TRANSPOSED as (..., W', H').

  The window is separable: rows, then columns. Both passes run along the
  contiguous axis with one transposed copy in between, which ndimage does about
  twice as fast as a pass across rows. The result stays transposed: VIF only
  combines arrays that went through the same number of filterings, so their
  orientations agree, and its sums do not care.
  """
  if x.shape[-2] < n or x.shape[-1] < n:
    return np.zeros(x.shape[:-2] + (0, 0))
  y = np.ascontiguousarray(np.swapaxes(_valid_rows(x, n, step), -1, -2))
  return _valid_rows(y, n, step)


def _box7(x: np.ndarray) -> np.ndarray:
  """7x7 window sums with 'reflect' (numpy 'symmetric') borders: skimage SSIM's
  uniform_filter times 49. Exact in float32 for integer images and their products
  (sums stay below 2^24)."""
  half = _SSIM_WIN // 2
  p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(half, half), (half, half)], mode="symmetric")
  h, w = x.shape[-2:]
  rows = p[..., :, 0:w].copy()
  for k in range(1, _SSIM_WIN):
    rows += p[..., :, k:k + w]
  out = rows[..., 0:h, :].copy()
  for k in range(1, _SSIM_WIN):
    out += rows[..., k:k + h, :]
  return out


def _uniform(x: np.ndarray) -> np.ndarray:
  """skimage SSIM's 7x7 mean filter (scipy uniform_filter, mode 'reflect')."""
  return _box7(x) * np.float32(1.0 / _SSIM_WIN ** 2)


def _sobel(x: np.ndarray):
  """True 2-D 'same' convolution (zero padding) with h3 (x) and h1 (y), docs/model.md §7.

  h3 = [1,2,1]^T [-1,0,1] and h1 = [1,0,-1]^T [1,2,1] are separable; convolving
  with [-1,0,1] gives x[j-1] - x[j+1], with [1,0,-1] x[i+1] - x[i-1].
  """
  p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
  diff_x = p[..., :, :-2] - p[..., :, 2:]
  sx = diff_x[..., :-2, :] + 2 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]
  smooth_x = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
  sy = smooth_x[..., 2:, :] - smooth_x[..., :-2, :]
  return sx, sy


def _sum_hw(x: np.ndarray) -> np.ndarray:
  return x.sum(axis=(-2, -1), dtype=np.float64)


def _dot_hw(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image inner product over H, W (broadcasting the stack axis)."""
  x, y = np.broadcast_arrays(x, y)
  return np.einsum("...ij,...ij->...", x, y)


# --------------------------------------------------------------------------- features


class _Features:
  """What one stack of images contributes to every metric, computed once.

  VIF moments stay float64 (their differences cancel); Qabf and SSIM run in
  float32 as the reference evaluator does on its float32 images.
  """

  def __init__(self, x: np.ndarray):
    if x.ndim != 3:
      raise ValueError(f"expected a (K, H, W) stack, got shape {x.shape}")
    if min(x.shape[-2:]) < MIN_SIDE:
      raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {x.shape[-2:]}")
    self.x = x
    self.size = x.shape[-1] * x.shape[-2]
    self.mean = x.mean(axis=(-2, -1), keepdims=True)
    self.centered = x - self.mean
    self.ssq = _dot_hw(self.centered, self.centered)
    # SSIM moments (sample covariance, 7x7 uniform window).
    self.x32 = x.astype(np.float32)
    self.ssim_mu = _uniform(self.x32)
    self.ssim_mu_sq = self.ssim_mu * self.ssim_mu
    self.ssim_var = _SSIM_COV_NORM * (_uniform(self.x32 * self.x32) - self.ssim_mu_sq)
    # VIF: per scale, the (subsampled) image, its local mean and clipped variance,
    # and the reference's denominator term, which only depends on this image.
    self.vif = []
    self.vif_den = 0.0
    image = x
    for scale in range(1, 5):
      n = 2 ** (5 - scale) + 1
      if scale > 1:
        image = _vif_filter(image, n, step=2)
      moments = _vif_filter(np.stack([image, image * image]), n)
      mu = moments[0]
      var = np.maximum(moments[1] - mu * mu, 0.0)
      self.vif.append((n, image, mu, var))
      den = np.log1p(var / _VIF_SIGMA_NSQ, out=np.zeros_like(var), where=var >= _VIF_EPS)
      self.vif_den = self.vif_den + _sum_hw(den) / _LN10
    # Qabf: gradient strength and the arctan (not arctan2) orientation.
    sx, sy = _sobel(self.x32)
    self.grad = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    self.angle = np.where(zero, np.float32(math.pi / 2),
                          np.arctan(sy / np.where(zero, np.float32(1.0), sx)))
    # Histogram codes: integer 0..255 images take a 256-bin bincount fast path.
    codes = x.astype(np.int64)
    integral = bool(np.array_equal(codes, x) and codes.min() >= 0 and codes.max() <= 255)
    self.codes = codes if integral else None
    self.en = _entropy(codes if integral else np.clip(np.round(x), 0, 255).astype(np.int64))


def _entropy(codes: np.ndarray) -> np.ndarray:
  """EN of uint8(round(F)) per image, from 0..255 integer codes (K, H, W)."""
  k = codes.shape[0]
  codes = codes.reshape(k, -1)
  counts = np.bincount((codes + 256 * np.arange(k)[:, None]).ravel(), minlength=256 * k)
  p = counts.reshape(k, 256) / codes.shape[1]
  return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=1)


# --------------------------------------------------------------------------- metrics


def _mi_from_joints(joint: np.ndarray) -> np.ndarray:
  """scikit-learn's mutual_info_score (natural log) of each (n_f, n_s) contingency
  table in a (K, n_f, n_s) stack, summing per-cell terms as it does."""
  k = joint.shape[0]
  pi = joint.sum(axis=2)
  pj = joint.sum(axis=1)
  total = pi.sum(axis=1).astype(np.float64)
  kk, ii, jj = np.nonzero(joint)
  nz_val = joint[kk, ii, jj].astype(np.float64)
  log_total = np.log(total)[kk]
  contingency_nm = nz_val / total[kk]
  outer = pi[kk, ii].astype(np.int64) * pj[kk, jj].astype(np.int64)
  log_outer = -np.log(outer) + 2.0 * log_total
  terms = contingency_nm * (np.log(nz_val) - log_total) + contingency_nm * log_outer
  terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
  mi = np.maximum(np.bincount(kk, weights=terms, minlength=k), 0.0)
  # One label on either side: sklearn returns 0 (the sum above is 0 up to rounding).
  single = (np.count_nonzero(pi, axis=1) <= 1) | (np.count_nonzero(pj, axis=1) <= 1)
  return np.where(single, 0.0, mi)


def _mutual_information(f: _Features, s: _Features) -> np.ndarray:
  k = max(f.x.shape[0], s.x.shape[0])
  if f.codes is not None and s.codes is not None:
    fc = np.broadcast_to(f.codes, (k,) + f.x.shape[1:]).reshape(k, -1)
    sc = np.broadcast_to(s.codes, (k,) + s.x.shape[1:]).reshape(k, -1)
    index = (np.arange(k)[:, None] * 65536 + fc * 256 + sc).ravel()
    joint = np.bincount(index, minlength=65536 * k).reshape(k, 256, 256)
    return _mi_from_joints(joint)
  out = []
  for i in range(k):  # general floats: one label per distinct value
    _, fl = np.unique(f.x[min(i, f.x.shape[0] - 1)], return_inverse=True)
    sv, sl = np.unique(s.x[min(i, s.x.shape[0] - 1)], return_inverse=True)
    fl, sl = fl.ravel(), sl.ravel()
    joint = np.bincount(fl * len(sv) + sl, minlength=(fl.max() + 1) * len(sv))
    out.append(_mi_from_joints(joint.reshape(1, -1, len(sv)))[0])
  return np.array(out)


def _corr(xc: np.ndarray, x_ssq: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation of centred x (with its sum of squares) and raw y."""
  yc = y - y.mean(axis=(-2, -1), keepdims=True)
  num = _dot_hw(xc, yc)
  den = np.sqrt(x_ssq * _dot_hw(yc, yc))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ssim(f: _Features, s: _Features) -> np.ndarray:
  cov = _SSIM_COV_NORM * (_uniform(f.x32 * s.x32) - f.ssim_mu * s.ssim_mu)
  num = (2.0 * f.ssim_mu * s.ssim_mu + _SSIM_C1) * (2.0 * cov + _SSIM_C2)
  den = (f.ssim_mu_sq + s.ssim_mu_sq + _SSIM_C1) * (f.ssim_var + s.ssim_var + _SSIM_C2)
  pad = (_SSIM_WIN - 1) // 2
  return _sum_hw((num / den)[..., pad:-pad, pad:-pad]) / (
      (num.shape[-2] - 2 * pad) * (num.shape[-1] - 2 * pad))


def _vif(ref: _Features, dist: _Features) -> np.ndarray:
  """vifp(ref, dist), 4-scale pixel-domain VIF with the reference's branch rules.

  Folding the rules: a pixel adds to the numerator only where s1 >= eps,
  s2 >= eps and g > 0 (every other branch sets g = 0); there the term is
  log10(1 + g^2 s1 / (max(sv, eps) + sigma_nsq)).
  """
  num = 0.0
  for (n, r, mu1, s1), (_, d, mu2, s2) in zip(ref.vif, dist.vif):
    if r.size == 0 or d.size == 0:
      continue
    s12 = _vif_filter(r * d, n) - mu1 * mu2
    g = s12 / (s1 + _VIF_EPS)
    keep = (s1 >= _VIF_EPS) & (s2 >= _VIF_EPS) & (g > 0)
    sv = np.maximum(s2 - g * s12, _VIF_EPS)
    ratio = g * g * s1 / (sv + _VIF_SIGMA_NSQ)
    ratio += 1.0
    # log(1 + t) (log1p is several times slower; the sums differ by ~1e-12
    # relative), only where a pixel counts: backgrounds are often most of an image.
    term = np.log(ratio, out=np.zeros_like(ratio), where=keep)
    num = num + _sum_hw(term) / _LN10
  with np.errstate(divide="ignore", invalid="ignore"):
    vif = np.asarray(num / ref.vif_den, dtype=np.float64)
  return np.where(np.isnan(vif), 1.0, vif)


def _qabf_source(src: _Features, f: _Features) -> np.ndarray:
  """Q_XF per pixel: G = min/max of the strengths, except gF where they are equal."""
  g_s, g_f = src.grad, f.grad
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.minimum(g_s, g_f) / np.maximum(g_s, g_f)
  ratio = np.where(g_s == g_f, g_f, ratio)
  angle = np.abs(src.angle - f.angle)
  q_g = np.float32(0.9994) / (1.0 + np.exp(np.float32(-15.0) * (ratio - np.float32(0.5))))
  # Aa = 1 - |aX - aF| / (pi/2); -22 (Aa - 0.8) = 22 |d| / (pi/2) - 4.4.
  q_a = np.float32(0.9879) / (
      1.0 + np.exp(angle * np.float32(22.0 / (math.pi / 2)) - np.float32(22.0 * 0.2)))
  return q_g * q_a


def _qabf(f: _Features, a: _Features, b: _Features) -> np.ndarray:
  # float32 per pixel as the reference, float64 sums (stable across stack shapes).
  num = _sum_hw(_qabf_source(a, f) * a.grad + _qabf_source(b, f) * b.grad)
  den = np.broadcast_to(_sum_hw(a.grad) + _sum_hw(b.grad), num.shape)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _gradient(x: np.ndarray, diff: np.ndarray, axis: int) -> np.ndarray:
  """numpy.gradient along `axis` (central inside, one-sided at the borders), from
  the forward differences `diff` already at hand."""
  diff = np.moveaxis(diff, axis, -1)
  out = np.empty(diff.shape[:-1] + (diff.shape[-1] + 1,))
  out[..., 1:-1] = (diff[..., 1:] + diff[..., :-1]) / 2.0
  out[..., 0] = diff[..., 0]
  out[..., -1] = diff[..., -1]
  return np.moveaxis(out, -1, axis)


def _evaluate_features(f: _Features, a: _Features, b: _Features) -> Dict[str, np.ndarray]:
  """All metrics for stacks that broadcast along the leading axis (K or 1)."""
  x = f.x
  k = max(x.shape[0], a.x.shape[0], b.x.shape[0])
  full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (k,)).copy()
  h, w = x.shape[-2:]
  dx = np.diff(x, axis=-1)
  dy = np.diff(x, axis=-2)
  sf = np.sqrt(_dot_hw(dx, dx) / (h * (w - 1)) + _dot_hw(dy, dy) / ((h - 1) * w))
  ag = _sum_hw(np.sqrt((_gradient(x, dx, -1) ** 2 + _gradient(x, dy, -2) ** 2) / 2.0)) / (h * w)
  da = a.x - x
  db = b.x - x
  mse = (_dot_hw(da, da) + _dot_hw(db, db)) / (2.0 * h * w)
  peak = np.max(x, axis=(-2, -1))
  with np.errstate(divide="ignore", invalid="ignore"):
    psnr = np.where(peak > 0, 10.0 * np.log10(peak * peak / mse), np.nan)
  out = {
      "EN": f.en,
      "SD": np.sqrt(f.ssq / f.size),
      "SF": sf,
      "AG": ag,
      "MI": _mutual_information(f, a) + _mutual_information(f, b),
      # F - B = -(B - F): corr(A, F - B) = -corr(A, db).
      "SCD": -_corr(a.centered, a.ssq, db) - _corr(b.centered, b.ssq, da),
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

