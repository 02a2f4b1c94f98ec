"""Workdir preparation and the explicit initialisation order of a training run:
workdir checkpoint > configured checkpoint > from scratch."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
from absl import logging

from dmfnet_jax.errors import CheckpointError, DmfnetError
from dmfnet_jax.train import checkpointing
from dmfnet_jax.train.loop import is_chief, write_json_atomic


def prepare_workdir(config, workdir: str):
  """The workdir as a path (local, or gs:// on Cloud TPU); created, with config.json."""
  path = checkpointing.as_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise DmfnetError(f"--workdir={workdir}: cannot create it ({err})") from err
  if is_chief():
    write_json_atomic(path / "config.json", config.to_dict())
  return path


def check_model_matches(store: checkpointing.CheckpointStore, step: int,
                        groups: Mapping[str, Mapping[str, Any]]) -> None:
  """Raises CheckpointError naming every differing key of each config group."""
  meta = store.read_meta(step)
  problems = []
  for group, current in groups.items():
    saved = meta.get(group)
    if saved is None:
      continue
    problems += [f"{group}.{d}" for d in checkpointing.config_mismatch(saved, dict(current))]
  if problems:
    raise CheckpointError(
        f"{store.directory / str(step)} was made with a different model config:\n  "
        + "\n  ".join(problems)
        + "\nUse the config it was trained with, or a fresh --workdir.")


def restore_or_initialise(*, store: checkpointing.CheckpointStore, abstract_state: Any,
                          data_iterator: Any, model_groups: Mapping[str, Mapping[str, Any]],
                          initialise: Callable[[], Any],
                          extra_targets: Optional[Mapping[str, Any]] = None):
  """Returns (state, start_step, restored_extras)."""

  def targets(step):
    check_model_matches(store, step, model_groups)
    return {"state": abstract_state, "data": data_iterator, **(extra_targets or {})}

  step, restored = store.restore_latest_good(targets)
  if step is not None:
    logging.info("Resuming from %s step %d.", store.directory, step)
    extras = {k: restored[k] for k in (extra_targets or {})}
    return restored["state"], step, extras
  return initialise(), 0, {}


def log_devices() -> None:
  logging.info("JAX %s, process %d of %d, %d local / %d global devices: %s",
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
