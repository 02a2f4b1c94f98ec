"""The authors' PyTorch checkpoints: reading them and converting them to our parameters.

torch is an optional dependency: it is imported only when a `.pth` file is read, and
only tensors are unpickled (`weights_only`), never code. Conversion is driven by the
flax side: every expected flax parameter names its reference key, so a checkpoint of
another model config fails on the first key whose shape differs, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dmfnet_jax import validation
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import unet as unet_lib

# Containers the reference (and common training scripts) wrap a state_dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")
# Top-level keys of a saved optimizer (the authors' `*_opt.pth`: epoch, iter, scheduler,
# optimizer; a bare torch optimizer state_dict: state, param_groups).
_OPTIMIZER_KEYS = ({"optimizer"}, {"state", "param_groups"})
# Wrapper prefixes of parameter names: nn.DataParallel / DistributedDataParallel.
_PARALLEL_PREFIX = "module."


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _read_torch_file(path: str) -> Any:
  """torch.load with weights only (tensors and plain containers: no pickled code runs)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"Reading the PyTorch checkpoint {path} needs torch: "
        "pip install 'dmfnet-jax[torch]'") from e
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder, not a PyTorch checkpoint file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: checkpoint file does not exist")
  if os.path.getsize(path) == 0:
    raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt/foreign files
    text = str(e)
    if "Unsupported global" in text or "GLOBAL" in text:
      reason = ("it holds pickled Python objects besides tensors; only weights are read "
                "(weights_only), so no code from the file runs")
    elif "central directory" in text or "zip archive" in text or "truncated" in text.lower():
      reason = "it is truncated or damaged (not a complete PyTorch zip archive)"
    else:
      reason = f"it is not a PyTorch checkpoint ({text.splitlines()[0][:200] if text else type(e).__name__})"
    raise CheckpointError(f"{path}: cannot read it: {reason}") from e


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch checkpoint into {key: numpy array}.

  Unwraps {'state_dict': ...}-style containers and the `module.` prefix of
  nn.DataParallel; refuses an optimizer file, naming what it holds.
  """
  path = os.fspath(path)
  obj = _read_torch_file(path)
  for _ in range(3):  # nested wrappers, e.g. {'model': {'state_dict': ...}}
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
      keys = {str(k) for k in obj}
      if any(marker <= keys for marker in _OPTIMIZER_KEYS):
        raise CheckpointError(
            f"{path}: holds optimizer state (keys {', '.join(sorted(keys)[:6])}), not model "
            "weights; the authors save the weights as <name>_gen.pth beside <name>_opt.pth, "
            "and the fusion head as a plain state_dict (MIF.pth)")
      inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)),
                   None)
      if inner is None:
        break
      obj = inner
  if not isinstance(obj, Mapping) or not _is_state_dict(obj):
    raise CheckpointError(
        f"{path}: does not hold a state_dict (a mapping of parameter names to tensors)")
  state_dict = {str(k): _to_numpy(v) for k, v in obj.items()}
  if all(k.startswith(_PARALLEL_PREFIX) for k in state_dict):
    state_dict = {k[len(_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
  return state_dict


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
  return bool(obj) and all(
      isinstance(k, str) and (hasattr(v, "shape") and hasattr(v, "dtype"))
      for k, v in obj.items())


def torch_to_flax_array(leaf_name: str, value: np.ndarray) -> np.ndarray:
  """Layout change of one tensor: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if leaf_name == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 3:  # Conv1d OIW -> WIO
      return np.transpose(value, (2, 1, 0))
    if value.ndim == 2:
      return value.T
  return value


def _flax_to_torch_shape(leaf_name: str, shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(shape)
  if leaf_name == "kernel":
    if len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 3:
      return (shape[2], shape[1], shape[0])
    if len(shape) == 2:
      return (shape[1], shape[0])
  return shape


def params_from_state_dict(state_dict: Mapping[str, Any], expected: Any,
                           key_for_path: Callable[[Sequence[str]], str], *,
                           what: str = "model") -> Any:
  """Fills the flax tree `expected` (arrays or ShapeDtypeStructs) from a state_dict.

  `key_for_path` maps a flax path (tuple of names, leaf last) to the reference key.
  Every expected key must be present with the right shape, and every state_dict key
  must be used; otherwise CheckpointError names the key and both shapes."""
  used = set()

  def convert(path, leaf):
    names = tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)
    key = key_for_path(names)
    want = _flax_to_torch_shape(names[-1], leaf.shape)
    if key not in state_dict:
      raise CheckpointError(
          f"{what} checkpoint lacks key '{key}' (expected shape {want}); is it a "
          "checkpoint of this model and config?")
    value = _to_numpy(state_dict[key])
    if tuple(value.shape) != want:
      raise CheckpointError(
          f"{what} checkpoint key '{key}' has shape {tuple(value.shape)}, the model config "
          f"expects {want}; the checkpoint was made with another model config")
    used.add(key)
    return np.ascontiguousarray(torch_to_flax_array(names[-1], value), dtype=np.float32)

  params = jax.tree_util.tree_map_with_path(convert, expected)
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    shape = tuple(_to_numpy(state_dict[unexpected[0]]).shape)
    raise CheckpointError(
        f"{what} checkpoint has unexpected key '{unexpected[0]}' (shape {shape})"
        + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        + "; the checkpoint was made with another model or config")
  return params


