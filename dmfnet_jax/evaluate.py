"""The evaluate job: reference metrics of fused images, per image and per task.

`python -m dmfnet_jax.main --config=configs/evaluate.py --workdir=DIR` (see that
file for the settings). For every source pair of the chosen tasks and split, each
method's fused image is found (or computed, for a baseline), reduced to the
evaluator's grayscale and scored with `dmfnet_jax.metrics`; the sources are
filtered once per pair for all methods, and pairs run on a thread pool.

Bad input never stops the job: a fused image that is missing, unreadable or of
another size than its sources is logged, listed under "problems" in
evaluation.json and left out of that method's mean (the per-method count of
evaluated pairs says how many remain); an unreadable source pair drops out for
every method. NaN metric values (see `dmfnet_jax.metrics`) are left out of means.

This module scores; `dmfnet_jax.report` formats and writes the tables (CSV, Markdown,
JSON), the HTML report and the montages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from dmfnet_jax import baselines, imageio, metrics, report, runtime
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.errors import ConfigError, DataError, ImageReadError

BASELINE_PREFIX = "baseline:"


@dataclasses.dataclass(frozen=True)
class Method:
  """One column of the comparison: a folder of fused images or a baseline."""

  name: str
  folder: Optional[pathlib.Path] = None
  baseline: Optional[str] = None
  colour: bool = False  # baselines: score the colourised image instead of the luma

  @property
  def source(self) -> str:
    if self.baseline:
      return BASELINE_PREFIX + self.baseline + (":colour" if self.colour else "")
    return str(self.folder)


# --------------------------------------------------------------------------- config


def parse_method(name: str, value: str) -> Method:
  """'baseline:<name>[:colour]' or a folder path -> Method (ConfigError if invalid)."""
  value = str(value).strip()
  key = f"config.evaluate.methods.{name}"
  if not name:
    raise ConfigError(f"{key}: method names must not be empty")
  if value.startswith(BASELINE_PREFIX):
    parts = value[len(BASELINE_PREFIX):].split(":")
    base, options = parts[0], parts[1:]
    if base not in baselines.BASELINES:
      raise ConfigError(f"{key}={value!r}: unknown baseline '{base}'; valid: "
                        f"{', '.join(BASELINE_PREFIX + b for b in baselines.BASELINES)}")
    if options not in ([], ["colour"], ["color"]):
      raise ConfigError(f"{key}={value!r}: the only baseline option is ':colour'")
    return Method(name, baseline=base, colour=bool(options))
  if not value:
    raise ConfigError(f"{key}: empty; give a folder of fused images or 'baseline:<name>'")
  folder = pathlib.Path(value).expanduser()
  if not folder.is_dir():
    raise ConfigError(f"{key}={value!r}: no such folder of fused images")
  return Method(name, folder=folder)


def parse_methods(methods: Mapping[str, str], extra: str = "") -> List[Method]:
  """The configured methods in order, then `extra` ('name=value,...') ones."""
  merged: Dict[str, str] = {str(k): str(v) for k, v in dict(methods or {}).items()}
  for item in filter(None, (s.strip() for s in str(extra or "").split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
      raise ConfigError(f"config.evaluate.extra_methods: '{item}' is not name=value")
    merged[name.strip()] = value.strip()
  if not merged:
    raise ConfigError("config.evaluate.methods: name at least one method")
  return [parse_method(name, value) for name, value in merged.items()]


def find_fused(folder: pathlib.Path, pair: pairs_lib.ImagePair) -> Optional[pathlib.Path]:
  """<folder>/<task>/<id>.<ext>, else <folder>/<id>.<ext> (any image extension)."""
  for base in (folder / pair.task, folder):
    for ext in imageio.IMAGE_EXTENSIONS:
      for candidate in (base / f"{pair.pair_id}{ext}", base / f"{pair.pair_id}{ext.upper()}"):
        if candidate.is_file():
          return candidate
  return None


# --------------------------------------------------------------------------- per pair


def _problem(pair, method: Optional[str], kind: str, message: str, path=None) -> Dict[str, Any]:
  return {"task": pair.task, "id": pair.pair_id, "method": method, "kind": kind,
          "path": None if path is None else str(path), "message": message}


def evaluate_pair_methods(pair: pairs_lib.ImagePair, methods: Sequence[Method],
                          montage_path: Optional[pathlib.Path] = None
                          ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
  """Scores every method on one pair -> (per-image rows, problems)."""
  problems: List[Dict[str, Any]] = []
  try:
    a = imageio.read_image(pair.path_a)
    b = imageio.read_image(pair.path_b)
  except ImageReadError as err:
    return [], [_problem(pair, None, "source_unreadable", str(err))]
  if a.shape[:2] != b.shape[:2]:
    return [], [_problem(pair, None, "source_size_mismatch",
                         f"sources differ in size: {pair.path_a} {a.shape[:2]} vs "
                         f"{pair.path_b} {b.shape[:2]}")]
  to_score: Dict[str, np.ndarray] = {}
  shown: Dict[str, np.ndarray] = {}
  for method in methods:
    if method.baseline:
      luma = baselines.fuse_luma_baseline(method.baseline, a, b)
      coloured = imageio.colourise(luma, b if b.ndim == 3 else None)
      to_score[method.name] = coloured if method.colour else luma
      shown[method.name] = coloured
      continue
    path = find_fused(method.folder, pair)
    if path is None:
      problems.append(_problem(pair, method.name, "missing",
                               f"no fused image {pair.task}/{pair.pair_id}.* or "
                               f"{pair.pair_id}.* in {method.folder}"))
      continue
    try:
      fused = imageio.read_image(path)
    except ImageReadError as err:
      problems.append(_problem(pair, method.name, "unreadable", str(err), path))
      continue
    if fused.shape[:2] != a.shape[:2]:
      problems.append(_problem(pair, method.name, "size_mismatch",
                               f"{path}: size {fused.shape[:2]} differs from the sources' "
                               f"{a.shape[:2]}", path))
      continue
    to_score[method.name] = fused
    shown[method.name] = fused
  rows = []
  if to_score:
    try:
      scores = metrics.evaluate_methods(to_score, a, b)
    except ValueError as err:  # e.g. images below the SSIM window
      problems.append(_problem(pair, None, "error", f"cannot score this pair: {err}"))
      scores = {}
    for method in methods:
      if method.name in scores:
        rows.append({"task": pair.task, "id": pair.pair_id, "method": method.name,
                     **scores[method.name]})
  if montage_path is not None:
    names = [m.name for m in methods if m.name in shown]
    report.write_montage(montage_path, [a, b] + [shown[n] for n in names],
                         ["MRI", pair.modality_b or "B"] + names)
  return rows, problems


# --------------------------------------------------------------------------- summaries


def summarise(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str],
              methods: Sequence[Method], expected: Mapping[str, int]) -> Dict[str, Any]:
  """Per task and method: n evaluated, mean/std per metric (NaN values left out)."""
  per_task: Dict[str, Any] = {}
  for task in tasks:
    per_task[task] = {}
    for method in methods:
      chosen = [r for r in rows if r["task"] == task and r["method"] == method.name]
      entry: Dict[str, Any] = {"n": len(chosen), "n_pairs": expected.get(task, 0),
                               "mean": {}, "std": {}, "nan_count": {}}
      for name in metrics.ALL_METRIC_NAMES:
        values = np.array([r[name] for r in chosen], dtype=np.float64)
        finite = values[~np.isnan(values)]
        entry["nan_count"][name] = int(values.size - finite.size)
        entry["mean"][name] = float(finite.mean()) if finite.size else float("nan")
        entry["std"][name] = float(finite.std(ddof=1)) if finite.size > 1 else (
            0.0 if finite.size else float("nan"))
      per_task[task][method.name] = entry
  return per_task


def best_methods(per_task: Mapping[str, Any]) -> Dict[str, Dict[str, List[str]]]:
  """task -> metric -> names with the highest mean (all table metrics: higher is better)."""
  best: Dict[str, Dict[str, List[str]]] = {}
  for task, by_method in per_task.items():
    best[task] = {}
    for name in metrics.METRIC_NAMES:
      means = {m: e["mean"][name] for m, e in by_method.items()
               if e["n"] and math.isfinite(e["mean"][name])}
      top = max(means.values()) if means else None
      best[task][name] = [m for m, v in means.items() if v == top]
  return best


def compare_to(per_task: Mapping[str, Any], reference: str) -> Dict[str, Dict[str, Any]]:
  """task -> method -> metrics on which its mean is at least the reference's.

  The field's way to read a table (every metric of `metrics.METRIC_NAMES` is
  higher-is-better): "at least as good as DM-FNet on k of 11 metrics". Tasks without
  the reference are left out.
  """
  result: Dict[str, Dict[str, Any]] = {}
  for task, by_method in per_task.items():
    ref = by_method.get(reference)
    if ref is None or not ref["n"]:
      continue
    result[task] = {}
    for method, entry in by_method.items():
      if method == reference or not entry["n"]:
        continue
      wins = [name for name in metrics.METRIC_NAMES
              if math.isfinite(entry["mean"][name]) and math.isfinite(ref["mean"][name])
              and entry["mean"][name] >= ref["mean"][name]]
      result[task][method] = {"at_least_as_good": wins, "count": len(wins),
                              "of": len(metrics.METRIC_NAMES)}
  return result


# --------------------------------------------------------------------------- job


def evaluate(root, tasks: Sequence[str], split: str, methods: Sequence[Method],
             num_workers: int = 0, montage_dir: Optional[pathlib.Path] = None,
             reference: str = "") -> Dict[str, Any]:
  """Scores `methods` on the split; returns the result dict (nothing written).

  With `reference` (a method name), also counts per task and method the metrics
  on which it is at least as good as the reference."""
  start = time.perf_counter()
  scan = pairs_lib.find_split_pairs(root, tasks, split)
  pairs, scan_problems = list(scan.pairs), list(scan.problems)
  problems: List[Dict[str, Any]] = [
      {"task": None, "id": None, "method": None, "kind": "unpaired_source", "path": None,
       "message": m} for m in scan_problems]
  workers = num_workers if num_workers and num_workers > 0 else (os.cpu_count() or 1)

  def job(pair):
    montage = None if montage_dir is None else montage_dir / pair.task / f"{pair.pair_id}.png"
    return evaluate_pair_methods(pair, methods, montage)

  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    outcomes = list(pool.map(job, pairs))
  rows = [row for pair_rows, _ in outcomes for row in pair_rows]
  for _, pair_problems in outcomes:
    problems.extend(pair_problems)
  for p in problems:
    logging.warning("evaluate: %s%s", f"[{p['method']}] " if p["method"] else "", p["message"])
  expected = {task: sum(p.task == task for p in pairs) for task in tasks}
  per_task = summarise(rows, tasks, methods, expected)
  best = best_methods(per_task)
  counts = {m.name: {t: per_task[t][m.name]["n"] for t in tasks} for m in methods}
  comparison = compare_to(per_task, reference) if reference else {}
  return {
      "split": split,
      "data_root": str(root),
      "tasks": list(tasks),
      "methods": {m.name: m.source for m in methods},
      "metrics": list(metrics.ALL_METRIC_NAMES),
      "higher_is_better": dict(metrics.HIGHER_IS_BETTER),
      "num_pairs": expected,
      "counts": counts,
      "per_task": per_task,
      "best": best,
      "per_image": rows,
      "problems": problems,
      "reference": reference or None,
      "comparison": comparison,
      "markdown": report.markdown_summary(per_task, best, comparison, reference),
      "seconds": round(time.perf_counter() - start, 3),
  }


def run(config, workdir) -> Dict[str, Any]:
  """The `evaluate` job (see configs/evaluate.py)."""
  eval_cfg = config.evaluate
  methods = parse_methods(eval_cfg.methods, eval_cfg.get("extra_methods", ""))
  reference = str(eval_cfg.get("compare_to", "") or "")
  if reference and reference not in [m.name for m in methods]:
    raise ConfigError(f"config.evaluate.compare_to='{reference}': not one of the methods "
                      f"({', '.join(m.name for m in methods)})")
  root = str(config.data.root or "")
  if not root:
    raise ConfigError("config.data.root: empty; set it to a dataset folder")
  tasks = list(config.data.tasks)
  split = str(config.data.split or "test")
  output_dir = pathlib.Path(eval_cfg.get("output_dir") or pathlib.Path(workdir) / "evaluation")
  sources = pairs_lib.find_split_pairs(root, tasks, split).pairs
  runtime.refuse_writing_inputs(
      [p for pair in sources for p in (pair.path_a, pair.path_b)],
      output_dirs=[output_dir, *(output_dir / "montages" / task for task in tasks)],
      input_folders=[f for m in methods if m.folder
                     for f in (m.folder, *(m.folder / task for task in tasks))])
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise DataError(f"config.evaluate.output_dir={output_dir}: cannot create ({err})") from err
  montage_dir = output_dir / "montages" if eval_cfg.get("report", False) else None
  logging.info("Evaluating %s on %s (%s, split %s) -> %s", ", ".join(m.name for m in methods),
               root, ", ".join(tasks), split, output_dir)
  result = evaluate(root, tasks, split, methods, int(eval_cfg.get("num_workers", 0) or 0),
                    montage_dir, reference=reference)
  if montage_dir is not None:
    limit = int(eval_cfg.get("report_max_pairs", 0) or 0)
    seen = list(dict.fromkeys((row["task"], row["id"]) for row in result["per_image"]))
    if limit > 0:
      seen = seen[:limit]
    montages = [(f"{task} {pair_id}", montage_dir / task / f"{pair_id}.png")
                for task, pair_id in seen
                if (montage_dir / task / f"{pair_id}.png").is_file()]
    result["report"] = str(report.write_evaluation_report(output_dir, result, montages))
  result["files"] = report.write_outputs(output_dir, result)
  n_total = sum(sum(c.values()) for c in result["counts"].values())
  print(result["markdown"])
  print(f"\n{n_total} pair-method scores in {result['seconds']:.1f} s; "
        f"{len(result['problems'])} problem(s); outputs in {output_dir}")
  result["skipped"] = len(result["problems"])  # exit status 3 when some were skipped
  return result
