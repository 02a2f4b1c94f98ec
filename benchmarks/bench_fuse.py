"""Fusion speed: our fuse path against the same network in PyTorch, compute and end to end.

  python benchmarks/bench_fuse.py [--presets reference,shipped] [--batches 1,2,4]
      [--dtypes float32] [--size 256] [--repeats 3] [--threads 2] [--no-torch]
      [--end-to-end] [--end-to-end-pairs 121] [--cpu-devices 0] [--unet-inputs-at-once 0]

Prints one JSON object. Per configuration (model size, dtype, batch size, device count;
on a CPU its cores become devices as in the fuse job, `--cpu-devices`):
compute-only pairs/s (the fuse job's compiled program on random 256x256 inputs, random
weights, median of `--repeats`), the first call's compile time, XLA's FLOP count per
pair and the GFLOP/s it implies, the process's peak resident memory, and the ratio of
our seconds per pair to the PyTorch baseline's (`benchmarks/torch_dmfnet.py`: the
authors' way, six sequential full UNet passes at batch 1 then the head, under
torch.no_grad(), with `--threads` threads, run in a subprocess of this run). With
`--end-to-end`, the shipped model fuses the Harvard test split from files to files
(read, fuse, write, as the fuse job does; `DMFNET_SHARED` must hold the data) and the
end-to-end pairs/s is reported beside the compute-only rate of the same batch size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmfnet_jax  # noqa: E402,F401  (sets the package's XLA flags before JAX starts)

HERE = os.path.dirname(os.path.abspath(__file__))
# Our preset names -> the model config presets (the shipped model is the `cpu` preset).
MODEL_PRESET = {"reference": "reference", "shipped": "cpu", "tiny": "tiny"}


def random_model(preset: str, dtype: str, unet_inputs_at_once: int = 0):
  """The fuse job's engine with random weights of a preset's structure."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dmfnet_jax import config_defaults as defaults  # pylint: disable=g-import-not-at-top
  from dmfnet_jax import engine  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import fusion_head as head_lib  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict()
  config.model = defaults.model_config(MODEL_PRESET[preset])
  config.fusion = defaults.fusion_config()
  config.diffusion = defaults.diffusion_config("linear")
  config.fuse = defaults.fuse_config()
  config.fuse.compute_dtype = dtype
  config.fuse.unet_inputs_at_once = unet_inputs_at_once
  rng = np.random.default_rng(0)
  rand = lambda tree: jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), tree)
  head = head_lib.fusion_head_from_config(config.model, config.fusion)
  return engine.FusionModel(config=config, unet_params=rand(unet_lib.abstract_params(config.model)),
                            head_params=rand(head_lib.abstract_head_params(head)))


def torch_seconds_per_pair(preset: str, size: int, threads: int, repeats: int) -> float:
  """The PyTorch baseline, in a subprocess (its threads never share a process with XLA's)."""
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, "torch_dmfnet.py"), "--preset", preset, "--size",
       str(size), "--threads", str(threads), "--repeats", str(repeats)],
      capture_output=True, text=True, check=True)
  return float(json.loads(result.stdout)["seconds_per_pair"])


