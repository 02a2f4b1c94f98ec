r"""Entry point: `python -m dmfnet_jax.main --config=configs/<job>.py[:preset] --workdir=DIR`.

Parses the config, starts `jax.distributed` where the environment asks for it,
logs the devices and hands over to the job the config names. Errors a user can
cause are printed as one clear message (exit status 2), not a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

JOBS = {
    "stage1": "dmfnet_jax.train.stage1",
    "stage2": "dmfnet_jax.train.stage2",
    "fuse": "dmfnet_jax.fuse",
    "evaluate": "dmfnet_jax.evaluate",
    "demo": "dmfnet_jax.demo",
}


class _QuietLibraries:
  """Drops INFO chatter of checkpointing internals; warnings still show."""

  NOISY = ("/orbax/", "/grain/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run_job(config, workdir: str):
  """Checks `config` and runs the job it names (the demo runs its parts this way);
  returns what the job returns (fuse and evaluate: a summary)."""
  from dmfnet_jax import validation  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import DmfnetError  # pylint: disable=g-import-not-at-top
  job = config.get("job")
  if job not in JOBS:
    raise DmfnetError(f"config.job={job!r}: unknown job; valid: {sorted(JOBS)}")
  validation.validate(config)
  return importlib.import_module(JOBS[job]).run(config, workdir)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from dmfnet_jax import distributed, runtime, validation  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import EXIT_CONFIG_ERROR, EXIT_ITEMS_SKIPPED, DmfnetError  # pylint: disable=g-import-not-at-top

  quiet_library_logs()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  job = config.get("job")
  try:
    if job not in JOBS:
      raise DmfnetError(f"config.job={job!r}: unknown job; valid: {sorted(JOBS)}")
    validation.validate(config)
    if job == "fuse":  # before JAX starts: a CPU's cores become devices of their own
      runtime.use_cpu_cores_as_devices(config.fuse.get("cpu_devices", 0))
    distributed.maybe_initialize(config.get("distributed"))
    runtime.enable_compilation_cache()
    runtime.log_devices()
    workdir = _WORKDIR.value or os.path.join("runs", job)
    logging.info("Job %s, workdir %s", job, workdir)
    result = run_job(config, workdir)
  except DmfnetError as err:
    logging.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)
  if isinstance(result, dict) and result.get("skipped"):
    sys.exit(EXIT_ITEMS_SKIPPED)


def parse_flags(argv):
  """absl flag parsing, with config override mistakes reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as err:
    key = str(err).strip("\"'")
    overrides = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith("--config.")]
    culprit = next((o for o in overrides if o.split(".")[-1] == key), None) or key
    print(f"error: {culprit}: unknown config key (see the config file for the valid keys)",
          file=sys.stderr)
    sys.exit(2)
  except (TypeError, ValueError) as err:
    print(f"error: bad config override: {err}", file=sys.stderr)
    sys.exit(2)


def _define_flags() -> None:
  """Flags are defined only when run as a program, so importing this module (the demo
  runs jobs through `run_job`) defines none."""
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/stage1.py or configs/stage1.py:tiny.",
      lock_config=True)
  _WORKDIR = flags.DEFINE_string(
      "workdir", None, "Folder that owns the run (checkpoints, config.json, metrics, outputs). "
      "Rerunning with the same workdir resumes. Default: runs/<job>.")


def run() -> None:
  _define_flags()
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
