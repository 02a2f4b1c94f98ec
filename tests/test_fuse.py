"""The fuse job: naming, colour, any size, determinism, bad input, and never losing a
user's file (inputs untouched, per-item failures, permissions, resume)."""

import io
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dmfnet_jax import api, config_defaults, fuse, imageio, validation
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import CheckpointError, DmfnetError
from conftest import REPO_ROOT, micro_config


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


# ----------------------------------------------------------------------------- safety


def _folder_pairs(root, count=3, size=40, task="MRI-CT"):
  a, b = root / "a", root / "b"
  for i in range(count):
    mri, other = phantoms.phantom_pair(i, size, task, seed=6)
    imageio.write_image_atomic(a / f"p{i}.png", mri)
    imageio.write_image_atomic(b / f"p{i}.png", other)
  return a, b


def _snapshot(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("target", ["a", "b"])
def test_an_output_that_would_touch_an_input_is_refused_before_any_work(
    micro_stage2_workdir, tmp_path, target):
  a, b = _folder_pairs(tmp_path)
  before = (_snapshot(a), _snapshot(b))
  output = tmp_path / target
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b), output_dir=str(output))
  with pytest.raises(DmfnetError, match="refusing to write"):
    fuse.run(config, str(tmp_path / "w"))
  assert (_snapshot(a), _snapshot(b)) == before
  assert not (tmp_path / "w" / "fuse_summary.json").exists()


def test_a_dataset_fused_into_one_of_its_folders_is_refused(micro_stage2_workdir, tmp_path,
                                                          dataset):
  mri_folder = dataset / "MRI-CT" / "test" / "MRI"
  before = _snapshot(mri_folder)
  config = fuse_config(micro_stage2_workdir, output_dir=str(mri_folder))
  config.data.update(root=str(dataset), tasks=("MRI-CT",), split="test")
  with pytest.raises(DmfnetError, match="output folder .*MRI holds the input"):
    fuse.run(config, str(tmp_path / "w"))
  assert _snapshot(mri_folder) == before


def test_one_bad_pair_never_stops_the_batch(micro_stage2_workdir, tmp_path):
  a, b = _folder_pairs(tmp_path, count=2, size=40)
  imageio.write_image_atomic(a / "dot.png", np.zeros((1, 1), np.uint8))
  imageio.write_image_atomic(b / "dot.png", np.zeros((1, 1), np.uint8))
  imageio.write_image_atomic(a / "big.png", np.zeros((72, 56), np.uint8))
  imageio.write_image_atomic(b / "big.png", np.zeros((72, 56), np.uint8))
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b),
                       output_dir=str(tmp_path / "out"))
  summary = fuse.run(config, str(tmp_path / "w"))
  assert summary["fused"] == 3 and summary["skipped"] == 1
  [item] = summary["skipped_pairs"]
  assert "dot.png" in item["pair"] and "1x1 pixels is too small" in item["reason"]


