r"""python -m dmfnet_jax.main --config=configs/stage1.py --workdir=runs/stage1

Stage I: train the SR3-style UNet as a predict-x0 diffusion model on single
medical images (docs/model.md §1-2). Reference hyper-parameters: 160x160 crops, batch of
one pair (2 images), AdamW lr 1e-5, cosine schedule with T=2000, ~630k steps.

Presets (`--config=configs/stage1.py:tiny`): `tiny` is a CPU-sized model (32
inner channels, 64x64 crops) for demos and tests; `cpu` holds the settings of the
shipped model (32 inner channels, Harvard train split, 64x64 crops, batch 8; the
phases and step counts it was trained in are in MODEL_CARD.md). `config.init_checkpoint`
starts from another Stage I UNet (a workdir, or an exported two-stage model). Data: `--config.data.root=`
a folder in the Harvard layout (empty = built-in synthetic phantoms).
"""

from dmfnet_jax import config_defaults as defaults


def get_config(arg=None):
  preset = arg or "reference"
  defaults.check_preset("stage1.py", preset, ('reference', 'tiny', 'cpu'))
  config = defaults.base_config(job="stage1")
  config.model = defaults.model_config(preset)
  config.diffusion = defaults.diffusion_config("cosine")
  config.data = defaults.data_config(crop_size=160)
  config.train = defaults.train_config()
  config.init_checkpoint = ""  # optional: a Stage I checkpoint to start from
  if preset == "tiny":
    config.data.crop_size = 64
    config.data.phantom_count = 16
    config.train.update(num_steps=200, batch_size=4, learning_rate=2e-4, log_every=10,
                        checkpoint_every=100, preview_every=100, preview_count=2)
    config.train.preview_steps = 50
  if preset == "cpu":
    config.data.root = defaults.harvard_root()
    config.data.crop_size = 64
    config.train.update(num_steps=2500, batch_size=8, learning_rate=1e-4, log_every=50,
                        checkpoint_every=250, preview_every=1250, preview_count=4,
                        preview_steps=100)
  return config
