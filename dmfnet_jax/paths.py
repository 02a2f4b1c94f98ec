"""Where the shared data lives.

Tests and benchmarks find the Harvard data, the parity vectors and the metric test
vectors through one setting: the environment variable `DMFNET_SHARED`, defaulting
to `../shared` beside the repository checkout.
"""

import os
import pathlib

SHARED_ENV_VAR = "DMFNET_SHARED"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_root() -> pathlib.Path:
  """The folder holding parity/, metrics/ and data/ (developers and CI only)."""
  env = os.environ.get(SHARED_ENV_VAR)
  if env:
    return pathlib.Path(env).expanduser().resolve()
  return (REPO_ROOT.parent / "shared").resolve()


def harvard_root() -> pathlib.Path:
  return shared_root() / "data" / "harvard"


def harvard_root_or_exit() -> pathlib.Path:
  """The Harvard data root for benchmark scripts; exits with status 2 saying why when the
  data is not there."""
  root = harvard_root()
  if not (root / "splits.json").is_file():
    raise SystemExit(f"Harvard data not found at {root}; set {SHARED_ENV_VAR} to the folder "
                     "holding data/harvard")
  return root


def dmfnet_outputs_root() -> pathlib.Path:
  return shared_root() / "data" / "dmfnet_outputs"


def parity_root() -> pathlib.Path:
  return shared_root() / "parity"


def metrics_vectors_root() -> pathlib.Path:
  return shared_root() / "metrics"


def shipped_model_dir() -> pathlib.Path:
  """The two-stage checkpoint this project trained and ships (MODEL_CARD.md)."""
  return pathlib.Path(__file__).resolve().parent / "weights" / "dmfnet_cpu_harvard"
