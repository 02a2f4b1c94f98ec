"""Loading trained models and running them: the home of everything that fuses.

A trained DM-FNet is two parameter trees, the Stage I UNet and the Stage II head,
stored in one Orbax checkpoint (a Stage II workdir, an exported model such as the
shipped one, or an import of the authors' weights). This module reads them, checks
them against the model config, and builds the jitted fuse function that the fuse
job, the demo, the tools, training previews and the Stage II train step share.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax import checkpoints, config_defaults, diffusion, features, models, validation
from dmfnet_jax.errors import CheckpointError, ConfigError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import unet as unet_lib


def feature_schedule(config) -> jax.Array:
  """sqrt(alpha_cumprod_prev) of the config's (Stage II: linear) schedule, float32."""
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


# ----------------------------------------------------------------------------- structure


def recorded_structure(path: str | os.PathLike, *, norm_groups: int | None = None) -> dict:
  """{"model": ..., "fusion": ...} as a checkpoint records them (our Orbax checkpoints),
  or as the weights show them (a reference Stage I `.pth`: the UNet only)."""
  if str(path).endswith((".pth", ".pt")):
    from dmfnet_jax.models import torch_convert  # pylint: disable=g-import-not-at-top
    state_dict = torch_convert.load_torch_state_dict(path)
    return {"model": torch_convert.unet_structure_from_torch(
        state_dict, norm_groups=norm_groups or config_defaults.MODEL_DEFAULTS["norm_groups"],
        source=str(path))}
  store, step = checkpoints.open_for_reading(path, local=True)
  meta = store.read_meta(step)
  if "model" not in meta:
    raise CheckpointError(f"{store.directory / str(step)}: records no model structure")
  return {group: meta[group] for group in checkpoints.STRUCTURE_GROUPS if group in meta}


def _resume_step(workdir) -> str | None:
  """The newest step of a training workdir whose metadata reads (the run resumes from a
  step of it; a damaged newer one is set aside by the run), or None."""
  if workdir is None:
    return None
  folder = checkpoints.checkpoint_dir(workdir)
  if not folder.is_dir():
    return None
  for step in sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True):
    meta = folder / str(step) / "meta" / "metadata"
    try:
      json.loads(meta.read_text())
    except (OSError, ValueError):
      continue
    return str(folder / str(step))
  return None


def _structure_sources(config, workdir=None) -> list[tuple[str, tuple[str, ...]]]:
  """Which checkpoint describes which group: (path, groups), in order of authority
  (a training workdir's own checkpoint first: the run resumes from it)."""
  job = config.get("job")
  resume = _resume_step(workdir) if job in ("stage1", "stage2") else None
  if resume:
    return [(resume, ("model", "fusion"))]
  if job == "fuse":
    return [(config.checkpoint, ("model", "fusion"))] if config.get("checkpoint") else []
  if job == "stage2":
    sources = []
    if config.get("stage1_checkpoint"):  # the UNet that is used
      sources.append((config.stage1_checkpoint, ("model",)))
    if config.get("init_checkpoint"):
      sources.append((config.init_checkpoint,
                      ("fusion",) if sources else ("model", "fusion")))
    return sources
  return []


def resolve_structure(config, workdir=None):
  """Fills the model and fusion keys a config leaves unset (None) from the checkpoint
  the job loads, so no preset or model flag is needed; a key that is set must agree
  with the checkpoint. Then validates the whole config. Idempotent. A job with no
  checkpoint configured keeps its unset keys and names the checkpoint it needs."""
  for path, groups in _structure_sources(config, workdir):
    norm_groups = config.model.get("norm_groups") if "model" in config else None
    recorded = recorded_structure(path, norm_groups=norm_groups)
    present = [g for g in groups if g in recorded and g in config]
    filled = {}
    for group in present:
      filled[group] = {key: (tuple(recorded[group][key]) if isinstance(recorded[group].get(key), list)
                             else recorded[group].get(key)) if value is None else value
                       for key, value in config[group].items()}
    checkpoints.check_model_matches(
        recorded, filled, path,
        hint="A model setting given in the config contradicts the checkpoint; leave it out "
             "(the checkpoint says what the model is).")
    for group in present:
      config[group].update(filled[group])
  if "fusion" in config and not validation.is_resolved(config.fusion):
    for key, value in config_defaults.fusion_config().items():
      if config.fusion[key] is None:
        config.fusion[key] = value
  if "model" in config and not validation.is_resolved(config.model):
    if not _structure_sources(config, workdir):
      return config  # nothing to read it from: the job says which checkpoint it needs
    unset = [k for k, v in config.model.items() if v is None]
    raise ConfigError(f"config.model.{unset[0]}: the checkpoint does not record it; set it")
  validation.validate(config)
  return config


