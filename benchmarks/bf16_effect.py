"""What `fuse.compute_dtype=bfloat16` changes: speed, pixels and the eleven metrics.

  python benchmarks/bf16_effect.py [--split dmfnet_side_by_side] [--batch 4]

Fuses the Harvard split with the shipped model in float32 and in bfloat16 (same seed),
then prints one JSON object: seconds per pair of each, the largest and mean grey-level
difference of the outputs (the luma of colour ones), and per task the mean of each
metric for both and their difference. `DMFNET_SHARED` must hold the data.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmfnet_jax  # noqa: E402  (sets the package's XLA flags before JAX starts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--split", default="dmfnet_side_by_side")
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dmfnet_jax import config_defaults, evaluate, imageio, metrics, paths  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.data import pairs as pairs_lib  # pylint: disable=g-import-not-at-top

  root = paths.harvard_root_or_exit()
  pairs = pairs_lib.find_split_pairs(root, config_defaults.TASKS, args.split).pairs
  folders, seconds = {}, {}
  for dtype in ("float32", "bfloat16"):
    fuser = dmfnet_jax.load(batch_size=args.batch, compute_dtype=dtype)
    folder = tempfile.mkdtemp(prefix=f"dmfnet_{dtype}_")
    fuser.fuse_pairs(pairs[:args.batch], lambda p: os.path.join(folder, "warm", f"{p.pair_id}.png"),
                     show_progress=False)
    start = time.perf_counter()
    fuser.fuse_pairs(pairs, lambda p: os.path.join(folder, p.task, f"{p.pair_id}.png"),
                     show_progress=False)
    seconds[dtype] = round((time.perf_counter() - start) / len(pairs), 3)
    folders[dtype] = folder
  differences = []
  for pair in pairs:
    luma = []
    for dtype in ("float32", "bfloat16"):
      image = imageio.read_image(os.path.join(folders[dtype], pair.task, f"{pair.pair_id}.png"))
      luma.append(imageio.rgb_to_ycrcb(image)[..., 0] if image.ndim == 3 else image)
    differences.append(np.abs(luma[0].astype(int) - luma[1].astype(int)))
  methods = [evaluate.parse_method(dtype, folder) for dtype, folder in folders.items()]
  result = evaluate.evaluate(str(root), list(config_defaults.TASKS), args.split, methods)
  per_task = {}
  for task, by_method in result["per_task"].items():
    f32, b16 = by_method["float32"]["mean"], by_method["bfloat16"]["mean"]
    per_task[task] = {name: {"float32": round(f32[name], 4), "bfloat16": round(b16[name], 4),
                             "change": round(b16[name] - f32[name], 4)}
                      for name in metrics.METRIC_NAMES}
  print(json.dumps({
      "benchmark": "bf16_effect", "split": args.split, "pairs": len(pairs),
      "seconds_per_pair": seconds,
      "max_grey_level_difference": int(max(d.max() for d in differences)),
      "mean_grey_level_difference": round(float(np.mean([d.mean() for d in differences])), 4),
      "metrics": per_task}, indent=1))


if __name__ == "__main__":
  main()
