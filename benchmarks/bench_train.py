"""Train-step time, images/s and compile time for Stage I and Stage II.

  python benchmarks/bench_train.py [--stage 1|2|both] [--presets tiny,reference] [--size 160]
      [--batch N] [--steps 5] [--devices N]

Prints one JSON object. Random data and parameters: this measures the compiled
step, not the input pipeline. `--devices N` simulates N CPU devices (set before
JAX starts) and uses a data-parallel mesh over them.
"""

import argparse
import json
import os
import sys
import time


def parse():
  p = argparse.ArgumentParser()
  p.add_argument("--stage", default="both", choices=["1", "2", "both"])
  p.add_argument("--presets", default="tiny,reference")
  p.add_argument("--size", type=int, default=160)
  p.add_argument("--batch", type=int, default=0, help="0: the reference batch (2 images / 1 pair)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--fsdp", type=int, default=1)
  return p.parse_args()


def main():
  args = parse()
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dmfnet_jax import config_defaults as defaults
  from dmfnet_jax.models import fusion_head as head_lib
  from dmfnet_jax.models import unet as unet_lib
  from dmfnet_jax import sharding as sharding_lib
  from dmfnet_jax import inference
  from dmfnet_jax.train import stage1, stage2
  from dmfnet_jax.train import state as state_lib
  from dmfnet_jax import diffusion

  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": args.fsdp})
  results = []
  rng = np.random.default_rng(0)

  def random_like(tree):
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), tree)

  def time_step(step_fn, state, batch_args):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, *batch_args)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, *batch_args)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))

  for preset in args.presets.split(","):
    model_cfg = defaults.model_config(preset)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.stage in ("1", "both"):
      batch = args.batch or 2
      train_cfg = defaults.train_config()
      tx = state_lib.make_optimizer(train_cfg)
      unet = unet_lib.unet_from_config(model_cfg, dtype=dtype)
      params = random_like(unet_lib.abstract_params(model_cfg))
      state = state_lib.create_state(lambda r: params, tx, jax.random.PRNGKey(0), ema=False)
      shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
      state = jax.device_put(state, shardings)
      sched = diffusion.make_schedule("cosine", 2000, 1e-6, 1e-2)
      step = jax.jit(stage1.make_train_step(unet, tx, jnp.asarray(sched.sqrt_alphas_cumprod_prev, jnp.float32), 0.0),
                     in_shardings=(shardings, sharding_lib.batch_sharding(mesh)), donate_argnums=0)
      images = jax.device_put(jnp.asarray(rng.uniform(-1, 1, (batch, args.size, args.size, 1)), jnp.float32),
                              sharding_lib.batch_sharding(mesh))
      compile_s, step_s = time_step(step, state, ({"image": images},))
      results.append(dict(stage=1, preset=preset, size=args.size, batch_images=batch, dtype=args.dtype,
                          devices=jax.device_count(), compile_s=round(compile_s, 2),
                          step_s=round(step_s, 4), images_per_s=round(batch / step_s, 3)))
      print(json.dumps(results[-1]), file=sys.stderr)
    if args.stage in ("2", "both"):
      batch = args.batch or 1
      cfg = defaults.train_config(optimizer="adam", learning_rate=1e-4)
      fusion_cfg = defaults.fusion_config()
      tx = state_lib.make_optimizer(cfg)
      unet = unet_lib.unet_from_config(model_cfg, dtype=dtype)
      head = head_lib.fusion_head_from_config(model_cfg, fusion_cfg, dtype=dtype)
      unet_params = random_like(unet_lib.abstract_params(model_cfg))
      head_params = random_like(head_lib.abstract_head_params(head))
      state = state_lib.create_state(lambda r: head_params, tx, jax.random.PRNGKey(0), ema=False)
      sched = diffusion.make_schedule("linear", 2000, 1e-6, 1e-2)
      fuse_fn = inference.make_fuse_fn(unet, head, jnp.asarray(sched.sqrt_alphas_cumprod_prev, jnp.float32), fusion_cfg)
      shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
      state = jax.device_put(state, shardings)
      unet_sh = sharding_lib.tree_shardings(unet_params, mesh)
      step = jax.jit(stage2.make_train_step(fuse_fn, tx),
                     in_shardings=(shardings, unet_sh, sharding_lib.batch_sharding(mesh)), donate_argnums=0)
      shape = (batch, args.size, args.size, 1)
      ab = {k: jax.device_put(jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32), sharding_lib.batch_sharding(mesh))
            for k in ("a", "b")}
      compile_s, step_s = time_step(step, state, (jax.device_put(unet_params, unet_sh), ab))
      results.append(dict(stage=2, preset=preset, size=args.size, batch_pairs=batch, dtype=args.dtype,
                          devices=jax.device_count(), compile_s=round(compile_s, 2),
                          step_s=round(step_s, 4), pairs_per_s=round(batch / step_s, 3)))
      print(json.dumps(results[-1]), file=sys.stderr)
  print(json.dumps({"benchmark": "train_step", "backend": jax.default_backend(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, indent=1))


if __name__ == "__main__":
  main()
