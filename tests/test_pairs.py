"""Pair discovery and loading: layouts, formats, and every user error we can name."""

import json
import re
import pathlib

import numpy as np
import pytest
from PIL import Image

from dmfnet_jax import imageio
from dmfnet_jax.data import pairs as pairs_lib
from dmfnet_jax.errors import DataError, ImageReadError

SIZE = 32


def _gray(seed=0, size=SIZE, dtype=np.uint8):
  rng = np.random.default_rng(seed)
  high = 256 if dtype == np.uint8 else 65536
  return rng.integers(0, high, size=(size, size), dtype=np.int64).astype(dtype)


def _rgb(seed=0, size=SIZE):
  return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def _make_layout(root, task="MRI-CT", split="train", ids=("001", "002", "003"), rgb=False):
  modality = task.split("-")[1]
  for i, pair_id in enumerate(ids):
    _save(root / task / split / "MRI" / f"{pair_id}.png", _gray(i))
    other = _rgb(i + 100) if rgb else _gray(i + 100)
    _save(root / task / split / modality / f"{pair_id}.png", other)
  return root


# ----- dataset layout -----------------------------------------------------------------


def test_dataset_pairs_sorted_and_complete(tmp_path):
  _make_layout(tmp_path, "MRI-CT", ids=("b", "a", "c"))
  _make_layout(tmp_path, "MRI-PET", ids=("2", "1"), rgb=True)
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET", "MRI-CT"], "train")
  assert [(p.task, p.pair_id) for p in found] == [
      ("MRI-PET", "1"), ("MRI-PET", "2"), ("MRI-CT", "a"), ("MRI-CT", "b"), ("MRI-CT", "c")]
  first = found[0]
  assert first.modality_b == "PET"
  assert first.path_a == tmp_path / "MRI-PET" / "train" / "MRI" / "1.png"
  assert first.path_b == tmp_path / "MRI-PET" / "train" / "PET" / "1.png"


def test_dataset_pairs_match_by_stem_across_extensions(tmp_path):
  _save(tmp_path / "MRI-CT" / "train" / "MRI" / "x.png", _gray())
  _save(tmp_path / "MRI-CT" / "train" / "CT" / "x.TIF", _gray(1))
  (tmp_path / "MRI-CT" / "train" / "CT" / "notes.txt").write_text("ignored")
  (pair,) = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")
  assert pair.path_b.name == "x.TIF"


@pytest.mark.parametrize("root", ["", None])
def test_empty_root_string(root):
  with pytest.raises(DataError, match="no data root"):
    pairs_lib.find_dataset_pairs(root, ["MRI-CT"], "train")


def test_missing_root(tmp_path):
  with pytest.raises(DataError, match="does_not_exist"):
    pairs_lib.find_dataset_pairs(tmp_path / "does_not_exist", ["MRI-CT"], "train")


