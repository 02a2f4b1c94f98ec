"""Stage II: train the fusion head on frozen, noisy-step UNet features (docs/model.md §3-5)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmfnet_jax import imageio, inference, losses, validation
from dmfnet_jax.data import pipeline
from dmfnet_jax.errors import CheckpointError, ConfigError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import unet as unet_lib
from dmfnet_jax.runtime import is_chief
from dmfnet_jax.train import state as state_lib
from dmfnet_jax.train import trainer

HOW_TO_GET_STAGE1 = (
    "train one with `python -m dmfnet_jax.main --config=configs/stage1.py --workdir=runs/stage1` "
    "and pass --config.stage1_checkpoint=runs/stage1, or convert the authors' weights with "
    "`python -m dmfnet_jax.tools.import_torch --stage1=UNET.pth --out=DIR`.")


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


def require_stage1_checkpoint(config) -> str:
  path = config.get("stage1_checkpoint", "")
  if not path:
    raise ConfigError("config.stage1_checkpoint is empty: Stage II needs a trained Stage I UNet; "
                      + HOW_TO_GET_STAGE1)
  if not pathlib.Path(path).expanduser().exists():
    raise CheckpointError(f"config.stage1_checkpoint={path}: does not exist; " + HOW_TO_GET_STAGE1)
  return path


def make_previewer(unet_fuse, config, workdir, root_key, global_batch: int):
  """Fuses the same few training crops at each preview step (chief writes the PNG)."""
  preview_batch = []
  fuse = jax.jit(unet_fuse)

  def preview(state, unet_params, step):
    if not preview_batch:
      preview_batch.append(next(iter(pipeline.make_train_dataset(
          config.data, stage="stage2", global_batch_size=global_batch, seed=config.seed + 1))))
    a, b = (jnp.asarray(preview_batch[0][k][: config.train.preview_count]) for k in ("a", "b"))
    fused = fuse(unet_params, state.params, a, b, jax.random.fold_in(root_key, 3))
    if is_chief():
      rows = [np.concatenate([imageio.from_model_range(np.asarray(x)[i, ..., 0])
                              for x in (a, b, fused)], axis=1) for i in range(a.shape[0])]
      path = workdir / "previews" / f"fused_{step:08d}.png"
      imageio.write_image_atomic(path, np.concatenate(rows, axis=0))
      logging.info("Wrote %s", path)

  return preview


def build_stage(config, ctx: trainer.RunContext) -> trainer.Stage:
  if not validation.is_resolved(config.model):  # no checkpoint says what the UNet is
    require_stage1_checkpoint(config)
  unet = unet_lib.unet_from_config(config.model, dtype=ctx.dtype)
  head = head_lib.fusion_head_from_config(config.model, config.fusion, dtype=ctx.dtype)
  fuse_fn = inference.make_fuse_fn(unet, head, inference.feature_schedule(config), config.fusion)
  coarsest = int(config.data.crop_size) // 2 ** (len(config.model.channel_mults) - 1)

  def init_params(rng):
    return head_lib.init_head_params(head, rng, coarsest=coarsest)

  def load_params():
    """(head, frozen UNet): the UNet of stage1_checkpoint if set, else init_checkpoint's."""
    head_params = unet_params = None
    if config.get("init_checkpoint"):
      logging.info("Initialising the head from configured checkpoint %s", config.init_checkpoint)
      unet_params, head_params = inference.load_two_stage_params(config.init_checkpoint, config)
    if config.get("stage1_checkpoint") or unet_params is None:
      source = require_stage1_checkpoint(config)
      logging.info("Loading the frozen Stage I UNet from %s", source)
      unet_params = inference.load_unet_params(source, config.model)
    else:
      logging.info("Using the frozen Stage I UNet of %s", config.init_checkpoint)
    return head_params, unet_params

  return trainer.Stage(
      name="Stage II", init_params=init_params, load_params=load_params,
      train_step=make_train_step(fuse_fn, ctx.tx, state_lib.learning_rate_factor(config.train),
                                 config.loss.to_dict() if "loss" in config else None),
      preview=make_previewer(fuse_fn, config, ctx.workdir, ctx.root_key, ctx.global_batch),
      abstract_frozen=unet_lib.abstract_params(config.model))


def run(config, workdir: str) -> None:
  trainer.run_training(config, workdir, build_stage)
