"""Loading trained models and running them: the home of everything that fuses.

A trained DM-FNet is two parameter trees, the Stage I UNet and the Stage II head,
stored in one Orbax checkpoint (a Stage II workdir, an exported model such as the
shipped one, or an import of the authors' weights). This module reads them, checks
them against the model config, and builds the jitted fuse function that the fuse
job, the demo, the tools, training previews and the Stage II train step share.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmfnet_jax import checkpoints, diffusion, features, models
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


# ----------------------------------------------------------------------------- loading


def restore_two_stage(store: checkpoints.CheckpointStore, step: int):
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
    saved_state = store.restore(step, {"state": None})["state"]
    params = saved_state.get("ema_params") or saved_state["params"]
  elif "unet" in names:
    params = store.restore(step, {"unet": None})["unet"]
  elif "params" in names:
    params = store.restore(step, {"params": None})["params"]["unet"]
  else:
    raise CheckpointError(f"{where}: holds no Stage I parameters")
  return checkpoints.conform_params(params, unet_lib.abstract_params(model_cfg), f"{where}")


def load_two_stage_params(path: str | os.PathLike, config):
  """(unet_params, head_params) of a two-stage checkpoint (a Stage II workdir or step
  folder, or an exported/imported model), checked against `config`'s model."""
  store, step = checkpoints.open_for_reading(path)
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


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class FusionModel:
  """Both stages' parameters and a jitted fuse function (compiled once per shape)."""
  config: Any
  unet_params: Any
  head_params: Any

  def __post_init__(self):
    dtype = models.compute_dtype(self.config.fuse.get("compute_dtype", "float32"),
                                 "fuse.compute_dtype")
    unet = unet_lib.unet_from_config(self.config.model, dtype=dtype)
    head = head_lib.fusion_head_from_config(self.config.model, self.config.fusion, dtype=dtype)
    fuse_one = make_fuse_fn(unet, head, feature_schedule(self.config), self.config.fusion)

    def fuse_batch(unet_params, head_params, a, b, keys):
      # One key per image: the result of a pair does not depend on its batch mates.
      per_image = lambda a1, b1, k: fuse_one(unet_params, head_params, a1[None], b1[None], k)[0]
      return jax.vmap(per_image)(a, b, keys)

    self._fuse = jax.jit(fuse_batch)

  def __call__(self, a: np.ndarray, b: np.ndarray, keys: jax.Array) -> np.ndarray:
    return np.asarray(self._fuse(self.unet_params, self.head_params, a, b, keys))


def load_fusion_model(config) -> FusionModel:
  """Both stages from `config.checkpoint` (a Stage II workdir or an imported model)."""
  path = config.get("checkpoint", "")
  if not path:
    raise ConfigError(
        "config.checkpoint is empty: point it at a Stage II workdir "
        "(python -m dmfnet_jax.main --config=configs/stage2.py --workdir=DIR) or at the output of "
        "python -m dmfnet_jax.tools.import_torch")
  unet_params, head_params = load_two_stage_params(path, config)
  return FusionModel(config=config, unet_params=unet_params, head_params=head_params)
