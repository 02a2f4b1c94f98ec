"""The fuse-path benchmark scripts run and print what their docstrings promise (small
sizes here: the figures themselves are taken by hand, see docs/performance.md)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CASES = {
    "bench_volume.py": (["--size", "64", "--slices", "6", "--empty", "1"],
                        {"fused_slices": 4, "skipped_empty_slices": 2}),
    # A budget below the 256 px estimate forces the tiled path.
    "bench_large.py": (["--size", "256", "--budget-gb", "0.4"], {"size": 256}),
    # Two CPU devices, as the fuse job makes of two cores, a pair each.
    "bench_fuse.py": (["--presets", "tiny", "--batches", "2", "--size", "64", "--repeats", "1",
                       "--no-torch", "--cpu-devices", "2"], {"benchmark": "fuse", "devices": 2}),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_prints_its_json(script, tmp_path):
  args, expected = CASES[script]
  env = dict(os.environ, TMPDIR=str(tmp_path))
  result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  for key, value in expected.items():
    assert report[key] == value, report
  if script == "bench_fuse.py":
    assert [row["batch"] for row in report["results"]] == [2]
    for row in report["results"]:
      assert row["devices"] == 2 and row["unet_inputs_at_once"] == 1, row
      assert row["compute_pairs_per_s"] > 0 and row["gflop_per_pair"] > 0, row
  if script == "bench_large.py":
    assert report["plan"] != "whole image" and report["plan"]["tiles"] > 1, report
    assert report["peak_rss_gib"] > 0 and report["output_shape"] == [256, 256, 3]
