"""Fault tolerance of training: SIGKILL (mid-step and mid-save), SIGTERM, a diverging
loss and damaged checkpoints.

Interrupted runs are real `python -m dmfnet_jax.main` processes with the micro model;
after each interruption the same command is run again and must continue the run
exactly: the last loss logged for every step equals the uninterrupted run's.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dmfnet_jax import checkpoints
from dmfnet_jax.train import stage1
from dmfnet_jax.train.loop import STEP_DELAY_ENV, TrainingDiverged
from conftest import REPO_ROOT, micro_config

NUM_STEPS = 12
CHECKPOINT_EVERY = 3
# The micro model of conftest.micro_config, as command-line overrides.
MICRO_FLAGS = (
    "--config.model.inner_channel=16", "--config.model.norm_groups=4",
    "--config.model.channel_mults=(1,2)", "--config.model.res_blocks=1",
    "--config.model.image_size=32", "--config.model.dropout=0.0",
    "--config.data.crop_size=32", "--config.data.phantom_count=4",
    "--config.data.phantom_size=48", "--config.train.batch_size=2",
    "--config.train.log_every=1", "--config.train.preview_every=0",
    f"--config.train.num_steps={NUM_STEPS}",
    f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
)
TMP_MARK = ".orbax-checkpoint-tmp"


# --------------------------------------------------------------------------- helpers
class Training:
  """One `dmfnet_jax.main` Stage I process writing into `workdir`."""

  def __init__(self, workdir: pathlib.Path, *extra_flags: str, save_delay: float = 0.0,
               step_delay: float = 0.0):
    self.workdir = workdir
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("DMFNET_JAX_CACHE", str(REPO_ROOT / ".jax_cache"))
    env.pop(checkpoints.SAVE_DELAY_ENV, None)
    if save_delay:
      env[checkpoints.SAVE_DELAY_ENV] = str(save_delay)
    env.pop(STEP_DELAY_ENV, None)
    if step_delay:
      env[STEP_DELAY_ENV] = str(step_delay)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    self.log_path = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log"
    self._log = open(self.log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, "-m", "dmfnet_jax.main", "--config=configs/stage1.py:tiny",
         f"--workdir={workdir}", *MICRO_FLAGS, *extra_flags],
        cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

  def log(self) -> str:
    if not self._log.closed:
      self._log.flush()
    return self.log_path.read_text()

  def wait_until(self, predicate, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
      if self.process.poll() is not None:
        pytest.fail(f"training exited ({self.process.returncode}) before {what}:\n"
                    + self.log()[-3000:])
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"timed out waiting for {what}:\n" + self.log()[-3000:])
      time.sleep(0.01)

  def send(self, signum: int) -> None:
    self.process.send_signal(signum)

  def kill(self) -> int:
    self.process.kill()
    return self.finish()

  def finish(self, timeout: float = 300.0) -> int:
    try:
      code = self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
      raise
    finally:
      self._log.close()
    return code


def run_training(workdir, *extra_flags, save_delay=0.0) -> Training:
  training = Training(workdir, *extra_flags, save_delay=save_delay)
  code = training.finish()
  assert code == 0, training.log()[-3000:]
  return training


def metrics(workdir) -> list:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  # Every line must parse: a killed run never leaves a torn record behind.
  return [json.loads(line) for line in path.read_text().splitlines()]


def last_logged_step(workdir) -> int:
  try:
    return max((m["step"] for m in metrics(workdir)), default=0)
  except ValueError:  # a line being appended right now
    return 0


def last_loss_per_step(workdir) -> dict:
  """After a resume the steps past the restored checkpoint are logged again: the
  last record of a step is the one the finished run stands on."""
  return {m["step"]: m["loss"] for m in metrics(workdir)}


def complete_steps(workdir) -> list:
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def temporary_dirs(workdir) -> set:
  folder = pathlib.Path(workdir) / "checkpoints"
  return {p.name for p in folder.glob(f"*{TMP_MARK}*")} if folder.is_dir() else set()


def resumed_from(log: str) -> list:
  """Steps named by 'Resuming from ... step N.' lines."""
  return [int(line.rsplit("step", 1)[1].strip(" .\n"))
          for line in log.splitlines() if "Resuming from" in line]


def assert_same_losses(workdir, reference) -> None:
  got, want = last_loss_per_step(workdir), last_loss_per_step(reference)
  assert sorted(got) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=1e-5)


def tree_digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce."""
  workdir = tmp_path_factory.mktemp("fault_reference") / "run"
  run_training(workdir)
  assert complete_steps(workdir) == [6, 9, 12]  # keep_checkpoints=3
  assert sorted(last_loss_per_step(workdir)) == list(range(1, NUM_STEPS + 1))
  return workdir


# --------------------------------------------------------------------------- SIGKILL
def test_sigkill_mid_step_and_mid_save_resume_from_last_complete_checkpoint(reference, tmp_path):
  workdir = tmp_path / "run"

  # 1. Killed while training: past the first complete checkpoint, no save in flight.
  #    (Slowed steps: with a warm compile cache the 12 micro steps can otherwise all
  #    run between two polls.)
  training = Training(workdir, step_delay=0.5)
  training.wait_until(
      lambda: last_logged_step(workdir) >= CHECKPOINT_EVERY + 1 and complete_steps(workdir)
      and not temporary_dirs(workdir), "a complete checkpoint and a step after it")
  assert training.kill() == -signal.SIGKILL
  killed_at = last_logged_step(workdir)
  assert killed_at < NUM_STEPS, "the run finished before it could be killed"
  first_good = complete_steps(workdir)[-1]
  assert CHECKPOINT_EVERY <= first_good <= killed_at

  # 2. The same command, killed in the middle of its first checkpoint save (the save is
  #    held open in its temporary folder by the test hook).
  stale = temporary_dirs(workdir)
  training = Training(workdir, save_delay=120)
  training.wait_until(lambda: temporary_dirs(workdir) - stale, "a checkpoint save in progress")
  assert training.kill() == -signal.SIGKILL
  assert resumed_from(training.log()) == [first_good]
  in_flight = temporary_dirs(workdir) - stale
  saving_step = int(next(iter(in_flight)).split(".")[0])
  assert saving_step > first_good
  assert saving_step not in complete_steps(workdir), "a killed save must not count as a step"
  second_good = complete_steps(workdir)[-1]
  assert second_good == first_good

  # 3. The same command again: resumes from the last complete step, cleans the
  #    half-written one and finishes with exactly the uninterrupted run's losses.
  training = run_training(workdir)
  assert resumed_from(training.log()) == [second_good]
  assert not temporary_dirs(workdir)
  assert not list((workdir / "checkpoints").glob(f"*{checkpoints.DAMAGED_MARK}*"))
  assert complete_steps(workdir) == [6, 9, 12]
  assert_same_losses(workdir, reference)


# --------------------------------------------------------------------------- SIGTERM
def test_sigterm_saves_at_the_current_step_and_exits_cleanly(reference, tmp_path):
  workdir = tmp_path / "run"
  training = Training(workdir)
  training.wait_until(lambda: last_logged_step(workdir) >= 2, "step 2")
  training.send(signal.SIGTERM)
  code = training.finish()
  log = training.log()
  assert code == 0, log[-3000:]
  assert "SIGTERM received" in log
  stopped_at = last_logged_step(workdir)
  assert stopped_at < NUM_STEPS, "the run finished before the preemption notice"
  assert complete_steps(workdir)[-1] == stopped_at
  assert not temporary_dirs(workdir)

  training = run_training(workdir)
  assert resumed_from(training.log()) == [stopped_at]
  assert_same_losses(workdir, reference)


