"""Fusing a 256x256x64 phantom volume pair with the shipped model.

  python benchmarks/bench_volume.py [--size 256] [--slices 64] [--empty 8] [--batch 1]

Writes an MRI and a PET phantom volume (NIfTI; `--empty` of the slices blank at each end,
as a scan's margins) to a temporary folder, fuses them slice by slice as
`dmfnet-jax fuse t1.nii.gz pet.nii.gz` does, and prints one JSON object: seconds (after a
warm-up that compiles), slices/s, and the empty slices skipped.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dmfnet_jax  # noqa: E402  (sets the package's XLA flags before JAX starts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--slices", type=int, default=64)
  parser.add_argument("--empty", type=int, default=8)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.data import phantoms  # pylint: disable=g-import-not-at-top

  folder = tempfile.mkdtemp(prefix="dmfnet_volume_")
  mri_path, pet_path = phantoms.write_phantom_volumes(
      folder, "MRI-PET", size=args.size, slices=args.slices - 2 * args.empty)
  for path in (mri_path, pet_path):  # blank margins at both ends of the slice axis
    image = nib.load(path)
    data = image.get_fdata(dtype="float32")
    blank = [[0, 0], [0, 0], [args.empty, args.empty]]
    import numpy as np  # pylint: disable=g-import-not-at-top
    nib.save(nib.Nifti1Image(np.pad(data, blank), image.affine, image.header), path)
  fuser = dmfnet_jax.load(batch_size=args.batch)
  fuser.fuse_volumes(mri_path, pet_path, os.path.join(folder, "warm.nii.gz"), show_progress=False)
  start = time.perf_counter()
  summary = fuser.fuse_volumes(mri_path, pet_path, os.path.join(folder, "fused.nii.gz"),
                               show_progress=False)
  seconds = time.perf_counter() - start
  print(json.dumps({"benchmark": "volume", "shape": [args.size, args.size, args.slices],
                    "batch": args.batch, "seconds": round(seconds, 2),
                    "slices_per_s": round(summary["fused_slices"] / seconds, 3),
                    "fused_slices": summary["fused_slices"],
                    "skipped_empty_slices": summary["skipped_empty_slices"]}, indent=1))


if __name__ == "__main__":
  main()
