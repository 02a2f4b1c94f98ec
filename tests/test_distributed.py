"""Multi-process training: `jax.distributed` settings, and two CPU processes on
localhost training Stage I together through the real entry point.

The two-process run is checked against a reference computed another way: one
process, one device, fed the concatenation of both hosts' shards (what the global
batch must be). Equal losses and restored parameters show that the processes read
disjoint shards, averaged their gradients over both, and wrote one checkpoint that
a single process can restore.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, load_config
from dmfnet_jax import distributed
from dmfnet_jax.errors import ConfigError

NUM_PROCESSES = 2
NUM_STEPS = 3
GLOBAL_BATCH = 4  # images: each process reads one pair (2 images) per step
MICRO_OVERRIDES = {
    "model.inner_channel": 16, "model.norm_groups": 4, "model.channel_mults": (1, 2),
    "model.res_blocks": 1, "model.image_size": 32, "model.dropout": 0.0,
    "data.crop_size": 32, "data.phantom_count": 4, "data.phantom_size": 48,
    "train.batch_size": GLOBAL_BATCH, "train.log_every": 1, "train.preview_every": 0,
    "train.num_steps": NUM_STEPS, "train.checkpoint_every": NUM_STEPS,
}


# ------------------------------------------------------------------ settings() parsing
@pytest.fixture
def clean_env(monkeypatch):
  for name in ("DMFNET_COORDINATOR_ADDRESS", "DMFNET_NUM_PROCESSES", "DMFNET_PROCESS_ID",
               "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def dist(**kw):
  return {"initialize": "auto", "coordinator_address": "", "num_processes": 0,
          "process_id": -1, **kw}


def test_single_process_by_default(clean_env):
  assert distributed.settings(dist()) is None
  assert distributed.settings(None) is None
  assert distributed.settings(dist(initialize="off", coordinator_address="h:1",
                                   num_processes=2, process_id=0)) is None


def test_explicit_address_from_config(clean_env):
  assert distributed.settings(dist(coordinator_address="10.0.0.1:1234", num_processes=2,
                                   process_id=1)) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert distributed.settings(dist(coordinator_address="[::1]:80", num_processes=1,
                                   process_id=0))["coordinator_address"] == "[::1]:80"


def test_environment_fills_what_the_config_leaves_unset(clean_env):
  clean_env.setenv("DMFNET_COORDINATOR_ADDRESS", "head:5000")
  clean_env.setenv("DMFNET_NUM_PROCESSES", "4")
  clean_env.setenv("DMFNET_PROCESS_ID", "3")
  assert distributed.settings(dist()) == dict(coordinator_address="head:5000",
                                              num_processes=4, process_id=3)
  # Config values win over the environment.
  assert distributed.settings(dist(process_id=0))["process_id"] == 0
  assert distributed.settings(dist(coordinator_address="other:1"))["coordinator_address"] == "other:1"


def test_cluster_environment_or_on_lets_jax_detect(clean_env):
  assert distributed.settings(dist(initialize="on")) == {}
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "2")
  assert distributed.settings(dist()) == {}
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.settings(dist()) is None


@pytest.mark.parametrize("cfg, message", [
    (dist(initialize="sometimes"), "config.distributed.initialize='sometimes'"),
    (dist(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "host:port"),
    (dist(coordinator_address="127.0.0.1:http", num_processes=2, process_id=0), "host:port"),
    (dist(coordinator_address="127.0.0.1:70000", num_processes=2, process_id=0), "1..65535"),
    (dist(coordinator_address=":1234", num_processes=2, process_id=0), "host:port"),
    (dist(coordinator_address="h:1", num_processes=2, process_id=2), "got 2, 2"),
    (dist(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes >= 1"),
    (dist(coordinator_address="h:1", process_id=0), "got 0, 0"),
])
def test_bad_settings_name_the_key(clean_env, cfg, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    distributed.settings(cfg)


def test_bad_environment_names_the_variable(clean_env):
  clean_env.setenv("DMFNET_COORDINATOR_ADDRESS", "head")
  with pytest.raises(ConfigError, match="DMFNET_COORDINATOR_ADDRESS='head'"):
    distributed.settings(dist())
  clean_env.setenv("DMFNET_COORDINATOR_ADDRESS", "head:1")
  clean_env.setenv("DMFNET_NUM_PROCESSES", "two")
  with pytest.raises(ConfigError, match="DMFNET_NUM_PROCESSES='two'"):
    distributed.settings(dist(process_id=0))


def test_unresolvable_coordinator_is_a_config_error(clean_env):
  with pytest.raises(ConfigError, match="cannot resolve host 'no-such-host.invalid'"):
    distributed.maybe_initialize(dist(coordinator_address="no-such-host.invalid:1234",
                                      num_processes=2, process_id=1))


def test_busy_coordinator_port_is_one_line_error(tmp_path):
  """Process 0 cannot serve on a port already taken: a one-line error, exit 2
  (JAX itself sometimes segfaults there, so distributed.py checks first)."""
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "dmfnet_jax.main", "--config=configs/stage1.py:tiny",
         f"--workdir={tmp_path}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=1", "--config.distributed.process_id=0"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"127.0.0.1:{port}" in result.stderr and f"port {port} is in use" in result.stderr
  assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ two processes
def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env() -> dict:
  """CPU, the tests' compilation cache, no device count forced by the parent."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             DMFNET_JAX_CACHE=os.environ.get("DMFNET_JAX_CACHE", str(REPO_ROOT / ".jax_cache")))
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                            env.get("XLA_FLAGS", "")).strip()
  for name in ("DMFNET_COORDINATOR_ADDRESS", "DMFNET_NUM_PROCESSES", "DMFNET_PROCESS_ID"):
    env.pop(name, None)
  return env


