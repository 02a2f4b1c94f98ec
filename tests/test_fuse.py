"""The fuse job: naming, colour, any size, determinism, and bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dmfnet_jax import fuse, imageio
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import CheckpointError, DmfnetError
from conftest import micro_config


def fuse_config(checkpoint, **fuse_overrides):
  config = micro_config("fuse")
  config.checkpoint = str(checkpoint)
  config.fuse.update({"batch_size": 2, **fuse_overrides})
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  phantoms.write_phantom_dataset(root, ["MRI-CT", "MRI-PET"], "test", count=2, size=48, seed=3)
  return root


def test_fuses_a_dataset_keeping_colour(micro_stage2_workdir, dataset, tmp_path):
  config = fuse_config(micro_stage2_workdir)
  config.data.update(root=str(dataset), tasks=("MRI-CT", "MRI-PET"), split="test")
  fuse.run(config, str(tmp_path))
  summary = json.loads((tmp_path / "fuse_summary.json").read_text())
  assert summary["fused"] == 4 and summary["skipped"] == 0
  ct = sorted((tmp_path / "fused" / "MRI-CT").glob("*.png"))
  pet = sorted((tmp_path / "fused" / "MRI-PET").glob("*.png"))
  assert [p.stem for p in ct] == [p.stem for p in sorted((dataset / "MRI-CT/test/MRI").glob("*.png"))]
  assert np.asarray(Image.open(ct[0])).ndim == 2
  fused_pet = np.asarray(Image.open(pet[0]))
  assert fused_pet.shape == (48, 48, 3)
  # Colour rule: the fused image keeps the PET source's chroma (where RGB is not clipped).
  source = imageio.read_image(dataset / "MRI-PET/test/PET" / pet[0].name)
  unclipped = np.all((fused_pet > 3) & (fused_pet < 252), axis=-1)
  assert unclipped.mean() > 0.3
  np.testing.assert_allclose(imageio.rgb_to_ycrcb(fused_pet)[unclipped][:, 1:].astype(int),
                             imageio.rgb_to_ycrcb(source)[unclipped][:, 1:].astype(int), atol=3)
  assert not list((tmp_path / "fused").rglob("*.tmp"))


def test_any_size_and_determinism(micro_stage2_workdir, tmp_path):
  """Odd sizes are padded and cropped back; the same seed gives the same image,
  whatever the batch it is fused in."""
  mri, ct = phantoms.phantom_pair(0, 52, "MRI-CT", seed=1)
  mri, ct = mri[:, :37], ct[:, :37]
  for name, image in (("a/x.png", mri), ("b/x.png", ct), ("a/y.png", mri[::-1]), ("b/y.png", ct[::-1])):
    imageio.write_image_atomic(tmp_path / name, image)
  outputs = []
  for batch in (1, 2):
    out = tmp_path / f"out{batch}"
    config = fuse_config(micro_stage2_workdir, dir_a=str(tmp_path / "a"), dir_b=str(tmp_path / "b"),
                         output_dir=str(out), batch_size=batch)
    fuse.run(config, str(tmp_path / f"w{batch}"))
    outputs.append(np.asarray(Image.open(out / "x.png")))
  assert outputs[0].shape == (52, 37)
  np.testing.assert_array_equal(outputs[0], outputs[1])


def test_bad_pairs_are_skipped_and_the_rest_fused(micro_stage2_workdir, tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  mri, ct = phantoms.phantom_pair(1, 32, "MRI-CT")
  for stem in ("good", "corrupt", "sized"):
    imageio.write_image_atomic(a / f"{stem}.png", mri)
    imageio.write_image_atomic(b / f"{stem}.png", ct)
  (b / "corrupt.png").write_bytes(b"not a png")
  imageio.write_image_atomic(b / "sized.png", np.zeros((40, 40), np.uint8))
  imageio.write_image_atomic(a / "lonely.png", mri)
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b),
                       output_dir=str(tmp_path / "out"))
  fuse.run(config, str(tmp_path / "w"))
  summary = json.loads((tmp_path / "w" / "fuse_summary.json").read_text())
  assert summary["fused"] == 1 and summary["skipped"] == 3
  reasons = " ".join(item["reason"] + item["pair"] for item in summary["skipped_pairs"])
  assert "corrupt.png" in reasons and "sized.png" in reasons and "lonely" in reasons
  assert (tmp_path / "out" / "good.png").exists()
  assert "skipped" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_is_named(micro_stage2_workdir, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  config = fuse_config(micro_stage2_workdir, output_dir=str(locked / "out"))
  with pytest.raises(DmfnetError, match="output_dir"):
    fuse.run(config, str(tmp_path / "w"))


def test_output_dir_that_is_a_file_is_named(micro_stage2_workdir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  config = fuse_config(micro_stage2_workdir, output_dir=str(blocker / "out"))
  with pytest.raises(DmfnetError, match="output_dir"):
    fuse.run(config, str(tmp_path / "w"))


def test_checkpoint_with_other_timesteps_is_refused(micro_stage2_workdir, tmp_path):
  config = fuse_config(micro_stage2_workdir)
  config.fusion.timesteps = [5, 10]
  with pytest.raises(CheckpointError, match="timesteps"):
    fuse.run(config, str(tmp_path))


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
  config = fuse_config("")
  with pytest.raises(DmfnetError, match="configs/stage2.py"):
    fuse.run(config, str(tmp_path))


def test_dataset_input_knows_the_side_by_side_split(harvard_root, tmp_path):
  """`data.split=dmfnet_side_by_side` fuses just the pairs DM-FNet published."""
  config = micro_config("fuse")
  config.data.update(root=str(harvard_root), tasks=("MRI-SPECT",), split="dmfnet_side_by_side")
  found, problems, _ = fuse.collect_pairs(config, tmp_path)
  listed = json.loads((harvard_root / "splits.json").read_text())["MRI-SPECT"]["dmfnet_side_by_side"]
  assert [p.pair_id for p in found] == [os.path.splitext(n)[0] for n in listed]
  assert not problems and all(p.path_a.parent.parent.name == "test" for p in found)
