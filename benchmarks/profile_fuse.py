"""Where the fuse path's time goes, by operation kind (docs/performance.md).

  python benchmarks/profile_fuse.py [--presets reference,shipped] [--size 256] [--batch 1]

Traces one fused batch (random weights; the compiled program is the fuse job's) with
the JAX profiler, maps every executed XLA operation to its kind through the compiled
HLO (convolution, normalization, attention, elementwise, data movement) and prints one
JSON object: per preset, milliseconds and shares per kind, the host's share (dispatch
and copies outside the compiled program) and the ten costliest operations.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmfnet_jax  # noqa: E402,F401  (sets the package's XLA flags before JAX starts)

KINDS = ("convolution", "normalization", "attention", "elementwise", "data movement")
_MOVEMENT = {"concatenate", "copy", "transpose", "slice", "pad", "gather", "bitcast", "reshape",
             "broadcast", "dynamic-slice", "dynamic-update-slice", "reverse", "tuple",
             "get-tuple-element", "parameter", "constant", "iota"}


def _computations(hlo: str) -> dict:
  """computation name -> opcodes it holds."""
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip())
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      comps[current] = []
      continue
    op = re.search(r"=\s*[\w\[\]{},.:\d\s()]*?\s([a-z][\w\-]*)\(", line)
    if current and op:
      comps[current].append(op.group(1))
  return comps


def _instruction_kinds(hlo: str) -> dict:
  """instruction name -> kind, for every instruction that runs as its own operation."""
  comps = _computations(hlo)
  kinds = {}
  for line in hlo.splitlines():
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$", line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
    ops = set(opcode.split()) | {o for c in called for o in comps.get(c, [])}
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    attends = re.search(r"/attn/|_attention/", op_name)
    if "convolution" in ops or ("dot" in ops and not attends):  # 1x1 convs are dots
      kind = "convolution"
    elif attends and ops & {"dot", "exponential", "divide", "reduce"}:
      kind = "attention"
    elif ops & {"reduce", "reduce-window", "rsqrt"}:
      kind = "normalization"
    elif ops <= _MOVEMENT:
      kind = "data movement"
    else:
      kind = "elementwise"
    kinds[name] = kind
  return kinds


def profile(preset: str, size: int, batch: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench_fuse import random_model  # pylint: disable=g-import-not-at-top

  model = random_model(preset, "float32")
  a = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 1)), jnp.float32)
  keys = jnp.stack([jax.random.PRNGKey(i) for i in range(batch)])
  compiled = model._fuse.lower(model.unet_params, model.head_params, a, a, keys).compile()  # pylint: disable=protected-access
  kinds = _instruction_kinds(compiled.as_text())
  model(a, a, keys)
  folder = tempfile.mkdtemp(prefix="dmfnet_profile_")
  jax.profiler.start_trace(folder, create_perfetto_trace=True)
  start = time.perf_counter()
  model(a, a, keys)
  wall_ms = (time.perf_counter() - start) * 1e3
  jax.profiler.stop_trace()
  trace = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_kind, per_op = collections.Counter(), collections.Counter()
  first, last = float("inf"), 0.0
  for event in events:
    if event.get("ph") != "X":
      continue
    name = event["name"]
    kind = kinds.get(name)
    if kind is None:
      continue
    per_kind[kind] += event.get("dur", 0) / 1e3
    per_op[name] += event.get("dur", 0) / 1e3
    first, last = min(first, event["ts"]), max(last, event["ts"] + event.get("dur", 0))
  # Operations overlap on the CPU's threads: shares are of the summed operation time;
  # the compiled program's span runs from its first operation to its last.
  device_ms = sum(per_kind.values())
  executed_ms = (last - first) / 1e3
  return {
      "preset": preset, "size": size, "batch": batch, "wall_ms": round(wall_ms, 1),
      "compiled_program_ms": round(executed_ms, 1),
      "host_ms": round(max(wall_ms - executed_ms, 0.0), 1),
      "operation_ms": {k: round(per_kind[k], 1) for k in KINDS},
      "operation_share": {k: round(per_kind[k] / device_ms, 3) for k in KINDS},
      "top_operations_ms": {k: round(v, 1) for k, v in per_op.most_common(10)},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="reference,shipped")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  results = [profile(p, args.size, args.batch) for p in args.presets.split(",")]
  print(json.dumps({"benchmark": "profile_fuse", "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "cpu_count": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
  main()
