"""Fusing one large pair (default 4096x4096) with the shipped model, as a user would.

  python benchmarks/bench_large.py [--size 4096] [--task MRI-PET] [--budget-gb 0]

Builds a phantom pair of that size, loads the shipped model with the default memory
budget (half the machine's memory; `--budget-gb` overrides), and prints one JSON object:
the plan the engine chose (whole image; whole with its UNet inputs one at a time and the
attention queries per chunk; or tiles: size, overlap, count, tiles per call, attention
queries per chunk on the whole image's coarse levels),
the memory estimate of the untiled image, the seconds of the fuse (compiling included,
and again once compiled) and the process's peak resident memory.
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmfnet_jax  # noqa: E402  (sets the package's XLA flags before JAX starts)

GIB = 2**30


def _describe(plan):
  if plan.tile is None:
    if plan.query_chunk is None:
      return "whole image"
    return {"whole image": "UNet inputs one at a time", "attention_query_chunk": plan.query_chunk}
  return {"tile": plan.tile, "overlap": plan.overlap, "tiles": len(plan.tiles),
          "tiles_per_call": plan.per_call, "coarse_query_chunk": plan.query_chunk}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=4096)
  parser.add_argument("--task", default="MRI-PET", choices=("MRI-CT", "MRI-PET", "MRI-SPECT"))
  parser.add_argument("--budget-gb", type=float, default=0.0)
  parser.add_argument("--repeat", action="store_true", help="fuse a second time, compiled")
  args = parser.parse_args()
  from dmfnet_jax import engine  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.data import phantoms  # pylint: disable=g-import-not-at-top

  mri, other = phantoms.phantom_pair(0, size=args.size, task=args.task, seed=0)
  fuser = dmfnet_jax.load(batch_size=1, memory_budget_gb=args.budget_gb)
  model = fuser.model
  plan = model.plan(args.size, args.size)
  start = time.perf_counter()
  fused = fuser.fuse(mri, other)
  first = time.perf_counter() - start
  result = {
      "benchmark": "large_pair", "size": args.size, "task": args.task,
      "budget_gib": round(model.budget / GIB, 2),
      "untiled_estimate_gib": round(engine.estimate_bytes(
          model.config.model, model.config.fusion, args.size, args.size) / GIB, 2),
      "plan": _describe(plan),
      "seconds_first": round(first, 1), "output_shape": list(fused.shape),
  }
  if args.repeat:
    start = time.perf_counter()
    fuser.fuse(mri, other)
    result["seconds_compiled"] = round(time.perf_counter() - start, 1)
  result["peak_rss_gib"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