def _fuse_command(micro_stage2_workdir, a, b, out, work, *extra):
  return [sys.executable, "-m", "dmfnet_jax.main",
          f"--config={REPO_ROOT / 'configs' / 'fuse.py'}", f"--workdir={work}",
          f"--config.checkpoint={micro_stage2_workdir}", f"--config.fuse.dir_a={a}",
          f"--config.fuse.dir_b={b}", f"--config.fuse.output_dir={out}",
          "--config.fuse.batch_size=1", *extra]


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_outputs_get_the_permissions_of_the_umask(micro_stage2_workdir, tmp_path, mask):
  """Fuse and evaluate, run as a user would (a process with that umask)."""
  a, b = _folder_pairs(tmp_path, count=2)
  work = tmp_path / "w"
  fuse_cmd = _fuse_command(micro_stage2_workdir, a, b, work / "fused", work)
  root = tmp_path / "data"
  phantoms.write_phantom_dataset(root, ["MRI-CT"], "test", count=2, size=32, seed=1)
  eval_cmd = [sys.executable, "-m", "dmfnet_jax.main",
              f"--config={REPO_ROOT / 'configs' / 'evaluate.py'}", f"--workdir={tmp_path / 'e'}",
              f"--config.data.root={root}", "--config.data.tasks=('MRI-CT',)",
              "--config.evaluate.methods.wavelet=baseline:max",
              "--config.evaluate.methods.laplacian=baseline:mean"]
  for command in (fuse_cmd, eval_cmd):
    # The shell sets the umask, as a user's login would (no fork from this threaded process).
    result = subprocess.run(["sh", "-c", f"umask {mask:03o} && exec \"$@\"", "sh", *command],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 3), result.stderr[-2000:]
  files = [p for d in (work, tmp_path / "e") for p in d.rglob("*") if p.is_file()]
  folders = [p for d in (work, tmp_path / "e") for p in d.rglob("*") if p.is_dir()]
  assert len(files) > 8
  assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~mask)}
  assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {oct(0o777 & ~mask)}


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(micro_stage2_workdir, tmp_path):
  a, b = _folder_pairs(tmp_path, count=6, size=32)
  out = tmp_path / "out"
  env = {**os.environ, api.WRITE_DELAY_ENV: "1.5"}
  process = subprocess.Popen(_fuse_command(micro_stage2_workdir, a, b, out, tmp_path / "w"),
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and len(list(out.glob("p*.png"))) < 2:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = sorted(p.name for p in out.glob("p*.png"))
  assert 2 <= len(done) < 6
  for name in done:  # never half-written
    assert imageio.read_image(out / name).shape == (32, 32)
  result = subprocess.run(_fuse_command(micro_stage2_workdir, a, b, out, tmp_path / "w"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / "w" / "fuse_summary.json").read_text())
  assert summary["already_done"] == len(done) and summary["fused"] == 6 - len(done)
  assert not list(out.glob(".*.tmp"))
  fresh = tmp_path / "fresh"
  subprocess.run(_fuse_command(micro_stage2_workdir, a, b, fresh, tmp_path / "w2"), cwd=tmp_path,
                 check=True, capture_output=True, timeout=600)
  for name in (f"p{i}.png" for i in range(6)):
    assert (out / name).read_bytes() == (fresh / name).read_bytes()


def test_a_rerun_with_another_model_or_seed_needs_overwrite(micro_stage2_workdir, tmp_path):
  a, b = _folder_pairs(tmp_path, count=2)
  out = tmp_path / "out"
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b), output_dir=str(out))
  fuse.run(config, str(tmp_path / "w"))
  assert fuse.run(config, str(tmp_path / "w"))["already_done"] == 2  # same run: nothing to do
  config.seed = 7
  with pytest.raises(DmfnetError, match="exist from another run.*overwrite"):
    fuse.run(config, str(tmp_path / "w"))
  config.fuse.overwrite = True
  summary = fuse.run(config, str(tmp_path / "w"))
  assert summary["fused"] == 2 and summary["already_done"] == 0


def test_float_tiffs_are_mapped_and_nan_is_named(micro_stage2_workdir, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  mri, ct = phantoms.phantom_pair(0, 32, "MRI-CT", seed=2)
  Image.fromarray(mri.astype(np.float32) / 255.0).save(a / "unit.tif")
  Image.fromarray(ct.astype(np.float32) / 255.0).save(b / "unit.tif")
  Image.fromarray(mri.astype(np.float32) * 10.0 - 1000.0).save(a / "hu.tif")  # any range
  Image.fromarray(ct.astype(np.float32) * 10.0 - 1000.0).save(b / "hu.tif")
  bad = mri.astype(np.float32)
  bad[3, 4] = np.nan
  Image.fromarray(bad).save(a / "nan.tif")
  Image.fromarray(ct.astype(np.float32)).save(b / "nan.tif")
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b),
                       output_dir=str(tmp_path / "out"))
  summary = fuse.run(config, str(tmp_path / "w"))
  assert summary["fused"] == 2 and summary["skipped"] == 1
  assert "nan.tif" in summary["skipped_pairs"][0]["reason"]
  assert "1 of 1024 pixels are NaN" in summary["skipped_pairs"][0]["reason"]
  # Min-max mapping of any range gives the same pixels as the [0, 1] version.
  unit, hu = (imageio.read_image(tmp_path / "out" / f"{n}.png").astype(int) for n in ("unit", "hu"))
  assert unit.shape == (32, 32) and hu.shape == (32, 32)


def _cmyk_jpeg(path, image):
  Image.fromarray(np.dstack([image] * 3)).convert("CMYK").save(path, format="JPEG")


