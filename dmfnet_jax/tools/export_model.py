r"""Export a trained two-stage model: both stages' parameters, nothing else.

  python -m dmfnet_jax.tools.export_model --checkpoint=runs/stage2 --out=DIR

Reads a Stage II workdir (or its checkpoint folder / one step folder), drops the
optimizer state and data-iterator position, and writes a compact Orbax checkpoint
(`params` = {unet, head}, `meta` = the model/fusion/diffusion configs) that
`configs/fuse.py --config.checkpoint=DIR` loads. This is how the shipped model in
`dmfnet_jax/weights/` was made.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags



def export(checkpoint: str, out: str, extra_meta: dict | None = None) -> pathlib.Path:
  from dmfnet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.inference import restore_two_stage  # pylint: disable=g-import-not-at-top

  store, step = checkpoints.open_for_reading(checkpoint)
  meta = store.read_meta(step)
  unet_params, head_params = restore_two_stage(store, step)
  params = {"unet": unet_params, "head": head_params}
  out_path = pathlib.Path(out)
  if out_path.exists() and any(out_path.iterdir()):
    raise CheckpointError(f"--out={out}: folder exists and is not empty")
  meta = dict(meta, job="exported", source={"checkpoint": str(store.directory), "step": step},
              **(extra_meta or {}))
  target = checkpoints.CheckpointStore(out_path, keep=1, async_save=False)
  target.save(step, {"params": params, "meta": meta})
  target.close()
  return out_path


def main(argv) -> None:
  del argv
  from dmfnet_jax.errors import DmfnetError  # pylint: disable=g-import-not-at-top
  if not _CHECKPOINT.value or not _OUT.value:
    raise app.UsageError("--checkpoint and --out are required")
  try:
    out = export(_CHECKPOINT.value, _OUT.value)
  except DmfnetError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {out}")


def _define_flags() -> None:
  """Flags are defined only when run as a program, so importing this module (tests,
  other tools) never clashes with another tool's flags."""
  global _CHECKPOINT, _OUT
  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage II workdir or checkpoint folder.")
  _OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
