"""Stage II: train the fusion head on frozen, noisy-step UNet features (SPEC.md §2)."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmfnet_jax import diffusion, features, imageio, losses
from dmfnet_jax.data import pipeline
from dmfnet_jax.errors import CheckpointError, ConfigError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import unet as unet_lib
from dmfnet_jax.train import checkpointing, setup
from dmfnet_jax.train import sharding as sharding_lib
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train.loop import is_chief, run_loop
from dmfnet_jax.train.stage1 import load_unet_params

HOW_TO_GET_STAGE1 = (
    "train one with `python -m dmfnet_jax.main --config=configs/stage1.py --workdir=runs/stage1` "
    "and pass --config.stage1_checkpoint=runs/stage1, or convert the authors' weights with "
    "`python -m dmfnet_jax.tools.import_torch --stage1=UNET.pth --out=DIR`.")


def model_meta(config) -> dict:
  meta = {"job": "stage2", "model": config.model.to_dict(), "fusion": config.fusion.to_dict(),
          "diffusion": config.diffusion.to_dict()}
  if "loss" in config:
    meta["loss"] = config.loss.to_dict()
  return meta


def feature_schedule(config) -> jax.Array:
  schedule = diffusion.schedule_from_config(config.diffusion)
  return jnp.asarray(schedule.sqrt_alphas_cumprod_prev, jnp.float32)


def make_fuse_fn(unet, head, sqrt_acp_prev, fusion_cfg):
  """(unet_params, head_params, a, b, key) -> fused; the whole forward in one graph."""
  timesteps = tuple(int(t) for t in fusion_cfg.timesteps)
  feat_scales = tuple(int(s) for s in fusion_cfg.feat_scales)

  def fuse(unet_params, head_params, a, b, key):
    return features.fuse_images(unet, unet_params, head, head_params, a, b, key, sqrt_acp_prev,
                                timesteps, feat_scales)

  return fuse


def make_train_step(fuse_fn, tx, lr_factor=None, loss_weights=None):
  """One optimizer step of the head; `lr_factor(step)` scales the update (None = 1);
  `loss_weights` ({intensity,gradient,ssim}_weight) default to the reference's."""
  lr_factor = lr_factor or (lambda step: 1.0)
  loss_weights = dict(loss_weights or {})

  def train_step(state: state_lib.TrainState, unet_params, batch):
    key = jax.random.fold_in(state.rng, state.step)
    a, b = batch["a"], batch["b"]
    frozen = jax.lax.stop_gradient(unet_params)

    def loss_fn(params):
      fused = fuse_fn(frozen, params, a, b, key)
      total, terms = losses.fusion_loss(fused, a, b, **loss_weights)
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = state_lib.apply_gradients(state, grads, tx, lr_factor)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, **terms, "lr_factor": jnp.asarray(lr_factor(state.step))}

  return train_step


def _check_fusion_meta(meta: dict, config, where) -> None:
  problems = []
  for group in ("model", "fusion"):
    if group in meta:
      current = config[group].to_dict()
      problems += [f"{group}.{d}" for d in checkpointing.config_mismatch(
          meta[group], current, keys=sorted(current))]
  if problems:
    raise CheckpointError(f"{where} does not match the config:\n  " + "\n  ".join(problems)
                          + "\nUse the config the model was trained with (e.g. the :tiny preset).")


def restore_two_stage(store: checkpointing.CheckpointStore, step: int):
  """Raw (unet_params, head_params) at `step`: exported/imported models hold
  `params` = {unet, head}; Stage II checkpoints hold `state` (the head) and `unet`."""
  where = store.directory / str(step)
  names = store.item_names_at(step)
  if "params" in names:
    params = store.restore(step, {"params": None})["params"]
    if not (isinstance(params, dict) and "unet" in params and "head" in params):
      raise CheckpointError(f"{where}: holds no fusion model (its params have no 'unet' and "
                            "'head' parts: a Stage I checkpoint?)")
    return params["unet"], params["head"]
  if "state" in names and "unet" in names:
    restored = store.restore(step, {"state": None, "unet": None})
    return restored["unet"], restored["state"]["params"]
  raise CheckpointError(f"{where}: holds no fusion model (needs Stage I and Stage II "
                        f"parameters; found items {names})")


def load_two_stage_params(path: str, config):
  """(unet_params, head_params) of a two-stage checkpoint (a Stage II workdir or step
  folder, or an exported/imported model), checked against `config`'s model."""
  store, step = checkpointing.open_for_reading(path)
  where = store.directory / str(step)
  _check_fusion_meta(store.read_meta(step), config, where)
  unet_params, head_params = restore_two_stage(store, step)
  unet_abstract = unet_lib.abstract_params(config.model)
  head_abstract = head_lib.abstract_head_params(
      head_lib.fusion_head_from_config(config.model, config.fusion))
  unet_params = checkpointing.conform_params(unet_params, unet_abstract, f"{where} (Stage I UNet)")
  head_params = checkpointing.conform_params(head_params, head_abstract, f"{where} (Stage II head)")
  return unet_params, head_params


