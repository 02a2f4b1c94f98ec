"""Reading, writing and colour handling of medical images (docs/model.md §6).

The reference uses OpenCV on uint8 images: RGB becomes luma with the fixed-point
BT.601 rule of `cv2.COLOR_BGR2YCrCb` / `COLOR_BGR2GRAY`, and a fused luma goes back
into the source's YCrCb before `COLOR_YCrCb2BGR`. The integer arithmetic below is
OpenCV's own, so colour outputs match it bit for bit without depending on OpenCV.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from dmfnet_jax import runtime
from dmfnet_jax.config_defaults import IMAGE_EXTENSIONS
from dmfnet_jax.errors import DmfnetError, ImageReadError

PathLike = Union[str, os.PathLike]

# OpenCV's fixed-point (14-bit) coefficients for full-range BT.601.
_SHIFT = 14
_HALF = 1 << (_SHIFT - 1)
_Y_R, _Y_G, _Y_B = 4899, 9617, 1868
_CR, _CB = 11682, 9241
_R_CR, _G_CR, _G_CB, _B_CB = 22987, -11698, -5636, 29049
# COLOR_RGB2GRAY uses its own 15-bit table.
_GRAY_SHIFT = 15
_GRAY_R, _GRAY_G, _GRAY_B = 9798, 19235, 3735


def is_image_file(path: PathLike) -> bool:
  return pathlib.Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: PathLike) -> np.ndarray:
  """Reads an image as uint8, uint16 or (floating-point TIFF) float32; HxW (grayscale)
  or HxWx3 (RGB).

  Alpha is dropped and palette images are expanded. Anything that is not a
  readable 2-D image raises `ImageReadError` naming the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ImageReadError(f"{path}: no such image file")
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(im, dtype=np.uint16)
      elif mode == "F":  # 32-bit float (research pipelines' TIFFs): see to_unit_range
        array = np.asarray(im, dtype=np.float32)
      elif mode == "I":
        array = np.asarray(im)
        if array.min() < 0 or array.max() > 65535:
          raise ImageReadError(
              f"{path}: pixel values {array.min()}..{array.max()} do not fit 16 bits"
          )
        array = array.astype(np.uint16)
      elif mode in ("L", "1"):
        array = np.asarray(im.convert("L"), dtype=np.uint8)
      elif mode in ("LA",):
        array = np.asarray(im.convert("L"), dtype=np.uint8)
      else:  # RGB, RGBA, P, CMYK, YCbCr, ...
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
    raise ImageReadError(f"{path}: cannot decode image ({err})") from err
  if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
    raise ImageReadError(f"{path}: not a 2-D image (shape {array.shape})")
  return np.ascontiguousarray(array)


def opencv_luma_uint8(rgb: np.ndarray) -> np.ndarray:
  """Y of `cv2.COLOR_RGB2YCrCb` on uint8 (14-bit fixed point)."""
  rgb = _check_uint8_rgb(rgb)
  r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
  y = (r * _Y_R + g * _Y_G + b * _Y_B + _HALF) >> _SHIFT
  return np.clip(y, 0, 255).astype(np.uint8)


def opencv_gray_uint8(rgb: np.ndarray) -> np.ndarray:
  """`cv2.COLOR_RGB2GRAY` on uint8 (15-bit fixed point; differs from the YCrCb luma by
  at most one grey level). The reference evaluator reads RGB files this way."""
  rgb = _check_uint8_rgb(rgb)
  r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
  y = (r * _GRAY_R + g * _GRAY_G + b * _GRAY_B + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
  return np.clip(y, 0, 255).astype(np.uint8)


def _check_uint8_rgb(rgb: np.ndarray) -> np.ndarray:
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"expected a uint8 HxWx3 RGB image, got {rgb.dtype} {rgb.shape}")
  return rgb


