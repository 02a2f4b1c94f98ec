"""Classical fusion baselines: pixel-wise max and mean, Laplacian pyramid, wavelet.

Each fuses the two sources' luma in float (0..255) and, like the fuse job, writes
uint8 with the colour of a PET/SPECT source restored through
`imageio.colourise`. The "max" and "mean" rows of docs/model.md §7 are the
grayscale fused luma (`fuse_luma_baseline`), which is what the evaluate job scores;
the colourised image differs wherever the restored colour clips.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import pywt
from scipy import ndimage

from dmfnet_jax import imageio

LumaFuser = Callable[[np.ndarray, np.ndarray], np.ndarray]

# 5-tap binomial kernel of the Burt-Adelson pyramid (as cv2.pyrDown / pyrUp).
_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def source_luma(image: np.ndarray) -> np.ndarray:
  """Image as read -> float64 luma in 0..255 (exact integers for uint8 input).

  RGB uses the YCrCb Y that the fuse job feeds the network (`opencv_luma_uint8`).
  """
  image = np.asarray(image)
  if image.ndim == 3:
    return imageio.opencv_luma_uint8(imageio.uint16_to_uint8(image)).astype(np.float64)
  if image.dtype == np.uint16:
    return image.astype(np.float64) / 257.0
  return image.astype(np.float64)


def fuse_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.maximum(a, b)


def fuse_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a + b) / 2.0


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
  kernel = _BINOMIAL * gain
  y = ndimage.correlate1d(x, kernel, axis=-1, mode="mirror")
  return ndimage.correlate1d(y, kernel, axis=-2, mode="mirror")


def _pyr_down(x: np.ndarray) -> np.ndarray:
  return _blur(x)[..., ::2, ::2]


def _pyr_up(x: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
  up = np.zeros(x.shape[:-2] + tuple(shape))
  up[..., ::2, ::2] = x
  return _blur(up, gain=2.0)  # 2 per axis restores the energy of the zeros.


def laplacian_levels(shape: Tuple[int, int], max_levels: int = 4) -> int:
  """Pyramid depth: up to `max_levels`, keeping the coarsest side >= 8 px."""
  levels = 0
  side = min(shape)
  while levels < max_levels and side >= 16:
    side = (side + 1) // 2
    levels += 1
  return levels


def fuse_laplacian(a: np.ndarray, b: np.ndarray, max_levels: int = 4) -> np.ndarray:
  """Laplacian pyramid: max-abs detail coefficients, averaged base.

  Both sources go through the pyramid as one (2, H, W) stack.
  """
  current = np.stack([a, b])
  details = []
  for _ in range(laplacian_levels(a.shape, max_levels)):
    down = _pyr_down(current)
    details.append(current - _pyr_up(down, current.shape[-2:]))
    current = down
  fused = current.mean(axis=0)
  for detail in reversed(details):
    pick = np.where(np.abs(detail[0]) >= np.abs(detail[1]), detail[0], detail[1])
    fused = _pyr_up(fused, detail.shape[-2:]) + pick
  return fused


def fuse_wavelet(a: np.ndarray, b: np.ndarray, wavelet: str = "db2",
                 max_level: int = 3) -> np.ndarray:
  """DWT fusion: averaged approximation, max-abs detail coefficients."""
  level = max(1, min(max_level, pywt.dwt_max_level(min(a.shape), wavelet)))
  coeffs = pywt.wavedec2(np.stack([a, b]), wavelet, level=level, mode="symmetric",
                         axes=(-2, -1))
  fused = [coeffs[0].mean(axis=0)]
  for details in coeffs[1:]:
    fused.append(tuple(np.where(np.abs(d[0]) >= np.abs(d[1]), d[0], d[1]) for d in details))
  out = pywt.waverec2(fused, wavelet, mode="symmetric", axes=(-2, -1))
  return out[: a.shape[0], : a.shape[1]]


BASELINES: Dict[str, LumaFuser] = {
    "max": fuse_max,
    "mean": fuse_mean,
    "laplacian": fuse_laplacian,
    "wavelet": fuse_wavelet,
}


def get_baseline(name: str) -> LumaFuser:
  try:
    return BASELINES[name]
  except KeyError:
    raise KeyError(f"unknown baseline '{name}'; choose one of {', '.join(BASELINES)}") from None


def fuse_luma_baseline(name: str, mri_img: np.ndarray, other_img: np.ndarray) -> np.ndarray:
  """Fused luma as uint8 HxW (clipped, rounded half to even like numpy)."""
  a, b = source_luma(mri_img), source_luma(other_img)
  if a.shape != b.shape:
    raise ValueError(f"sources differ in size: {a.shape} vs {b.shape}")
  fused = get_baseline(name)(a, b)
  return np.clip(np.round(fused), 0, 255).astype(np.uint8)