# ----------------------------------------------------------------------------- loading


def restore_two_stage(store: checkpoints.CheckpointStore, step: int):
  """Raw (unet_params, head_params) at `step`, as host arrays: exported/imported models
  hold `params` = {unet, head}; Stage II checkpoints hold `state` (the head) and `unet`."""
  where = store.directory / str(step)
  names = store.item_names_at(step)
  if "params" in names:
    params = store.restore_numpy(step, "params")
    if not (isinstance(params, dict) and "unet" in params and "head" in params):
      raise CheckpointError(f"{where}: holds no fusion model (its params have no 'unet' and "
                            "'head' parts: a Stage I checkpoint?)")
    return params["unet"], params["head"]
  if "state" in names and "unet" in names:
    return store.restore_numpy(step, "unet"), store.restore_numpy(step, "state")["params"]
  raise CheckpointError(f"{where}: holds no fusion model (needs Stage I and Stage II "
                        f"parameters; found items {names})")


def load_unet_params(path: str | os.PathLike, model_cfg) -> Any:
  """Stage I parameters from an Orbax checkpoint (workdir/step) or a reference .pth."""
  if str(path).endswith((".pth", ".pt")):
    from dmfnet_jax.models import torch_convert  # pylint: disable=g-import-not-at-top
    return torch_convert.unet_params_from_torch(torch_convert.load_torch_state_dict(path),
                                                model_cfg)
  store, step = checkpoints.open_for_reading(path)
  where = store.directory / str(step)
  checkpoints.check_model_matches(store.read_meta(step), {"model": model_cfg}, where)
  names = store.item_names_at(step)
  if "state" in names and store.read_meta(step).get("job") == "stage1":
    saved_state = store.restore_numpy(step, "state")
    params = saved_state.get("ema_params") or saved_state["params"]
  elif "unet" in names:
    params = store.restore_numpy(step, "unet")
  elif "params" in names:
    params = store.restore_numpy(step, "params")["unet"]
  else:
    raise CheckpointError(f"{where}: holds no Stage I parameters")
  return checkpoints.conform_params(params, unet_lib.abstract_params(model_cfg), f"{where}")


def load_two_stage_params(path: str | os.PathLike, config, *, local: bool = False):
  """(unet_params, head_params) of a two-stage checkpoint (a Stage II workdir or step
  folder, or an exported/imported model), checked against `config`'s model. `local`:
  each process reads on its own (fusion; see `checkpoints.CheckpointStore`)."""
  store, step = checkpoints.open_for_reading(path, local=local)
  where = store.directory / str(step)
  checkpoints.check_model_matches(
      store.read_meta(step), {g: config[g] for g in checkpoints.STRUCTURE_GROUPS}, where,
      hint="Use the config the model was trained with (e.g. the :tiny preset).")
  unet_params, head_params = restore_two_stage(store, step)
  unet_abstract = unet_lib.abstract_params(config.model)
  head_abstract = head_lib.abstract_head_params(
      head_lib.fusion_head_from_config(config.model, config.fusion))
  unet_params = checkpoints.conform_params(unet_params, unet_abstract, f"{where} (Stage I UNet)")
  head_params = checkpoints.conform_params(head_params, head_abstract, f"{where} (Stage II head)")
  return unet_params, head_params


def load_fusion_model(config):
  """An `engine.FusionModel` with both stages from `config.checkpoint` (a Stage II
  workdir, an exported model or an imported one); `config` is the fuse job's."""
  from dmfnet_jax import engine  # pylint: disable=g-import-not-at-top
  path = config.get("checkpoint", "")
  if not path:
    raise ConfigError(
        "config.checkpoint is empty: point it at a Stage II workdir "
        "(python -m dmfnet_jax.main --config=configs/stage2.py --workdir=DIR) or at the output of "
        "python -m dmfnet_jax.tools.import_torch")
  config = resolve_structure(config)
  unet_params, head_params = load_two_stage_params(path, config, local=True)
  return engine.FusionModel(config=config, unet_params=unet_params, head_params=head_params)
