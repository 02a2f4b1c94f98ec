"""The demo job: the whole pipeline at tiny scale on the built-in phantoms.

Stage I, Stage II and fuse run one after another, each in its own folder under
the workdir, so a rerun resumes (or skips) what is already done. A few training
steps only show the plumbing, so the same phantoms are then fused by the model this
project trained and ships (MODEL_CARD.md), to show what trained output looks like,
and so is a small MRI-PET phantom volume (NIfTI in, NIfTI and a montage out).
"""

from __future__ import annotations

import pathlib

from absl import logging

from dmfnet_jax import api, fuse, main, runtime
from dmfnet_jax.data import phantoms
from dmfnet_jax.runtime import is_chief


def run(config, workdir: str) -> None:

  root = pathlib.Path(workdir)
  stage1_dir, stage2_dir = root / "stage1", root / "stage2"
  with_shipped = bool(config.get("compare_with_shipped_model", False))
  parts = 5 if with_shipped else 4
  logging.info("Demo 1/%d: Stage I (diffusion-trained UNet) in %s", parts, stage1_dir)
  main.run_job(config.stage1, str(stage1_dir))
  logging.info("Demo 2/%d: Stage II (fusion head) in %s", parts, stage2_dir)
  with config.stage2.unlocked():
    config.stage2.stage1_checkpoint = str(stage1_dir)
  main.run_job(config.stage2, str(stage2_dir))
  logging.info("Demo 3/%d: fusing phantom pairs", parts)
  with config.fuse.unlocked():
    config.fuse.checkpoint = str(stage2_dir)
  fuse.run(config.fuse, str(root / "fuse"))
  fused_dir = pathlib.Path(config.fuse.fuse.output_dir or root / "fuse" / "fused")
  note = (f"Demo finished. Fused images: {fused_dir.resolve()}\n"
          f"Stage I samples and Stage II previews: {(root / 'stage1' / 'previews').resolve()}, "
          f"{(root / 'stage2' / 'previews').resolve()}\n"
          f"Checkpoints (both stages): {(stage2_dir / 'checkpoints').resolve()}\n")
  volume_fuse = config.fuse
  if with_shipped:
    logging.info("Demo 4/%d: the same phantoms fused by the shipped trained model", parts)
    shipped = config.shipped_fuse
    with shipped.unlocked():
      shipped.data.root = str(root / "fuse" / "phantom_inputs")  # written by step 3
      shipped.data.tasks = tuple(config.fuse.data.tasks)
    fuse.run(shipped, str(root / "fuse_shipped"))
    shipped_dir = pathlib.Path(shipped.fuse.output_dir or root / "fuse_shipped" / "fused")
    note += f"The same pairs fused by the shipped model (MODEL_CARD.md): {shipped_dir.resolve()}\n"
    volume_fuse = shipped
  which = "shipped" if with_shipped else "demo"
  logging.info("Demo %d/%d: a phantom MRI-PET volume fused by the %s model", parts, parts, which)
  volume_dir = root / "volume"
  mri, pet = phantoms.write_phantom_volumes(volume_dir / "inputs", "MRI-PET",
                                            size=int(config.get("volume_size", 64)),
                                            slices=int(config.get("volume_slices", 8)))
  summary = api.Fuser.from_config(volume_fuse).fuse_volumes(
      mri, pet, volume_dir / "fused.nii.gz")
  note += (f"A phantom MRI-PET volume ({mri.name}, {pet.name} in {mri.parent.resolve()}) fused "
           f"by the {which} model: {pathlib.Path(summary['output']).resolve()}, montage "
           f"{pathlib.Path(summary['montage']).resolve()}\n")
  if is_chief():
    runtime.write_text_atomic(root / "DEMO_OUTPUTS.txt", note)
  print(note)
