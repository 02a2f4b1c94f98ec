"""Every default value of the project, and the config groups built from them.

The config files in `configs/` compose these groups and state only what differs.
This module is the single home of the reference hyper-parameters (docs/model.md),
so the model, data and loss modules read their defaults from here, and loading a
config file imports nothing heavier than ml_collections. Reference values are the
defaults; presets shrink a run (`tiny`) without touching the model's structure rules.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from dmfnet_jax import paths

TASKS = ("MRI-CT", "MRI-PET", "MRI-SPECT")
# Image files read as inputs and written as outputs (Pillow codecs).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# The reference UNet: the structure of the authors' released model (docs/model.md §1).
# image_size is a structural hyper-parameter (the attention rule compares attn_res with
# it halved per level), not the input size. The authors trained with 160 and test with
# 640: no level is 16, so only the middle block attends (20,670,081 parameters at C=128).
# image_size 256 also puts attention at the 16x16 level (21,984,641 parameters).
MODEL_DEFAULTS = dict(
    in_channel=1,
    out_channel=1,
    inner_channel=128,
    norm_groups=32,
    channel_mults=(1, 1, 1, 1, 2),
    attn_res=(16,),
    res_blocks=2,
    dropout=0.2,
    image_size=160,
    with_noise_level_emb=True,
)
REFERENCE_MODEL = dict(MODEL_DEFAULTS)

# CPU-sized model; the parity vectors' "tiny" configuration.
TINY_MODEL = dict(REFERENCE_MODEL, inner_channel=32, norm_groups=8, image_size=64)

# The model this project trains and ships (MODEL_CARD.md): the reference structure
# with image_size 256 (attention at the 16x16 level and in the middle) at 32 channels.
CPU_MODEL = dict(REFERENCE_MODEL, inner_channel=32, norm_groups=8, image_size=256)

MODEL_PRESETS = {"reference": REFERENCE_MODEL, "tiny": TINY_MODEL, "cpu": CPU_MODEL}

# Stage II (docs/model.md §3-4): decoder features of the noisy sources at these steps.
DEFAULT_TIMESTEPS = (5, 10, 20)
DEFAULT_FEAT_SCALES = (2, 5, 8, 11, 14)
# The head's 7x7 reflect padding needs at least this many pixels at the coarsest level.
MIN_COARSEST_SIDE = 4

# The hybrid loss's weights (docs/model.md §5).
REFERENCE_LOSS_WEIGHTS = {"intensity_weight": 1.5, "gradient_weight": 1.0, "ssim_weight": 0.5}

# train.lr_schedule values; the first is the reference's (in effect constant) rate.
LR_SCHEDULES = ("constant", "linear_decay")
OPTIMIZERS = ("adamw", "adam")
COMPUTE_DTYPES = ("float32", "bfloat16")


def get_setting(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg[key]` of a ConfigDict, a dict or an attribute namespace; `default` if absent."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  try:
    return cfg[key]
  except (KeyError, TypeError, AttributeError):
    return getattr(cfg, key, default)


def check_preset(config_file: str, preset: str, valid: Sequence[str]) -> None:
  """The one preset check of the config files; names the file and the valid presets."""
  if preset not in valid:
    named = [p for p in valid if p not in ("default",)]
    raise ValueError(f"configs/{config_file}: unknown preset '{preset}' "
                     f"(use {', '.join(repr(p) for p in named)} or nothing)")


def sibling_config(config_file: str, name: str, preset: str | None = None):
  """`get_config(preset)` of `configs/<name>.py` beside `config_file`, for config files
  that compose others (the demo)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(config_file).resolve().parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_dmfnet_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def base_config(job: str) -> ml_collections.ConfigDict:
  """Keys every job has."""
  cfg = ml_collections.ConfigDict()
  cfg.job = job
  cfg.seed = 0
  cfg.mesh = mesh_config()
  cfg.distributed = distributed_config()
  return cfg


def model_config(preset: str = "reference") -> ml_collections.ConfigDict:
  # Sequences are tuples: ml_collections can override tuples from the command line
  # (--config.model.channel_mults='(1,2,2)'), not lists.
  return ml_collections.ConfigDict(dict(MODEL_PRESETS[preset]))


