"""Fusion on every device and every host: each batch's UNet inputs split over 8 simulated
CPU devices, and the fuse job run as 2 processes on localhost, against one device and one
process.

A different device count may change the order of floating-point sums, nothing more:
the fused float images agree within 1e-5 and the written images within one grey level.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dmfnet_jax import imageio
from dmfnet_jax.data import phantoms
from conftest import REPO_ROOT
from test_distributed import child_env, free_port

PROBE = REPO_ROOT / "tests" / "fuse_probe.py"


def _run_worker(checkpoint, out, devices, pairs=8):
  env = child_env()
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  result = subprocess.run([sys.executable, str(PROBE), str(checkpoint), str(out), str(pairs), "40"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_fuse_as_one(micro_stage2_workdir, tmp_path):
  one, eight = tmp_path / "one.npy", tmp_path / "eight.npy"
  assert _run_worker(micro_stage2_workdir, one, 1)["devices"] == 1
  assert _run_worker(micro_stage2_workdir, eight, 8)["devices"] == 8
  np.testing.assert_allclose(np.load(eight), np.load(one), atol=1e-5)
  # Fewer pairs than devices: their 18 UNet inputs are spread over the 8 devices (padded
  # to 24) and every device runs the head on all three pairs.
  three = tmp_path / "three.npy"
  assert _run_worker(micro_stage2_workdir, three, 8, pairs=3)["devices"] == 8
  np.testing.assert_allclose(np.load(three), np.load(one)[:3], atol=1e-5)


@pytest.mark.slow
def test_two_processes_share_the_pairs(micro_stage2_workdir, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  for i in range(5):
    mri, ct = phantoms.phantom_pair(i, 32, "MRI-CT", seed=8)
    imageio.write_image_atomic(a / f"{i}.png", mri)
    imageio.write_image_atomic(b / f"{i}.png", ct)

  def command(workdir, out, *extra):
    return [sys.executable, "-m", "dmfnet_jax.main", f"--config={REPO_ROOT / 'configs' / 'fuse.py'}",
            f"--workdir={workdir}", f"--config.checkpoint={micro_stage2_workdir}",
            f"--config.fuse.dir_a={a}", f"--config.fuse.dir_b={b}",
            f"--config.fuse.output_dir={out}", "--config.fuse.batch_size=1", *extra]

  single = subprocess.run(command(tmp_path / "w1", tmp_path / "single"), cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  address = f"127.0.0.1:{free_port()}"
  processes = [subprocess.Popen(
      command(tmp_path / "w2", tmp_path / "multi", f"--config.distributed.coordinator_address={address}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=600) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], logs[0][1][-2000:] + logs[1][1][-2000:]
  shares = [int(re.search(r"Fusing (\d+) of 5 pairs", err).group(1)) for _, err in logs]
  assert sorted(shares) == [2, 3]
  summary = json.loads((tmp_path / "w2" / "fuse_summary.json").read_text())
  assert summary["fused"] == 5 and summary["processes"] == 2
  assert not list((tmp_path / "w2").glob("fuse_summary.process-*"))
  for i in range(5):
    multi = imageio.read_image(tmp_path / "multi" / f"{i}.png").astype(int)
    one = imageio.read_image(tmp_path / "single" / f"{i}.png").astype(int)
    assert np.abs(multi - one).max() <= 1
