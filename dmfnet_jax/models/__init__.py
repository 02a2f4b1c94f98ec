"""Flax models of DM-FNet: the Stage I diffusion UNet and the Stage II fusion head,
and the conversion of the authors' PyTorch checkpoints (`torch_convert`)."""

import math

import jax
import jax.numpy as jnp

from dmfnet_jax import validation


def param_count(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def compute_dtype(name: str, key: str = "train.compute_dtype"):
  """The jnp dtype a `compute_dtype` setting names; parameters stay float32 either way."""
  validation.validate_compute_dtype(name, key)
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32