def _unset_like(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Every key unset (None) but typed, so `--config.<group>.<key>=...` still parses."""
  return ml_collections.ConfigDict(
      {key: config_dict.placeholder(type(value)) for key, value in values.items()})


def model_config_from_checkpoint() -> ml_collections.ConfigDict:
  """A model group read from the checkpoint the job loads (docs/architecture.md): a
  key set on the command line must agree with it, an unset one is filled from it."""
  return _unset_like(MODEL_DEFAULTS)


def fusion_config_from_checkpoint() -> ml_collections.ConfigDict:
  """A fusion group read from the checkpoint's head when it has one, else the reference's."""
  return _unset_like(fusion_config())


def diffusion_config(schedule: str) -> ml_collections.ConfigDict:
  """Stage I trains with `cosine`; Stage II features and fusion use `linear`."""
  return ml_collections.ConfigDict(
      dict(schedule=schedule, num_timesteps=2000, linear_start=1e-6, linear_end=1e-2))


def fusion_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          feat_scales=DEFAULT_FEAT_SCALES,
          timesteps=DEFAULT_TIMESTEPS,
          # Reference quirk: with one timestep the aggregation block is skipped.
          skip_aggregation_for_single_timestep=True,
      ))


def loss_config() -> ml_collections.ConfigDict:
  """Stage II hybrid-loss weights; the defaults are the reference's."""
  return ml_collections.ConfigDict(dict(REFERENCE_LOSS_WEIGHTS))


def data_config(crop_size: int = 160) -> ml_collections.ConfigDict:
  """Data settings; the reference trains on random 160x160 crops with flips."""
  return ml_collections.ConfigDict(
      dict(
          root="",  # empty: built-in phantoms, no download needed
          # Tuples, not lists: --config.data.tasks='("MRI-CT",)' works on the command line.
          tasks=TASKS,
          split="train",
          crop_size=crop_size,
          random_flip=True,  # horizontal and vertical, each with probability 1/2
          phantom_count=64,  # phantom pairs in total, tasks taken in turn
          phantom_size=256,
          phantom_seed=0,
          num_workers=0,  # grain worker processes; 0 = in-process
          worker_buffer_size=2,  # batches buffered per worker process
          read_threads=2,  # threads preparing batches in each process
          prefetch_buffer_size=4,  # batches prepared ahead in each process
      ))


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh: `-1` takes all remaining devices. Batch is split over data x fsdp;
  parameters are replicated over `data` and sharded over `fsdp`."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def distributed_config() -> ml_collections.ConfigDict:
  """`jax.distributed` settings; `auto` initialises when the environment asks for it
  (Cloud TPU, SLURM, or the variables below)."""
  return ml_collections.ConfigDict(
      dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1))


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
          # Pairs per call (each is six UNet passes already); 1 is fastest on a CPU
          # (docs/performance.md), raise it on an accelerator.
          batch_size=1,
          compute_dtype="float32",
          # UNet inputs (six per pair) a device runs at once; 0 = automatic: one on a CPU
          # (faster there: docs/performance.md), all on an accelerator. Same numbers.
          unet_inputs_at_once=0,
          # The fuse job on a CPU: how many JAX devices to make of its cores, each fusing
          # its own share; 0 = one per core (at most 8), 1 = one device for all cores.
          cpu_devices=0,
          # Memory a fuse may plan for; 0 = half the machine's (an accelerator's own).
          # Larger images are fused one UNet input at a time, or else in tiles.
          memory_budget_gb=0.0,
          overwrite=False,  # True: fuse again pairs whose output exists (else resume)
          phantom_count=6,  # phantom pairs per task fused when no input is given
      ))


def harvard_root() -> str:
  """Default data root of the `cpu` presets and the evaluate job (see README, Data)."""
  return str(paths.harvard_root())


def dmfnet_outputs_root() -> str:
  """The published DM-FNet fused images, for the evaluate job's `:dmfnet` preset."""
  return str(paths.dmfnet_outputs_root())


def shipped_model_dir() -> str:
  """The two-stage model this project trained and ships (MODEL_CARD.md)."""
  return str(paths.shipped_model_dir())
