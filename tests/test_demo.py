"""The demo job end to end, shrunk to the micro model (the real one takes minutes)."""

import numpy as np
from PIL import Image

from dmfnet_jax import demo
from conftest import load_config, micro_config


def test_demo_trains_fuses_and_compares_with_the_shipped_model(tmp_path):
  config = load_config("demo")
  with config.unlocked():
    config.stage1 = micro_config("stage1", num_steps=2, checkpoint_every=2)
    config.stage2 = micro_config("stage2", num_steps=2, checkpoint_every=2)
    config.fuse = micro_config("fuse")
    config.fuse.data.tasks = ("MRI-PET",)
    config.fuse.fuse.phantom_count = 1  # of data.phantom_size 48
  demo.run(config, str(tmp_path))
  note = (tmp_path / "DEMO_OUTPUTS.txt").read_text()
  assert "shipped model" in note
  ours = sorted((tmp_path / "fuse" / "fused" / "MRI-PET").glob("*.png"))
  shipped = sorted((tmp_path / "fuse_shipped" / "fused" / "MRI-PET").glob("*.png"))
  assert len(ours) == 1 and [p.name for p in shipped] == [p.name for p in ours]
  image = np.asarray(Image.open(shipped[0]))
  assert image.shape == (48, 48, 3) and image.std() > 10  # colour kept, not blank
  assert (tmp_path / "stage2" / "checkpoints").is_dir()
