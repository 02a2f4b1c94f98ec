"""`jax.distributed` start-up from config or environment.

Cloud TPU VMs and SLURM tell JAX everything (`jax.distributed.initialize()` with no
arguments finds it). Elsewhere, set `config.distributed.*` or the variables
DMFNET_COORDINATOR_ADDRESS, DMFNET_NUM_PROCESSES and DMFNET_PROCESS_ID; every
process gets the same address (`host:port`, reachable from all of them, the port
free on process 0) and its own `process_id`. On CPU the processes exchange
gradients through gloo, so several CPU hosts (or processes on one) train together.
"""

from __future__ import annotations

import errno
import os
import socket

from absl import logging

from dmfnet_jax.errors import ConfigError

_ENV = ("DMFNET_COORDINATOR_ADDRESS", "DMFNET_NUM_PROCESSES", "DMFNET_PROCESS_ID")
_ON = (True, "on", "always", "yes")
_OFF = (False, "off", "never", "no")


def _on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM (`gcloud compute tpus tpu-vm create`): TPU device files or the
  variables its runtime sets. JAX then finds the slice through the metadata server,
  and `jax.distributed.initialize()` is harmless on a single-host slice."""
  return bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_ID")) or \
      os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and os.path.exists("/dev/vfio/0")


def _cluster_detected() -> bool:
  return bool(os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1) or \
      bool(os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ["TPU_WORKER_HOSTNAMES"]) or \
      _on_cloud_tpu_vm()


def _get(dist_cfg, key: str, default):
  return dist_cfg.get(key, default) if dist_cfg is not None else default


def _int_setting(value, env_name: str, key: str, unset) -> int:
  """The config value if set, else the environment variable, as an int."""
  if value is not None and value != unset:
    source, raw = f"config.distributed.{key}", value
  else:
    source, raw = env_name, os.environ.get(env_name, unset)
  try:
    return int(raw)
  except (TypeError, ValueError):
    raise ConfigError(f"{source}={raw!r}: must be an integer") from None


def split_address(address: str, source: str) -> tuple[str, int]:
  """`host:port` (IPv6 as `[::1]:port`) -> (host, port); ConfigError naming `source`."""
  host, sep, port = address.strip().rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(
        f"{source}={address!r}: expected host:port with a port in 1..65535, "
        "e.g. 10.0.0.1:1234 (the machine of process 0 and a free port on it)")
  return host, int(port)


def settings(dist_cfg) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for one process.

  Config values win over the environment; `initialize='off'` wins over both.
  """
  mode = _get(dist_cfg, "initialize", "auto")
  if mode in _OFF:
    return None
  if mode not in _ON and mode != "auto":
    raise ConfigError(f"config.distributed.initialize={mode!r}: use 'auto', 'on' or 'off'")
  address = _get(dist_cfg, "coordinator_address", "") or ""
  source = "config.distributed.coordinator_address"
  if not address:
    address, source = os.environ.get(_ENV[0], ""), _ENV[0]
  if address:
    split_address(address, source)
    num = _int_setting(_get(dist_cfg, "num_processes", 0), _ENV[1], "num_processes", 0)
    pid = _int_setting(_get(dist_cfg, "process_id", -1), _ENV[2], "process_id", -1)
    if num < 1 or not 0 <= pid < num:
      raise ConfigError(
          f"config.distributed: coordinator_address={address!r} needs num_processes >= 1 and "
          f"0 <= process_id < num_processes (got {num}, {pid}); set them in the config or "
          f"with {_ENV[1]} / {_ENV[2]}")
    return dict(coordinator_address=address.strip(), num_processes=num, process_id=pid)
  if mode in _ON or _cluster_detected():
    return {}
  return None


def enable_cpu_collectives() -> None:
  """Cross-process collectives on CPU need an implementation (gloo is JAX's default
  in recent versions; older ones had none, and multi-process CPU steps then fail)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # a JAX without the option
    return
  if current is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _check_port_free(address: str, port: int) -> None:
  """Process 0 serves the coordinator on `[::]:port`; JAX may crash (not raise)
  when that port is taken, so look first."""
  families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
  for family, any_host in families:
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # the family is not available here
      continue
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((any_host, port))
      except OSError as err:
        if err.errno == errno.EADDRINUSE:
          raise ConfigError(
              f"config.distributed.coordinator_address={address!r}: port {port} is in use on "
              "this machine (process 0 serves the coordinator there); choose a free port"
          ) from None


def maybe_initialize(dist_cfg) -> None:
  """Starts `jax.distributed` when config or environment ask for it (before any
  other JAX call that touches devices); a second call is a no-op."""
  kwargs = settings(dist_cfg)
  if kwargs is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialised; using it.")
    return
  if kwargs:
    host, port = split_address(kwargs["coordinator_address"], "coordinator_address")
    try:
      socket.getaddrinfo(host, None)
    except OSError as err:
      raise ConfigError(
          f"config.distributed.coordinator_address={kwargs['coordinator_address']!r}: "
          f"cannot resolve host {host!r} ({err})") from None
    if kwargs["process_id"] == 0:
      _check_port_free(kwargs["coordinator_address"], port)
  enable_cpu_collectives()
  logging.info("Initialising jax.distributed with %s", kwargs or "the cluster's environment")
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as err:  # JaxRuntimeError is a RuntimeError
    where = (f"coordinator {kwargs['coordinator_address']} (process {kwargs['process_id']} "
             f"of {kwargs['num_processes']})" if kwargs else "the cluster's environment")
    raise ConfigError(
        f"config.distributed: jax.distributed could not start with {where}: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}. "
        "Check that the address is reachable from every process and its port is free "
        "on process 0.") from err
