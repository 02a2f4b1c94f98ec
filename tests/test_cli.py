"""The `dmfnet-jax` command: files, folders, datasets, volumes, exit statuses, and a
plain (non-editable) install used from outside the repository."""

import json
import os
import subprocess
import sys
import venv

import numpy as np
import pytest

from dmfnet_jax import cli, imageio
from dmfnet_jax.data import phantoms
from conftest import REPO_ROOT


def _run(*args, cwd):
  return subprocess.run([sys.executable, "-m", "dmfnet_jax.cli", *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def _write_pairs(folder, task="MRI-PET", count=2, size=48):
  modality = task.split("-")[1]
  for i in range(count):
    mri, other = phantoms.phantom_pair(i, size=size, task=task, seed=2)
    imageio.write_image_atomic(folder / "MRI" / f"{i:03d}.png", mri)
    imageio.write_image_atomic(folder / modality / f"{i:03d}.png", other)


def test_help_explains():
  result = subprocess.run([sys.executable, "-m", "dmfnet_jax.cli", "--help"], capture_output=True,
                          text=True, cwd=REPO_ROOT)
  assert result.returncode == 0 and "fuse" in result.stdout and "exit status" in result.stdout
  parser = cli.build_parser()
  fuse_help = parser._subparsers._group_actions[0].choices["fuse"].format_help()  # pylint: disable=protected-access
  for option in ("--checkpoint", "--modality", "--window-other", "--resample", "-o"):
    assert option in fuse_help


def test_files_folders_and_datasets(micro_stage2_workdir, tmp_path):
  _write_pairs(tmp_path / "data" / "MRI_PET")
  mri, pet = tmp_path / "data" / "MRI_PET" / "MRI", tmp_path / "data" / "MRI_PET" / "PET"
  ckpt = f"--checkpoint={micro_stage2_workdir}"
  result = _run("fuse", mri / "000.png", pet / "000.png", "-o", tmp_path / "one.png", ckpt,
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert imageio.read_image(tmp_path / "one.png").shape == (48, 48, 3)
  result = _run("fuse", mri, pet, "-o", tmp_path / "folders", ckpt, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(p.name for p in (tmp_path / "folders").glob("*.png")) == ["000.png", "001.png"]
  result = _run("fuse", tmp_path / "data", "-o", tmp_path / "dataset", ckpt, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "dataset" / "MRI-PET" / "001.png").is_file()


def test_a_bad_item_is_reported_and_the_rest_fused(micro_stage2_workdir, tmp_path):
  _write_pairs(tmp_path, task="MRI-CT", count=2)
  (tmp_path / "CT" / "002.png").write_bytes(b"not an image")
  imageio.write_image_atomic(tmp_path / "MRI" / "002.png", np.zeros((48, 48), np.uint8))
  result = _run("fuse", tmp_path / "MRI", tmp_path / "CT", "-o", tmp_path / "out",
                f"--checkpoint={micro_stage2_workdir}", cwd=tmp_path)
  assert result.returncode == 3, result.stderr[-2000:]
  assert "002.png" in result.stdout and "cannot decode" in result.stdout
  summary = json.loads((tmp_path / "out" / "fuse_summary.json").read_text())
  assert summary["fused"] == 2 and summary["skipped"] == 1


def test_volumes_and_a_volume_paired_with_an_image(micro_stage2_workdir, tmp_path):
  nib = pytest.importorskip("nibabel")
  slices = [phantoms.phantom_pair(i, size=32, task="MRI-CT", seed=1) for i in range(3)]
  for name, index in (("t1.nii.gz", 0), ("ct.nii.gz", 1)):
    data = np.stack([s[index] for s in slices], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
  result = _run("fuse", tmp_path / "t1.nii.gz", tmp_path / "ct.nii.gz", "-o", tmp_path / "out",
                f"--checkpoint={micro_stage2_workdir}", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "out" / "t1_fused.nii.gz").is_file()
  assert (tmp_path / "out" / "t1_fused_montage.png").is_file()
  imageio.write_image_atomic(tmp_path / "slice.png", slices[0][1])
  result = _run("fuse", tmp_path / "t1.nii.gz", tmp_path / "slice.png", "-o", tmp_path / "x",
                f"--checkpoint={micro_stage2_workdir}", cwd=tmp_path)
  assert result.returncode == 2 and "is a volume but" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_input_and_bad_checkpoint_are_one_line(tmp_path):
  result = _run("fuse", tmp_path / "nope.png", tmp_path / "nope2.png", "-o", tmp_path / "o.png",
                cwd=tmp_path)
  assert result.returncode == 2 and "nope.png: no such file" in result.stderr
  (tmp_path / "a.png").write_bytes(b"x")
  result = _run("fuse", tmp_path / "a.png", tmp_path / "a.png", "-o", tmp_path / "o.png",
                f"--checkpoint={tmp_path / 'none'}", cwd=tmp_path)
  assert result.returncode == 2 and "does not exist" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_wheel_installed_outside_the_repository(tmp_path):
  """`pip install .` (not editable) into a fresh environment, then the console command and
  the API from another folder find the shipped weights inside the installed package."""
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(REPO_ROOT)], check=True, capture_output=True, timeout=600)
  env_dir = tmp_path / "env"
  # The dependencies come from this interpreter's site-packages; the package from the wheel.
  venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
  python = env_dir / "bin" / "python"
  wheel = next(wheels.glob("dmfnet_jax-*.whl"))
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                  "--force-reinstall", str(wheel)], check=True, capture_output=True, timeout=600)
  work = tmp_path / "elsewhere"
  work.mkdir()
  mri, pet = phantoms.phantom_pair(0, size=64, task="MRI-PET", seed=9)
  imageio.write_image_atomic(work / "mri.png", mri)
  imageio.write_image_atomic(work / "pet.png", pet)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([str(env_dir / "bin" / "dmfnet-jax"), "fuse", "mri.png", "pet.png",
                           "-o", "fused.png"], cwd=work, capture_output=True, text=True,
                          timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert imageio.read_image(work / "fused.png").shape == (64, 64, 3)
  probe = ("import dmfnet_jax, numpy as np; from PIL import Image\n"
           "f = dmfnet_jax.load().fuse(np.asarray(Image.open('mri.png')), "
           "np.asarray(Image.open('pet.png')))\n"
           "print(dmfnet_jax.__file__); print(f.shape)")
  result = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True,
                          timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  location, shape = result.stdout.strip().splitlines()[-2:]
  assert str(env_dir) in location and str(REPO_ROOT) not in location
  assert shape == "(64, 64, 3)"
