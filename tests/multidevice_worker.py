"""Run by tests/test_sharding.py in its own process with 8 simulated CPU devices.

One Stage I and one Stage II train step on the same global batch: 1 device vs a
data-parallel mesh vs an FSDP mesh. Prints a JSON report on stdout's last line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import micro_config  # noqa: E402
from dmfnet_jax import diffusion  # noqa: E402
from dmfnet_jax.errors import ConfigError  # noqa: E402
from dmfnet_jax.models import fusion_head as head_lib  # noqa: E402
from dmfnet_jax.models import unet as unet_lib  # noqa: E402
from dmfnet_jax import inference, sharding  # noqa: E402
from dmfnet_jax.train import stage1, stage2  # noqa: E402
from dmfnet_jax.train import state as state_lib  # noqa: E402

MESHES = {"single": ({"data": 1, "fsdp": 1}, 1), "data8": ({"data": -1, "fsdp": 1}, 8),
          "data2_fsdp4": ({"data": 2, "fsdp": 4}, 8)}


def random_tree(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), abstract)


def run_step(make_step, params, extra, batch, mesh_cfg, num_devices, tx):
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:num_devices])
  state = state_lib.create_state(lambda r: params, tx, jax.random.PRNGKey(0), ema=False)
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh)
  state = jax.device_put(state, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
  in_sh = [shardings] + ([sharding.tree_shardings(extra, mesh)] if extra is not None else []) + [batch_sh]
  step = jax.jit(make_step, in_shardings=tuple(in_sh), out_shardings=(shardings, sharding.replicated(mesh)))
  args = [state] + ([jax.device_put(extra, in_sh[1])] if extra is not None else []) + [batch]
  new_state, metrics = step(*args)
  kernel_shardings = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(new_state.params)}
  flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(new_state.params)])
  return float(metrics["loss"]), flat, sorted(kernel_shardings)


def main():
  report = {"devices": jax.device_count()}
  # Stage I
  config = micro_config("stage1")
  tx = state_lib.make_optimizer(config.train)
  unet = unet_lib.unet_from_config(config.model)
  params = random_tree(unet_lib.abstract_params(config.model), 0)
  sched = diffusion.make_schedule("cosine", 2000, 1e-6, 1e-2)
  step1 = stage1.make_train_step(unet, tx, jnp.asarray(sched.sqrt_alphas_cumprod_prev, jnp.float32), 0.0)
  images = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32)
  # Stage II
  config2 = micro_config("stage2")
  tx2 = state_lib.make_optimizer(config2.train)
  head = head_lib.fusion_head_from_config(config2.model, config2.fusion)
  head_params = random_tree(head_lib.abstract_head_params(head), 2)
  fuse_fn = inference.make_fuse_fn(unet, head, inference.feature_schedule(config2), config2.fusion)
  step2 = stage2.make_train_step(fuse_fn, tx2)
  pairs = {k: np.random.default_rng(3 + i).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32)
           for i, k in enumerate("ab")}
  for stage, (make_step, p, extra, batch, opt) in {
      "stage1": (step1, params, None, {"image": images}, tx),
      "stage2": (step2, head_params, params, pairs, tx2)}.items():
    results = {name: run_step(make_step, p, extra, batch, mesh_cfg, n, opt)
               for name, (mesh_cfg, n) in MESHES.items()}
    ref_loss, ref_params, _ = results["single"]
    report[stage] = {name: {"loss_diff": abs(loss - ref_loss),
                            "param_max_diff": float(np.max(np.abs(flat - ref_params))),
                            "param_shardings": specs}
                     for name, (loss, flat, specs) in results.items()}
  try:
    sharding.check_batch_divisible(6, sharding.make_mesh({"data": -1, "fsdp": 1}))
    report["indivisible_error"] = None
  except ConfigError as err:
    report["indivisible_error"] = str(err)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
