"""Every check of a config: each impossible value fails with its key named, before
anything is compiled or read. `validate` runs at start-up; the library functions that
take a config group (models, data pipeline, optimizer) call the check of their group
here, so a direct caller gets the same message as the command line."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from dmfnet_jax import config_defaults
from dmfnet_jax.errors import ConfigError


def _need(cond: bool, key: str, value: Any, why: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def levels(model_cfg) -> int:
  return len(model_cfg.channel_mults)


def min_multiple(model_cfg) -> int:
  """H and W must be divisible by this (one halving per level but the last)."""
  return 2 ** (levels(model_cfg) - 1)


def attention_levels(channel_mults, attn_res, image_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(down-path levels, up-path levels) whose resnet blocks attend (docs/model.md §1).

  The reference compares `attn_res` with `image_size` halved per level on the way down
  (integer halving) and doubled back on the way up, not with the actual feature size;
  `image_size` is therefore a structural setting, not the input size."""
  num_levels = len(channel_mults)
  down = [int(image_size) // 2**level for level in range(num_levels)]
  up = [down[-1] * 2**(num_levels - 1 - level) for level in range(num_levels)]
  attend = {int(r) for r in attn_res}
  return (tuple(level for level in range(num_levels) if down[level] in attend),
          tuple(level for level in range(num_levels) if up[level] in attend))


def valid_fusion_side(size: int, num_levels: int) -> int:
  """Smallest side >= size that the UNet and the head accept: a multiple of
  2^(levels-1) giving the coarsest level at least MIN_COARSEST_SIDE pixels."""
  multiple = 2**(num_levels - 1)
  return max(-(-size // multiple) * multiple, config_defaults.MIN_COARSEST_SIDE * multiple)


def check_input_size(model_cfg, height: int, width: int, what: str, *, fusion: bool = False) -> None:
  m = min_multiple(model_cfg)
  for name, size in (("height", height), ("width", width)):
    if size % m:
      raise ConfigError(f"{what}: {name} {size} is not a multiple of {m} "
                        f"(2^(levels-1) with {levels(model_cfg)} levels)")
    if fusion and size < valid_fusion_side(size, levels(model_cfg)):
      raise ConfigError(f"{what}: {name} {size} is below {valid_fusion_side(1, levels(model_cfg))}: "
                        "the fusion head's 7x7 reflect padding needs the coarsest level to be at "
                        f"least {config_defaults.MIN_COARSEST_SIDE} pixels")


def _as_config(cfg: Any) -> ml_collections.ConfigDict:
  return cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(cfg))


def validate_model(model_cfg: Any) -> None:
  """A model group (ConfigDict or dict of UNet settings)."""
  c = _as_config(model_cfg)
  _need(c.inner_channel > 0, "model.inner_channel", c.inner_channel, "must be positive")
  _need(len(c.channel_mults) >= 1 and all(m > 0 for m in c.channel_mults),
        "model.channel_mults", list(c.channel_mults), "needs at least one positive multiplier")
  for m in c.channel_mults:
    _need((c.inner_channel * m) % c.norm_groups == 0, "model.norm_groups", c.norm_groups,
          f"must divide every level width (inner_channel*mult = {c.inner_channel * m})")
  _need(c.inner_channel % 2 == 0, "model.inner_channel", c.inner_channel,
        "must be even (sin/cos noise-level encoding)")
  _need(c.res_blocks >= 1, "model.res_blocks", c.res_blocks, "must be at least 1")
  _need(0.0 <= c.dropout < 1.0, "model.dropout", c.dropout, "must be in [0, 1)")
  _need(c.image_size > 0, "model.image_size", c.image_size, "must be positive")
  _need(c.in_channel == 1 and c.out_channel == 1, "model.in_channel/out_channel",
        (c.in_channel, c.out_channel), "DM-FNet works on single-channel (luma) images")


def validate_diffusion(cfg) -> None:
  _need(cfg.schedule in ("linear", "cosine"), "diffusion.schedule", cfg.schedule,
        "use 'linear' or 'cosine'")
  _need(cfg.num_timesteps >= 2, "diffusion.num_timesteps", cfg.num_timesteps, "must be >= 2")
  _need(0 < cfg.linear_start < cfg.linear_end < 1, "diffusion.linear_start/linear_end",
        (cfg.linear_start, cfg.linear_end), "need 0 < start < end < 1")


def validate_data(cfg, *, need_root: bool = False) -> None:
  unknown = [t for t in cfg.tasks if t not in config_defaults.TASKS]
  _need(not unknown, "data.tasks", list(cfg.tasks),
        f"unknown task(s) {unknown}; valid: {list(config_defaults.TASKS)}")
  _need(len(cfg.tasks) > 0, "data.tasks", list(cfg.tasks),
        f"name at least one task of {', '.join(config_defaults.TASKS)}")
  if need_root:
    _need(bool(cfg.root), "data.root", cfg.root, "set it to a dataset folder")
  crop = cfg.get("crop_size")
  if crop is not None:
    _need(isinstance(crop, int) and crop > 0, "data.crop_size", crop, "must be a positive integer")
  _need(cfg.get("num_workers", 0) >= 0, "data.num_workers", cfg.get("num_workers"), "must be >= 0")
  if not cfg.get("root") and "phantom_count" in cfg:
    _need(cfg.phantom_count > 0, "data.phantom_count", cfg.phantom_count, "must be positive")
    if crop is not None:
      _need(cfg.phantom_size >= crop, "data.phantom_size", cfg.phantom_size,
            f"is smaller than data.crop_size ({crop})")


def validate_train(cfg, *, stage: str) -> None:
  _need(cfg.num_steps >= 0, "train.num_steps", cfg.num_steps, "must be >= 0")
  _need(cfg.batch_size > 0, "train.batch_size", cfg.batch_size, "must be positive")
  if stage == "stage1":
    _need(cfg.batch_size % 2 == 0, "train.batch_size", cfg.batch_size,
          "counts images and each pair gives two, so it must be even")
  validate_optimizer(cfg)
  _need(cfg.checkpoint_every > 0, "train.checkpoint_every", cfg.checkpoint_every, "must be positive")
  _need(cfg.log_every > 0, "train.log_every", cfg.log_every, "must be positive")
  _need(cfg.keep_checkpoints >= 1, "train.keep_checkpoints", cfg.keep_checkpoints, "must be >= 1")
  _need(0.0 <= cfg.ema_decay < 1.0, "train.ema_decay", cfg.ema_decay, "must be in [0, 1)")
  validate_lr_schedule(cfg)
  _need(cfg.preview_every >= 0, "train.preview_every", cfg.preview_every, "must be >= 0")
  validate_compute_dtype(cfg.compute_dtype, "train.compute_dtype")


def validate_optimizer(cfg) -> None:
  _need(cfg.optimizer in config_defaults.OPTIMIZERS, "train.optimizer", cfg.optimizer,
        f"use one of {', '.join(config_defaults.OPTIMIZERS)}")
  _need(cfg.learning_rate > 0, "train.learning_rate", cfg.learning_rate, "must be positive")


def validate_lr_schedule(cfg) -> None:
  _need(cfg.get("lr_schedule", "constant") in config_defaults.LR_SCHEDULES, "train.lr_schedule",
        cfg.get("lr_schedule"), f"must be one of {', '.join(config_defaults.LR_SCHEDULES)}")
  if cfg.get("lr_schedule") == "linear_decay":
    _need(0 <= cfg.decay_start_step < cfg.num_steps, "train.decay_start_step",
          cfg.decay_start_step, f"must be in [0, train.num_steps={cfg.num_steps})")
  _need(cfg.get("warmup_steps", 0) >= 0, "train.warmup_steps", cfg.get("warmup_steps"),
        "must be >= 0")


def validate_compute_dtype(name: str, key: str) -> None:
  _need(name in config_defaults.COMPUTE_DTYPES, key, name,
        f"use {' or '.join(repr(d) for d in config_defaults.COMPUTE_DTYPES)}")


def validate_fusion(fusion_cfg, model_cfg) -> None:
  n = levels(model_cfg) * (model_cfg.res_blocks + 1)
  bad = [s for s in fusion_cfg.feat_scales if not 0 <= s < n]
  _need(not bad, "fusion.feat_scales", list(fusion_cfg.feat_scales),
        f"indices must lie in 0..{n - 1} (decoder blocks of this model)")
  _need(len(fusion_cfg.timesteps) >= 1, "fusion.timesteps", list(fusion_cfg.timesteps),
        "name at least one timestep")


def validate_loss(loss_cfg) -> None:
  for key, value in loss_cfg.items():
    _need(isinstance(value, (int, float)) and 0.0 <= value < float("inf"), f"loss.{key}", value,
          "must be a finite number >= 0")
  _need(any(v > 0 for v in loss_cfg.values()), "loss", loss_cfg.to_dict(),
        "at least one weight must be positive")


def validate_fuse(cfg) -> None:
  _need(cfg.batch_size >= 1, "fuse.batch_size", cfg.batch_size, "must be >= 1")
  fmt = str(cfg.output_format).lower().lstrip(".")
  formats = [e[1:] for e in config_defaults.IMAGE_EXTENSIONS]
  _need(f".{fmt}" in config_defaults.IMAGE_EXTENSIONS, "fuse.output_format", cfg.output_format,
        f"use one of {formats}")
  validate_compute_dtype(cfg.get("compute_dtype", "float32"), "fuse.compute_dtype")
  at_once = cfg.get("unet_inputs_at_once", 0)
  _need(isinstance(at_once, int) and at_once >= 0, "fuse.unet_inputs_at_once", at_once,
        "must be an integer >= 0 (0 = automatic)")
  cpu_devices = cfg.get("cpu_devices", 0)
  _need(isinstance(cpu_devices, int) and cpu_devices >= 0, "fuse.cpu_devices", cpu_devices,
        "must be an integer >= 0 (0 = one per core)")


def is_resolved(group) -> bool:
  """False while a group still has keys to be read from a checkpoint (None values)."""
  return all(value is not None for value in group.values())


def validate(config) -> None:
  """Checks the groups a config has, according to its job.

  Model and fusion groups that are still to be read from a checkpoint are checked
  once they are filled (`inference.resolve_structure` calls this again)."""
  job = config.get("job")
  model_known = "model" in config and is_resolved(config.model)
  if model_known:
    validate_model(config.model)
  if "diffusion" in config:
    validate_diffusion(config.diffusion)
  if "data" in config and "tasks" in config.data:
    validate_data(config.data)
  if job in ("stage1", "stage2") and "train" in config:
    validate_train(config.train, stage=job)
    if model_known:
      check_input_size(config.model, config.data.crop_size, config.data.crop_size,
                       "config.data.crop_size", fusion=job == "stage2")
  if "fusion" in config and model_known and is_resolved(config.fusion):
    validate_fusion(config.fusion, config.model)
  if "loss" in config:
    validate_loss(config.loss)
  if "fuse" in config and job == "fuse":
    validate_fuse(config.fuse)
  if job == "demo":
    for part in ("stage1", "stage2", "fuse", "shipped_fuse"):
      if part in config:
        validate(config[part])
