"""Stage I: train the UNet as a predict-x0 diffusion model (SPEC.md §1)."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmfnet_jax import diffusion, imageio
from dmfnet_jax.data import pipeline
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import unet as unet_lib
from dmfnet_jax.train import checkpointing, setup
from dmfnet_jax.train import sharding as sharding_lib
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train.loop import is_chief, run_loop


def model_meta(config) -> dict:
  return {"job": "stage1", "model": config.model.to_dict(),
          "diffusion": config.diffusion.to_dict()}


def make_train_step(unet: unet_lib.UNet, tx, sqrt_acp_prev: jax.Array, ema_decay: float,
                    lr_factor=None):
  """One optimizer step; the step's key is `fold_in(rng, step)`.

  `lr_factor(step)` scales the update (`state_lib.learning_rate_factor`; None = 1)."""
  lr_factor = lr_factor or (lambda step: 1.0)

  def apply_fn(params, x, level, dropout_key):
    return unet.apply({"params": params}, x, level, train=True, rngs={"dropout": dropout_key})

  def train_step(state: state_lib.TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    images = batch["image"]

    def loss_fn(params):
      return diffusion.x0_loss(apply_fn, params, images, key, sqrt_acp_prev)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state = state_lib.apply_gradients(state, grads, tx, lr_factor)
    ema = state.ema_params
    if ema is not None:
      ema = state_lib.ema_update(ema, params, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    return new_state, {"loss": loss, "grad_norm": grad_norm,
                       "lr_factor": jnp.asarray(lr_factor(state.step))}

  return train_step


def preview_schedule(config) -> diffusion.Schedule:
  """A shortened schedule for previews: the UNet is conditioned on the continuous
  level g, so a respaced linear schedule spanning the same range samples with it."""
  steps = int(config.train.preview_steps)
  scale = config.diffusion.num_timesteps / steps
  return diffusion.make_schedule("linear", steps, config.diffusion.linear_start * scale,
                                 min(config.diffusion.linear_end * scale, 0.999))


def make_previewer(unet: unet_lib.UNet, config, workdir: pathlib.Path, root_key):
  schedule = preview_schedule(config)
  size = int(config.data.crop_size)
  shape = (int(config.train.preview_count), size, size, unet.in_channel)

  def apply_fn(params, x, level):
    return unet.apply({"params": params}, x, level, train=False)

  sample = jax.jit(lambda params, key: diffusion.ancestral_sample(
      apply_fn, params, key, shape, schedule))

  def preview(state, step):
    params = state.ema_params if state.ema_params is not None else state.params
    samples = np.asarray(jax.device_get(sample(params, jax.random.fold_in(root_key, step))))
    if is_chief():
      tiles = [imageio.from_model_range(s[..., 0]) for s in samples]
      grid = np.concatenate(tiles, axis=1)
      path = workdir / "previews" / f"samples_{step:08d}.png"
      imageio.write_image_atomic(path, grid)
      logging.info("Wrote %s", path)

  return preview


def load_unet_params(path: str, model_cfg) -> Any:
  """Stage I parameters from an Orbax checkpoint (workdir/step) or a reference .pth."""
  if str(path).endswith((".pth", ".pt")):
    from dmfnet_jax import torch_import  # pylint: disable=g-import-not-at-top
    return unet_lib.unet_params_from_torch(torch_import.load_torch_state_dict(path), model_cfg)
  store, step = checkpointing.open_for_reading(path)
  setup.check_model_matches(store, step, {"model": model_cfg})
  abstract = unet_lib.abstract_params(model_cfg)
  names = store.item_names_at(step)
  if "state" in names and store.read_meta(step).get("job") == "stage1":
    meta_state = store.restore(step, {"state": None})["state"]
    params = meta_state.get("ema_params") or meta_state["params"]
  elif "unet" in names:
    params = store.restore(step, {"unet": None})["unet"]
  elif "params" in names:
    params = store.restore(step, {"params": None})["params"]["unet"]
  else:
    raise CheckpointError(f"{store.directory / str(step)}: holds no Stage I parameters")
  return checkpointing.conform_params(params, abstract, f"{store.directory / str(step)}")


def run(config, workdir: str) -> None:
  basics = setup.start_run(config, workdir)
  workdir_path, mesh, global_batch = basics.workdir, basics.mesh, basics.global_batch
  tx, root_key, store = basics.tx, basics.root_key, basics.store
  unet = unet_lib.unet_from_config(config.model, dtype=basics.dtype)
  schedule = diffusion.schedule_from_config(config.diffusion)
  sqrt_acp_prev = jnp.asarray(schedule.sqrt_alphas_cumprod_prev, jnp.float32)
  ema = config.train.ema_decay > 0
  crop = int(config.data.crop_size)

  def init_params(rng):
    x = jnp.zeros((1, crop, crop, unet.in_channel), jnp.float32)
    return unet.init({"params": rng}, x, jnp.ones((1,), jnp.float32))["params"]

  init_key, data_seed = jax.random.fold_in(root_key, 0), config.seed
  shardings, abstract_sharded = setup.abstract_sharded_state(init_params, basics, init_key,
                                                             ema=ema)

  dataset = pipeline.make_train_dataset(config.data, stage="stage1", global_batch_size=global_batch,
                                        seed=data_seed)
  batches = iter(dataset)

  def initialise():
    params = None
    if config.init_checkpoint:
      logging.info("Initialising from configured checkpoint %s", config.init_checkpoint)
      params = load_unet_params(config.init_checkpoint, config.model)
    state, _ = state_lib.init_sharded_state(init_params, tx, init_key, mesh, ema=ema,
                                            params=params)
    return state

  state, start_step, _ = setup.restore_or_initialise(
      store=store, abstract_state=abstract_sharded, data_iterator=batches,
      model_groups={"model": config.model}, initialise=initialise)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  step_fn = make_train_step(unet, tx, sqrt_acp_prev, config.train.ema_decay,
                            state_lib.learning_rate_factor(config.train))
  train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, sharding_lib.replicated(mesh)),
                       donate_argnums=0)
  meta = model_meta(config)
  result = run_loop(
      state=state, start_step=start_step, train_step=train_step, batches=batches,
      to_global=functools.partial(sharding_lib.host_to_global, sharding=batch_sharding),
      store=store,
      checkpoint_items=lambda s: {"state": s, "data": batches, "meta": meta},
      settings=setup.loop_settings(config.train, global_batch),
      workdir=workdir_path,
      preview=make_previewer(unet, config, workdir_path, jax.random.fold_in(root_key, 2)))
  store.close()
  logging.info("Stage I %s at step %d (loss %.5g); checkpoints in %s", result.stopped_by,
               result.step, result.last_loss, store.directory)
