r"""Convert the authors' PyTorch checkpoints into one Orbax checkpoint.

  python -m dmfnet_jax.tools.import_torch --stage1=UNET.pth --stage2=HEAD.pth \
      --config=configs/fuse.py:reference --out=DIR

`--stage1` is a Stage I checkpoint (the diffusion wrapper's state_dict with keys
under `denoise_fn.`, or bare UNet keys); `--stage2` the fusion head's state_dict.
The result loads with `configs/fuse.py:reference --config.checkpoint=DIR`; with `--stage1`
alone it serves as `configs/stage2.py --config.stage1_checkpoint=DIR`.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags



def convert(config, stage1: str, stage2: str | None, out: str) -> pathlib.Path:
  from dmfnet_jax import checkpoints, validation  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import torch_convert  # pylint: disable=g-import-not-at-top

  validation.validate_model(config.model)
  params = {"unet": torch_convert.unet_params_from_torch(
      torch_convert.load_torch_state_dict(stage1), config.model)}
  meta = {"job": "imported", "source": {"stage1": str(stage1)},
          "model": config.model.to_dict()}
  if stage2:
    if "fusion" not in config:
      raise CheckpointError("--stage2 needs a config with a `fusion` group (configs/fuse.py)")
    params["head"] = torch_convert.head_params_from_torch(
        torch_convert.load_torch_state_dict(stage2), config.model, config.fusion)
    meta["source"]["stage2"] = str(stage2)
    meta["fusion"] = config.fusion.to_dict()
  if "diffusion" in config:
    meta["diffusion"] = config.diffusion.to_dict()
  out_path = pathlib.Path(out)
  if out_path.exists() and any(out_path.iterdir()):
    raise CheckpointError(f"--out={out}: folder exists and is not empty")
  store = checkpoints.CheckpointStore(out_path, keep=1, async_save=False)
  store.save(0, {"params": params, "meta": meta})
  store.close()
  return out_path


def main(argv) -> None:
  del argv
  from dmfnet_jax.errors import DmfnetError  # pylint: disable=g-import-not-at-top
  if not _STAGE1.value or not _OUT.value:
    raise app.UsageError("--stage1 and --out are required")
  try:
    out = convert(_CONFIG.value, _STAGE1.value, _STAGE2.value, _OUT.value)
  except DmfnetError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  logging.info("Wrote %s", out)
  print(f"Wrote {out}")


def _define_flags() -> None:
  """Flags are defined only when run as a program, so importing this module (tests,
  other tools) never clashes with another tool's flags."""
  global _CONFIG, _STAGE1, _STAGE2, _OUT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/fuse.py:reference", "Config whose model/fusion groups describe the checkpoints.")
  _STAGE1 = flags.DEFINE_string("stage1", None, "Reference Stage I (UNet) .pth.")
  _STAGE2 = flags.DEFINE_string("stage2", None, "Reference Stage II (fusion head) .pth.")
  _OUT = flags.DEFINE_string("out", None, "Output folder (an Orbax checkpoint manager folder).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
