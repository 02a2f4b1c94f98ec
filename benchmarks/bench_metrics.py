"""Time the evaluate job's scoring of the Harvard test split for four baselines.

    python benchmarks/bench_metrics.py [--workers N] [--repeats R]

Prints JSON: wall and CPU seconds for reading the 121 test pairs, fusing them with
the max, mean, laplacian and wavelet baselines and computing all metrics (best of
R repeats), per pair-method milliseconds and the pair count. Data is found via
dmfnet_jax.paths (set DMFNET_SHARED to the shared folder).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from dmfnet_jax import config_defaults, evaluate, paths  # noqa: E402

METHODS = {name: f"baseline:{name}" for name in ("max", "mean", "laplacian", "wavelet")}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=0, help="threads (0 = all CPU cores)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  root = paths.harvard_root_or_exit()
  methods = evaluate.parse_methods(METHODS)
  best = None
  for _ in range(max(1, args.repeats)):
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate.evaluate(root, config_defaults.TASKS, "test", methods, num_workers=args.workers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if best is None or wall < best[0]:
      best = (wall, cpu, result)
  wall, cpu, result = best
  pairs = sum(result["num_pairs"].values())
  scores = len(result["per_image"])
  print(json.dumps({
      "what": "read + fuse (4 baselines) + all metrics, Harvard test split",
      "pairs": pairs,
      "methods": list(METHODS),
      "pair_method_scores": scores,
      "seconds": round(wall, 3),
      "cpu_seconds": round(cpu, 3),
      "ms_per_pair_method": round(1000 * wall / max(scores, 1), 2),
      "cpu_ms_per_pair_method": round(1000 * cpu / max(scores, 1), 2),
      "workers": args.workers or os.cpu_count(),
      "repeats": args.repeats,
      "problems": len(result["problems"]),
  }, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