def test_unusual_and_broken_inputs(micro_stage2_workdir, tmp_path):
  """The 22 inputs a user tried: each is fused or skipped with its reason, never a crash."""
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  mri, ct = phantoms.phantom_pair(2, 48, "MRI-CT", seed=3)
  _, pet = phantoms.phantom_pair(2, 48, "MRI-PET", seed=3)
  save = lambda folder, name, image: Image.fromarray(image).save(folder / name)
  fine = {
      "rgba": lambda: (save(a, "rgba.png", mri), save(b, "rgba.png", np.dstack([pet, np.full_like(mri, 200)]))),
      "palette": lambda: (save(a, "palette.png", mri),
                          Image.fromarray(pet).convert("P").save(b / "palette.png")),
      "sixteen": lambda: (save(a, "sixteen.png", mri.astype(np.uint16) * 257),
                          save(b, "sixteen.png", ct.astype(np.uint16) * 257)),
      "cmyk": lambda: (save(a, "cmyk.png", mri), _cmyk_jpeg(b / "cmyk.jpg", ct)),
      "strip": lambda: (save(a, "strip.png", np.tile(mri[:7], (1, 7))[:, :300]),
                        save(b, "strip.png", np.tile(ct[:7], (1, 7))[:, :300])),
      "große_ÿ": lambda: (save(a, "große_ÿ.png", mri), save(b, "große_ÿ.png", ct)),
  }
  broken = {
      "truncated": lambda: (save(a, "truncated.png", mri),
                            (b / "truncated.png").write_bytes(_png_bytes(ct)[:200])),
      "empty": lambda: (save(a, "empty.png", mri), (b / "empty.png").write_bytes(b"")),
      "text": lambda: (save(a, "text.png", mri), (b / "text.png").write_text("hello")),
      "sizes": lambda: (save(a, "sizes.png", mri), save(b, "sizes.png", ct[:40])),
  }
  for make in (*fine.values(), *broken.values()):
    make()
  save(a, "lonely.png", mri)
  config = fuse_config(micro_stage2_workdir, dir_a=str(a), dir_b=str(b),
                       output_dir=str(tmp_path / "out"))
  summary = fuse.run(config, str(tmp_path / "w"))
  fused = {pathlib.Path(p).stem for p in summary["outputs"]}
  assert fused == set(fine), summary["skipped_pairs"]
  reasons = {item["pair"]: item["reason"] for item in summary["skipped_pairs"]}
  assert summary["skipped"] == len(broken) + 1
  assert any("lonely.png" in pair and "no partner" in pair for pair in reasons)
  for name, why in (("truncated", "cannot decode"), ("empty", "cannot decode"),
                    ("text", "cannot decode"), ("sizes", "image sizes differ")):
    assert any(f"{name}.png" in pair and why in reason for pair, reason in reasons.items()), name
  assert imageio.read_image(tmp_path / "out" / "strip.png").shape == (7, 300)
  assert imageio.read_image(tmp_path / "out" / "rgba.png").shape == (48, 48, 3)
  for key, value, message in (("batch_size", 0, "fuse.batch_size"),
                              ("output_format", "gif", "fuse.output_format"),
                              ("unet_inputs_at_once", -1, "fuse.unet_inputs_at_once"),
                              ("cpu_devices", -2, "fuse.cpu_devices")):
    config = fuse_config(micro_stage2_workdir)
    config.fuse[key] = value
    with pytest.raises(DmfnetError, match=message):
      validation.validate(config)


@pytest.mark.slow
def test_a_1536_pair_with_the_shipped_model(tmp_path):
  """Larger than the training images: fused whole if it fits the memory budget, else
  whole one UNet input at a time, else in tiles (tests/test_engine.py); here one input at
  a time (a 7 GiB budget), as on a small machine."""
  mri, pet = phantoms.phantom_pair(4, 1536, "MRI-PET", seed=3)
  for folder, image in (("a", mri), ("b", pet)):
    imageio.write_image_atomic(tmp_path / folder / "large.png", image)
  config = micro_config("fuse")
  config.model = config_defaults.model_config_from_checkpoint()
  config.fusion = config_defaults.fusion_config_from_checkpoint()
  config.checkpoint = config_defaults.shipped_model_dir()
  config.fuse.update(dir_a=str(tmp_path / "a"), dir_b=str(tmp_path / "b"), batch_size=1,
                     output_dir=str(tmp_path / "out"), memory_budget_gb=7.0)
  summary = fuse.run(config, str(tmp_path / "w"))
  assert summary["fused"] == 1, summary["skipped_pairs"]
  assert imageio.read_image(tmp_path / "out" / "large.png").shape == (1536, 1536, 3)


def _png_bytes(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()
