"""Finding and loading MRI / second-modality image pairs.

Three ways to name pairs: a dataset root, two plain folders matched by file stem, or an
explicit list. A dataset root may have any of these layouts; the modality of an image
is the name of its folder:

  1. ROOT/<task>/<split>/<modality>/<id>.<ext>   e.g. ROOT/MRI-PET/test/PET/001.png
  2. ROOT/<task>/<modality>/<id>.<ext>           e.g. ROOT/MRI_PET/PET/001.png
  3. ROOT/<modality>/<id>.<ext>                  e.g. ROOT/MRI/001.png + ROOT/PET/001.png

<task> is MRI-CT, MRI-PET or MRI-SPECT, also written with `_` (MRI_PET) and in any case;
<modality> is MRI, CT, PET or SPECT in any case (mri, Pet). Layout 1 is the Harvard
layout; layout 2 (the test sets of CDDFuse and most medical-fusion repositories) is used
for a task folder that has no <split> folder but holds modality folders; in layout 3
the root is one task folder and the tasks are those whose partner folder is present.
Layouts 2 and 3 have no split: every split reads the same images. Tasks are always
reported in the canonical `MRI-PET` form, so outputs are named `<task>/<id>` whatever
the folders are called.

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
# How many entries of a folder an error message names before summarising.
_MAX_LISTED_ENTRIES = 20
MODALITIES = (MRI_FOLDER,) + tuple(task.split("-", 1)[1] for task in TASKS)
# The dataset layouts, for the error that says none matched (see the module docstring).
_LAYOUTS = (
    ("ROOT/<task>/<split>/<modality>/<id>.<ext>", "ROOT/MRI-PET/test/PET/001.png"),
    ("ROOT/<task>/<modality>/<id>.<ext>", "ROOT/MRI_PET/PET/001.png"),
    ("ROOT/<modality>/<id>.<ext>", "ROOT/MRI/001.png + ROOT/PET/001.png"),
)


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
  if not names:
    return "nothing"
  more = len(names) - _MAX_LISTED_ENTRIES
  listed = ", ".join(names[:_MAX_LISTED_ENTRIES])
  return f"{listed}, ... and {more} more" if more > 0 else listed


def _layouts_help() -> str:
  lines = [f"  {i}. {pattern:<44} e.g. {example}"
           for i, (pattern, example) in enumerate(_LAYOUTS, 1)]
  return (
      f"accepted layouts (<task> one of {', '.join(TASKS)}, also with '_' and in any case; "
      f"<modality> one of {', '.join(MODALITIES)} in any case):\n" + "\n".join(lines)
  )


def _task_name(name: str) -> str:
  """'mri_pet' -> 'MRI-PET'; '' for a folder that names no task."""
  canonical = name.upper().replace("_", "-")
  return canonical if canonical in TASKS else ""


def _modality_name(name: str) -> str:
  """'Pet' -> 'PET'; '' for a folder that names no modality."""
  canonical = name.upper()
  return canonical if canonical in MODALITIES else ""


def _named_dirs(parent: pathlib.Path, canonical_of) -> dict:
  """Canonical name -> the sub-folder of `parent` spelling it (two spellings raise).

  Only case-sensitive file systems can hold both `MRI` and `mri`; picking one would
  silently drop the other's images.
  """
  found: dict = {}
  for entry in sorted(parent.iterdir()):
    name = canonical_of(entry.name)
    if not name or entry.name.startswith(".") or not entry.is_dir():
      continue
    if name in found:
      raise DataError(f"{found[name]} and {entry}: two folders for {name}; keep one")
    found[name] = entry
  return found


def _modality_dirs(
    folder: pathlib.Path, dirs: dict, modality: str
) -> Tuple[pathlib.Path, pathlib.Path]:
  """The MRI and `modality` folders among `dirs` (found in `folder`); a missing one raises."""
  for name in (MRI_FOLDER, modality):
    if name not in dirs:
      raise DataError(
          f"{folder / name}: modality folder missing ({folder} holds {_listing(folder)})"
      )
  return dirs[MRI_FOLDER], dirs[modality]


def _task_sources(
    root: pathlib.Path, tasks: Sequence[str], split: str
) -> List[Tuple[str, pathlib.Path, pathlib.Path]]:
  """(task, MRI folder, partner folder) for each requested task the root holds.

  With all tasks requested (the default), absent ones are skipped: most roots hold only
  some. A task asked for by name must be there, so its absence raises.
  """
  lenient = set(tasks) == set(TASKS)
  task_dirs = _named_dirs(root, _task_name)
  top_modalities = _named_dirs(root, _modality_name)
  if task_dirs and top_modalities:
    raise DataError(
        f"{root}: holds both task folders ({', '.join(d.name for d in task_dirs.values())}) "
        f"and modality folders ({', '.join(d.name for d in top_modalities.values())}); a data "
        f"root is either a folder of tasks or one task's folder, not both; {_layouts_help()}"
    )
  if not task_dirs and not top_modalities:
    raise DataError(
        f"{root}: no known data layout (it holds {_listing(root)}); {_layouts_help()}"
    )
  sources = []
  for task in tasks:
    modality = modality_of(task)
    if top_modalities:  # layout 3: the root is one task's folder
      if lenient and modality not in top_modalities:
        continue
      sources.append((task, *_modality_dirs(root, top_modalities, modality)))
      continue
    task_dir = task_dirs.get(task)
    if task_dir is None:
      if lenient:
        continue
      raise DataError(
          f"{root / task}: task folder missing (also looked for {task.replace('-', '_')}, "
          f"in any case; data root {root} holds {_listing(root)})"
      )
    split_dir = task_dir / split
    if split_dir.is_dir():  # layout 1
      sources.append((task, *_modality_dirs(split_dir, _named_dirs(split_dir, _modality_name),
                                            modality)))
      continue
    inside = _named_dirs(task_dir, _modality_name)
    if MRI_FOLDER not in inside and modality not in inside:
      raise DataError(
          f"{split_dir}: split folder '{split}' missing, and no {MRI_FOLDER} or {modality} "
          f"folder directly inside ({task_dir} holds {_listing(task_dir)})"
      )
    sources.append((task, *_modality_dirs(task_dir, inside, modality)))  # layout 2
  if not sources:
    raise DataError(
        f"{root}: holds an {MRI_FOLDER} folder but no partner folder "
        f"({', '.join(MODALITIES[1:])}; it holds {_listing(root)})"
    )
  return sources


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
  """Pairs of MRI and CT/PET/SPECT images under a dataset root (layouts: module docstring).

  Ordered by task (as given), then image id. Unknown tasks, a root in no known layout,
  and missing folders raise (absent tasks are skipped when all tasks are requested,
  see `_task_sources`). A file without its partner raises with `strict=True`; with
  `strict=False` (batch jobs) it is skipped and reported in `PairScan.problems`.
  """
  _, scan = _scan_dataset(root, tasks, split)
  if strict:
    return _strict(scan, root, tasks, split)
  return scan


def _scan_dataset(root, tasks, split) -> Tuple[List[str], PairScan]:
  """(tasks found, non-strict scan) for `find_dataset_pairs` and `find_split_pairs`."""
  if isinstance(tasks, str):
    tasks = [tasks]
  if root is None or not str(root).strip():
    raise DataError("no data root given (empty path)")
  root = pathlib.Path(root).expanduser()
  _require_dir(root, "data root")
  if not any(root.iterdir()):
    raise DataError(f"{root}: data root is empty; {_layouts_help()}")
  if not tasks:
    raise DataError(f"{root}: no tasks requested; valid tasks are {', '.join(TASKS)}")
  for task in tasks:
    modality_of(task)
  pairs, problems, found = [], [], []
  for task, dir_a, dir_b in _task_sources(root, list(tasks), split):
    scan = _match_folders(dir_a, dir_b, task, modality_of(task))
    pairs.extend(scan.pairs)
    problems.extend(scan.problems)
    found.append(task)
  return found, PairScan(pairs, problems)


def _strict(scan: PairScan, root, tasks, split) -> List[ImagePair]:
  if scan.problems:
    _raise_problems(scan.problems, f"data root {root}, split '{split}'")
  if not scan.pairs:
    tasks = [tasks] if isinstance(tasks, str) else tasks
    raise DataError(f"{root}: no image pairs for tasks {', '.join(tasks)} in split '{split}'")
  return scan.pairs


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

  That split is the `test` folder (or, in layouts 2 and 3, the only images) restricted
  to the ids ROOT/splits.json lists for each task found, in the listed order; a listed
  id without sources is reported as a problem.
  """
  folder_split = "test" if split == SIDE_BY_SIDE_SPLIT else split
  found_tasks, scan = _scan_dataset(root, tasks, folder_split)
  if split != SIDE_BY_SIDE_SPLIT:
    return scan
  root = pathlib.Path(root).expanduser()
  selected, problems = [], list(scan.problems)
  for task in found_tasks:
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
      a=imageio.to_model_range(raw_a, str(pair.path_a)),
      b=imageio.to_model_range(raw_b, str(pair.path_b)), b_raw=raw_b
  )


def check_same_size(pair: ImagePair, size_a: Tuple[int, int], size_b: Tuple[int, int]) -> None:
  """Fusion is pixel-wise, so both images of a pair must have one size."""
  if tuple(size_a) != tuple(size_b):
    raise DataError(
        f"image sizes differ in pair '{pair.pair_id}': {pair.path_a} is "
        f"{size_a[0]}x{size_a[1]} but {pair.path_b} is {size_b[0]}x{size_b[1]} (HxW)"
    )
