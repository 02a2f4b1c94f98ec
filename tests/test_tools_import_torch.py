"""The reference-checkpoint converter: one Orbax checkpoint that fuse and Stage II load."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from dmfnet_jax import inference
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import torch_convert
from dmfnet_jax.tools import import_torch
from conftest import REPO_ROOT, load_config

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference_pair(parity_root):
  return parity_root / "tiny_stage1_unet.pth", parity_root / "tiny_stage2_head.pth"


def test_converted_checkpoint_loads_in_fuse(reference_pair, tmp_path):
  unet_pth, head_pth = reference_pair
  config = load_config("fuse", "tiny")
  out = import_torch.convert(config, str(unet_pth), str(head_pth), str(tmp_path / "model"))
  config.checkpoint = str(out)
  model = inference.load_fusion_model(config)
  expected_unet = torch_convert.unet_params_from_torch(torch_convert.load_torch_state_dict(unet_pth),
                                                  config.model)
  expected_head = torch_convert.head_params_from_torch(torch_convert.load_torch_state_dict(head_pth),
                                                  config.model, config.fusion)
  for got, want in ((model.unet_params, expected_unet), (model.head_params, expected_head)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # Stage I alone serves as Stage II's starting point.
  unet_only = import_torch.convert(config, str(unet_pth), None, str(tmp_path / "unet"))
  jax.tree.map(np.testing.assert_array_equal,
               inference.load_unet_params(str(unet_only), config.model), expected_unet)


def test_refuses_a_non_empty_output_and_a_mismatched_config(reference_pair, tmp_path):
  unet_pth, head_pth = reference_pair
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "file").write_text("x")
  config = load_config("fuse", "tiny")
  with pytest.raises(CheckpointError, match="not empty"):
    import_torch.convert(config, str(unet_pth), str(head_pth), str(tmp_path / "busy"))
  with pytest.raises(CheckpointError):
    import_torch.convert(load_config("fuse", "reference"), str(unet_pth), None,
                         str(tmp_path / "other"))


def test_command_line(reference_pair, tmp_path):
  unet_pth, head_pth = reference_pair
  result = subprocess.run(
      [sys.executable, "-m", "dmfnet_jax.tools.import_torch", f"--stage1={unet_pth}",
       f"--stage2={head_pth}", "--config=configs/fuse.py:tiny", f"--out={tmp_path / 'm'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "m" / "0").is_dir()
  result = subprocess.run(
      [sys.executable, "-m", "dmfnet_jax.tools.import_torch", f"--stage1={tmp_path / 'no.pth'}",
       "--config=configs/fuse.py:tiny", f"--out={tmp_path / 'n'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "no.pth" in result.stderr and "Traceback" not in result.stderr
