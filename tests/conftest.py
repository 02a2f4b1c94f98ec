"""Shared test fixtures: the shared data folder and a persistent XLA cache."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# One compile per shape across test runs: CI reruns hit the on-disk cache.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DMFNET_JAX_CACHE", str(REPO_ROOT / ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from dmfnet_jax import paths  # noqa: E402

# Start JAX's backend now: jobs run in this process (the fuse job, the command line)
# then keep one CPU device instead of making one per core (runtime.use_cpu_cores_as_devices);
# tests of other device counts run in processes of their own.
jax.devices()


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.exists():
    pytest.skip(
        f"{what} not found at {path}; set {paths.SHARED_ENV_VAR} to the folder holding "
        "SPEC.md, parity/, metrics/ and data/"
    )
  return path


@pytest.fixture(scope="session")
def shared_root() -> pathlib.Path:
  return _require(paths.shared_root(), "shared folder")


@pytest.fixture(scope="session")
def harvard_root() -> pathlib.Path:
  return _require(paths.harvard_root(), "Harvard data")


@pytest.fixture(scope="session")
def dmfnet_outputs_root() -> pathlib.Path:
  return _require(paths.dmfnet_outputs_root(), "published DM-FNet outputs")


@pytest.fixture(scope="session")
def parity_root() -> pathlib.Path:
  return _require(paths.parity_root(), "parity vectors")


@pytest.fixture(scope="session")
def metrics_vectors_root() -> pathlib.Path:
  return _require(paths.metrics_vectors_root(), "metric test vectors")


# --------------------------------------------------------------------------- micro configs
# The smallest model that still has every part (two levels, attention, a head):
# training-loop, fuse and CLI tests use it so each compiles in seconds.
MICRO_MODEL = dict(inner_channel=16, norm_groups=4, channel_mults=(1, 2), res_blocks=1,
                   image_size=32, attn_res=(16,), dropout=0.0)
MICRO_FEAT_SCALES = (1, 3)


def load_config(name: str, preset=None):
  """configs/<name>.py's get_config(preset), as the CLI would load it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = REPO_ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def micro_config(name: str, **train_overrides):
  """A config file's `tiny` preset shrunk to the micro model and 32x32 crops."""
  config = load_config(name, "tiny")
  # Every model key explicit (Stage II and fuse configs read unset ones from checkpoints).
  from dmfnet_jax import config_defaults  # pylint: disable=g-import-not-at-top
  config.model.update(dict(config_defaults.TINY_MODEL, **MICRO_MODEL))
  if "fusion" in config:
    config.fusion.update(dict(config_defaults.fusion_config(), feat_scales=MICRO_FEAT_SCALES))
  if "data" in config:
    config.data.update(crop_size=32, phantom_count=4, phantom_size=48)
  if "train" in config:
    config.train.update(num_steps=4, batch_size=2, log_every=1, checkpoint_every=2,
                        preview_every=0, async_checkpointing=False)
    config.train.update(train_overrides)
  return config


@pytest.fixture
def micro():
  return micro_config


@pytest.fixture(scope="session")
def micro_stage1_workdir(tmp_path_factory):
  """A Stage I micro run (2 steps), shared by Stage II and fuse tests."""
  from dmfnet_jax.train import stage1  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("micro_stage1")
  stage1.run(micro_config("stage1", num_steps=2, checkpoint_every=2), str(workdir))
  return workdir


@pytest.fixture(scope="session")
def micro_stage2_workdir(tmp_path_factory, micro_stage1_workdir):
  """A Stage II micro run (2 steps) holding both stages."""
  from dmfnet_jax.train import stage2  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("micro_stage2")
  config = micro_config("stage2", num_steps=2, checkpoint_every=2)
  config.stage1_checkpoint = str(micro_stage1_workdir)
  stage2.run(config, str(workdir))
  return workdir
