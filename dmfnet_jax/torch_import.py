"""Reading reference PyTorch checkpoints and converting them to flax parameter trees.

torch is an optional dependency: it is imported only when a `.pth` file is read.
Conversion is driven by the flax side: every expected flax parameter names its
reference key, so a checkpoint of another model config fails on the first key whose
shape differs, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dmfnet_jax.errors import CheckpointError

# Containers the reference (and common training scripts) wrap a state_dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch checkpoint into {key: numpy array}, unwrapping {'state_dict': ...}."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"Reading the PyTorch checkpoint {path} needs torch: "
        "pip install 'dmfnet-jax[torch]'") from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"Checkpoint file {path} does not exist")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt/foreign files
    raise CheckpointError(f"Cannot read PyTorch checkpoint {path}: {e}") from e
  for _ in range(3):  # nested wrappers, e.g. {'model': {'state_dict': ...}}
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
      inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)),
                   None)
      if inner is None:
        break
      obj = inner
  if not isinstance(obj, Mapping) or not _is_state_dict(obj):
    raise CheckpointError(
        f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


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
