"""Config groups shared by the files in `configs/`.

The config files stay short and declarative: each composes these groups and
states only what differs. Reference values are the defaults; presets shrink a
run (`tiny`) without touching the model's structure rules.
"""

from __future__ import annotations

import ml_collections

from dmfnet_jax.models import unet as unet_lib

# Reference hyper-parameters (SPEC.md §1), as the UNet's defaults. Note image_size
# 256: it reproduces the reference's 21,984,641 parameters, because the attention
# rule compares attn_res with image_size halved per level, so level 4 (256/16)
# attends. It is a structural hyper-parameter, not the input size.
REFERENCE_MODEL = dict(unet_lib.MODEL_DEFAULTS)

# CPU-sized model; the parity vectors' "tiny" configuration.
TINY_MODEL = dict(REFERENCE_MODEL, inner_channel=32, norm_groups=8, image_size=64)

# The model this project trains and ships (CPU-sized, reference structure: with
# image_size 256 attention sits at the 16x16 level and the middle, as in the
# published models).
CPU_MODEL = dict(REFERENCE_MODEL, inner_channel=32, norm_groups=8)

TASKS = ("MRI-CT", "MRI-PET", "MRI-SPECT")


def base_config(job: str) -> ml_collections.ConfigDict:
  """Keys every job has."""
  cfg = ml_collections.ConfigDict()
  cfg.job = job
  cfg.seed = 0
  cfg.mesh = mesh_config()
  cfg.distributed = distributed_config()
  return cfg


def model_config(preset: str = "reference") -> ml_collections.ConfigDict:
  values = {"reference": REFERENCE_MODEL, "tiny": TINY_MODEL, "cpu": CPU_MODEL}[preset]
  # Sequences are tuples: ml_collections can override tuples from the command line
  # (--config.model.channel_mults='(1,2,2)'), not lists.
  return ml_collections.ConfigDict(dict(values))


def diffusion_config(schedule: str) -> ml_collections.ConfigDict:
  """Stage I trains with `cosine`; Stage II features and fusion use `linear`."""
  return ml_collections.ConfigDict(
      dict(schedule=schedule, num_timesteps=2000, linear_start=1e-6, linear_end=1e-2))


def fusion_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          feat_scales=(2, 5, 8, 11, 14),
          timesteps=(5, 10, 20),
          # Reference quirk: with one timestep the aggregation block is skipped.
          skip_aggregation_for_single_timestep=True,
      ))


def loss_config() -> ml_collections.ConfigDict:
  """Stage II hybrid-loss weights; the defaults are the reference's (SPEC.md §2)."""
  from dmfnet_jax import losses  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(losses.REFERENCE_WEIGHTS))


def data_config(crop_size: int = 160) -> ml_collections.ConfigDict:
  from dmfnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  values = pipeline.default_data_config().to_dict()
  values.update(crop_size=crop_size, tasks=tuple(values["tasks"]))
  # Tuples, not lists: --config.data.tasks='("MRI-CT",)' works on the command line.
  return ml_collections.ConfigDict(values)


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh: `-1` takes all remaining devices. Batch is split over data x fsdp;
  parameters are replicated over `data` and sharded over `fsdp`."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def distributed_config() -> ml_collections.ConfigDict:
  """`jax.distributed` settings; `auto` initialises when the environment asks for it
  (Cloud TPU, SLURM, or the variables below)."""
  return ml_collections.ConfigDict(
      dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1))


# train.lr_schedule values; the first is the reference's (in effect constant) rate.
LR_SCHEDULES = ("constant", "linear_decay")


def train_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(
      dict(
          num_steps=630_000,
          batch_size=2,
          optimizer="adamw",
          learning_rate=1e-5,
          weight_decay=0.01,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          grad_clip_norm=0.0,  # 0 = off (reference)
          lr_schedule="constant",  # reference; or "linear_decay" (to 0 at num_steps)
          decay_start_step=0,  # linear_decay: the rate is constant before this step
          warmup_steps=0,  # 0 = none (reference); else the rate ramps up linearly over these
          ema_decay=0.0,  # 0 = off (reference)
          compute_dtype="float32",  # or "bfloat16": bf16 compute, fp32 params/opt state
          log_every=50,
          checkpoint_every=5000,
          keep_checkpoints=3,
          async_checkpointing=True,
          preview_every=10_000,  # 0 = off
          preview_count=2,
          preview_steps=200,  # ancestral steps of a preview (continuous-g respacing)
          stop_on_nonfinite=True,
      ))
  cfg.update(overrides)
  return cfg


def fuse_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          pairs="",  # 'a.png:b.png,...' or a text file of pairs
          dir_a="",
          dir_b="",
          output_dir="",  # default: WORKDIR/fused
          output_format="png",
          batch_size=4,
          compute_dtype="float32",
          overwrite=True,
          phantom_count=6,  # phantom pairs per task fused when no input is given
      ))