def rgb_to_ycrcb(rgb: np.ndarray) -> np.ndarray:
  """uint8 RGB -> uint8 YCrCb exactly as OpenCV's COLOR_RGB2YCrCb."""
  rgb = np.asarray(rgb)
  r, b = rgb[..., 0].astype(np.int32), rgb[..., 2].astype(np.int32)
  y = opencv_luma_uint8(rgb).astype(np.int32)
  delta = 128 << _SHIFT
  cr = ((r - y) * _CR + delta + _HALF) >> _SHIFT
  cb = ((b - y) * _CB + delta + _HALF) >> _SHIFT
  return np.clip(np.stack([y, cr, cb], axis=-1), 0, 255).astype(np.uint8)


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
  """uint8 YCrCb -> uint8 RGB exactly as OpenCV's COLOR_YCrCb2RGB."""
  ycrcb = np.asarray(ycrcb).astype(np.int32)
  y, cr, cb = ycrcb[..., 0], ycrcb[..., 1] - 128, ycrcb[..., 2] - 128
  r = y + ((cr * _R_CR + _HALF) >> _SHIFT)
  g = y + ((cb * _G_CB + cr * _G_CR + _HALF) >> _SHIFT)
  b = y + ((cb * _B_CB + _HALF) >> _SHIFT)
  return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def uint16_to_uint8(image: np.ndarray) -> np.ndarray:
  """16-bit pixels scaled to 8 bits (rounded); 8-bit images are returned as they are."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if image.dtype != np.uint16:
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
  return (image.astype(np.float32) / 65535.0 * 255.0).round().astype(np.uint8)


def to_unit_range(image: np.ndarray, what: str = "image") -> np.ndarray:
  """Pixels -> float32 in [0, 1], the same shape; the one intensity mapping of inputs.

  uint8 is divided by 255 and uint16 by 65535. Other integers are read as 8-bit when
  they lie in 0..255, as 16-bit in 0..65535, else mapped from their minimum and maximum.
  Floats are taken as they are when they lie in [0, 1], else mapped linearly from their
  own minimum and maximum to [0, 1] (a constant image becomes 0). NaN or infinite pixels
  raise `ImageReadError` naming `what`."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if image.dtype == np.uint16:
    return image.astype(np.float32) / 65535.0
  if image.dtype.kind in "iu":
    low, high = int(image.min()), int(image.max())
    if low >= 0 and high <= 255:
      return image.astype(np.float32) / 255.0
    if low >= 0 and high <= 65535:
      return image.astype(np.float32) / 65535.0
  elif image.dtype.kind == "f":
    finite = np.isfinite(image)
    if not finite.all():
      raise ImageReadError(f"{what}: {image.size - int(finite.sum())} of {image.size} pixels "
                           "are NaN or infinite")
    low, high = float(image.min()), float(image.max())
    if low >= 0.0 and high <= 1.0:
      return image.astype(np.float32)
  else:
    raise ImageReadError(f"{what}: pixels of type {image.dtype} are not supported")
  span = high - low
  if span <= 0:
    return np.zeros(image.shape, np.float32)
  return ((image.astype(np.float64) - low) / span).astype(np.float32)


def to_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
  """Pixels of any supported type as uint8 (16-bit scaled, others by `to_unit_range`)."""
  image = np.asarray(image)
  if image.dtype in (np.uint8, np.uint16):
    return uint16_to_uint8(image)
  return np.clip(np.round(to_unit_range(image, what) * 255.0), 0, 255).astype(np.uint8)


def to_unit_gray(image: np.ndarray, what: str = "image") -> np.ndarray:
  """Any image from `read_image` -> float32 HxW in [0, 1] (RGB reduced to luma)."""
  if image.ndim == 3:
    return opencv_luma_uint8(to_uint8(image, what)).astype(np.float32) / 255.0
  return to_unit_range(image, what)


def to_model_range(image: np.ndarray, what: str = "image") -> np.ndarray:
  """Any image from `read_image` -> float32 HxW in [-1, 1], the networks' range."""
  return to_unit_gray(image, what) * 2.0 - 1.0


def from_model_range(x: np.ndarray) -> np.ndarray:
  """Network output in [-1, 1] -> uint8 (mapped to [0, 255], rounded)."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def colourise(fused_luma: np.ndarray, colour_source: Optional[np.ndarray]) -> np.ndarray:
  """Puts a fused uint8 luma back into the colour source's YCrCb (docs/model.md §6).

  A grayscale (or absent) colour source returns the luma unchanged.
  """
  fused_luma = np.asarray(fused_luma)
  if colour_source is None or colour_source.ndim == 2:
    return fused_luma
  colour_source = to_uint8(colour_source, "colour source")
  if colour_source.shape[:2] != fused_luma.shape[:2]:
    raise ValueError(
        f"fused image {fused_luma.shape[:2]} and colour source {colour_source.shape[:2]} differ in size"
    )
  ycrcb = rgb_to_ycrcb(colour_source)
  ycrcb[..., 0] = fused_luma
  return ycrcb_to_rgb(ycrcb)


def metric_gray(image: np.ndarray) -> np.ndarray:
  """Image -> float32 grayscale in 0..255 as the reference evaluator reads it."""
  if image.ndim == 3:
    image = opencv_gray_uint8(uint16_to_uint8(image))
  elif image.dtype == np.uint16:
    return image.astype(np.float32) / 257.0
  return image.astype(np.float32)


def encode_image(image: np.ndarray, suffix: str) -> bytes:
  """uint8 HxW or HxWx3 -> the bytes of an image file of the format `suffix` names."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {image.dtype}")
  fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
         ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix.lower() or ".png")
  if fmt is None:
    raise DmfnetError(f"unsupported output format '{suffix}'")
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def write_image_atomic(path: PathLike, image: np.ndarray) -> pathlib.Path:
  """Writes uint8 HxW or HxWx3 to `path` atomically (`runtime.write_bytes_atomic`).

  A crash mid-write never leaves a truncated image under the final name.
  """
  suffix = pathlib.PurePath(os.fspath(path)).suffix
  try:
    data = encode_image(image, suffix)
  except DmfnetError as err:
    raise DmfnetError(f"{path}: {err}") from err
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from err
  return runtime.write_bytes_atomic(path, data)


def image_size(path: PathLike) -> Tuple[int, int]:
  """(height, width) from the header only."""
  try:
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except (UnidentifiedImageError, OSError) as err:
    raise ImageReadError(f"{path}: cannot decode image ({err})") from err
