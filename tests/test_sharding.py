"""Meshes from config; multi-device steps equal single-device ones (own process)."""

import json
import os
import subprocess
import sys

import pytest

from dmfnet_jax.errors import ConfigError
from dmfnet_jax import sharding
from conftest import REPO_ROOT


@pytest.mark.parametrize("cfg, devices, shape", [
    ({"data": -1, "fsdp": 1}, 8, (8, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4)),
    ({"data": 1, "fsdp": 1}, 1, (1, 1)),
])
def test_mesh_shape_fills_minus_one(cfg, devices, shape):
  assert sharding.mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize("cfg, message", [
    ({"data": 3, "fsdp": 1}, "does not divide"),
    ({"data": -1, "fsdp": -1}, "only one axis"),
    ({"data": 2, "fsdp": 2}, "uses 4 devices"),
    ({"data": -1, "model": 2}, "unknown axis"),
    ({"data": 0, "fsdp": 1}, "positive"),
])
def test_bad_mesh_is_named(cfg, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(cfg, 8)


@pytest.fixture(scope="module")
def multidevice_report():
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "multidevice_worker.py")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("mesh", ["data8", "data2_fsdp4"])
def test_eight_devices_match_one(multidevice_report, stage, mesh):
  assert multidevice_report["devices"] == 8
  result = multidevice_report[stage][mesh]
  assert result["loss_diff"] < 1e-5
  assert result["param_max_diff"] < 1e-5
  if mesh == "data2_fsdp4":
    assert any("fsdp" in spec for spec in result["param_shardings"])


def test_indivisible_batch_fails_clearly(multidevice_report):
  message = multidevice_report["indivisible_error"]
  assert message and "batch_size=6" in message and "8 devices" in message
