"""What `import dmfnet_jax` does: no framework loaded, and XLA flags that keep outputs."""

import os
import subprocess
import sys

import dmfnet_jax
from conftest import REPO_ROOT

PROBE = REPO_ROOT / "tests" / "fuse_probe.py"


def test_the_package_sets_its_xla_flags_without_clobbering():
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in dmfnet_jax.XLA_DEFAULTS:
    assert flag.split("=")[0] in flags
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
  out = subprocess.run([sys.executable, "-c", "import dmfnet_jax, os; print(os.environ['XLA_FLAGS'])"],
                       env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert out == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def test_the_xla_flags_keep_the_outputs(micro_stage2_workdir, tmp_path):
  """Convolutions through YNNPACK give the outputs of XLA's own kernels (1e-5)."""
  results = []
  for setting in ("1", "0"):
    env = {**os.environ, "DMFNET_XLA_DEFAULTS": setting,
           "XLA_FLAGS": "" if setting == "1" else "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    path = tmp_path / f"out{setting}.npy"
    subprocess.run([sys.executable, str(PROBE), str(micro_stage2_workdir), str(path), "2", "48"],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600)
    results.append(__import__("numpy").load(path))
  assert abs(results[0] - results[1]).max() <= 1e-5
