"""The training loop both stages share: logging, checkpoints, previews, preemption.

The loop owns nothing model-specific: a stage hands it a jitted step, a data
iterator and callbacks. Only process 0 writes logs, metrics and previews; all
processes take part in (Orbax-coordinated) checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from dmfnet_jax.checkpoints import CheckpointStore
from dmfnet_jax.errors import DmfnetError
from dmfnet_jax.runtime import is_chief, is_remote, workdir_path

# Test hook (tests/test_fault_tolerance.py): seconds to wait after each step, so a
# test can kill a run between two steps however fast the steps are. Unset in normal use.
STEP_DELAY_ENV = "DMFNET_TEST_STEP_DELAY"


class TrainingDiverged(DmfnetError):
  """The loss became NaN or infinite."""


class MetricsWriter:
  """One JSON line per logged step in `workdir/metrics.jsonl` (chief only).

  Local files are appended to; an object store cannot append, so there the file
  is rewritten whole (it stays small: one line per logged step)."""

  def __init__(self, workdir: os.PathLike | str):
    self.path = workdir_path(workdir) / "metrics.jsonl"
    self._lines = None

  def write(self, record: Mapping[str, Any]) -> None:
    if not is_chief():
      return
    line = json.dumps(record, default=float) + "\n"
    if not is_remote(self.path):
      with open(os.fspath(self.path), "a") as f:
        f.write(line)
      return
    if self._lines is None:
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    self._lines.append(line)
    self.path.write_text("".join(self._lines))


class PreemptionWatcher:
  """Turns SIGTERM (a preemption notice) into a flag the loop polls each step."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._event.set()

  def requested(self, step: int) -> bool:
    """True on every process at the same step once any process was told to stop
    (a SIGTERM reaches hosts at different moments; a lone host stopping would
    leave the others waiting in the next collective)."""
    if jax.process_count() == 1:
      return self._event.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except RuntimeError:  # no preemption service in this runtime
      pass
    flags = multihost_utils.process_allgather(np.asarray(self._event.is_set(), np.int32))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


@dataclasses.dataclass
class LoopSettings:
  num_steps: int
  log_every: int
  checkpoint_every: int
  preview_every: int
  images_per_step: int
  stop_on_nonfinite: bool = True


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  stopped_by: str  # "done" | "preempted"
  last_loss: float


def _to_float(x) -> float:
  return float(np.asarray(jax.device_get(x)))


def run_loop(*, state: Any, start_step: int, train_step: Callable, batches: Iterator,
             to_global: Callable, store: CheckpointStore,
             checkpoint_items: Callable[[Any], Mapping[str, Any]],
             settings: LoopSettings, workdir: os.PathLike | str,
             preview: Optional[Callable[[Any, int], None]] = None) -> LoopResult:
  """Runs `train_step` from `start_step` to `settings.num_steps`."""
  metrics_writer = MetricsWriter(workdir)
  step = start_step
  # The step this run started from, not the store's newest: a newer step that failed
  # to restore was set aside, and this run must write that step again.
  last_saved = start_step if start_step in store.all_steps() else None
  last_loss = math.nan
  progress = None
  if is_chief():
    progress = tqdm(total=settings.num_steps, initial=step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=2.0, disable=None)

  def check_finite(loss_value: float):
    if settings.stop_on_nonfinite and not math.isfinite(loss_value):
      kept = (f"the last good checkpoint (step {last_saved}) is kept in {store.directory}"
              if last_saved is not None else "no checkpoint had been written yet")
      raise TrainingDiverged(
          f"training stopped at step {step}: the loss is {loss_value}; {kept}. Lower "
          "config.train.learning_rate or set config.train.grad_clip_norm, then rerun to resume.")

  def save(current_state):
    nonlocal last_saved
    if last_saved == step:
      return
    store.save(step, checkpoint_items(current_state))
    last_saved = step

  stopped_by = "done"
  step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
  window_start, window_steps = time.perf_counter(), 0
  try:
    with PreemptionWatcher() as preemption:
      while step < settings.num_steps:
        batch = to_global(next(batches))
        state, metrics = train_step(state, batch)
        step += 1
        if step_delay:
          time.sleep(step_delay)
        window_steps += 1
        if progress is not None:
          progress.update(1)
        is_log = step % settings.log_every == 0 or step == settings.num_steps
        is_save = step % settings.checkpoint_every == 0 or step == settings.num_steps
        preempted = preemption.requested(step)
        if is_log or is_save or preempted:
          last_loss = _to_float(metrics["loss"])
          check_finite(last_loss)
        if is_log:
          elapsed = time.perf_counter() - window_start
          rate = window_steps / elapsed if elapsed > 0 else float("nan")
          record = {"step": step, "steps_per_sec": rate,
                    "images_per_sec": rate * settings.images_per_step,
                    **{k: _to_float(v) for k, v in metrics.items()}}
          metrics_writer.write(record)
          if is_chief():
            logging.info("step %d: %s", step, " ".join(
                f"{k}={v:.5g}" for k, v in record.items() if k != "step"))
            if progress is not None:
              progress.set_postfix(loss=f"{last_loss:.4g}",
                                   img_s=f"{rate * settings.images_per_step:.3g}")
          window_start, window_steps = time.perf_counter(), 0
        if is_save or preempted:
          save(state)
        if preempted:
          stopped_by = "preempted"
          break
        if preview is not None and settings.preview_every and step % settings.preview_every == 0:
          preview(state, step)
  except BaseException:
    # A stop by error (a diverged loss included) must not abandon an async save in
    # flight: it holds the last good checkpoint the error message points to.
    try:
      store.wait()
    except Exception as err:  # pylint: disable=broad-except
      logging.error("The checkpoint save in flight failed: %s", err)
    raise
  finally:
    if progress is not None:
      progress.close()
  store.wait()
  return LoopResult(state=state, step=step, stopped_by=stopped_by, last_loss=last_loss)
