"""`jax.distributed` start-up from config or environment.

Cloud TPU VMs and SLURM tell JAX everything (`jax.distributed.initialize()` with no
arguments finds it). Elsewhere, set `config.distributed.*` or the variables
DMFNET_COORDINATOR_ADDRESS, DMFNET_NUM_PROCESSES and DMFNET_PROCESS_ID.
"""

from __future__ import annotations

import os

from absl import logging

from dmfnet_jax.errors import ConfigError

_ENV = ("DMFNET_COORDINATOR_ADDRESS", "DMFNET_NUM_PROCESSES", "DMFNET_PROCESS_ID")


def _cluster_detected() -> bool:
  return bool(os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1) or \
      bool(os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ["TPU_WORKER_HOSTNAMES"])


def settings(dist_cfg) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for one process."""
  mode = (dist_cfg or {}).get("initialize", "auto") if dist_cfg is not None else "auto"
  if mode in (False, "off", "never", "no"):
    return None
  address = (dist_cfg.get("coordinator_address") if dist_cfg else "") or \
      os.environ.get(_ENV[0], "")
  num = int((dist_cfg.get("num_processes") if dist_cfg else 0) or os.environ.get(_ENV[1], 0))
  pid = dist_cfg.get("process_id", -1) if dist_cfg else -1
  pid = int(pid if pid is not None and pid >= 0 else os.environ.get(_ENV[2], -1))
  if address:
    if num < 1 or not 0 <= pid < num:
      raise ConfigError(
          f"config.distributed: coordinator_address={address!r} needs num_processes >= 1 and "
          f"0 <= process_id < num_processes (got {num}, {pid})")
    return dict(coordinator_address=address, num_processes=num, process_id=pid)
  if mode in (True, "on", "always", "yes") or (mode == "auto" and _cluster_detected()):
    return {}
  if mode not in ("auto",):
    raise ConfigError(f"config.distributed.initialize={mode!r}: use 'auto', 'on' or 'off'")
  return None


def maybe_initialize(dist_cfg) -> None:
  kwargs = settings(dist_cfg)
  if kwargs is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("Initialising jax.distributed with %s", kwargs or "the cluster's environment")
  jax.distributed.initialize(**kwargs)
