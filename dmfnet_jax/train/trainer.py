"""The one training scaffold both stages run on.

dataset -> initialise (workdir checkpoint > configured checkpoint > from scratch)
-> one sharded, jitted, state-donating step -> the loop (logs, checkpoints, previews,
preemption) -> close. A stage supplies only what is its own, as a `Stage`: its
fresh parameters, what it loads from configured checkpoints, its step and its preview.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
from absl import logging

from dmfnet_jax import checkpoints, inference, models, runtime
from dmfnet_jax import sharding as sharding_lib
from dmfnet_jax.data import pipeline
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train.loop import LoopResult, LoopSettings, run_loop


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What every training job sets up the same way before building its model."""

  workdir: Any  # local path or etils.epath.Path (gs://)
  mesh: Any
  global_batch: int
  dtype: Any
  tx: Any
  root_key: jax.Array
  store: checkpoints.CheckpointStore


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a training stage adds to the scaffold.

  Attributes:
    name: for logs ("Stage I").
    init_params: key -> fresh trainable parameters.
    load_params: () -> (trainable parameters or None, frozen parameters or None) from
      the configured checkpoints; called only when the workdir holds no checkpoint.
    train_step: the un-jitted step, `(state, batch)`, or `(state, frozen, batch)` when
      the stage has frozen parameters.
    preview: `(state, frozen, step)` -> writes a preview (chief only); or None.
    abstract_frozen: shapes of parameters the stage keeps frozen (Stage II: the UNet),
      saved in every checkpoint under `frozen_item` so a checkpoint holds the model.
    ema: whether the state keeps an exponential moving average of the parameters.
  """

  name: str
  init_params: Callable[[jax.Array], Any]
  load_params: Callable[[], tuple[Optional[Any], Optional[Any]]]
  train_step: Callable
  preview: Optional[Callable[[Any, Any, int], None]] = None
  abstract_frozen: Any = None
  frozen_item: str = "unet"
  ema: bool = False


def start_run(config, workdir: str) -> RunContext:
  """Workdir + config.json, mesh (batch divisibility checked), optimizer, root key, store."""
  workdir_path = runtime.prepare_workdir(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  global_batch = int(config.train.batch_size)
  sharding_lib.check_batch_divisible(global_batch, mesh)
  store = checkpoints.CheckpointStore(checkpoints.checkpoint_dir(workdir_path),
                                      keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpointing)
  return RunContext(workdir=workdir_path, mesh=mesh, global_batch=global_batch,
                    dtype=models.compute_dtype(config.train.compute_dtype),
                    tx=state_lib.make_optimizer(config.train),
                    root_key=jax.random.PRNGKey(config.seed), store=store)


def abstract_sharded_state(init_params: Callable[[jax.Array], Any], ctx: RunContext,
                           init_key: jax.Array, *, ema: bool):
  """(state shardings, abstract state carrying them): shapes via eval_shape, no allocation."""
  abstract_state = jax.eval_shape(
      lambda r: state_lib.create_state(init_params, ctx.tx, r, ema=ema), init_key)
  shardings = state_lib.state_shardings(abstract_state, ctx.mesh)
  return shardings, checkpoints.abstract_with_shardings(abstract_state, shardings)


def loop_settings(train_cfg, global_batch: int) -> LoopSettings:
  return LoopSettings(
      num_steps=int(train_cfg.num_steps), log_every=int(train_cfg.log_every),
      checkpoint_every=int(train_cfg.checkpoint_every),
      preview_every=int(train_cfg.preview_every), images_per_step=global_batch,
      stop_on_nonfinite=bool(train_cfg.stop_on_nonfinite))


def run_training(config, workdir: str, build_stage: Callable[[Any, RunContext], Stage]
                 ) -> LoopResult:
  """Trains the stage `build_stage(config, ctx)` describes, resuming from the workdir."""
  config = inference.resolve_structure(config, workdir)
  ctx = start_run(config, workdir)
  stage = build_stage(config, ctx)
  mesh, store = ctx.mesh, ctx.store
  init_key = jax.random.fold_in(ctx.root_key, 0)
  shardings, abstract_state = abstract_sharded_state(stage.init_params, ctx, init_key,
                                                     ema=stage.ema)
  batches = iter(pipeline.make_train_dataset(config.data, stage=config.job,
                                             global_batch_size=ctx.global_batch, seed=config.seed))
  has_frozen = stage.abstract_frozen is not None
  frozen_shardings = (sharding_lib.tree_shardings(stage.abstract_frozen, mesh)
                      if has_frozen else None)
  extra_targets = ({stage.frozen_item: checkpoints.abstract_with_shardings(
      stage.abstract_frozen, frozen_shardings)} if has_frozen else {})
  structure = {g: config[g] for g in checkpoints.STRUCTURE_GROUPS if g in config}

  def targets(step):
    checkpoints.check_model_matches(store.read_meta(step), structure, store.directory / str(step))
    return {"state": abstract_state, "data": batches, **extra_targets}

  start_step, restored = store.restore_latest_good(targets)
  if start_step is not None:
    logging.info("Resuming from %s step %d.", store.directory, start_step)
    state, frozen = restored["state"], restored.get(stage.frozen_item)
  else:
    start_step = 0
    params, frozen = stage.load_params()
    state, _ = state_lib.init_sharded_state(stage.init_params, ctx.tx, init_key, mesh,
                                            ema=stage.ema, params=params)
    if has_frozen:
      frozen = jax.device_put(frozen, frozen_shardings)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  out_shardings = (shardings, sharding_lib.replicated(mesh))
  if has_frozen:
    jitted = jax.jit(stage.train_step, in_shardings=(shardings, frozen_shardings, batch_sharding),
                     out_shardings=out_shardings, donate_argnums=0)
    train_step = lambda s, batch: jitted(s, frozen, batch)
  else:
    train_step = jax.jit(stage.train_step, in_shardings=(shardings, batch_sharding),
                         out_shardings=out_shardings, donate_argnums=0)
  frozen_items = {stage.frozen_item: frozen} if has_frozen else {}
  meta = checkpoints.model_meta(config, config.job)
  preview = (None if stage.preview is None
             else lambda s, step: stage.preview(s, frozen, step))
  result = run_loop(
      state=state, start_step=start_step, train_step=train_step, batches=batches,
      to_global=functools.partial(sharding_lib.host_to_global, sharding=batch_sharding),
      store=store,
      checkpoint_items=lambda s: {"state": s, "data": batches, "meta": meta, **frozen_items},
      settings=loop_settings(config.train, ctx.global_batch), workdir=ctx.workdir,
      preview=preview)
  store.close()
  logging.info("%s %s at step %d (loss %.5g); checkpoints in %s", stage.name, result.stopped_by,
               result.step, result.last_loss, store.directory)
  return result
