"""The `dmfnet-jax` command: fusion from a shell, with nothing but the installed package.

    dmfnet-jax fuse MRI OTHER -o OUT     two images, two folders (matched by name) or two
                                         volumes (NIfTI files or DICOM series folders)
    dmfnet-jax fuse DATASET -o OUT       a dataset folder in any layout README, "Data" lists

The model is the shipped one unless `--checkpoint` names another. Exit status: 0 when
everything was fused, 3 when some items were skipped (each is reported), 2 when a
setting or input stopped the run before its work.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

from dmfnet_jax import config_defaults
from dmfnet_jax.errors import EXIT_CONFIG_ERROR, EXIT_ITEMS_SKIPPED, EXIT_OK, DmfnetError

_EPILOG = """examples:
  dmfnet-jax fuse mri.png pet.png -o fused.png
  dmfnet-jax fuse MRI/ PET/ -o fused/              pairs matched by file name
  dmfnet-jax fuse test_img/MRI_PET -o fused/       a dataset folder (MRI/ beside PET/)
  dmfnet-jax fuse t1.nii.gz pet.nii.gz -o fused.nii.gz --modality PET
  dmfnet-jax fuse dicom/mri/ dicom/ct/ -o fused.nii.gz --window-other=-160,240

exit status: 0 all fused, 3 some items skipped (listed), 2 bad setting or input.
"""


def _window(text: str):
  try:
    low, high = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH, e.g. -160,240") from None
  return low, high


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="dmfnet-jax", description="Fuse an MRI with a CT, PET or SPECT image using DM-FNet "
      "(a diffusion-trained fusion network), on image files, folders or 3-D volumes.",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  fuse = commands.add_parser(
      "fuse", help="fuse image pairs, folders or volumes", epilog=_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Fuse MRI with OTHER (CT, PET or SPECT): two image files, two folders whose "
      "images are matched by file name, or two co-registered volumes (.nii/.nii.gz, or DICOM "
      "series folders). With MRI alone, MRI is a dataset folder (README, Data). PET/SPECT "
      "colour is kept. Inputs are never written to.")
  fuse.add_argument("mri", metavar="MRI", help="MRI image, folder, volume, or a dataset folder")
  fuse.add_argument("other", metavar="OTHER", nargs="?",
                    help="the CT/PET/SPECT image, folder or volume registered to MRI")
  fuse.add_argument("-o", "--output", required=True, metavar="OUT",
                    help="output file (an image, or .nii/.nii.gz for volumes) or folder")
  fuse.add_argument("--checkpoint", default=None,
                    help="a trained model (Stage II workdir, exported model, imported authors' "
                    "weights); default: the shipped model")
  fuse.add_argument("--batch-size", type=int, default=config_defaults.fuse_config().batch_size)
  fuse.add_argument("--seed", type=int, default=0, help="noise seed (results are deterministic)")
  fuse.add_argument("--dtype", choices=config_defaults.COMPUTE_DTYPES, default="float32",
                    help="compute precision (parameters stay float32)")
  fuse.add_argument("--format", default="png", help="image format of folder outputs")
  fuse.add_argument("--split", default="test", help="dataset folders: the split to fuse")
  fuse.add_argument("--overwrite", action="store_true",
                    help="fuse again pairs whose output exists (default: a rerun resumes)")
  fuse.add_argument("--memory-budget-gb", type=float, default=0.0,
                    help="memory a fuse may plan for (default: half the machine's); larger "
                    "images are fused one UNet input at a time, or in tiles")
  fuse.add_argument("--cpu-devices", type=int, default=0,
                    help="on a CPU, how many JAX devices to make of its cores; each fuses "
                    "its own share (default 0: one per core, up to 8)")
  volumes = fuse.add_argument_group("volumes")
  volumes.add_argument("--modality", choices=("CT", "PET", "SPECT"),
                       help="the second volume's modality (default: from its name)")
  volumes.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                       help="slice axis after reorientation to RAS: 0 sagittal, 1 coronal, "
                       "2 axial (default)")
  volumes.add_argument("--resample", action="store_true",
                       help="resample OTHER onto the MRI's grid when the grids differ")
  volumes.add_argument("--window-mri", type=_window, metavar="LOW,HIGH",
                       help="intensity window of the MRI (default: 0.5-99.5 percentiles)")
  volumes.add_argument("--window-other", type=_window, metavar="LOW,HIGH",
                       help="intensity window of OTHER, e.g. a CT window in HU: -160,240")
  volumes.add_argument("--colormap", help="colour map given to PET/SPECT (default: hot for PET, "
                       "spect for SPECT)")
  volumes.add_argument("--grey", action="store_true", help="grey output instead of colour")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command != "fuse":
    build_parser().print_help()
    return EXIT_CONFIG_ERROR
  try:
    summary = run_fuse(args)
  except DmfnetError as err:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_CONFIG_ERROR
  return EXIT_ITEMS_SKIPPED if summary.get("skipped") else EXIT_OK


def run_fuse(args) -> dict:
  from dmfnet_jax import api, runtime, volumes  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.data import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  from dmfnet_jax.errors import DataError  # pylint: disable=g-import-not-at-top

  mri, other = pathlib.Path(args.mri), pathlib.Path(args.other) if args.other else None
  output = pathlib.Path(args.output)
  for path in (mri, other):
    if path is not None and not path.exists():
      raise DataError(f"{path}: no such file or folder")
  mri_is_volume = volumes.is_volume_path(mri)
  other_is_volume = other is not None and volumes.is_volume_path(other)
  if other is not None and mri_is_volume != other_is_volume:
    volume, image = (mri, other) if mri_is_volume else (other, mri)
    raise DataError(f"{volume} is a volume but {image} is not: give two volumes, two images "
                    "or two folders of images")
  runtime.use_cpu_cores_as_devices(args.cpu_devices)
  runtime.enable_compilation_cache()
  fuser = api.load(args.checkpoint, batch_size=args.batch_size, compute_dtype=args.dtype,
                   seed=args.seed, memory_budget_gb=args.memory_budget_gb)
  if mri_is_volume:
    if output.suffix.lower() not in (".nii", ".gz"):
      output = output / f"{_volume_stem(mri)}_fused.nii.gz"
    summary = fuser.fuse_volumes(
        mri, other, output, modality=args.modality, axis=args.axis, resample=args.resample,
        window_mri=args.window_mri, window_other=args.window_other, colormap=args.colormap,
        grey_output=args.grey)
    print(f"Fused {summary['fused_slices']} slices ({summary['skipped_empty_slices']} empty "
          f"ones skipped) in {summary['seconds']:.1f} s: {summary['output']} "
          f"(montage {summary['montage']})")
    return {"skipped": 0, **summary}
  fmt = args.format.lower().lstrip(".")
  if other is not None and mri.is_file() and other.is_file():
    if not output.suffix:
      output = output / f"{mri.stem}.{fmt}"
    fuser.fuse_files(mri, other, output)
    print(f"Fused {mri} + {other}: {output}")
    return {"skipped": 0, "fused": 1, "outputs": [str(output)]}
  if other is not None:
    scan = pairs_lib.find_folder_pairs(mri, other, strict=False)
  else:
    scan = pairs_lib.find_split_pairs(mri, config_defaults.TASKS, args.split)
  for problem in scan.problems:
    print(f"  skipped: {problem}", file=sys.stderr)
  summary = fuser.fuse_pairs(
      scan.pairs, lambda pair: output / (pair.task or "") / f"{pathlib.Path(pair.pair_id).name}.{fmt}",
      output_root=output, overwrite=args.overwrite)
  summary["skipped"] += len(scan.problems)
  summary["skipped_pairs"] += [{"pair": p, "reason": "unpaired"} for p in scan.problems]
  runtime.write_json_atomic(output / "fuse_summary.json", summary)
  print(f"Fused {summary['fused']} pairs, skipped {summary['skipped']}, in "
        f"{summary['seconds']:.1f} s; outputs in {output}")
  for item in summary["skipped_pairs"]:
    print(f"  skipped {item['pair']}: {item['reason']}")
  return summary


def _volume_stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
