"""Workdir preparation and the explicit initialisation order of a training run:
workdir checkpoint > configured checkpoint > from scratch."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
from absl import logging

from dmfnet_jax.errors import CheckpointError, DmfnetError
from dmfnet_jax.train import checkpointing
from dmfnet_jax.train import sharding as sharding_lib
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train.loop import LoopSettings, is_chief, write_json_atomic


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


@dataclasses.dataclass(frozen=True)
class RunBasics:
  """What every training job sets up the same way before building its model."""

  workdir: Any  # local path or etils.epath.Path (gs://)
  mesh: Any
  global_batch: int
  dtype: Any
  tx: Any
  root_key: jax.Array
  store: checkpointing.CheckpointStore


def start_run(config, workdir: str) -> RunBasics:
  """Workdir + config.json, mesh (batch divisibility checked), optimizer, root key, store."""
  workdir_path = prepare_workdir(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  global_batch = int(config.train.batch_size)
  sharding_lib.check_batch_divisible(global_batch, mesh)
  store = checkpointing.CheckpointStore(checkpointing.checkpoint_dir(workdir_path),
                                        keep=config.train.keep_checkpoints,
                                        async_save=config.train.async_checkpointing)
  return RunBasics(workdir=workdir_path, mesh=mesh, global_batch=global_batch,
                   dtype=state_lib.compute_dtype(config.train),
                   tx=state_lib.make_optimizer(config.train),
                   root_key=jax.random.PRNGKey(config.seed), store=store)


def abstract_sharded_state(init_params: Callable[[jax.Array], Any], basics: RunBasics,
                           init_key: jax.Array, *, ema: bool):
  """(state shardings, abstract state carrying them): shapes via eval_shape, no allocation."""
  abstract_state = jax.eval_shape(
      lambda r: state_lib.create_state(init_params, basics.tx, r, ema=ema), init_key)
  shardings = state_lib.state_shardings(abstract_state, basics.mesh)
  return shardings, checkpointing.abstract_with_shardings(abstract_state, shardings)


def loop_settings(train_cfg, global_batch: int) -> LoopSettings:
  return LoopSettings(
      num_steps=int(train_cfg.num_steps), log_every=int(train_cfg.log_every),
      checkpoint_every=int(train_cfg.checkpoint_every),
      preview_every=int(train_cfg.preview_every), images_per_step=global_batch,
      stop_on_nonfinite=bool(train_cfg.stop_on_nonfinite))


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
