"""Stage I training: runs, checkpoints, resumes, and refuses mismatched checkpoints."""

import json
import pathlib

import numpy as np
import pytest

from dmfnet_jax.errors import CheckpointError
from dmfnet_jax import checkpoints, inference
from dmfnet_jax.train import stage1
from conftest import micro_config


def read_metrics(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted 6-step run, reused by the tests below."""
  workdir = tmp_path_factory.mktemp("stage1_full")
  config = micro_config("stage1", num_steps=6, checkpoint_every=3, preview_every=6)
  config.train.preview_steps = 4
  stage1.run(config, str(workdir))
  return workdir


def test_run_writes_workdir(trained):
  assert json.loads((trained / "config.json").read_text())["job"] == "stage1"
  store = checkpoints.CheckpointStore(trained / "checkpoints", read_only=True)
  assert store.all_steps() == [3, 6]
  assert store.read_meta(6)["model"]["inner_channel"] == 16
  metrics = read_metrics(trained)
  assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(m["loss"]) and m["images_per_sec"] > 0 for m in metrics)
  previews = list((trained / "previews").glob("*.png"))
  assert len(previews) == 1


def test_resume_continues_the_same_run(trained, tmp_path):
  """3 steps, stop, rerun to 6: the same losses as the uninterrupted run, step for step
  (parameters, optimizer state, RNG and data stream all restored)."""
  stage1.run(micro_config("stage1", num_steps=3, checkpoint_every=3), str(tmp_path))
  stage1.run(micro_config("stage1", num_steps=6, checkpoint_every=3), str(tmp_path))
  resumed = {m["step"]: m["loss"] for m in read_metrics(tmp_path)}
  full = {m["step"]: m["loss"] for m in read_metrics(trained)}
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [full[s] for s in range(1, 7)],
                             rtol=1e-5)


def test_checkpoint_of_another_model_config_is_refused(trained, tmp_path):
  import shutil
  shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
  config = micro_config("stage1", num_steps=8)
  config.model.inner_channel = 8
  with pytest.raises(CheckpointError, match="inner_channel"):
    stage1.run(config, str(tmp_path))


def test_configured_checkpoint_initialises_a_new_run(trained, tmp_path):
  """Initialisation order: workdir checkpoint > configured checkpoint > scratch."""
  config = micro_config("stage1", num_steps=1, checkpoint_every=1)
  config.init_checkpoint = str(trained)
  stage1.run(config, str(tmp_path))
  loaded = inference.load_unet_params(str(trained), config.model)
  assert loaded["init_conv"]["kernel"].shape[-1] == 16
  with pytest.raises(CheckpointError, match="inner_channel"):
    other = micro_config("stage1")
    other.model.inner_channel = 8
    inference.load_unet_params(str(trained), other.model)


def test_load_unet_params_names_a_missing_path(tmp_path):
  config = micro_config("stage1")
  with pytest.raises(CheckpointError, match="does not exist"):
    inference.load_unet_params(str(tmp_path / "nowhere"), config.model)


def test_bfloat16_compute_tracks_float32(trained, tmp_path):
  """bf16 compute with fp32 parameters and optimizer state: the same run's losses
  stay close to the fp32 run's."""
  config = micro_config("stage1", num_steps=6, checkpoint_every=6)
  config.train.compute_dtype = "bfloat16"
  stage1.run(config, str(tmp_path))
  bf16 = [m["loss"] for m in read_metrics(tmp_path)]
  fp32 = [m["loss"] for m in read_metrics(trained)]
  np.testing.assert_allclose(bf16, fp32, rtol=0.05)
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", read_only=True)
  state = store.restore(6, {"state": None})["state"]
  import jax  # pylint: disable=g-import-not-at-top
  dtypes = {str(x.dtype) for x in jax.tree.leaves((state["params"], state["opt_state"]))
            if hasattr(x, "dtype") and x.ndim > 0}
  assert dtypes == {"float32"}


def test_ema_of_parameters_is_kept_and_used(tmp_path):
  config = micro_config("stage1", num_steps=2, checkpoint_every=2)
  config.train.ema_decay = 0.5
  stage1.run(config, str(tmp_path))
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", read_only=True)
  state = store.restore(2, {"state": None})["state"]
  ema, params = state["ema_params"]["init_conv"]["kernel"], state["params"]["init_conv"]["kernel"]
  assert ema.shape == params.shape and not np.allclose(ema, params)
  loaded = inference.load_unet_params(str(tmp_path), config.model)
  np.testing.assert_allclose(loaded["init_conv"]["kernel"], ema)
