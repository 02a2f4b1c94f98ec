"""The fuse job: fuse folders or lists of image pairs with a trained model.

The job collects the pairs its config names and hands them to `api.Fuser`, the one
fusion path of the project: pairs of one size are fused in batches by one jitted
call, given back their colour (PET/SPECT) and written atomically. A bad pair is
reported and skipped; the rest are fused; `fuse_summary.json` closes the run.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import jax
from absl import logging

from dmfnet_jax import api, inference, runtime
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import ConfigError, DmfnetError
from dmfnet_jax.runtime import is_chief


# ----------------------------------------------------------------------------- inputs


def _parse_pairs(spec: str) -> list[pairs_lib.ImagePair]:
  path = pathlib.Path(spec)
  if path.is_file() and ":" not in spec.split(",")[0].replace(str(path), ""):
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.replace(",", " ").split()
      if len(parts) != 2:
        raise ConfigError(f"{path}:{n}: expected two paths (MRI, other), got {line!r}")
      items.append(tuple(parts))
  else:
    items = []
    for item in spec.split(","):
      parts = item.strip().split(":")
      if len(parts) != 2:
        raise ConfigError(f"config.fuse.pairs: {item!r} is not 'mri_path:other_path'")
      items.append(tuple(parts))
  return pairs_lib.pairs_from_list(items)


def collect_pairs(config, workdir: pathlib.Path) -> tuple[list[pairs_lib.ImagePair], list[str], str]:
  """(pairs, problems found while pairing, description of the input)."""
  fuse_cfg = config.fuse
  if fuse_cfg.pairs:
    return _parse_pairs(fuse_cfg.pairs), [], "explicit pairs"
  if fuse_cfg.dir_a or fuse_cfg.dir_b:
    if not (fuse_cfg.dir_a and fuse_cfg.dir_b):
      raise ConfigError("config.fuse.dir_a and config.fuse.dir_b must be set together")
    scan = pairs_lib.find_folder_pairs(fuse_cfg.dir_a, fuse_cfg.dir_b, strict=False)
    return scan.pairs, scan.problems, f"folders {fuse_cfg.dir_a} + {fuse_cfg.dir_b}"
  if config.data.root:
    scan = pairs_lib.find_split_pairs(config.data.root, list(config.data.tasks),
                                      config.data.split)
    return scan.pairs, scan.problems, f"dataset {config.data.root} ({config.data.split})"
  root = workdir / "phantom_inputs"
  logging.info("No input configured: fusing built-in synthetic phantoms written to %s", root)
  phantoms.write_phantom_dataset(root, list(config.data.tasks), "test",
                                 count=int(fuse_cfg.phantom_count),
                                 size=int(config.data.get("phantom_size", 256)), seed=config.seed)
  scan = pairs_lib.find_dataset_pairs(root, list(config.data.tasks), "test", strict=False)
  return scan.pairs, scan.problems, "built-in phantoms"


def output_path(pair: pairs_lib.ImagePair, output_dir: pathlib.Path, fmt: str) -> pathlib.Path:
  name = f"{pathlib.Path(pair.pair_id).name}.{fmt}"
  return output_dir / pair.task / name if pair.task else output_dir / name


def check_writable(output_dir: pathlib.Path) -> None:
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_test"):
      pass
  except OSError as err:
    raise DmfnetError(f"config.fuse.output_dir={output_dir}: cannot write there ({err})") from err


def merge_process_summaries(summary: dict, workdir_path) -> dict:
  """The whole run's summary: each process writes its part; the chief adds them up."""
  if jax.process_count() == 1:
    return summary
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  part = workdir_path / f"fuse_summary.process-{jax.process_index()}.json"
  runtime.write_json_atomic(part, summary)
  multihost_utils.sync_global_devices("dmfnet_fuse_done")
  parts = [json.loads((workdir_path / f"fuse_summary.process-{i}.json").read_text())
           for i in range(jax.process_count())]
  merged = {key: sum(p[key] for p in parts) for key in ("fused", "skipped", "already_done")}
  merged["skipped_pairs"] = [item for p in parts for item in p["skipped_pairs"]]
  merged["outputs"] = sorted(item for p in parts for item in p["outputs"])
  merged["seconds"] = max(p["seconds"] for p in parts)
  merged["processes"] = len(parts)
  multihost_utils.sync_global_devices("dmfnet_fuse_merged")
  if is_chief():
    for i in range(len(parts)):
      (workdir_path / f"fuse_summary.process-{i}.json").unlink(missing_ok=True)
  return merged


def run(config, workdir: str) -> dict:
  config = inference.resolve_structure(config)
  workdir_path = runtime.prepare_workdir(config, workdir)
  fuse_cfg = config.fuse
  fmt = fuse_cfg.output_format.lower().lstrip(".")
  output_dir = pathlib.Path(fuse_cfg.output_dir or workdir_path / "fused")
  pairs, problems, source = collect_pairs(config, workdir_path)
  outputs = [output_path(pair, output_dir, fmt) for pair in pairs]
  runtime.refuse_writing_inputs([p for pair in pairs for p in (pair.path_a, pair.path_b)],
                                outputs, {output_dir, *(o.parent for o in outputs)})
  check_writable(output_dir)
  fuser = api.Fuser.from_config(config)
  for problem in problems:
    logging.error("Skipping: %s", problem)
  # Each process of a multi-host run fuses its own share; outputs never collide.
  share = pairs[jax.process_index()::jax.process_count()]
  logging.info("Fusing %d of %d pairs from %s into %s", len(share), len(pairs), source,
               output_dir)
  summary = fuser.fuse_pairs(share, lambda pair: output_path(pair, output_dir, fmt),
                             output_root=output_dir, overwrite=bool(fuse_cfg.overwrite))
  summary = merge_process_summaries(summary, workdir_path)
  summary["output_dir"] = str(output_dir)
  summary["skipped"] += len(problems)
  summary["skipped_pairs"] += [{"pair": p, "reason": "unpaired"} for p in problems]
  summary["input"] = source
  if is_chief():
    runtime.write_json_atomic(workdir_path / "fuse_summary.json", summary)
  done = f", {summary['already_done']} done before" if summary["already_done"] else ""
  message = (f"Fused {summary['fused']} pairs, skipped {summary['skipped']}{done}, in "
             f"{summary['seconds']:.1f} s; outputs in {output_dir}")
  logging.info(message)
  print(message)
  for item in summary["skipped_pairs"]:
    print(f"  skipped {item['pair']}: {item['reason']}")
  return summary
