r"""python -m dmfnet_jax.main --config=configs/demo.py

The whole DM-FNet pipeline at tiny scale on built-in synthetic phantoms, on a
fresh machine with no downloads: Stage I (a few diffusion training steps),
Stage II (a few fusion-head steps), then fusion of phantom MRI-CT, MRI-PET and
MRI-SPECT pairs. Minutes on a laptop CPU; those outputs show the plumbing, not a
trained model, so the same phantoms are then fused by the shipped trained model
(`--config.compare_with_shipped_model=False` skips that). See README for real
training. Default workdir: runs/demo.
"""

from dmfnet_jax import config_defaults as defaults


def _load(name, preset=None):
  return defaults.sibling_config(__file__, name, preset)


def get_config(arg=None):
  del arg
  config = defaults.base_config(job="demo")
  # The tiny recipe with the shipped model's structure (the `cpu` model preset),
  # which stays cheap when fusing 256x256 images.
  stage1 = _load("stage1", "tiny")
  stage1.train.update(num_steps=30, log_every=10, checkpoint_every=30, preview_every=30,
                      preview_count=2, preview_steps=50)
  stage2 = _load("stage2", "tiny")
  stage2.train.update(num_steps=20, log_every=10, checkpoint_every=20, preview_every=20)
  fuse = _load("fuse", "tiny")
  fuse.fuse.phantom_count = 2  # per task
  stage1.model = defaults.model_config("cpu")  # Stage II and fuse read it from checkpoints
  for sub in (stage1, stage2, fuse):
    sub.data.phantom_count = 12
  config.stage1, config.stage2, config.fuse = stage1, stage2, fuse
  config.compare_with_shipped_model = True
  config.shipped_fuse = _load("fuse")  # the shipped model; inputs set by the job
  return config