def pair_flops(model, size: int) -> float:
  """XLA's FLOP count of fusing one pair with all six UNet inputs in one call on one
  device: the work itself (the fuse program's own count would see a loop body once, and
  one device's share)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dmfnet_jax import features, inference  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import fusion_head as head_lib  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  config = model.config
  unet = unet_lib.unet_from_config(config.model)
  head = head_lib.fusion_head_from_config(config.model, config.fusion)
  fuse = inference.make_fuse_fn(unet, head, inference.feature_schedule(config), config.fusion)
  a = jnp.zeros((1, size, size, 1), jnp.float32)
  compiled = jax.jit(fuse).lower(model.unet_params, model.head_params, a, a,
                                 jax.random.PRNGKey(0)).compile()
  return float((compiled.cost_analysis() or {}).get("flops", float("nan")))


def compute_only(model, batch: int, size: int, repeats: int, flops_per_pair: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 1)), jnp.float32)
  keys = jnp.stack([jax.random.PRNGKey(i) for i in range(batch)])
  start = time.perf_counter()
  model(a, a, keys)
  first = time.perf_counter() - start
  flops = batch * flops_per_pair
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    model(a, a, keys)
    times.append(time.perf_counter() - start)
  per_call = float(np.median(times))
  return {"batch": batch, "first_call_s": round(first, 2), "seconds_per_pair": round(per_call / batch, 3),
          "compute_pairs_per_s": round(batch / per_call, 3),
          "gflop_per_pair": round(flops / 1e9 / batch, 1),
          "gflop_per_s": round(flops / 1e9 / per_call, 1)}


def end_to_end(batch: int, pairs_limit: int) -> dict:
  """The shipped model over the Harvard test split: read, fuse, write (as the fuse job)."""
  from dmfnet_jax import api, paths  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.data import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  root = paths.harvard_root_or_exit()
  pairs = pairs_lib.find_split_pairs(root, ("MRI-CT", "MRI-PET", "MRI-SPECT"), "test").pairs
  pairs = pairs[:pairs_limit]
  fuser = api.load(batch_size=batch)
  out = tempfile.mkdtemp(prefix="dmfnet_bench_")
  warm = fuser.fuse_pairs(pairs[:batch], lambda p: os.path.join(out, "warm", f"{p.task}_{p.pair_id}.png"),
                          show_progress=False)
  assert warm["fused"] == min(batch, len(pairs)), warm
  start = time.perf_counter()
  summary = fuser.fuse_pairs(pairs, lambda p: os.path.join(out, p.task, f"{p.pair_id}.png"),
                             show_progress=False)
  seconds = time.perf_counter() - start
  return {"pairs": summary["fused"], "seconds": round(seconds, 2),
          "end_to_end_seconds_per_pair": round(seconds / max(summary["fused"], 1), 3),
          "end_to_end_pairs_per_s": round(summary["fused"] / seconds, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="reference,shipped")
  parser.add_argument("--batches", default="1,2,4")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--end-to-end", action="store_true")
  parser.add_argument("--end-to-end-pairs", type=int, default=121)
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="JAX devices made of a CPU's cores, as the fuse job does "
                      "(0: one per core; 1: one device for all cores)")
  parser.add_argument("--unet-inputs-at-once", type=int, default=0,
                      help="UNet inputs a device runs at once (0: as the fuse job: one on "
                      "a CPU, all on an accelerator)")
  args = parser.parse_args()
  from dmfnet_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.use_cpu_cores_as_devices(args.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top

  torch_s = {}
  if not args.no_torch:
    for preset in args.presets.split(","):
      torch_s[preset] = torch_seconds_per_pair(preset, args.size, args.threads, args.repeats)
  results = []
  for preset in args.presets.split(","):
    for dtype in args.dtypes.split(","):
      model = random_model(preset, dtype, args.unet_inputs_at_once)
      flops_per_pair = pair_flops(model, args.size)
      for batch in (int(b) for b in args.batches.split(",")):
        row = {"preset": preset, "dtype": dtype, "devices": len(model.devices),
               "unet_inputs_at_once": model.unet_inputs_at_once, "size": args.size,
               **compute_only(model, batch, args.size, args.repeats, flops_per_pair)}
        if preset in torch_s:
          row["torch_seconds_per_pair"] = round(torch_s[preset], 3)
          row["ratio_to_torch"] = round(row["seconds_per_pair"] / torch_s[preset], 3)
        if args.end_to_end and preset == "shipped" and dtype == "float32":
          row.update(end_to_end(batch, args.end_to_end_pairs))
          row["end_to_end_vs_compute"] = round(
              row["end_to_end_pairs_per_s"] / row["compute_pairs_per_s"], 3)
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
  print(json.dumps({"benchmark": "fuse", "backend": jax.default_backend(),
                    "devices": jax.device_count(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "results": results}, indent=1))


if __name__ == "__main__":
  main()
