"""Finding and loading MRI / second-modality image pairs.

Three ways to name pairs: the dataset layout `ROOT/<task>/<split>/<modality>/<id>.<ext>`
(the Harvard layout), two plain folders matched by file stem, or an explicit list.
All return `ImagePair`s in a deterministic order, so a sharded or resumed job sees
the same records on every machine. Problems a user can fix raise `DataError` naming
the file or folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterable, List, Literal, NamedTuple, Sequence, Tuple, Union, overload

import numpy as np

from dmfnet_jax import imageio
from dmfnet_jax.config_defaults import TASKS
from dmfnet_jax.errors import DataError

PathLike = Union[str, os.PathLike]

MRI_FOLDER = "MRI"
# A split named in ROOT/splits.json rather than a folder: the test pairs for which the
# DM-FNet authors published fused images (the comparison set of MODEL_CARD.md).
SIDE_BY_SIDE_SPLIT = "dmfnet_side_by_side"
# How many problems a strict error message spells out before summarising.
_MAX_LISTED_PROBLEMS = 10


@dataclasses.dataclass(frozen=True)
class ImagePair:
  """One fusion sample: an MRI (`path_a`) and its partner (`path_b`)."""

  pair_id: str
  task: str
  path_a: pathlib.Path
  path_b: pathlib.Path
  modality_b: str


@dataclasses.dataclass(frozen=True)
class LoadedPair:
  """Decoded pair: network inputs in [-1, 1] plus the partner as read (for colour)."""

  a: np.ndarray
  b: np.ndarray
  b_raw: np.ndarray


class PairScan(NamedTuple):
  """Result of a non-strict scan: the good pairs and one message per skipped file."""

  pairs: List[ImagePair]
  problems: List[str]


def modality_of(task: str) -> str:
  """'MRI-PET' -> 'PET'; unknown names raise listing the valid ones."""
  if task not in TASKS:
    raise DataError(f"unknown task '{task}'; valid tasks are {', '.join(TASKS)}")
  return task.split("-", 1)[1]


def _image_files(folder: pathlib.Path) -> dict:
  """stem -> sorted list of image paths in `folder` (dotfiles such as '._x.png' skipped)."""
  by_stem: dict = {}
  for entry in sorted(folder.iterdir()):
    if entry.name.startswith(".") or not entry.is_file() or not imageio.is_image_file(entry):
      continue
    by_stem.setdefault(entry.stem, []).append(entry)
  return by_stem


def _match_folders(
    dir_a: pathlib.Path, dir_b: pathlib.Path, task: str, modality_b: str
) -> PairScan:
  files_a, files_b = _image_files(dir_a), _image_files(dir_b)
  pairs, problems = [], []
  for stem in sorted(set(files_a) | set(files_b)):
    in_a, in_b = files_a.get(stem, []), files_b.get(stem, [])
    ambiguous = [paths for paths in (in_a, in_b) if len(paths) > 1]
    if ambiguous:
      for paths in ambiguous:
        problems.append(
            f"ambiguous image id '{stem}': {', '.join(str(p) for p in paths)} share one stem"
        )
    elif not in_b:
      problems.append(f"{in_a[0]}: no partner image '{stem}.*' in {dir_b}")
    elif not in_a:
      problems.append(f"{in_b[0]}: no partner image '{stem}.*' in {dir_a}")
    else:
      pairs.append(ImagePair(stem, task, in_a[0], in_b[0], modality_b))
  return PairScan(pairs, problems)


def _raise_problems(problems: Sequence[str], hint: str) -> None:
  listed = list(problems[:_MAX_LISTED_PROBLEMS])
  more = len(problems) - len(listed)
  if more > 0:
    listed.append(f"... and {more} more")
  raise DataError(
      f"{len(problems)} unpaired or ambiguous image(s) ({hint}):\n  " + "\n  ".join(listed)
  )


def _require_dir(path: pathlib.Path, what: str) -> None:
  if not path.exists():
    raise DataError(f"{path}: {what} does not exist")
  if not path.is_dir():
    raise DataError(f"{path}: {what} is not a directory")


def _listing(path: pathlib.Path) -> str:
  names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
  return ", ".join(names) if names else "nothing"


@overload
def find_dataset_pairs(
    root: PathLike, tasks: Sequence[str], split: str, strict: Literal[True] = ...
) -> List[ImagePair]:
  ...


@overload
def find_dataset_pairs(
    root: PathLike, tasks: Sequence[str], split: str, strict: Literal[False]
) -> PairScan:
  ...


def find_dataset_pairs(root, tasks, split, strict=True):
  """Pairs of `ROOT/<task>/<split>/MRI/<id>.*` with `ROOT/<task>/<split>/<CT|PET|SPECT>/<id>.*`.

  Ordered by task (as given), then image id. Missing folders and unknown tasks always
  raise. A file without its partner raises with `strict=True`; with `strict=False`
  (batch jobs) it is skipped and reported in `PairScan.problems`.
  """
  if isinstance(tasks, str):
    tasks = [tasks]
  if root is None or not str(root).strip():
    raise DataError("no data root given (empty path)")
  root = pathlib.Path(root).expanduser()
  _require_dir(root, "data root")
  if not any(root.iterdir()):
    raise DataError(f"{root}: data root is empty; expected folders {', '.join(TASKS)}")
  if not tasks:
    raise DataError(f"{root}: no tasks requested; valid tasks are {', '.join(TASKS)}")
  modalities = [modality_of(task) for task in tasks]
  pairs, problems = [], []
  for task, modality in zip(tasks, modalities):
    task_dir = root / task
    if not task_dir.is_dir():
      raise DataError(
          f"{task_dir}: task folder missing (data root {root} holds {_listing(root)})"
      )
    split_dir = task_dir / split
    if not split_dir.is_dir():
      raise DataError(
          f"{split_dir}: split folder '{split}' missing ({task_dir} holds {_listing(task_dir)})"
      )
    for folder in (MRI_FOLDER, modality):
      if not (split_dir / folder).is_dir():
        raise DataError(
            f"{split_dir / folder}: modality folder missing ({split_dir} holds "
            f"{_listing(split_dir)})"
        )
    scan = _match_folders(split_dir / MRI_FOLDER, split_dir / modality, task, modality)
    pairs.extend(scan.pairs)
    problems.extend(scan.problems)
  if strict:
    if problems:
      _raise_problems(problems, f"data root {root}, split '{split}'")
    if not pairs:
      raise DataError(
          f"{root}: no image pairs for tasks {', '.join(tasks)} in split '{split}'"
      )
    return pairs
  return PairScan(pairs, problems)


def side_by_side_ids(root: pathlib.Path, task: str) -> List[str]:
  """Image ids (file stems) listed under `dmfnet_side_by_side` in ROOT/splits.json."""
  splits_file = pathlib.Path(root) / "splits.json"
  try:
    splits = json.loads(splits_file.read_text())
  except FileNotFoundError:
    raise DataError(f"{splits_file}: missing; split '{SIDE_BY_SIDE_SPLIT}' needs it") from None
  except (OSError, ValueError) as err:
    raise DataError(f"{splits_file}: cannot read ({err})") from err
  try:
    names = splits[task][SIDE_BY_SIDE_SPLIT]
  except (KeyError, TypeError):
    raise DataError(f"{splits_file}: no '{task}' -> '{SIDE_BY_SIDE_SPLIT}' list") from None
  return [pathlib.Path(n).stem for n in names]


def find_split_pairs(root: PathLike, tasks: Sequence[str], split: str) -> PairScan:
  """Non-strict `find_dataset_pairs` that also knows `dmfnet_side_by_side`.

  That split is the `test` folder restricted to the ids ROOT/splits.json lists,
  in the listed order; a listed id without sources is reported as a problem.
  """
  if isinstance(tasks, str):
    tasks = [tasks]
  folder_split = "test" if split == SIDE_BY_SIDE_SPLIT else split
  scan = find_dataset_pairs(root, list(tasks), folder_split, strict=False)
  if split != SIDE_BY_SIDE_SPLIT:
    return scan
  root = pathlib.Path(root).expanduser()
  selected, problems = [], list(scan.problems)
  for task in tasks:
    by_id = {p.pair_id: p for p in scan.pairs if p.task == task}
    for pair_id in side_by_side_ids(root, task):
      if pair_id in by_id:
        selected.append(by_id[pair_id])
      else:
        problems.append(f"{task}/{pair_id}: listed in splits.json but its sources are missing")
  return PairScan(selected, problems)


@overload
def find_folder_pairs(
    dir_a: PathLike, dir_b: PathLike, strict: Literal[True] = ..., task: str = ...
) -> List[ImagePair]:
  ...


@overload
def find_folder_pairs(
    dir_a: PathLike, dir_b: PathLike, strict: Literal[False], task: str = ...
) -> PairScan:
  ...


def find_folder_pairs(dir_a, dir_b, strict=True, task=""):
  """Pairs the images of two plain folders by file stem (`dir_a` holds the MRIs).

  `task` (optional, one of TASKS) fills `ImagePair.task` / `modality_b`; without it
  they are empty strings. Unpaired files behave as in `find_dataset_pairs`.
  """
  dir_a, dir_b = pathlib.Path(dir_a).expanduser(), pathlib.Path(dir_b).expanduser()
  _require_dir(dir_a, "MRI folder")
  _require_dir(dir_b, "second-modality folder")
  modality_b = modality_of(task) if task else ""
  scan = _match_folders(dir_a, dir_b, task, modality_b)
  if strict:
    if scan.problems:
      _raise_problems(scan.problems, f"folders {dir_a} and {dir_b}")
    if not scan.pairs:
      raise DataError(f"{dir_a}, {dir_b}: no image pairs found")
    return scan.pairs
  return scan


def pairs_from_list(
    items: Iterable[Tuple[PathLike, PathLike]], task: str = ""
) -> List[ImagePair]:
  """Explicit `(mri_path, other_path)` items -> pairs, in the order given.

  `pair_id` is the MRI file stem; repeated stems get a `_2`, `_3`, ... suffix so
  output names never collide. Missing files raise `DataError` naming them.
  """
  modality_b = modality_of(task) if task else ""
  pairs, seen = [], {}
  for position, item in enumerate(items):
    try:
      path_a, path_b = item
    except (TypeError, ValueError) as err:
      raise DataError(
          f"pair list item {position} ({item!r}) is not an (mri_path, other_path) pair"
      ) from err
    path_a, path_b = pathlib.Path(path_a).expanduser(), pathlib.Path(path_b).expanduser()
    for path in (path_a, path_b):
      if not path.is_file():
        raise DataError(f"{path}: no such image file (pair list item {position})")
    stem = path_a.stem
    seen[stem] = seen.get(stem, 0) + 1
    pair_id = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
    pairs.append(ImagePair(pair_id, task, path_a, path_b, modality_b))
  if not pairs:
    raise DataError("empty pair list")
  return pairs


def load_pair(pair: ImagePair) -> LoadedPair:
  """Decodes both images; RGB partners become luma in [-1, 1], `b_raw` keeps the colour."""
  raw_a = imageio.read_image(pair.path_a)
  raw_b = imageio.read_image(pair.path_b)
  check_same_size(pair, raw_a.shape[:2], raw_b.shape[:2])
  return LoadedPair(
      a=imageio.to_model_range(raw_a), b=imageio.to_model_range(raw_b), b_raw=raw_b
  )


def check_same_size(pair: ImagePair, size_a: Tuple[int, int], size_b: Tuple[int, int]) -> None:
  """Fusion is pixel-wise, so both images of a pair must have one size."""
  if tuple(size_a) != tuple(size_b):
    raise DataError(
        f"image sizes differ in pair '{pair.pair_id}': {pair.path_a} is "
        f"{size_a[0]}x{size_a[1]} but {pair.path_b} is {size_b[0]}x{size_b[1]} (HxW)"
    )
