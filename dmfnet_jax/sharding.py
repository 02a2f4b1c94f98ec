"""Device mesh and shardings built from `config.mesh`.

One jitted step, explicit `NamedSharding`s: the batch is split over every device
(`data` x `fsdp`), parameters are replicated over `data` and, when `fsdp` > 1,
sharded over `fsdp` along their largest divisible dimension.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmfnet_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
  unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh: unknown axis {sorted(unknown)}; axes are {list(MESH_AXES)}")
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size}: must be a positive size or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices")
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
        f"but {num_devices} are present; set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "config.train.batch_size"):
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ConfigError(
        f"{what}={global_batch} cannot be split over {shards} devices "
        f"(mesh {dict(mesh.shape)}); use a multiple of {shards}")
  if global_batch % jax.process_count():
    raise ConfigError(
        f"{what}={global_batch} cannot be split over {jax.process_count()} processes")


def param_sharding(leaf: Any, mesh: Mesh) -> NamedSharding:
  """Shards the largest dimension divisible by the fsdp size; else replicates."""
  fsdp = mesh.shape["fsdp"]
  shape = getattr(leaf, "shape", ())
  if fsdp == 1 or not shape:
    return replicated(mesh)
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree of arrays or ShapeDtypeStructs (parameters, optimizer state)."""
  return jax.tree.map(lambda leaf: param_sharding(leaf, mesh), abstract_tree)


def host_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles each host's share of the batch into global arrays (multi-host safe)."""
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in batch.items()
  }