def test_empty_root(tmp_path):
  with pytest.raises(DataError, match="empty"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")


def test_unknown_task_lists_valid_ones(tmp_path):
  _make_layout(tmp_path)
  with pytest.raises(DataError, match="MRI-XR.*MRI-CT, MRI-PET, MRI-SPECT"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-XR"], "train")


def test_missing_task_split_and_modality_folders(tmp_path):
  _make_layout(tmp_path)
  with pytest.raises(DataError, match="MRI-PET: task folder missing"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], "train")
  with pytest.raises(DataError, match="split folder 'test' missing"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "test")
  (tmp_path / "MRI-SPECT" / "train" / "MRI").mkdir(parents=True)
  with pytest.raises(DataError, match="SPECT: modality folder missing"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-SPECT"], "train")


def test_split_without_images(tmp_path):
  for folder in ("MRI", "CT"):
    (tmp_path / "MRI-CT" / "train" / folder).mkdir(parents=True)
  with pytest.raises(DataError, match="no image pairs"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")


def test_mri_without_partner(tmp_path):
  _make_layout(tmp_path)
  orphan = _save(tmp_path / "MRI-CT" / "train" / "MRI" / "004.png", _gray())
  with pytest.raises(DataError, match=re.escape(f"{orphan}: no partner")):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")
  scan = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train", strict=False)
  good, problems = scan
  assert [p.pair_id for p in good] == ["001", "002", "003"]
  assert len(problems) == 1 and str(orphan) in problems[0]


def test_partner_without_mri(tmp_path):
  _make_layout(tmp_path)
  orphan = _save(tmp_path / "MRI-CT" / "train" / "CT" / "000.png", _gray())
  with pytest.raises(DataError, match=re.escape(f"{orphan}: no partner")):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")
  scan = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train", strict=False)
  assert len(scan.pairs) == 3 and str(orphan) in scan.problems[0]


def test_ambiguous_stem(tmp_path):
  _make_layout(tmp_path)
  _save(tmp_path / "MRI-CT" / "train" / "MRI" / "001.bmp", _gray())
  with pytest.raises(DataError, match="ambiguous image id '001'"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")


# ----- other dataset layouts ----------------------------------------------------------


def _make_folders(folder, modalities=("MRI", "PET"), ids=("001", "002")):
  """Writes `folder/<modality>/<id>.png` for each modality folder name given."""
  for i, pair_id in enumerate(ids):
    for j, modality in enumerate(modalities):
      _save(folder / modality / f"{pair_id}.png", _gray(i + 100 * j))
  return folder


def _found(found):
  return [(p.task, p.pair_id, p.modality_b) for p in found]


@pytest.mark.parametrize("task_folder", ["MRI-PET", "MRI_PET", "mri_pet", "Mri-Pet"])
def test_task_folder_spellings_with_split(tmp_path, task_folder):
  _make_folders(tmp_path / task_folder / "test")
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], "test")
  assert _found(found) == [("MRI-PET", "001", "PET"), ("MRI-PET", "002", "PET")]
  assert found[0].path_b == tmp_path / task_folder / "test" / "PET" / "001.png"


@pytest.mark.parametrize("task_folder", ["MRI-PET", "MRI_PET"])
def test_task_folder_without_split(tmp_path, task_folder):
  # CDDFuse's test_img/MRI_PET/{MRI,PET}: every split reads the same images.
  _make_folders(tmp_path / task_folder)
  for split in ("test", "train"):
    found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], split)
    assert _found(found) == [("MRI-PET", "001", "PET"), ("MRI-PET", "002", "PET")]
    assert found[0].path_a == tmp_path / task_folder / "MRI" / "001.png"


def test_split_folder_wins_over_modality_folders_beside_it(tmp_path):
  _make_folders(tmp_path / "MRI_CT", ("MRI", "CT"), ids=("flat",))
  _make_folders(tmp_path / "MRI_CT" / "test", ("MRI", "CT"), ids=("nested",))
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "test")
  assert [p.pair_id for p in found] == ["nested"]
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT"], "train")
  assert [p.pair_id for p in found] == ["flat"]


def test_modality_folder_case_variants(tmp_path):
  _make_folders(tmp_path / "MRI_PET", ("mri", "Pet"))
  _make_folders(tmp_path / "mri-spect" / "test", ("Mri", "spect"), ids=("s",))
  found = pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "test")
  assert _found(found) == [
      ("MRI-PET", "001", "PET"), ("MRI-PET", "002", "PET"), ("MRI-SPECT", "s", "SPECT")]
  assert found[0].path_b == tmp_path / "MRI_PET" / "Pet" / "001.png"


def test_cddfuse_test_img_root(tmp_path):
  for task, modality in (("MRI_CT", "CT"), ("MRI_PET", "PET"), ("MRI_SPECT", "SPECT")):
    _make_folders(tmp_path / task, ("MRI", modality), ids=(f"{modality.lower()}1",))
  _make_folders(tmp_path / "MSRS", ("ir", "vi"))  # an infrared-visible set beside them
  scan = pairs_lib.find_split_pairs(tmp_path, list(pairs_lib.TASKS), "test")
  assert _found(scan.pairs) == [
      ("MRI-CT", "ct1", "CT"), ("MRI-PET", "pet1", "PET"), ("MRI-SPECT", "spect1", "SPECT")]
  assert scan.problems == []


