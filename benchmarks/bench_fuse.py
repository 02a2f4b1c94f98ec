"""Fusion throughput: pairs/s at 256x256 with random weights, per config and batch.

  python benchmarks/bench_fuse.py [--presets reference,tiny] [--batches 1,2,4] [--size 256]
      [--repeats 3] [--dtype float32]

Prints one JSON object: per preset and batch size, seconds per pair, pairs/s, the
first (compiling) call's time, and the process's peak resident memory. This is the
fuse job's compiled path (six noisy UNet passes batched, early exit after the last
needed decoder feature, the head), without file IO.
"""

import argparse
import json
import os
import resource
import sys
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="reference,tiny")
  p.add_argument("--batches", default="1,2,4")
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from dmfnet_jax import config_defaults as defaults
  from dmfnet_jax import engine
  from dmfnet_jax.models import fusion_head as head_lib
  from dmfnet_jax.models import unet as unet_lib

  rng = np.random.default_rng(0)
  results = []
  for preset in args.presets.split(","):
    config = ml_collections.ConfigDict()
    config.model = defaults.model_config(preset)
    config.fusion = defaults.fusion_config()
    config.diffusion = defaults.diffusion_config("linear")
    config.fuse = defaults.fuse_config()
    config.fuse.compute_dtype = args.dtype
    head = head_lib.fusion_head_from_config(config.model, config.fusion)
    rand = lambda tree: jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), tree)
    model = engine.FusionModel(config=config, unet_params=rand(unet_lib.abstract_params(config.model)),
                             head_params=rand(head_lib.abstract_head_params(head)))
    for batch in (int(b) for b in args.batches.split(",")):
      a = rng.uniform(-1, 1, (batch, args.size, args.size, 1)).astype(np.float32)
      keys = jnp.stack([jax.random.PRNGKey(i) for i in range(batch)])
      cost = model._fuse.lower(model.unet_params, model.head_params, a, a, keys).cost_analysis()  # pylint: disable=protected-access
      gflop_per_pair = float(cost.get("flops", float("nan"))) / 1e9 / batch
      t0 = time.perf_counter()
      model(a, a, keys)
      first = time.perf_counter() - t0
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        model(a, a, keys)
        times.append(time.perf_counter() - t0)
      per_call = float(np.median(times))
      results.append(dict(preset=preset, batch=batch, size=args.size, dtype=args.dtype,
                          first_call_s=round(first, 2), gflop_per_pair=round(gflop_per_pair, 1),
                          gflop_per_s=round(gflop_per_pair * batch / per_call, 1), seconds_per_pair=round(per_call / batch, 3),
                          pairs_per_s=round(batch / per_call, 3),
                          peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
      print(json.dumps(results[-1]), file=sys.stderr)
  print(json.dumps({"benchmark": "fuse", "backend": jax.default_backend(),
                    "devices": jax.device_count(), "cpu_count": os.cpu_count(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, indent=1))


if __name__ == "__main__":
  main()
