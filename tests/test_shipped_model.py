"""The shipped model (dmfnet_jax/weights/, MODEL_CARD.md) is what `configs/fuse.py`
uses by default, and it still fuses a Harvard pair to its stored result.

Regenerate the stored image after a deliberate model change with
`DMFNET_UPDATE_GOLDEN=1 python -m pytest tests/test_shipped_model.py`.
"""

import os

import numpy as np
import pytest

from dmfnet_jax import fuse, imageio, paths
from conftest import REPO_ROOT, load_config

TASK, PAIR_ID = "MRI-PET", "25033"
GOLDEN = REPO_ROOT / "tests" / "data" / "shipped_model" / f"{TASK}_{PAIR_ID}.png"


def test_fuse_config_defaults_to_the_shipped_model():
  config = load_config("fuse")
  assert config.checkpoint == str(paths.shipped_model_dir())
  assert paths.shipped_model_dir().is_dir(), "the shipped model is missing from the package"


def test_shipped_model_reproduces_its_stored_output(harvard_root, tmp_path):
  mri = harvard_root / TASK / "test" / "MRI" / f"{PAIR_ID}.png"
  pet = harvard_root / TASK / "test" / "PET" / f"{PAIR_ID}.png"
  config = load_config("fuse")
  config.fuse.pairs = f"{mri}:{pet}"
  config.fuse.output_dir = str(tmp_path / "out")
  fuse.run(config, str(tmp_path / "work"))
  fused = imageio.read_image(tmp_path / "out" / f"{PAIR_ID}.png")
  assert fused.shape == (256, 256, 3)
  if os.environ.get("DMFNET_UPDATE_GOLDEN"):
    imageio.write_image_atomic(GOLDEN, fused)
  if not GOLDEN.exists():
    pytest.fail(f"{GOLDEN} is missing; regenerate it with DMFNET_UPDATE_GOLDEN=1")
  expected = imageio.read_image(GOLDEN)
  diff = np.abs(fused.astype(int) - expected.astype(int))
  assert diff.max() <= 1, f"max difference {diff.max()} grey levels"