def test_root_is_one_task_folder(tmp_path):
  _make_folders(tmp_path, ("MRI", "PET", "ct"), ids=("b", "a"))
  found = pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "test")
  assert _found(found) == [("MRI-CT", "a", "CT"), ("MRI-CT", "b", "CT"),
                           ("MRI-PET", "a", "PET"), ("MRI-PET", "b", "PET")]
  assert found[0].path_b == tmp_path / "ct" / "a.png"
  found = pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], "train")
  assert _found(found) == [("MRI-PET", "a", "PET"), ("MRI-PET", "b", "PET")]
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'SPECT'}: modality folder missing")):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-SPECT"], "test")


def test_root_is_one_task_folder_needs_both_modalities(tmp_path):
  _make_folders(tmp_path, ("PET",))
  with pytest.raises(DataError, match="MRI: modality folder missing"):
    pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "test")
  (tmp_path / "PET").rename(tmp_path / "MRI")
  with pytest.raises(DataError, match="MRI folder but no partner folder"):
    pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "test")


def test_default_tasks_skip_absent_ones_but_named_tasks_must_exist(tmp_path):
  _make_layout(tmp_path, "MRI-PET", split="test", ids=("1",))
  found = pairs_lib.find_dataset_pairs(tmp_path, list(pairs_lib.TASKS), "test")
  assert _found(found) == [("MRI-PET", "1", "PET")]
  with pytest.raises(DataError, match="MRI-CT: task folder missing"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-CT", "MRI-PET"], "test")
  with pytest.raises(DataError, match="MRI-SPECT: task folder missing"):
    pairs_lib.find_split_pairs(tmp_path, ["MRI-SPECT"], "test")
  # A present task folder is checked even when all tasks are requested.
  (tmp_path / "MRI_CT" / "train").mkdir(parents=True)
  with pytest.raises(DataError, match="split folder 'test' missing"):
    pairs_lib.find_dataset_pairs(tmp_path, list(pairs_lib.TASKS), "test")


def test_side_by_side_split_looks_up_only_the_tasks_found(tmp_path):
  _make_folders(tmp_path / "MRI_CT", ("MRI", "CT"), ids=("a", "b"))
  (tmp_path / "splits.json").write_text(json.dumps(
      {"MRI-CT": {"dmfnet_side_by_side": ["b.png"]}}))
  scan = pairs_lib.find_split_pairs(tmp_path, list(pairs_lib.TASKS), "dmfnet_side_by_side")
  assert _found(scan.pairs) == [("MRI-CT", "b", "CT")] and scan.problems == []


def test_no_known_layout_lists_the_accepted_ones(tmp_path):
  _make_folders(tmp_path / "MSRS", ("ir", "vi"))
  (tmp_path / "notes.txt").write_text("x")
  for tasks in (pairs_lib.TASKS, ["MRI-PET"]):
    with pytest.raises(DataError) as info:
      pairs_lib.find_dataset_pairs(tmp_path, list(tasks), "test")
    message = str(info.value)
    assert "no known data layout" in message and "MSRS, notes.txt" in message
    for pattern, example in (
        ("ROOT/<task>/<split>/<modality>/<id>.<ext>", "ROOT/MRI-PET/test/PET/001.png"),
        ("ROOT/<task>/<modality>/<id>.<ext>", "ROOT/MRI_PET/PET/001.png"),
        ("ROOT/<modality>/<id>.<ext>", "ROOT/MRI/001.png + ROOT/PET/001.png")):
      assert pattern in message and example in message


def test_empty_root_lists_the_accepted_layouts(tmp_path):
  with pytest.raises(DataError, match=r"empty; accepted layouts(.|\n)*ROOT/<modality>/"):
    pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "test")


def test_root_mixing_task_and_modality_folders(tmp_path):
  _make_layout(tmp_path, "MRI-CT")
  _make_folders(tmp_path, ("MRI", "PET"))
  with pytest.raises(DataError, match="both task folders \\(MRI-CT\\) and modality folders"):
    pairs_lib.find_dataset_pairs(tmp_path, pairs_lib.TASKS, "train")


def test_two_spellings_of_one_task_folder(tmp_path):
  for name in ("MRI-PET", "MRI_PET"):
    _make_folders(tmp_path / name)
  with pytest.raises(DataError, match="two folders for MRI-PET; keep one"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], "test")


