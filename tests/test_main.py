"""The command line: config overrides and user errors give one clear line, exit 2."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "dmfnet_jax.main", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/stage1.py:tiny", "--config.train.nonexistent=3"],
     "config.train.nonexistent: unknown config key"),
    (["--config=configs/stage1.py:tiny", "--config.train.num_steps=abc"], "num_steps"),
    (["--config=configs/stage1.py:tiny", "--config.train.batch_size=3"],
     "config.train.batch_size=3"),
    (["--config=configs/stage1.py:tiny", "--config.data.crop_size=70"], "config.data.crop_size"),
    (["--config=configs/stage2.py:tiny", "--config.data.tasks=('MRI-XR',)"], "MRI-XR"),
    (["--config=configs/stage2.py:tiny", "--config.fusion.timesteps=(5,)", "--config.data.tasks=('MRI-CT',)",
      "--config.stage1_checkpoint=/no/ckpt"], "/no/ckpt"),
    (["--config=configs/stage1.py:tiny", "--config.data.root=/no/such/root"], "/no/such/root"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
  result = run_cli(*args, f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr
