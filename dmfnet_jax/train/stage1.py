"""Stage I: train the UNet as a predict-x0 diffusion model (docs/model.md §1-2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dmfnet_jax import diffusion, imageio, inference
from dmfnet_jax.models import unet as unet_lib
from dmfnet_jax.runtime import is_chief
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train import trainer


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
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                       "lr_factor": jnp.asarray(lr_factor(state.step))}

  return train_step


def preview_schedule(config) -> diffusion.Schedule:
  """A shortened schedule for previews: the UNet is conditioned on the continuous
  level g, so a respaced linear schedule spanning the same range samples with it."""
  steps = int(config.train.preview_steps)
  scale = config.diffusion.num_timesteps / steps
  return diffusion.make_schedule("linear", steps, config.diffusion.linear_start * scale,
                                 min(config.diffusion.linear_end * scale, 0.999))


def make_previewer(unet: unet_lib.UNet, config, workdir, root_key):
  schedule = preview_schedule(config)
  size = int(config.data.crop_size)
  shape = (int(config.train.preview_count), size, size, unet.in_channel)

  def apply_fn(params, x, level):
    return unet.apply({"params": params}, x, level, train=False)

  sample = jax.jit(lambda params, key: diffusion.ancestral_sample(
      apply_fn, params, key, shape, schedule))

  def preview(state, frozen, step):
    del frozen  # Stage I trains every parameter
    params = state.ema_params if state.ema_params is not None else state.params
    samples = np.asarray(jax.device_get(sample(params, jax.random.fold_in(root_key, step))))
    if is_chief():
      tiles = [imageio.from_model_range(s[..., 0]) for s in samples]
      grid = np.concatenate(tiles, axis=1)
      path = workdir / "previews" / f"samples_{step:08d}.png"
      imageio.write_image_atomic(path, grid)
      logging.info("Wrote %s", path)

  return preview


def build_stage(config, ctx: trainer.RunContext) -> trainer.Stage:
  unet = unet_lib.unet_from_config(config.model, dtype=ctx.dtype)
  schedule = diffusion.schedule_from_config(config.diffusion)
  sqrt_acp_prev = jnp.asarray(schedule.sqrt_alphas_cumprod_prev, jnp.float32)
  crop = int(config.data.crop_size)

  def init_params(rng):
    x = jnp.zeros((1, crop, crop, unet.in_channel), jnp.float32)
    return unet.init({"params": rng}, x, jnp.ones((1,), jnp.float32))["params"]

  def load_params():
    if not config.init_checkpoint:
      return None, None
    logging.info("Initialising from configured checkpoint %s", config.init_checkpoint)
    return inference.load_unet_params(config.init_checkpoint, config.model), None

  return trainer.Stage(
      name="Stage I", init_params=init_params, load_params=load_params,
      train_step=make_train_step(unet, ctx.tx, sqrt_acp_prev, config.train.ema_decay,
                                 state_lib.learning_rate_factor(config.train)),
      preview=make_previewer(unet, config, ctx.workdir, jax.random.fold_in(ctx.root_key, 2)),
      ema=config.train.ema_decay > 0)


def run(config, workdir: str) -> None:
  trainer.run_training(config, workdir, build_stage)
