r"""python -m dmfnet_jax.main --config=configs/stage2.py --workdir=runs/stage2 --config.stage1_checkpoint=runs/stage1

Stage II: freeze the Stage I UNet, extract its decoder features from copies of
both sources noised at timesteps 5, 10 and 20 (linear schedule), and train the
fusion head with the hybrid intensity/gradient/SSIM loss (docs/model.md §3-5).
Reference: Adam lr 1e-4, batch 1, 160x160 crops with flips, 300 epochs over the
689 Harvard training pairs (~206,700 steps).

The Stage I checkpoint says what the UNet is (`config.model` is read from it) and an
`init_checkpoint` what the head is (`config.fusion`; else the reference's); a key set on
the command line must agree with them.

Presets: `configs/stage2.py:tiny` (64x64 crops) for CPU demos/tests;
`cpu`: the settings of the shipped model (Harvard train split, 96x96 crops, 2 pairs per
step, a linear learning-rate decay over the last 1,800 of 8,800 steps; the later phases,
which start from `config.init_checkpoint`, are in MODEL_CARD.md).
`config.stage1_checkpoint` is a Stage I workdir, an Orbax checkpoint folder, or a
reference `.pth`. The checkpoints written here hold both stages: point
`configs/fuse.py`'s `config.checkpoint` at this workdir.
"""

from dmfnet_jax import config_defaults as defaults


def get_config(arg=None):
  preset = arg or "reference"
  defaults.check_preset("stage2.py", preset, ('reference', 'tiny', 'cpu'))
  config = defaults.base_config(job="stage2")
  config.stage1_checkpoint = ""
  # Optional: a two-stage checkpoint (a Stage II workdir, an exported or imported model)
  # whose head starts this run; its Stage I UNet is used when stage1_checkpoint is empty.
  config.init_checkpoint = ""
  config.model = defaults.model_config_from_checkpoint()
  config.diffusion = defaults.diffusion_config("linear")
  config.fusion = defaults.fusion_config_from_checkpoint()
  config.loss = defaults.loss_config()
  config.data = defaults.data_config(crop_size=160)
  config.train = defaults.train_config(
      num_steps=206_700, batch_size=1, optimizer="adam", learning_rate=1e-4, weight_decay=0.0,
      checkpoint_every=5000, preview_every=5000)
  if preset == "tiny":
    config.data.crop_size = 64
    config.data.phantom_count = 16
    config.train.update(num_steps=100, batch_size=2, log_every=10, checkpoint_every=50,
                        preview_every=50)
  if preset == "cpu":
    config.data.root = defaults.harvard_root()
    config.data.crop_size = 96
    # Adam 1e-4 as the reference, held to step 7,000, then annealed linearly to 0 at
    # 8,800 (a stable-then-decay tail; its effect is measured in MODEL_CARD.md).
    config.train.update(num_steps=8800, batch_size=2, log_every=50, checkpoint_every=250,
                        preview_every=1000, lr_schedule="linear_decay", decay_start_step=7000)
  return config
