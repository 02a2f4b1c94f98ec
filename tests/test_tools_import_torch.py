"""Importing the authors' checkpoints: structure read from the weights, their files as
they are, end-to-end parity with their test script, and one-line errors."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import features, imageio, inference, models
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import fusion_head as head_lib
from dmfnet_jax.models import torch_convert
from dmfnet_jax.models import unet as unet_lib
from dmfnet_jax.tools import import_torch
from conftest import REPO_ROOT, load_config

torch = pytest.importorskip("torch")

TAGS = ("MRI_t5", "MRI_t10", "MRI_t20", "Other_t5", "Other_t10", "Other_t20")


@pytest.fixture(scope="module")
def tiny_pair(parity_root):
  return parity_root / "tiny_stage1_unet.pth", parity_root / "tiny_stage2_head.pth"


@pytest.fixture(scope="module")
def published(parity_root):
  folder = parity_root / "published"
  return folder / "published_stage1_gen.pth", folder / "published_stage2_head.pth"


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
  """The published files imported with no model flag at all."""
  out = tmp_path_factory.mktemp("imported") / "model"
  return import_torch.convert(str(published[0]), str(published[1]), str(out))


def _fuse_config(checkpoint):
  config = load_config("fuse", "reference")
  config.checkpoint = str(checkpoint)
  return inference.resolve_structure(config)


def test_structure_is_read_from_the_weights(imported):
  config = _fuse_config(imported)
  assert config.model.inner_channel == 32 and config.model.norm_groups == 32
  assert tuple(config.model.channel_mults) == (1, 1, 1, 1, 2) and config.model.res_blocks == 2
  assert config.model.image_size == 160  # attention only in the middle, as released
  assert tuple(config.fusion.timesteps) == (5, 10, 20)
  assert tuple(config.fusion.feat_scales) == (2, 5, 8, 11, 14)
  params = unet_lib.abstract_params(config.model)
  assert "attn" in params["mid_0"] and not any("attn" in params[k] for k in params
                                               if k.startswith(("downs_", "ups_")))


def test_the_released_structure_is_the_reference_preset():
  assert models.param_count(unet_lib.abstract_params(load_config("stage1").model)) == 20_670_081


def test_published_test_script_end_to_end(imported, parity_root, harvard_root):
  """Their noisy UNet inputs through our feature extraction and head give their `fused`;
  our colour step gives the PNG their script writes."""
  config = _fuse_config(imported)
  unet_params, head_params = inference.load_two_stage_params(str(imported), config)
  vectors = dict(np.load(parity_root / "published" / "published_vectors.npz"))
  x = np.stack([vectors[f"{t}_x_noisy"][0].transpose(1, 2, 0) for t in TAGS])
  g = np.stack([vectors[f"{t}_noise_level"].reshape(()) for t in TAGS])
  unet = unet_lib.unet_from_config(config.model)
  head = head_lib.fusion_head_from_config(config.model, config.fusion)
  scales = list(config.fusion.feat_scales)
  feats = features.features_from_noisy(unet, unet_params, jnp.asarray(x.reshape(2, 3, 1, 256, 256, 1)),
                                       jnp.asarray(g.reshape(2, 3, 1)), scales)
  fused = head.apply({"params": head_params},
                     head_lib.order_features_coarse_to_fine(feats, scales))
  want = vectors["fused"][0, 0]
  np.testing.assert_allclose(np.asarray(fused)[0, ..., 0], want, atol=1e-4)
  pet = imageio.read_image(harvard_root / "MRI-PET" / "test" / "PET" / "25033.png")
  ours = imageio.colourise(imageio.from_model_range(np.asarray(fused)[0, ..., 0]), pet)
  theirs = imageio.read_image(parity_root / "published" / "published_fused.png")
  assert ours.shape == theirs.shape == (256, 256, 3)
  assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_readme_commands_import_then_fuse(published, harvard_root, tmp_path):
  """README, "Using the authors' released weights": both commands, no model flags."""
  for folder in ("MRI", "PET"):
    (tmp_path / folder).mkdir()
    shutil.copy(harvard_root / "MRI-PET" / "test" / folder / "25033.png", tmp_path / folder)
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=600)
  result = run("dmfnet_jax.tools.import_torch", f"--stage1={published[0]}",
               f"--stage2={published[1]}", "--out=runs/imported")
  assert result.returncode == 0, result.stderr[-2000:]
  result = run("dmfnet_jax.main", f"--config={REPO_ROOT / 'configs' / 'fuse.py'}:reference",
               "--config.checkpoint=runs/imported", "--config.fuse.dir_a=MRI",
               "--config.fuse.dir_b=PET", "--workdir=runs/fuse")
  assert result.returncode == 0, result.stderr[-2000:]
  fused = imageio.read_image(tmp_path / "runs" / "fuse" / "fused" / "25033.png")
  assert fused.shape == (256, 256, 3)


def test_tiny_pair_converts_and_loads_in_fuse_and_stage2(tiny_pair, tmp_path):
  unet_pth, head_pth = tiny_pair
  out = import_torch.convert(str(unet_pth), str(head_pth), str(tmp_path / "model"), norm_groups=8)
  config = _fuse_config(out)
  assert config.model.image_size == 64 and config.model.norm_groups == 8  # attention at 16x16
  model = inference.load_fusion_model(config)
  expected_unet = torch_convert.unet_params_from_torch(
      torch_convert.load_torch_state_dict(unet_pth), config.model)
  expected_head = torch_convert.head_params_from_torch(
      torch_convert.load_torch_state_dict(head_pth), config.model, config.fusion)
  for got, want in ((model.unet_params, expected_unet), (model.head_params, expected_head)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # Stage I alone serves as Stage II's starting point, with no model flags either.
  unet_only = import_torch.convert(str(unet_pth), None, str(tmp_path / "unet"), norm_groups=8)
  stage2 = load_config("stage2", "tiny")
  stage2.stage1_checkpoint = str(unet_only)
  stage2 = inference.resolve_structure(stage2)
  jax.tree.map(np.testing.assert_array_equal,
               inference.load_unet_params(str(unet_only), stage2.model), expected_unet)


def test_a_contradicting_config_names_the_key_and_both_values(published, tmp_path):
  config = load_config("fuse", "reference")
  config.model.inner_channel = 128
  with pytest.raises(CheckpointError, match=r"model.inner_channel: checkpoint 32 vs config 128"):
    import_torch.convert(str(published[0]), None, str(tmp_path / "a"), config=config)
  imported = import_torch.convert(str(published[0]), str(published[1]), str(tmp_path / "b"))
  config = load_config("fuse", "reference")
  config.checkpoint = str(imported)
  config.model.image_size = 256  # attention at 16x16: not the released structure
  with pytest.raises(CheckpointError, match="attention_levels"):
    inference.resolve_structure(config)
  config = load_config("fuse", "reference")
  config.checkpoint = str(imported)
  config.model.image_size = 640  # the authors' test config: the same structure
  assert inference.resolve_structure(config).model.image_size == 640
  assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- their files


def _save(tmp_path, name, obj):
  path = tmp_path / name
  torch.save(obj, path)
  return path


def _tensors(state_dict):
  return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def published_state(published):
  return (torch_convert.load_torch_state_dict(published[0]),
          torch_convert.load_torch_state_dict(published[1]))


@pytest.mark.parametrize("layout", ["data_parallel", "wrapped", "bare_unet"])
def test_their_layouts_are_accepted(layout, published_state, tmp_path):
  unet_sd, head_sd = published_state
  if layout == "data_parallel":
    unet = {f"module.{k}": v for k, v in _tensors(unet_sd).items()}
    head = {f"module.{k}": v for k, v in _tensors(head_sd).items()}
  elif layout == "wrapped":
    unet, head = {"state_dict": _tensors(unet_sd), "epoch": 3}, {"model": _tensors(head_sd)}
  else:
    unet = {k[len("denoise_fn."):]: v for k, v in _tensors(unet_sd).items()
            if k.startswith("denoise_fn.")}
    head = _tensors(head_sd)
  out = import_torch.convert(str(_save(tmp_path, "u.pth", unet)),
                             str(_save(tmp_path, "h.pth", head)), str(tmp_path / "m"))
  assert _fuse_config(out).model.inner_channel == 32


def _assert_refused(tmp_path, match, stage1, stage2=None):
  out = tmp_path / "out"
  with pytest.raises(CheckpointError, match=match):
    import_torch.convert(str(stage1), None if stage2 is None else str(stage2), str(out))
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_optimizer_file_is_named_as_such(published_state, tmp_path):
  opt = {"epoch": 14000, "iter": 630000, "scheduler": None,
         "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}}
  _assert_refused(tmp_path, "optimizer state", _save(tmp_path, "I630000_E14000_opt.pth", opt))


def test_truncated_and_foreign_files(published, tmp_path):
  data = published[0].read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) // 2])
  _assert_refused(tmp_path, "truncated.pth: cannot read it", truncated)
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint\n")
  _assert_refused(tmp_path, "notes.pth: cannot read it", text)
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  _assert_refused(tmp_path, "empty.pth: empty file", empty)
  _assert_refused(tmp_path, "checkpoint file does not exist", tmp_path / "absent.pth")
  _assert_refused(tmp_path, "is a folder, not a PyTorch checkpoint", tmp_path)


def test_pickled_code_is_never_run(tmp_path):
  class Payload:  # pylint: disable=too-few-public-methods
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'ran'}",))

  path = tmp_path / "evil.pth"
  torch.save({"init_conv.weight": torch.zeros(1), "x": Payload()}, path)
  _assert_refused(tmp_path, "pickled Python objects", path)
  assert not (tmp_path / "ran").exists()


def test_another_architecture_is_named(tmp_path):
  resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
            "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(10, 512)}
  _assert_refused(tmp_path, "not a DM-FNet Stage I UNet.*conv1.weight",
                  _save(tmp_path, "resnet.pth", resnet))
  random = {"a.weight": torch.randn(3, 3), "b.bias": torch.randn(3)}
  _assert_refused(tmp_path, "not a DM-FNet Stage I UNet", _save(tmp_path, "random.pth", random))


def test_swapped_files_are_named(published, tmp_path):
  _assert_refused(tmp_path, "is a Stage II fusion head.*swapped", published[1], published[0])


def test_a_head_of_another_model_is_named(published, published_state, tmp_path):
  unet_sd, head_sd = published_state
  narrow = {k: v[:16] if k.startswith("decoder.0.block.2") else v for k, v in head_sd.items()}
  _assert_refused(tmp_path, "level widths .* do not match the UNet",
                  published[0], _save(tmp_path, "narrow.pth", _tensors(narrow)))
  two_steps = dict(head_sd)
  two_steps["decoder.0.block.0.weight"] = head_sd["decoder.0.block.0.weight"][:, :128]
  _assert_refused(tmp_path, "trained on 2 timestep", published[0],
                  _save(tmp_path, "two.pth", _tensors(two_steps)))
  fewer_levels = {k: v for k, v in head_sd.items() if not k.startswith(("decoder.8.", "decoder.9."))}
  _assert_refused(tmp_path, "head has 4 levels but the UNet has 5", published[0],
                  _save(tmp_path, "four.pth", _tensors(fewer_levels)))
  del unet_sd


def test_a_non_empty_output_is_left_alone(published, tmp_path):
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "file").write_text("x")
  with pytest.raises(CheckpointError, match="not an empty folder"):
    import_torch.convert(str(published[0]), str(published[1]), str(busy))
  assert [p.name for p in busy.iterdir()] == ["file"]


def test_command_line_errors_are_one_line(published, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dmfnet_jax.tools.import_torch", f"--stage1={published[1]}",
       f"--stage2={published[0]}", f"--out={tmp_path / 'n'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "swapped" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "n").exists()
