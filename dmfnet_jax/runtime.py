"""Small runtime helpers every job shares: the chief process, atomic writes, the workdir.

Every file a job writes goes through `write_bytes_atomic`: a temporary file in the
target's folder, fsync, then a rename, so a crash never leaves a half-written file
under the final name. The temporary file is created 0600, so the final file is
given the permissions the user's umask grants a newly created file (0644 under the
usual umask 022), not the temporary file's. Object stores (`gs://...`) write whole
objects, which is atomic there.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
import threading
from typing import Any, Iterable, Union

from dmfnet_jax.errors import DataError, DmfnetError

PathLike = Union[str, os.PathLike]

_UMASK_LOCK = threading.Lock()
_UMASK: list = []


def is_chief() -> bool:
  """Process 0 of a multi-process run: the one that writes logs, metrics and outputs."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def is_remote(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows (/proc)."""
  with _UMASK_LOCK:
    if not _UMASK:
      mask = None
      try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
          if line.startswith("Umask:"):
            mask = int(line.split()[1], 8)
            break
      except (OSError, ValueError):
        mask = None
      if mask is None:  # no /proc: os.umask is the only portable read, and it writes
        mask = os.umask(0o022)
        os.umask(mask)
      _UMASK.append(mask)
    return _UMASK[0]


def reset_umask_cache() -> None:
  """Forget the cached umask (tests change it within one process)."""
  with _UMASK_LOCK:
    _UMASK.clear()


def new_file_mode() -> int:
  """Permissions `open(path, 'w')` would give a new file under the current umask."""
  return 0o666 & ~current_umask()


def write_bytes_atomic(path: PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (see the module docstring); returns the path."""
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    target = epath.Path(os.fspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as err:
    raise DmfnetError(f"{path.parent}: cannot write there ({err})") from err
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def _real(path: PathLike) -> str:
  return os.path.realpath(os.path.expanduser(os.fspath(path)))


def refuse_writing_inputs(input_files: Iterable[PathLike], output_files: Iterable[PathLike] = (),
                          output_dirs: Iterable[PathLike] = (),
                          input_folders: Iterable[PathLike] = ()) -> None:
  """Refuses, before any work, outputs that would touch an input: an output file that is
  an input file (also through a link) or an output folder that holds input files (or is
  one of `input_folders`). Raises DataError naming both paths."""
  inputs = {}
  for path in input_files:
    inputs.setdefault(_real(path), os.fspath(path))
  input_dirs = {os.path.dirname(real): given for real, given in inputs.items()}
  input_dirs.update({_real(folder): os.fspath(folder) for folder in input_folders})
  checks = ((output_files, inputs, "output {path} is the input {input}: refusing to write "
              "over an input; choose another output file or folder"),
            (output_dirs, input_dirs, "output folder {path} holds the input {input}: refusing "
             "to write into an input folder; choose another output folder"))
  for paths, known, message in checks:
    for path in paths:
      real = None if is_remote(path) else _real(path)
      if real in known:
        raise DataError(message.format(path=path, input=known[real]))


def remove_stale_temporaries(folder: PathLike) -> int:
  """Deletes what a killed atomic write leaves (`.<name>.<random>.tmp`) in `folder`."""
  folder = pathlib.Path(folder)
  removed = 0
  if folder.is_dir():
    for path in folder.glob(".*.tmp"):
      try:
        path.unlink()
        removed += 1
      except OSError:
        pass
  return removed


def write_text_atomic(path: PathLike, text: str) -> pathlib.Path:
  return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
  """NaN and infinities -> None (strict JSON), recursively."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def write_json_atomic(path: PathLike, payload: Any) -> pathlib.Path:
  text = json.dumps(json_safe(payload), indent=2, sort_keys=True, default=str)
  return write_text_atomic(path, text + "\n")


def workdir_path(workdir: PathLike):
  """A workdir as a path: local ones made absolute, `gs://` ones kept as they are."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  text = os.fspath(workdir)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(pathlib.Path(text).expanduser().absolute())


def prepare_workdir(config, workdir: PathLike):
  """The workdir (created) with the run's `config.json`, written by the chief."""
  path = workdir_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise DmfnetError(f"--workdir={workdir}: cannot create it ({err})") from err
  if is_chief():
    write_json_atomic(path / "config.json", config.to_dict())
  return path


def log_devices() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s, process %d of %d, %d local / %d global devices: %s",
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())


def enable_compilation_cache() -> None:
  """A persistent XLA compilation cache (DMFNET_JAX_CACHE, default ~/.cache/dmfnet_jax/xla):
  a command compiles each shape once per machine, not once per run."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("DMFNET_JAX_CACHE", os.path.expanduser("~/.cache/dmfnet_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# The most CPU devices `use_cpu_cores_as_devices` makes by default: each holds a batch's
# share of UNet inputs in memory at once.
MAX_AUTOMATIC_CPU_DEVICES = 8


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def use_cpu_cores_as_devices(count: int = 0) -> int:
  """Makes JAX's CPU backend `count` devices (0: one per usable core, at most
  MAX_AUTOMATIC_CPU_DEVICES), so the fuse path runs a UNet input per core at a time
  instead of spreading each operation over every core: 25% more pairs per second on two
  cores (docs/performance.md). Only possible before JAX starts its CPU backend and when
  the user has not chosen a count (XLA_FLAGS, JAX_NUM_CPU_DEVICES); returns the count
  in force, or 0 where it could not be set."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if count < 0:
    raise DmfnetError(f"fuse.cpu_devices (--cpu-devices) must be >= 0 (0 = one per core), "
                      f"got {count}")
  chosen = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or "JAX_NUM_CPU_DEVICES" in os.environ)
  if chosen or xla_bridge.backends_are_initialized():
    return 0
  count = count or min(usable_cores(), MAX_AUTOMATIC_CPU_DEVICES)
  jax.config.update("jax_num_cpu_devices", count)
  return count