# --- Stage I UNet --------------------------------------------------------------------

# Buffers of the reference diffusion wrapper that are not UNet parameters.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "sqrt_alphas_cumprod_prev",
})
TORCH_PREFIX = "denoise_fn."

_BLOCK_CHILDREN = {"norm": "block.0", "conv": "block.3"}
_MLP_CHILDREN = {"dense_in": "1", "dense_out": "3"}


def unet_torch_key(path: Sequence[str]) -> str:
  """Reference state_dict key of a flax parameter path, e.g.
  ('downs_0', 'res_block', 'block1', 'conv', 'kernel') ->
  'downs.0.res_block.block1.block.3.weight'."""
  parts = []
  parent = None
  for name in path[:-1]:
    if parent in ("block1", "block2", "final_conv"):
      parts.append(_BLOCK_CHILDREN[name])
    elif parent == "noise_level_mlp":
      parts.append(_MLP_CHILDREN[name])
    elif name == "noise_func":
      parts.append("noise_func.noise_func.0")
    else:
      head, _, index = name.rpartition("_")
      if head in ("downs", "mid", "ups") and index.isdigit():
        parts.append(f"{head}.{index}")
      else:
        parts.append(name)
    parent = name
  leaf = path[-1]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def bare_unet_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """UNet keys without the diffusion wrapper's `denoise_fn.` prefix and schedule buffers."""
  bare = {}
  for key, value in state_dict.items():
    name = key[len(TORCH_PREFIX):] if key.startswith(TORCH_PREFIX) else key
    if name not in SCHEDULE_BUFFERS:
      bare[name] = value
  return bare


def unet_params_from_torch(state_dict: Mapping[str, Any], model_cfg: Any) -> Any:
  """Converts a reference UNet (or diffusion wrapper) state_dict to flax params.

  Accepts bare keys or keys under `denoise_fn.`; the wrapper's schedule buffers are
  skipped. Raises CheckpointError naming the key on anything missing, unexpected or
  mis-shaped (a checkpoint of another model config)."""
  return params_from_state_dict(bare_unet_state_dict(state_dict),
                                unet_lib.abstract_params(model_cfg), unet_torch_key,
                                what="Stage I UNet")


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  return tuple(np.shape(state_dict[key]))


def _describe_keys(state_dict: Mapping[str, Any], count: int = 4) -> str:
  keys = sorted(state_dict)
  return ", ".join(keys[:count]) + (f", ... ({len(keys)} keys)" if len(keys) > count else "")


_KIND = {True: ("Stage I UNet", "init_conv.weight", "keys init_conv, downs.*"),
         False: ("Stage II fusion head", "decoder.0.block.0.weight", "keys decoder.*, rgb_decode*")}


def _check_kind(state_dict: Mapping[str, Any], source: str, *, unet: bool) -> None:
  """Names what a state_dict is when it is not the part asked for (swapped files, another
  architecture), before any key-by-key conversion."""
  name, key, _ = _KIND[unet]
  if key in state_dict:
    return
  other, other_key, other_keys = _KIND[not unet]
  if other_key in bare_unet_state_dict(state_dict):
    raise CheckpointError(f"{source} is a {other} ({other_keys}), not a {name}: were --stage1 "
                          "and --stage2 swapped?")
  raise CheckpointError(f"{source} is not a DM-FNet {name}: it has no '{key}' "
                        f"(its keys: {_describe_keys(state_dict)})")


def image_size_for_attention(levels: Sequence[int], num_levels: int) -> tuple[int, tuple[int, ...]]:
  """(image_size, attn_res) reproducing attention at exactly `levels` (docs/model.md §1).

  No level: the released model's 160 with attn_res (16,) (160, 80, ... never meets 16).
  One level k: 16 * 2**k with (16,), as the reference's own configs. Several: a power of
  two with one attn_res entry per level."""
  levels = sorted(set(levels))
  if not levels:
    return 160, (16,)
  if len(levels) == 1:
    return 16 * 2**levels[0], (16,)
  size = 2**(max(num_levels, 5) + 3)
  return size, tuple(size >> k for k in levels)