def test_two_spellings_of_one_modality_folder(tmp_path):
  _make_folders(tmp_path / "MRI_PET", ("MRI", "PET"))
  try:
    (tmp_path / "MRI_PET" / "pet").mkdir()
  except FileExistsError:
    pytest.skip("case-insensitive file system")
  with pytest.raises(DataError, match="two folders for PET; keep one"):
    pairs_lib.find_dataset_pairs(tmp_path, ["MRI-PET"], "test")


# ----- plain folders and explicit lists -------------------------------------------------


def test_folder_pairs(tmp_path):
  for name in ("x", "y"):
    _save(tmp_path / "mri" / f"{name}.png", _gray())
    _save(tmp_path / "pet" / f"{name}.jpg", _rgb())
  found = pairs_lib.find_folder_pairs(tmp_path / "mri", tmp_path / "pet", task="MRI-PET")
  assert [p.pair_id for p in found] == ["x", "y"]
  assert found[0].modality_b == "PET" and found[0].task == "MRI-PET"
  _save(tmp_path / "pet" / "z.jpg", _rgb())
  with pytest.raises(DataError, match="z.jpg: no partner"):
    pairs_lib.find_folder_pairs(tmp_path / "mri", tmp_path / "pet")
  scan = pairs_lib.find_folder_pairs(tmp_path / "mri", tmp_path / "pet", strict=False)
  assert len(scan.pairs) == 2 and len(scan.problems) == 1
  with pytest.raises(DataError, match="nope"):
    pairs_lib.find_folder_pairs(tmp_path / "nope", tmp_path / "pet")


def test_pairs_from_list(tmp_path):
  a1 = _save(tmp_path / "a" / "1.png", _gray())
  b1 = _save(tmp_path / "b" / "1.png", _gray())
  a2 = _save(tmp_path / "c" / "1.png", _gray())
  found = pairs_lib.pairs_from_list([(a1, b1), [str(a2), str(b1)]])
  assert [p.pair_id for p in found] == ["1", "1_2"]
  assert found[1].path_a == a2
  with pytest.raises(DataError, match="missing.png"):
    pairs_lib.pairs_from_list([(a1, tmp_path / "missing.png")])
  with pytest.raises(DataError, match="item 0"):
    pairs_lib.pairs_from_list([(a1,)])
  with pytest.raises(DataError, match="empty"):
    pairs_lib.pairs_from_list([])


# ----- loading --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, dtype",
    [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint8), (".tiff", np.uint16),
     (".bmp", np.uint8)],
)
def test_load_lossless_formats(tmp_path, suffix, dtype):
  a, b = _gray(1, dtype=dtype), _gray(2, dtype=dtype)
  pair = pairs_lib.pairs_from_list(
      [(_save(tmp_path / f"a{suffix}", a), _save(tmp_path / f"b{suffix}", b))])[0]
  loaded = pairs_lib.load_pair(pair)
  scale = 255.0 if dtype == np.uint8 else 65535.0
  for got, want in ((loaded.a, a), (loaded.b, b)):
    assert got.dtype == np.float32 and got.shape == (SIZE, SIZE)
    np.testing.assert_allclose(got, want / scale * 2 - 1, atol=1e-6)
  assert loaded.b_raw.dtype == dtype
  np.testing.assert_array_equal(loaded.b_raw, b)


def test_load_jpeg(tmp_path):
  smooth = np.tile(np.linspace(0, 255, SIZE), (SIZE, 1)).astype(np.uint8)
  pair = pairs_lib.pairs_from_list([
      (_save(tmp_path / "a.jpg", smooth, quality=95), _save(tmp_path / "b.jpeg", smooth))])[0]
  loaded = pairs_lib.load_pair(pair)
  assert loaded.a.shape == (SIZE, SIZE) and loaded.a.dtype == np.float32
  assert np.abs((loaded.a + 1) * 127.5 - smooth).max() < 8  # lossy, but close
  assert -1.0 <= loaded.a.min() and loaded.a.max() <= 1.0


