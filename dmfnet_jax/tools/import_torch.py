r"""Convert the authors' PyTorch checkpoints into one Orbax checkpoint.

  python -m dmfnet_jax.tools.import_torch --stage1=I630000_E14000_gen.pth \
      --stage2=MIF.pth --out=runs/imported

`--stage1` is a Stage I checkpoint as the authors' training script saves it (the
diffusion wrapper's state_dict: UNet keys under `denoise_fn.` plus schedule buffers) or
bare UNet keys; `--stage2` the fusion head's state_dict. A `module.` prefix
(nn.DataParallel) and a dict wrapping the state_dict are accepted; only tensors are
read (no pickled code runs). The model's structure (inner channels, channel multipliers,
res blocks per level, which levels attend, the head's timestep count) is read from the
weights; the GroupNorm group count is not in them: `--norm_groups` (the reference's 32).
`--config` is optional: a config file whose model/fusion settings must agree with the
weights (a contradiction names the key and both values).

The result records its structure, so `configs/fuse.py --config.checkpoint=DIR` fuses
with it and, with `--stage1` alone, `configs/stage2.py --config.stage1_checkpoint=DIR`
trains a head on it, with no model flags. Nothing is written to `--out` unless the
whole conversion succeeds.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags


def convert(stage1: str, stage2: str | None, out: str, *, config=None,
            norm_groups: int | None = None) -> pathlib.Path:
  """Converts the authors' files; returns the output folder (an Orbax checkpoint)."""
  from dmfnet_jax import checkpoints, config_defaults  # pylint: disable=g-import-not-at-top
  from dmfnet_jax import validation  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.models import torch_convert  # pylint: disable=g-import-not-at-top

  out_path = pathlib.Path(out).expanduser()
  if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
    raise CheckpointError(f"--out={out}: exists and is not an empty folder; nothing was written")
  if norm_groups is None and config is not None and "model" in config:
    norm_groups = config.model.get("norm_groups")
  norm_groups = int(norm_groups or config_defaults.MODEL_DEFAULTS["norm_groups"])

  unet_sd = torch_convert.load_torch_state_dict(stage1)
  model = torch_convert.unet_structure_from_torch(unet_sd, norm_groups=norm_groups,
                                                  source=f"--stage1={stage1}")
  groups = {"model": model}
  head_sd = None
  if stage2:
    head_sd = torch_convert.load_torch_state_dict(stage2)
    timesteps = None
    if config is not None and "fusion" in config and config.fusion.get("timesteps"):
      timesteps = tuple(config.fusion.timesteps)
    groups["fusion"] = torch_convert.head_structure_from_torch(
        head_sd, model, timesteps=timesteps, source=f"--stage2={stage2}")
  if config is not None:
    present = {g: config[g] for g in groups if g in config}
    checkpoints.check_model_matches(groups, present, "the checkpoint",
                                    hint="Leave those settings out: the weights say what the "
                                    "model is.")
  validation.validate_model(model)
  params = {"unet": torch_convert.unet_params_from_torch(unet_sd, model)}
  if head_sd is not None:
    params["head"] = torch_convert.head_params_from_torch(head_sd, model, groups["fusion"])
  meta = {"job": "imported", "source": {"stage1": str(stage1)}, **groups,
          "diffusion": config_defaults.diffusion_config("linear").to_dict()}
  if stage2:
    meta["source"]["stage2"] = str(stage2)
  # Written beside --out, then renamed: a failed save leaves --out as it was.
  out_path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
  try:
    store = checkpoints.CheckpointStore(staging, keep=1, async_save=False)
    store.save(0, {"params": params, "meta": meta})
    store.close()
    os.chmod(staging, 0o777 & ~_umask())
    if out_path.exists():
      out_path.rmdir()
    os.replace(staging, out_path)
  finally:
    if staging.exists():
      shutil.rmtree(staging, ignore_errors=True)
  return out_path


def _umask() -> int:
  from dmfnet_jax import runtime  # pylint: disable=g-import-not-at-top
  return runtime.current_umask()


def main(argv) -> None:
  del argv
  from dmfnet_jax.errors import DmfnetError  # pylint: disable=g-import-not-at-top
  if not _STAGE1.value or not _OUT.value:
    raise app.UsageError("--stage1 and --out are required")
  try:
    out = convert(_STAGE1.value, _STAGE2.value, _OUT.value, config=_CONFIG.value,
                  norm_groups=_NORM_GROUPS.value)
  except DmfnetError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  logging.info("Wrote %s", out)
  print(f"Wrote {out}")


def _define_flags() -> None:
  """Flags are defined only when run as a program, so importing this module (tests,
  other tools) never clashes with another tool's flags."""
  global _CONFIG, _STAGE1, _STAGE2, _OUT, _NORM_GROUPS
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Optional config file whose model/fusion settings the weights must match.")
  _STAGE1 = flags.DEFINE_string("stage1", None, "The authors' Stage I (UNet) .pth, e.g. "
                                "I630000_E14000_gen.pth.")
  _STAGE2 = flags.DEFINE_string("stage2", None, "The authors' Stage II (fusion head) .pth, "
                                "e.g. MIF.pth.")
  _OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty).")
  _NORM_GROUPS = flags.DEFINE_integer("norm_groups", None, "GroupNorm groups of the UNet "
                                      "(not stored in the weights; default: the reference's 32).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
