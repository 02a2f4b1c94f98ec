"""Shared test fixtures: the shared data folder and a persistent XLA cache."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# One compile per shape across test runs: CI reruns hit the on-disk cache.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DMFNET_JAX_CACHE", str(REPO_ROOT / ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from dmfnet_jax import paths  # noqa: E402


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.exists():
    pytest.skip(
        f"{what} not found at {path}; set {paths.SHARED_ENV_VAR} to the folder holding "
        "SPEC.md, parity/, metrics/ and data/"
    )
  return path


@pytest.fixture(scope="session")
def shared_root() -> pathlib.Path:
  return _require(paths.shared_root(), "shared folder")


@pytest.fixture(scope="session")
def harvard_root() -> pathlib.Path:
  return _require(paths.harvard_root(), "Harvard data")


@pytest.fixture(scope="session")
def dmfnet_outputs_root() -> pathlib.Path:
  return _require(paths.dmfnet_outputs_root(), "published DM-FNet outputs")


@pytest.fixture(scope="session")
def parity_root() -> pathlib.Path:
  return _require(paths.parity_root(), "parity vectors")


@pytest.fixture(scope="session")
def metrics_vectors_root() -> pathlib.Path:
  return _require(paths.metrics_vectors_root(), "metric test vectors")