def unet_structure_from_torch(state_dict: Mapping[str, Any], *, norm_groups: int = 32,
                              source: str = "Stage I checkpoint") -> dict[str, Any]:
  """The UNet's model config, read from the reference state_dict itself.

  Inner channels, channel multipliers, res blocks per level, which levels attend and
  the in/out channels are all in the weights; the GroupNorm group count is not (its
  parameters have one entry per channel), so it is given (reference: 32)."""
  sd = bare_unet_state_dict(state_dict)
  _check_kind(sd, source, unet=True)
  try:
    inner, in_channel = _shape(sd, "init_conv.weight")[:2]
    out_channel = _shape(sd, "final_conv.block.3.weight")[0]
    downs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("downs.")})
    levels: list[list[tuple[int, bool]]] = [[]]
    for i in downs:
      if f"downs.{i}.conv.weight" in sd:
        levels.append([])
        continue
      width = _shape(sd, f"downs.{i}.res_block.block1.block.3.weight")[0]
      levels[-1].append((width, f"downs.{i}.attn.qkv.weight" in sd))
  except KeyError as err:
    raise CheckpointError(f"{source} is not a DM-FNet Stage I UNet: key {err} is missing "
                          f"(its keys: {_describe_keys(sd)})") from None
  blocks = {len(level) for level in levels}
  if len(blocks) != 1 or 0 in blocks:
    raise CheckpointError(f"{source}: levels hold {[len(level) for level in levels]} resnet "
                          "blocks; a DM-FNet UNet has the same number at every level")
  mults = []
  for index, level in enumerate(levels):
    widths = {w for w, _ in level}
    if len(widths) != 1 or next(iter(widths)) % inner:
      raise CheckpointError(f"{source}: level {index} has widths {sorted(widths)}, not one "
                            f"multiple of the inner channels {inner}")
    mults.append(next(iter(widths)) // inner)
  attended = [index for index, level in enumerate(levels) if any(a for _, a in level)]
  image_size, attn_res = image_size_for_attention(attended, len(levels))
  model = dict(in_channel=int(in_channel), out_channel=int(out_channel), inner_channel=int(inner),
               norm_groups=int(norm_groups), channel_mults=tuple(mults), attn_res=attn_res,
               res_blocks=int(blocks.pop()), dropout=0.2, image_size=image_size,
               with_noise_level_emb="noise_level_mlp.1.weight" in sd)
  if validation.attention_levels(mults, attn_res, image_size) != (tuple(attended),) * 2:
    raise CheckpointError(f"{source}: attention at levels {attended} cannot come from the "
                          "reference's image_size rule")
  return model


# --- Stage II fusion head ------------------------------------------------------------


def _torch_key_map(num_levels: int) -> dict[str, tuple[str, ...]]:
  """Reference state_dict prefix -> path of the `_Conv` module in our params."""
  mapping = {}
  for i in range(num_levels):
    agg, att = f"decoder.{2 * i}", f"decoder.{2 * i + 1}"
    mapping[f"{agg}.block.0"] = (f"level{i}_aggregate", "conv0")
    mapping[f"{agg}.block.2"] = (f"level{i}_aggregate", "conv2")
    mapping[f"{att}.att.sa.sa"] = (f"level{i}_attention", "sa")
    mapping[f"{att}.att.ca.ca.0"] = (f"level{i}_attention", "ca0")
    mapping[f"{att}.att.ca.ca.2"] = (f"level{i}_attention", "ca2")
    mapping[f"{att}.att.pa.pa2"] = (f"level{i}_attention", "pa")
    mapping[f"{att}.block.0"] = (f"level{i}_block", "conv0")
    mapping[f"{att}.block.2"] = (f"level{i}_block", "conv2")
    if i >= 2:
      mapping[f"{att}.block1.0"] = (f"level{i}_block1", "conv0")
      mapping[f"{att}.block1.2"] = (f"level{i}_block1", "conv2")
  mapping["rgb_decode2.conv"] = ("out_conv0",)
  mapping["rgb_decode1.conv"] = ("out_conv1",)
  return mapping


def head_torch_key(path: Sequence[str], num_levels: int) -> str:
  """Reference state_dict key of a head parameter path, e.g.
  ('level2_block1', 'conv0', 'conv', 'kernel') -> 'decoder.5.block1.0.weight'."""
  by_module = {module: prefix for prefix, module in _torch_key_map(num_levels).items()}
  module = tuple(path[:-2])  # drop the inner ('conv', leaf)
  if module not in by_module:
    raise CheckpointError(f"no reference key for head parameter {'/'.join(path)}")
  return f"{by_module[module]}.{'bias' if path[-1] == 'bias' else 'weight'}"


def head_params_from_torch(state_dict: Mapping[str, Any], model_cfg: Any, fusion_cfg: Any) -> Any:
  """Converts a reference head state_dict (bare keys) to FusionHead params.

  Conv weights go OIHW -> HWIO; the grouped pixel-attention conv too, since
  PyTorch's (O, I/groups, kh, kw) and XLA's feature_group_count kernel
  (kh, kw, I/groups, O) group channels the same way. A checkpoint made with
  another timestep count is named as such; any other missing, unexpected or
  mis-shaped key raises CheckpointError naming the key and both shapes.
  """
  head = head_lib.fusion_head_from_config(model_cfg, fusion_cfg)
  dims = list(head.dims)
  num_timesteps = head.num_timesteps
  # A different timestep count shows in the aggregation conv's input channels.
  agg_key = "decoder.0.block.0.weight"
  if agg_key in state_dict and len(np.shape(state_dict[agg_key])) == 4:
    in_channels = int(np.shape(state_dict[agg_key])[1])
    if in_channels != dims[0] * num_timesteps and in_channels % dims[0] == 0:
      raise CheckpointError(
          f"head checkpoint was trained with {in_channels // dims[0]} timestep(s) "
          f"('{agg_key}' takes {in_channels} input channels = {dims[0]} x "
          f"{in_channels // dims[0]}), but fusion.timesteps has {num_timesteps} "
          "entries; set fusion.timesteps to the checkpoint's timesteps")
  return params_from_state_dict(
      state_dict, head_lib.abstract_head_params(head), lambda path: head_torch_key(path, len(dims)),
      what="Stage II fusion head")


def head_structure_from_torch(state_dict: Mapping[str, Any], model: Mapping[str, Any], *,
                              timesteps: Sequence[int] | None = None,
                              source: str = "Stage II checkpoint") -> dict[str, Any]:
  """The head's fusion config, read from its state_dict and checked against the UNet.

  The number of levels, their widths and the number of timesteps are in the weights;
  which timesteps is not, so a head trained on three uses the reference's (5, 10, 20)
  and any other count needs `timesteps` given. The decoder features it reads are the
  reference's: the first block of every up level."""
  from dmfnet_jax import config_defaults  # pylint: disable=g-import-not-at-top
  _check_kind(state_dict, source, unet=False)
  num_levels = len({int(k.split(".")[1]) for k in state_dict if k.startswith("decoder.")}) // 2
  res_blocks, levels = int(model["res_blocks"]), len(model["channel_mults"])
  if num_levels != levels:
    raise CheckpointError(f"{source}: the head has {num_levels} levels but the UNet has {levels}; "
                          "the two files belong to different models")
  feat_scales = tuple(level * (res_blocks + 1) + res_blocks for level in range(levels))
  unet_dims = head_lib.level_dims(model, feat_scales)
  head_dims = [_shape(state_dict, f"decoder.{2 * i}.block.2.weight")[0] for i in range(levels)]
  if head_dims != unet_dims:
    raise CheckpointError(f"{source}: the head's level widths {head_dims} do not match the UNet's "
                          f"decoder features {unet_dims} (coarse to fine); the two files belong to "
                          "different models")
  count, remainder = divmod(_shape(state_dict, "decoder.0.block.0.weight")[1], head_dims[0])
  if remainder:
    raise CheckpointError(f"{source}: 'decoder.0.block.0.weight' takes "
                          f"{_shape(state_dict, 'decoder.0.block.0.weight')[1]} channels, not a "
                          f"multiple of the level width {head_dims[0]}")
  if timesteps is None:
    if count != len(config_defaults.DEFAULT_TIMESTEPS):
      raise CheckpointError(f"{source}: the head was trained on {count} timestep(s), which ones "
                            "the weights do not say; set fusion.timesteps")
    timesteps = config_defaults.DEFAULT_TIMESTEPS
  elif len(timesteps) != count:
    raise CheckpointError(f"{source}: the head was trained on {count} timestep(s), but "
                          f"fusion.timesteps={tuple(timesteps)} has {len(timesteps)}")
  return dict(feat_scales=feat_scales, timesteps=tuple(int(t) for t in timesteps),
              skip_aggregation_for_single_timestep=True)
