"""Montages and the self-contained HTML report."""

import base64
import re

import numpy as np
from PIL import Image

from dmfnet_jax import evaluate, report


def test_montage_layout():
  gray = np.zeros((32, 40), np.uint8)
  rgb = np.full((32, 40, 3), 200, np.uint8)
  montage = report.make_montage([gray, rgb, gray], ["MRI", "PET", "a very long method name"])
  assert montage.dtype == np.uint8 and montage.ndim == 3
  assert montage.shape[1] == 3 * 40 + 2 * 4 and montage.shape[0] > 32
  assert (montage[:15] < 128).any()  # captions drawn above the tiles


def test_html_is_self_contained(tmp_path):
  png = tmp_path / "m.png"
  report.write_montage(png, [np.zeros((16, 16), np.uint8)], ["x"])
  table = report.html_table(["task", "EN"], [["MRI-CT", "4.658"]], bold=[(0, 1)])
  page = report.write_html_report(tmp_path / "r.html", "Title <&>", [("Tables", table)],
                                  [("pair 1", png)]).read_text()
  assert "<b>4.658</b>" in page and "Title &lt;&amp;&gt;" in page
  uris = re.findall(r'src="(data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)"', page)
  assert len(uris) == 1 and base64.b64decode(uris[0].split(",", 1)[1])
  assert not re.search(r'(?:src|href)="(?!data:)', page)
  assert "http://" not in page and "https://" not in page and "<link" not in page


def test_evaluate_writes_montages_and_report(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "data"
  for pair_id in ("a", "b"):
    for modality in ("MRI", "PET"):
      shape = (48, 48) if modality == "MRI" else (48, 48, 3)
      path = root / "MRI-PET/test" / modality / f"{pair_id}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path)
  methods = evaluate.parse_methods({"max": "baseline:max", "wavelet": "baseline:wavelet"})
  out = tmp_path / "out"
  result = evaluate.evaluate(root, ["MRI-PET"], "test", methods, num_workers=2,
                             montage_dir=out / "montages")
  montage = np.asarray(Image.open(out / "montages/MRI-PET/a.png"))
  assert montage.shape[1] == 4 * 48 + 3 * 4  # MRI, PET, max, wavelet
  page = report.write_evaluation_report(out, result,
                                        [("MRI-PET a", out / "montages/MRI-PET/a.png")])
  html = page.read_text()
  assert "Per task" in html and "max (2/2)" in html and "wavelet (2/2)" in html
  assert html.count("data:image/") == 1 and "https://" not in html
