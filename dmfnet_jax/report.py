"""Every output format of an evaluation: CSV, Markdown and JSON tables, the HTML report
and per-pair montages.

`dmfnet_jax.evaluate` scores; this module only formats and writes what it computed.
Files go through `dmfnet_jax.runtime`'s atomic writes (montage PNGs through
`imageio.write_image_atomic`), so a crash never leaves a half-written table.

A montage shows the sources, then each method's fused image, captioned. The HTML
page embeds its tables and montages (as base64 data URIs), so it opens straight
from disk, with no server and nothing fetched from elsewhere.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import pathlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmfnet_jax import imageio, metrics, runtime

PathLike = Union[str, os.PathLike]

_CAPTION_HEIGHT = 18
_GAP = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


# --------------------------------------------------------------------------- tables


def format_value(value: float) -> str:
  """About four significant digits, three decimals below 1 (as docs/model.md §7 prints)."""
  if value is None or not math.isfinite(value):
    return "nan" if value is None or math.isnan(value) else ("inf" if value > 0 else "-inf")
  magnitude = abs(value)
  if magnitude < 1:
    return f"{value:.3f}"
  decimals = max(0, 3 - int(math.floor(math.log10(magnitude))))
  return f"{value:.{decimals}f}"


def comparison_table_rows(comparison: Mapping[str, Any]) -> Tuple[List[str], List[List[str]]]:
  """Header and cells of the "at least as good as the reference" table."""
  headers = ["task", "method"] + list(metrics.METRIC_NAMES) + ["total"]
  rows = []
  for task, by_method in comparison.items():
    for i, (method, entry) in enumerate(by_method.items()):
      marks = ["✓" if name in entry["at_least_as_good"] else "✗"
               for name in metrics.METRIC_NAMES]
      rows.append([task if i == 0 else "", method] + marks + [f"{entry['count']}/{entry['of']}"])
  return headers, rows


def task_table_rows(per_task, best, with_std: bool = True
                    ) -> Tuple[List[str], List[List[str]], List[Tuple[int, int]]]:
  """Header, cells and best (row, column) cells of the per-task table."""
  headers = ["task", "method (n)"] + list(metrics.METRIC_NAMES)
  rows, bold = [], []
  for task, by_method in per_task.items():
    for i, (method, entry) in enumerate(by_method.items()):
      label = f"{method} ({entry['n']}/{entry['n_pairs']})"
      cells = [task if i == 0 else "", label]
      for c, name in enumerate(metrics.METRIC_NAMES):
        text = format_value(entry["mean"][name])
        if with_std and entry["n"] > 1:
          text += " ± " + format_value(entry["std"][name])
        cells.append(text)
        if method in best[task][name]:
          bold.append((len(rows), c + 2))
      rows.append(cells)
  return headers, rows, bold


def per_image_table(rows: Sequence[Mapping[str, Any]]
                    ) -> Tuple[List[str], List[List[str]]]:
  """Header and formatted cells of the per-image table (every metric)."""
  headers = ["task", "id", "method"] + list(metrics.ALL_METRIC_NAMES)
  return headers, [[r["task"], r["id"], r["method"]]
                   + [format_value(r[n]) for n in metrics.ALL_METRIC_NAMES] for r in rows]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   bold: Sequence[Tuple[int, int]] = ()) -> str:
  bold = set(bold)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for r, row in enumerate(rows):
    cells = [f"**{v}**" if (r, c) in bold and v else str(v) for c, v in enumerate(row)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_summary(per_task: Mapping[str, Any], best: Mapping[str, Any],
                     comparison: Optional[Mapping[str, Any]] = None,
                     reference: str = "") -> str:
  """The per-task table (best per metric in bold), then the comparison table if any."""
  headers, cells, bold = task_table_rows(per_task, best)
  text = markdown_table(headers, cells, bold)
  if comparison:
    text += (f"\n\nAt least as good as {reference} (higher is better for every metric):\n\n"
             + markdown_table(*comparison_table_rows(comparison)))
  return text


def csv_text(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
  """A CSV document (csv module defaults: comma, minimal quoting, CRLF line ends)."""
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(headers)
  writer.writerows(rows)
  return buffer.getvalue()


def write_outputs(output_dir: pathlib.Path, result: Mapping[str, Any]) -> Dict[str, str]:
  """per_image.{csv,md}, per_task.{csv,md} and evaluation.json; returns their paths."""
  rows, per_task, best = result["per_image"], result["per_task"], result["best"]
  files = {}
  headers, cells = per_image_table(rows)
  runtime.write_text_atomic(output_dir / "per_image.csv", csv_text(
      headers, [[r["task"], r["id"], r["method"]]
                + [repr(float(r[n])) for n in metrics.ALL_METRIC_NAMES] for r in rows]))
  runtime.write_text_atomic(output_dir / "per_image.md", markdown_table(headers, cells) + "\n")
  files["per_image_csv"] = str(output_dir / "per_image.csv")
  files["per_image_md"] = str(output_dir / "per_image.md")
  task_headers = ["task", "method", "n", "n_pairs"]
  for name in metrics.ALL_METRIC_NAMES:
    task_headers += [f"{name}_mean", f"{name}_std"]
  task_headers.append("best_metrics")
  task_rows = []
  for task, by_method in per_task.items():
    for method, entry in by_method.items():
      row = [task, method, entry["n"], entry["n_pairs"]]
      for name in metrics.ALL_METRIC_NAMES:
        row += [repr(entry["mean"][name]), repr(entry["std"][name])]
      row.append(";".join(n for n in metrics.METRIC_NAMES if method in best[task][n]))
      task_rows.append(row)
  runtime.write_text_atomic(output_dir / "per_task.csv", csv_text(task_headers, task_rows))
  runtime.write_text_atomic(output_dir / "per_task.md", result["markdown"] + "\n")
  files["per_task_csv"] = str(output_dir / "per_task.csv")
  files["per_task_md"] = str(output_dir / "per_task.md")
  # Not write_json_atomic: its sorted keys would lose the table order of tasks and
  # methods, which readers of this file rely on.
  runtime.write_text_atomic(
      output_dir / "evaluation.json",
      json.dumps(runtime.json_safe(dict(result, files=files)), indent=1) + "\n")
  files["json"] = str(output_dir / "evaluation.json")
  return files


# --------------------------------------------------------------------------- montages


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint16:
    image = imageio.uint16_to_uint8(image)
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
  return runtime.write_text_atomic(path, "\n".join(parts))


def write_evaluation_report(output_dir: pathlib.Path, result: Mapping[str, Any],
                            montages: Sequence[Tuple[str, PathLike]]) -> pathlib.Path:
  """`output_dir/report.html` for an evaluate result: its tables, problems and montages."""
  headers, cells, bold = task_table_rows(result["per_task"], result["best"])
  sections = [("Per task (mean ± std; best per metric in bold)",
               html_table(headers, cells, bold))]
  if result.get("comparison"):
    sections.append((f"At least as good as {result['reference']}",
                     html_table(*comparison_table_rows(result["comparison"]))))
  if result["problems"]:
    sections.append(("Problems (left out of the means)", html_table(
        ["task", "id", "method", "kind", "message"],
        [[p["task"] or "", p["id"] or "", p["method"] or "", p["kind"], p["message"]]
         for p in result["problems"]])))
  image_headers, image_cells = per_image_table(result["per_image"])
  sections.append(("Per image", "<details><summary>show</summary>" +
                   html_table(image_headers, image_cells) + "</details>"))
  title = (f"Fusion metrics: {', '.join(result['tasks'])} ({result['split']}), "
           f"methods {', '.join(result['methods'])}")
  return write_html_report(pathlib.Path(output_dir) / "report.html", title, sections, montages)
