"""Stage II training: frozen Stage I, checkpoints holding both stages, clear errors."""

import json

import jax
import numpy as np
import pytest

from dmfnet_jax.errors import CheckpointError, ConfigError
from dmfnet_jax import checkpoints
from dmfnet_jax.train import stage2
from conftest import micro_config


def test_run_trains_head_and_keeps_unet_frozen(micro_stage1_workdir, micro_stage2_workdir):
  store = checkpoints.CheckpointStore(micro_stage2_workdir / "checkpoints", read_only=True)
  assert store.all_steps() == [2]
  assert sorted(store.item_names_at(2)) == ["data", "meta", "state", "unet"]
  meta = store.read_meta(2)
  assert meta["job"] == "stage2" and meta["fusion"]["feat_scales"] == [1, 3]
  frozen = store.restore(2, {"unet": None})["unet"]
  s1 = checkpoints.CheckpointStore(micro_stage1_workdir / "checkpoints", read_only=True)
  original = s1.restore(s1.latest_step(), {"state": None})["state"]["params"]
  np.testing.assert_array_equal(frozen["init_conv"]["kernel"], original["init_conv"]["kernel"])
  losses = [json.loads(l) for l in (micro_stage2_workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"loss", "loss_in", "loss_grad", "ssim_term"} <= set(losses[-1])
  assert all(np.isfinite(m["loss"]) for m in losses)


def test_resume_keeps_the_frozen_unet_and_may_switch_schedule(micro_stage2_workdir, tmp_path):
  """A constant-rate run resumed with a linear-decay tail (same optimizer state)."""
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(micro_stage2_workdir, workdir)
  config = micro_config("stage2", num_steps=4, checkpoint_every=1, lr_schedule="linear_decay",
                        decay_start_step=2)
  config.stage1_checkpoint = ""  # not needed when the workdir has a checkpoint
  stage2.run(config, str(workdir))
  store = checkpoints.CheckpointStore(workdir / "checkpoints", read_only=True)
  assert store.latest_step() == 4
  logged = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["lr_factor"] for m in logged] == [1.0, 1.0, 1.0, 0.5]


def test_missing_stage1_checkpoint_says_how_to_make_one(tmp_path):
  config = micro_config("stage2")
  with pytest.raises(ConfigError, match="configs/stage1.py"):
    stage2.run(config, str(tmp_path / "a"))
  config.stage1_checkpoint = str(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="does not exist"):
    stage2.run(config, str(tmp_path / "b"))


def test_stage1_checkpoint_of_another_shape_is_refused(micro_stage1_workdir, tmp_path):
  config = micro_config("stage2")
  config.model.inner_channel = 8
  config.stage1_checkpoint = str(micro_stage1_workdir)
  with pytest.raises(CheckpointError, match="inner_channel"):
    stage2.run(config, str(tmp_path))


def test_init_checkpoint_starts_head_and_unet_from_a_two_stage_model(micro_stage2_workdir,
                                                                     tmp_path):
  """Configured checkpoint (no stage1_checkpoint): both stages come from it; the
  loss weights are the config's and are recorded."""
  config = micro_config("stage2", num_steps=2, checkpoint_every=2, learning_rate=1e-12)
  config.init_checkpoint = str(micro_stage2_workdir)
  config.loss.intensity_weight = 4.5
  stage2.run(config, str(tmp_path))
  source = checkpoints.CheckpointStore(micro_stage2_workdir / "checkpoints", read_only=True)
  start = source.restore(2, {"state": None, "unet": None})
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", read_only=True)
  assert store.all_steps() == [2]
  restored = store.restore(2, {"state": None, "unet": None})
  np.testing.assert_array_equal(restored["unet"]["init_conv"]["kernel"],
                                start["unet"]["init_conv"]["kernel"])
  head, head_start = restored["state"]["params"], start["state"]["params"]
  for got, want in zip(jax.tree.leaves(head), jax.tree.leaves(head_start)):
    np.testing.assert_allclose(got, want, atol=1e-9)
  assert store.read_meta(2)["loss"]["intensity_weight"] == 4.5
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # loss_in is the weighted term: 4.5 x the L1 distance to max(A, B).
  assert all(m["loss_in"] > 0 for m in logged)


def test_init_checkpoint_without_a_head_is_refused(micro_stage1_workdir, tmp_path):
  config = micro_config("stage2")
  config.init_checkpoint = str(micro_stage1_workdir)
  with pytest.raises(CheckpointError, match="holds no fusion model"):
    stage2.run(config, str(tmp_path))
