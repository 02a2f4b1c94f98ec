r"""python -m dmfnet_jax.main --config=configs/demo.py

The whole DM-FNet pipeline at tiny scale on built-in synthetic phantoms, on a
fresh machine with no downloads: Stage I (a few diffusion training steps),
Stage II (a few fusion-head steps), then fusion of phantom MRI-CT, MRI-PET and
MRI-SPECT pairs. Minutes on a laptop CPU; those outputs show the plumbing, not a
trained model, so the same phantoms are then fused by the shipped trained model
(`--config.compare_with_shipped_model=False` skips that). See README for real
training. Default workdir: runs/demo.
"""

import importlib.util
import pathlib

_CONFIGS = pathlib.Path(__file__).resolve().parent


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_dmfnet_config_{name}", _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  del arg
  from dmfnet_jax import config_defaults as defaults

  config = defaults.base_config(job="demo")
  # The tiny recipe with the shipped model's structure (image_size 256: attention
  # only at the 16x16 level), which stays cheap when fusing 256x256 images.
  stage1 = _load("stage1").get_config("tiny")
  stage1.train.update(num_steps=30, log_every=10, checkpoint_every=30, preview_every=30,
                      preview_count=2, preview_steps=50)
  stage2 = _load("stage2").get_config("tiny")
  stage2.train.update(num_steps=20, log_every=10, checkpoint_every=20, preview_every=20)
  fuse = _load("fuse").get_config("tiny")
  fuse.fuse.phantom_count = 2  # per task
  for sub in (stage1, stage2, fuse):
    sub.data.phantom_count = 12
    sub.model = defaults.model_config("cpu")
  config.stage1, config.stage2, config.fuse = stage1, stage2, fuse
  config.compare_with_shipped_model = True
  config.shipped_fuse = _load("fuse").get_config()  # the shipped model; inputs set by the job
  return config