def test_rgb_partner_becomes_luma_and_keeps_colour(tmp_path):
  rgb = _rgb(5)
  pair = pairs_lib.pairs_from_list(
      [(_save(tmp_path / "a.png", _gray()), _save(tmp_path / "b.png", rgb))])[0]
  loaded = pairs_lib.load_pair(pair)
  np.testing.assert_array_equal(loaded.b_raw, rgb)
  luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
  assert np.abs((loaded.b + 1) * 127.5 - luma).max() <= 0.51 + 1e-4
  np.testing.assert_allclose(
      loaded.b, imageio.opencv_luma_uint8(rgb) / 255.0 * 2 - 1, atol=1e-6)


def test_size_mismatch_names_both_files(tmp_path):
  path_a = _save(tmp_path / "a.png", _gray(size=32))
  path_b = _save(tmp_path / "b.png", _gray(size=24))
  pair = pairs_lib.pairs_from_list([(path_a, path_b)])[0]
  with pytest.raises(DataError, match=r"a\.png is 32x32 but .*b\.png is 24x24"):
    pairs_lib.load_pair(pair)


def test_corrupt_image_names_file(tmp_path):
  good = _save(tmp_path / "a.png", _gray())
  bad = tmp_path / "b.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  pair = pairs_lib.pairs_from_list([(good, bad)])[0]
  with pytest.raises(ImageReadError, match="b.png"):
    pairs_lib.load_pair(pair)


def test_truncated_image_names_file(tmp_path):
  path = _save(tmp_path / "a.png", _gray(size=64))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  pair = pairs_lib.pairs_from_list([(path, _save(tmp_path / "b.png", _gray(size=64)))])[0]
  with pytest.raises(ImageReadError, match="a.png"):
    pairs_lib.load_pair(pair)


def test_side_by_side_split_is_test_folder_restricted_to_listed_ids(tmp_path):
  _make_layout(tmp_path, "MRI-CT", split="test", ids=("a", "b", "c"))
  (tmp_path / "splits.json").write_text(json.dumps(
      {"MRI-CT": {"dmfnet_side_by_side": ["c.png", "a.png", "gone.png"]}}))
  scan = pairs_lib.find_split_pairs(tmp_path, ["MRI-CT"], "dmfnet_side_by_side")
  assert [p.pair_id for p in scan.pairs] == ["c", "a"]  # listed order
  assert scan.problems == ["MRI-CT/gone: listed in splits.json but its sources are missing"]
  plain = pairs_lib.find_split_pairs(tmp_path, "MRI-CT", "test")
  assert [p.pair_id for p in plain.pairs] == ["a", "b", "c"]


@pytest.mark.parametrize("content,message", [
    (None, "splits.json: missing"),
    ("{not json", "splits.json: cannot read"),
    ('{"MRI-PET": {}}', "no 'MRI-CT' -> 'dmfnet_side_by_side' list"),
])
def test_side_by_side_split_names_a_bad_splits_file(tmp_path, content, message):
  _make_layout(tmp_path, "MRI-CT", split="test")
  if content is not None:
    (tmp_path / "splits.json").write_text(content)
  with pytest.raises(DataError, match=re.escape(message)):
    pairs_lib.find_split_pairs(tmp_path, ["MRI-CT"], "dmfnet_side_by_side")


# ----- the real Harvard layout -----------------------------------------------------------


def test_harvard_layout_matches_splits(harvard_root):
  splits = json.loads((harvard_root / "splits.json").read_text())
  for task in pairs_lib.TASKS:
    for split in ("train", "test"):
      found = pairs_lib.find_dataset_pairs(harvard_root, [task], split)
      assert [p.pair_id for p in found] == sorted(
          pathlib.Path(name).stem for name in splits[task][split])
  for task in pairs_lib.TASKS:
    scan = pairs_lib.find_split_pairs(harvard_root, [task], "dmfnet_side_by_side")
    assert [p.pair_id for p in scan.pairs] == [
        pathlib.Path(name).stem for name in splits[task]["dmfnet_side_by_side"]]
    assert not scan.problems
  pet = pairs_lib.find_dataset_pairs(harvard_root, ["MRI-PET"], "test")[0]
  loaded = pairs_lib.load_pair(pet)
  assert loaded.a.shape == loaded.b.shape == (256, 256)
  assert loaded.b_raw.shape == (256, 256, 3)
