"""Visual report of an evaluation: per-pair montages and one self-contained HTML page.

A montage shows the sources, then each method's fused image, captioned. The HTML
page embeds its tables and montages (as base64 data URIs), so it opens straight
from disk, with no server and nothing fetched from elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import os
import pathlib
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmfnet_jax import imageio

PathLike = Union[str, os.PathLike]

_CAPTION_HEIGHT = 18
_GAP = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint16:
    image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
  elif image.dtype != np.uint8:
    image = np.clip(np.round(image.astype(np.float32)), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image


def make_montage(images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
  """Tiles images left to right, each with its caption above; uint8 HxWx3.

  Tiles are scaled to the first image's height (they normally share one size).
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  if not images:
    raise ValueError("a montage needs at least one image")
  tiles = [Image.fromarray(_to_rgb_uint8(im)) for im in images]
  height = tiles[0].height
  tiles = [t if t.height == height else
           t.resize((max(1, round(t.width * height / t.height)), height), Image.BILINEAR)
           for t in tiles]
  width = sum(t.width for t in tiles) + _GAP * (len(tiles) - 1)
  canvas = Image.new("RGB", (width, height + _CAPTION_HEIGHT), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  x = 0
  for tile, caption in zip(tiles, captions):
    canvas.paste(tile, (x, _CAPTION_HEIGHT))
    text = _fit_text(draw, font, str(caption), tile.width - 4)
    draw.text((x + 2, 3), text, fill=_TEXT, font=font)
    x += tile.width + _GAP
  return np.asarray(canvas)


def _fit_text(draw, font, text: str, width: int) -> str:
  """Shortens a caption with an ellipsis until it fits the tile."""
  if draw.textlength(text, font=font) <= width:
    return text
  while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def write_montage(path: PathLike, images: Sequence[np.ndarray],
                  captions: Sequence[str]) -> pathlib.Path:
  return imageio.write_image_atomic(path, make_montage(images, captions))


# --------------------------------------------------------------------------- HTML


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
               bold: Optional[Iterable[Tuple[int, int]]] = None) -> str:
  """A plain HTML table; `bold` holds (row, column) cells to emphasise."""
  bold = set(bold or ())
  out = ["<table>", "<thead><tr>"]
  out += [f"<th>{html.escape(str(h))}</th>" for h in headers]
  out.append("</tr></thead><tbody>")
  for r, row in enumerate(rows):
    cells = []
    for c, value in enumerate(row):
      text = html.escape(str(value))
      cells.append(f"<td><b>{text}</b></td>" if (r, c) in bold else f"<td>{text}</td>")
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</tbody></table>")
  return "\n".join(out)


def image_data_uri(path: PathLike, fmt: str = "jpeg", quality: int = 90) -> str:
  """An image file as a data URI; JPEG (default) keeps a page of many montages small."""
  path = pathlib.Path(path)
  if fmt == "png" and path.suffix.lower() == ".png":
    data, mime = path.read_bytes(), "image/png"
  else:
    with Image.open(path) as im:
      buffer = io.BytesIO()
      if fmt == "png":
        im.save(buffer, format="PNG")
        mime = "image/png"
      else:
        im.convert("RGB").save(buffer, format="JPEG", quality=quality)
        mime = "image/jpeg"
      data = buffer.getvalue()
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #111; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
thead th { background: #eee; }
figure { margin: 0.5em 0 1em 0; }
figcaption { font-size: 0.9em; color: #333; }
img { max-width: 100%; image-rendering: pixelated; }
"""


def write_html_report(path: PathLike, title: str,
                      sections: Sequence[Tuple[str, str]],
                      montages: Sequence[Tuple[str, PathLike]] = (),
                      image_format: str = "jpeg") -> pathlib.Path:
  """Writes one self-contained HTML page.

  sections: (heading, HTML body) pairs, e.g. from `html_table`; montages:
  (caption, image file) pairs, embedded as data URIs.
  """
  parts: List[str] = [
      "<!DOCTYPE html>",
      '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{html.escape(title)}</title>",
      f"<style>{_STYLE}</style></head><body>",
      f"<h1>{html.escape(title)}</h1>",
  ]
  for heading, body in sections:
    parts.append(f"<h2>{html.escape(heading)}</h2>")
    parts.append(body)
  if montages:
    parts.append("<h2>Montages</h2>")
    for caption, image_path in montages:
      uri = image_data_uri(image_path, fmt=image_format)
      parts.append(f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>")
  parts.append("</body></html>")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text("\n".join(parts), encoding="utf-8")
  os.replace(tmp, path)
  return path