def override_flags() -> list:
  def text(v):
    return f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)
  return [f"--config.{key}={text(value)}" for key, value in MICRO_OVERRIDES.items()]


def micro_config():
  config = load_config("stage1", "tiny")
  for key, value in MICRO_OVERRIDES.items():
    group, name = key.split(".")
    config[group][name] = value
  return config


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Two `dmfnet_jax.main` processes on localhost sharing one workdir."""
  workdir = tmp_path_factory.mktemp("two_process")
  port = free_port()
  procs, logs = [], []
  for pid in range(NUM_PROCESSES):
    log = open(workdir.parent / f"{workdir.name}_process{pid}.log", "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dmfnet_jax.main", "--config=configs/stage1.py:tiny",
         f"--workdir={workdir}", *override_flags(),
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         f"--config.distributed.num_processes={NUM_PROCESSES}",
         f"--config.distributed.process_id={pid}"],
        cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True))
  codes = []
  try:
    for proc in procs:
      codes.append(proc.wait(timeout=420))
  except subprocess.TimeoutExpired:
    codes = [proc.poll() for proc in procs]
  finally:
    for proc in procs:  # only the processes started here, by their own group
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  tails = "\n".join(f"--- process {i}:\n{t[-3000:]}" for i, t in enumerate(texts))
  assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}\n{tails}"
  return workdir, texts


@pytest.fixture(scope="module")
def reference():
  """The same 3 steps in one process on one device; global batch = shard 0 ++ shard 1."""
  import jax
  import jax.numpy as jnp
  from dmfnet_jax import diffusion
  from dmfnet_jax.data import pipeline
  from dmfnet_jax.models import unet as unet_lib
  from dmfnet_jax.train import stage1
  from dmfnet_jax.train import state as state_lib

  config = micro_config()
  unet = unet_lib.unet_from_config(config.model, dtype=jnp.float32)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps,
                                     config.diffusion.linear_start, config.diffusion.linear_end)
  tx = state_lib.make_optimizer(config.train)
  crop = config.data.crop_size

  def init_params(rng):
    x = jnp.zeros((1, crop, crop, unet.in_channel), jnp.float32)
    return unet.init({"params": rng}, x, jnp.ones((1,), jnp.float32))["params"]

  ema = config.train.ema_decay > 0
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  state = jax.jit(lambda r: state_lib.create_state(init_params, tx, r, ema=ema))(init_key)
  initial_params = jax.device_get(state.params)
  step_fn = jax.jit(stage1.make_train_step(
      unet, tx, jnp.asarray(schedule.sqrt_alphas_cumprod_prev, jnp.float32),
      config.train.ema_decay))
  streams = [iter(pipeline.make_train_dataset(
      config.data, stage="stage1", global_batch_size=GLOBAL_BATCH, seed=config.seed,
      process_index=i, process_count=NUM_PROCESSES)) for i in range(NUM_PROCESSES)]
  losses, host_batches = [], []
  for _ in range(NUM_STEPS):
    parts = [next(stream)["image"] for stream in streams]
    host_batches.append(parts)
    state, metrics = step_fn(state, {"image": np.concatenate(parts)})
    losses.append(float(metrics["loss"]))
  return {"state": jax.device_get(state), "initial_params": initial_params, "losses": losses,
          "host_batches": host_batches}


@pytest.mark.slow
def test_two_processes_start_and_only_process_zero_logs(two_process_run):
  workdir, logs = two_process_run
  for pid, text in enumerate(logs):
    assert f"process {pid} of {NUM_PROCESSES}, 1 local / {NUM_PROCESSES} global devices" in text
  step_lines = [[l for l in text.splitlines() if re.search(r"\] step \d+:", l)] for text in logs]
  assert len(step_lines[0]) == NUM_STEPS and step_lines[1] == []
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == list(range(1, NUM_STEPS + 1))  # written once
  assert json.loads((workdir / "config.json").read_text())["distributed"]["num_processes"] == 2
  assert not (workdir / "previews").exists()
  # Both processes end with the same (replicated) loss.
  finals = [re.findall(r"Stage I done at step 3 \(loss ([\d.eE+-]+)\)", t) for t in logs]
  assert finals[0] and finals[0] == finals[1]


@pytest.mark.slow
def test_each_process_reads_its_own_shard(two_process_run, reference):
  from dmfnet_jax.data import pipeline
  shards = [set(pipeline.host_shard(MICRO_OVERRIDES["data.phantom_count"], i, NUM_PROCESSES))
            for i in range(NUM_PROCESSES)]
  assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(4))
  # The two hosts' shares of each global batch differ (so the loss check below can tell).
  for part0, part1 in reference["host_batches"]:
    assert part0.shape == part1.shape == (GLOBAL_BATCH // NUM_PROCESSES, 32, 32, 1)
    assert not np.allclose(part0, part1)
  # One checkpoint, each process's iterator position saved beside the other.
  workdir, _ = two_process_run
  data_dir = workdir / "checkpoints" / str(NUM_STEPS) / "data"
  for pid in range(NUM_PROCESSES):
    saved = json.loads((data_dir / f"process_{pid}-of-{NUM_PROCESSES}.json").read_text())
    assert saved["next_index"] == NUM_STEPS
  # The losses the chief logged are those of the global batch shard 0 ++ shard 1.
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([m["loss"] for m in metrics], reference["losses"], rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_restores_in_one_process(two_process_run, reference):
  import jax
  from dmfnet_jax import checkpoints
  from dmfnet_jax import sharding as sharding_lib
  from dmfnet_jax.train import state as state_lib

  workdir, _ = two_process_run
  store = checkpoints.CheckpointStore(checkpoints.checkpoint_dir(workdir), read_only=True)
  assert store.all_steps() == [NUM_STEPS]
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  expected = reference["state"]
  abstract = jax.eval_shape(lambda s: s, expected)
  target = checkpoints.abstract_with_shardings(abstract,
                                                 state_lib.state_shardings(abstract, mesh))
  restored = jax.device_get(store.restore(NUM_STEPS, {"state": target})["state"])
  store.close()
  assert int(restored.step) == NUM_STEPS
  np.testing.assert_array_equal(restored.rng, expected.rng)
  # Tolerance: summation order differs between one device and a cross-process
  # all-reduce (seen: < 3e-6); a different global batch moves parameters by ~lr.
  tolerance = 2e-5
  flat_restored = jax.tree_util.tree_leaves_with_path(restored.params)
  flat_expected = jax.tree.leaves(expected.params)
  assert len(flat_restored) == len(flat_expected) > 0
  for (path, got), want in zip(flat_restored, flat_expected):
    assert np.all(np.isfinite(got)), jax.tree_util.keystr(path)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance,
                               err_msg=jax.tree_util.keystr(path))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      flat_expected, jax.tree.leaves(reference["initial_params"])))
  assert moved > 10 * tolerance  # the comparison can tell trained from untrained
  if expected.ema_params is not None:
    for got, want in zip(jax.tree.leaves(restored.ema_params), jax.tree.leaves(expected.ema_params)):
      np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