# --------------------------------------------------------------------------- NaN / Inf
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  stage1.run(micro_config("stage1", num_steps=2, checkpoint_every=2), str(tmp_path))
  good = tmp_path / "checkpoints" / "2"
  before = tree_digest(good)

  # Resumes from step 2; an absurd learning rate blows the parameters up at step 3,
  # so the loss of step 4 is not finite (and step 4 is a save step).
  config = micro_config("stage1", num_steps=6, checkpoint_every=2, learning_rate=1e30)
  with pytest.raises(TrainingDiverged) as raised:
    stage1.run(config, str(tmp_path))
  message = str(raised.value)
  assert "training stopped at step 4" in message
  assert "last good checkpoint (step 2)" in message
  assert str(tmp_path / "checkpoints") in message
  assert complete_steps(tmp_path) == [2]
  assert tree_digest(good) == before
  assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]


def test_diverging_loss_on_the_command_line_is_one_line_and_keeps_a_save_in_flight(tmp_path):
  """Exit 2 with one line; the async save of step 1, still being written when step 2
  diverges, completes instead of being lost."""
  workdir = tmp_path / "run"
  training = Training(workdir, "--config.train.learning_rate=1e30",
                      "--config.train.checkpoint_every=1", save_delay=2)
  code = training.finish()
  log = training.log()
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  assert code == 2, log[-3000:]
  assert "Traceback" not in log
  assert len(errors) == 1 and "training stopped at step 2" in errors[0], log[-3000:]
  assert "last good checkpoint (step 1)" in errors[0]
  assert complete_steps(workdir) == [1]
  assert not temporary_dirs(workdir)
  store = checkpoints.CheckpointStore(workdir / "checkpoints", read_only=True)
  state = store.restore(1, {"state": None})["state"]
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state["params"]))


# --------------------------------------------------------------------------- damaged checkpoints
def _garble_state(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  assert files
  for path in files:
    path.write_bytes(b"\x00garbage\xff" * 7)


def _delete_state_data(step_dir: pathlib.Path) -> None:
  """A partly copied step: the array data of `state` is gone, its metadata is not."""
  data = [p for p in (step_dir / "state").iterdir() if p.is_dir()]
  assert data
  for path in data:
    shutil.rmtree(path)


def _garble_meta(step_dir: pathlib.Path) -> None:
  (step_dir / "meta" / "metadata").write_text('{"job": "stage1", "mod')


# A failed tensorstore read leaves an event-loop callback behind: Orbax noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_garble_state, _delete_state_data, _garble_meta],
                         ids=["garbled_state", "deleted_state_data", "garbled_meta"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage,
                                                                   caplog):
  shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
  damage(tmp_path / "checkpoints" / "12")
  # A save killed before its rename, newer than every step.
  partial = tmp_path / "checkpoints" / f"15{TMP_MARK}-1700000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"half written")

  config = micro_config("stage1", num_steps=NUM_STEPS, checkpoint_every=CHECKPOINT_EVERY)
  with caplog.at_level("WARNING"):
    stage1.run(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("step 12" in w and "trying the previous one" in w for w in warnings), warnings
  assert not temporary_dirs(tmp_path)
  # The damaged step is kept for inspection under a name Orbax does not take for a step.
  set_aside = list((tmp_path / "checkpoints").glob(f"12{checkpoints.DAMAGED_MARK}*"))
  assert len(set_aside) == 1 and (set_aside[0] / "state").is_dir()
  assert complete_steps(tmp_path) == [6, 9, 12]
  # Resumed from step 9: steps 10..12 were trained again, with the reference's losses.
  resumed = last_loss_per_step(tmp_path)
  want = last_loss_per_step(reference)
  assert sorted(resumed) == [10, 11, 12]
  np.testing.assert_allclose([resumed[s] for s in (10, 11, 12)], [want[s] for s in (10, 11, 12)],
                             rtol=1e-5)
  # The rewritten step 12 restores.
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", read_only=True)
  assert int(store.restore(12, {"state": None})["state"]["step"]) == 12
