r"""python -m dmfnet_jax.main --config=configs/fuse.py --workdir=runs/fuse

Fuse image pairs with a trained two-stage model (an Orbax checkpoint holding the
Stage I UNet and the Stage II head: a Stage II workdir, or the output of
`python -m dmfnet_jax.tools.import_torch`).

Inputs, first that is set wins:
  --config.fuse.pairs='a1.png:b1.png,a2.png:b2.png'   explicit pairs (or a text file, one `a b` per line)
  --config.fuse.dir_a=MRI_DIR --config.fuse.dir_b=OTHER_DIR   two folders matched by file name
  --config.data.root=ROOT [--config.data.tasks=...] [--config.data.split=test]   dataset layout
      (split: a folder name, or `dmfnet_side_by_side`: the test ids ROOT/splits.json lists)
  nothing: the built-in synthetic phantoms (a demo on a fresh machine).
Outputs go to `config.fuse.output_dir` (default WORKDIR/fused), named after the
inputs (`<task>/<id>.png` for a dataset): grayscale for MRI-CT, colour for PET/SPECT.

Model: by default the model this project trained on the Harvard training split and
ships in the package (`dmfnet_jax/weights/`, see MODEL_CARD.md), so this command
fuses out of the box. `--config.checkpoint=DIR` picks another two-stage checkpoint (a
Stage II workdir, an exported model, an import of the authors' weights). The checkpoint
says what the model is: `config.model` and `config.fusion` are read from it, and a key
set on the command line must agree with it. Presets: `cpu` (the default) fuses with the
shipped model; `reference` and `tiny` have no default checkpoint.
"""

from dmfnet_jax import config_defaults as defaults


def get_config(arg=None):
  preset = arg or "cpu"
  defaults.check_preset("fuse.py", preset, ('reference', 'tiny', 'cpu'))
  config = defaults.base_config(job="fuse")
  config.checkpoint = defaults.shipped_model_dir() if preset == "cpu" else ""
  config.model = defaults.model_config_from_checkpoint()
  config.diffusion = defaults.diffusion_config("linear")
  config.fusion = defaults.fusion_config_from_checkpoint()
  config.data = defaults.data_config()
  config.data.split = "test"
  config.fuse = defaults.fuse_config()
  return config