def require_stage1_checkpoint(config) -> str:
  path = config.get("stage1_checkpoint", "")
  if not path:
    raise ConfigError("config.stage1_checkpoint is empty: Stage II needs a trained Stage I UNet; "
                      + HOW_TO_GET_STAGE1)
  if not pathlib.Path(path).expanduser().exists():
    raise CheckpointError(f"config.stage1_checkpoint={path}: does not exist; " + HOW_TO_GET_STAGE1)
  return path


def run(config, workdir: str) -> None:
  basics = setup.start_run(config, workdir)
  workdir_path, mesh, global_batch = basics.workdir, basics.mesh, basics.global_batch
  tx, root_key, store = basics.tx, basics.root_key, basics.store
  unet = unet_lib.unet_from_config(config.model, dtype=basics.dtype)
  head = head_lib.fusion_head_from_config(config.model, config.fusion, dtype=basics.dtype)
  sqrt_acp_prev = feature_schedule(config)
  crop = int(config.data.crop_size)
  fuse_fn = make_fuse_fn(unet, head, sqrt_acp_prev, config.fusion)
  replicated = sharding_lib.replicated(mesh)
  abstract_unet = unet_lib.abstract_params(config.model)
  unet_shardings = sharding_lib.tree_shardings(abstract_unet, mesh)

  def init_params(rng):
    return head_lib.init_head_params(head, rng, coarsest=crop // 2 ** (len(config.model.channel_mults) - 1))

  init_key = jax.random.fold_in(root_key, 0)
  shardings, abstract_sharded = setup.abstract_sharded_state(init_params, basics, init_key,
                                                             ema=False)

  dataset = pipeline.make_train_dataset(config.data, stage="stage2", global_batch_size=global_batch,
                                        seed=config.seed)
  batches = iter(dataset)

  init_unet = None

  def initialise():
    nonlocal init_unet
    head_params = None
    if config.get("init_checkpoint"):
      logging.info("Initialising the head from configured checkpoint %s", config.init_checkpoint)
      init_unet, head_params = load_two_stage_params(config.init_checkpoint, config)
    state, _ = state_lib.init_sharded_state(init_params, tx, init_key, mesh, ema=False,
                                            params=head_params)
    return state

  state, start_step, extras = setup.restore_or_initialise(
      store=store, abstract_state=abstract_sharded, data_iterator=batches,
      model_groups={"model": config.model, "fusion": config.fusion},
      initialise=initialise,
      extra_targets={"unet": checkpointing.abstract_with_shardings(abstract_unet, unet_shardings)})
  if start_step:
    unet_params = extras["unet"]
  elif init_unet is not None and not config.get("stage1_checkpoint"):
    logging.info("Using the frozen Stage I UNet of %s", config.init_checkpoint)
    unet_params = jax.device_put(init_unet, unet_shardings)
  else:
    source = require_stage1_checkpoint(config)
    logging.info("Loading the frozen Stage I UNet from %s", source)
    unet_params = jax.device_put(load_unet_params(source, config.model), unet_shardings)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  lr_factor = state_lib.learning_rate_factor(config.train)
  loss_weights = config.loss.to_dict() if "loss" in config else None
  train_step = jax.jit(make_train_step(fuse_fn, tx, lr_factor, loss_weights),
                       in_shardings=(shardings, unet_shardings, batch_sharding),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  step_with_unet = lambda s, batch: train_step(s, unet_params, batch)

  preview_batch = None
  fuse_jit = jax.jit(fuse_fn)

  def preview(current_state, step):
    nonlocal preview_batch
    if preview_batch is None:
      preview_batch = next(iter(pipeline.make_train_dataset(
          config.data, stage="stage2", global_batch_size=global_batch, seed=config.seed + 1)))
    a, b = (jnp.asarray(preview_batch[k][: config.train.preview_count]) for k in ("a", "b"))
    fused = fuse_jit(unet_params, current_state.params, a, b, jax.random.fold_in(root_key, 3))
    if is_chief():
      rows = [np.concatenate([imageio.from_model_range(np.asarray(x)[i, ..., 0])
                              for x in (a, b, fused)], axis=1) for i in range(a.shape[0])]
      path = workdir_path / "previews" / f"fused_{step:08d}.png"
      imageio.write_image_atomic(path, np.concatenate(rows, axis=0))
      logging.info("Wrote %s", path)

  meta = model_meta(config)
  result = run_loop(
      state=state, start_step=start_step, train_step=step_with_unet, batches=batches,
      to_global=functools.partial(sharding_lib.host_to_global, sharding=batch_sharding),
      store=store,
      checkpoint_items=lambda s: {"state": s, "data": batches, "meta": meta, "unet": unet_params},
      settings=setup.loop_settings(config.train, global_batch),
      workdir=workdir_path, preview=preview)
  store.close()
  logging.info("Stage II %s at step %d (loss %.5g); checkpoints in %s", result.stopped_by,
               result.step, result.last_loss, store.directory)
