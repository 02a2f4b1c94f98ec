"""The fuse job: fuse folders or lists of image pairs with a trained model.

Pairs are grouped by size, reflect-padded to a size the networks accept, fused in
batches by one jitted call per shape, cropped back, given back their colour
(PET/SPECT) and written atomically. A bad pair is reported and skipped; the rest
are fused; a summary closes the run.
"""

from __future__ import annotations

import collections
import pathlib
import tempfile
import time
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from dmfnet_jax import features, imageio, runtime
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import ConfigError, DmfnetError
from dmfnet_jax.inference import FusionModel, load_fusion_model
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


def pair_key(root_key: jax.Array, pair: pairs_lib.ImagePair) -> jax.Array:
  """A key that depends only on the seed and the pair's name."""
  return jax.random.fold_in(root_key, zlib.crc32(f"{pair.task}/{pair.pair_id}".encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- job


def fuse_pairs(model: FusionModel, pairs: Sequence[pairs_lib.ImagePair], output_dir: pathlib.Path,
               *, seed: int, batch_size: int, fmt: str = "png",
               show_progress: bool = True) -> dict:
  """Fuses and writes every pair it can; returns a summary with the skipped ones."""
  levels = len(model.config.model.channel_mults)
  root_key = jax.random.PRNGKey(seed)
  skipped: list[dict] = []
  written: list[str] = []
  loaded: dict[tuple, list] = collections.defaultdict(list)
  start = time.perf_counter()
  progress = _progress(len(pairs), show_progress)

  def flush(shape):
    group = loaded.pop(shape, [])
    if not group:
      return
    a = np.stack([g[1] for g in group])[..., None]
    b = np.stack([g[2] for g in group])[..., None]
    a_pad, crop = features.pad_to_valid(jnp.asarray(a), levels)
    b_pad, _ = features.pad_to_valid(jnp.asarray(b), levels)
    keys = jnp.stack([pair_key(root_key, g[0]) for g in group])
    fused = np.asarray(features.crop_back(jnp.asarray(model(a_pad, b_pad, keys)), crop))
    for (pair, _, _, b_raw), image in zip(group, fused):
      target = output_path(pair, output_dir, fmt)
      try:
        out = imageio.colourise(imageio.from_model_range(image[..., 0]), b_raw)
        imageio.write_image_atomic(target, out)
        written.append(str(target))
      except (DmfnetError, OSError, ValueError) as err:
        skipped.append({"pair": _describe(pair), "reason": str(err)})
        logging.error("Skipping %s: %s", _describe(pair), err)
      if progress is not None:
        progress.update(1)

  for pair in pairs:
    try:
      item = pairs_lib.load_pair(pair)
    except DmfnetError as err:
      skipped.append({"pair": _describe(pair), "reason": str(err)})
      logging.error("Skipping %s: %s", _describe(pair), err)
      if progress is not None:
        progress.update(1)
      continue
    shape = item.a.shape
    loaded[shape].append((pair, item.a, item.b, item.b_raw))
    if len(loaded[shape]) >= batch_size:
      flush(shape)
  for shape in list(loaded):
    flush(shape)
  if progress is not None:
    progress.close()
  elapsed = time.perf_counter() - start
  return {"fused": len(written), "skipped": len(skipped), "skipped_pairs": skipped,
          "seconds": round(elapsed, 3), "output_dir": str(output_dir), "outputs": written}


def _describe(pair: pairs_lib.ImagePair) -> str:
  return f"{pair.path_a} + {pair.path_b}"


def _progress(total: int, enabled: bool):
  if not enabled or not is_chief():
    return None
  return tqdm(total=total, desc="fuse", unit="pair", dynamic_ncols=True, disable=None)


def run(config, workdir: str) -> None:
  workdir_path = runtime.prepare_workdir(config, workdir)
  fuse_cfg = config.fuse
  fmt = fuse_cfg.output_format.lower().lstrip(".")
  output_dir = pathlib.Path(fuse_cfg.output_dir or workdir_path / "fused")
  check_writable(output_dir)
  model = load_fusion_model(config)
  pairs, problems, source = collect_pairs(config, workdir_path)
  for problem in problems:
    logging.error("Skipping: %s", problem)
  logging.info("Fusing %d pairs from %s into %s", len(pairs), source, output_dir)
  summary = fuse_pairs(model, pairs, output_dir, seed=config.seed,
                       batch_size=int(fuse_cfg.batch_size), fmt=fmt)
  summary["skipped"] += len(problems)
  summary["skipped_pairs"] += [{"pair": p, "reason": "unpaired"} for p in problems]
  summary["input"] = source
  if is_chief():
    runtime.write_json_atomic(workdir_path / "fuse_summary.json", summary)
  message = (f"Fused {summary['fused']} pairs, skipped {summary['skipped']}, in "
             f"{summary['seconds']:.1f} s; outputs in {output_dir}")
  logging.info(message)
  print(message)
  for item in summary["skipped_pairs"]:
    print(f"  skipped {item['pair']}: {item['reason']}")
