"""Reference checkpoint reading and key/layout conversion of the Stage I UNet."""

import sys

import jax
import numpy as np
import pytest

from dmfnet_jax import models
from dmfnet_jax.models import torch_convert
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import unet as unet_lib

TINY = dict(inner_channel=32, norm_groups=8, image_size=64)
MINI = dict(inner_channel=8, norm_groups=4, channel_mults=(1, 2), attn_res=(8,),
            res_blocks=1, image_size=16)


def fake_state_dict(model_cfg, seed=0):
  """A reference-layout state_dict (OIHW convs, (out, in) linears) for `model_cfg`."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  flat = jax.tree_util.tree_flatten_with_path(unet_lib.abstract_params(model_cfg))[0]
  for path, leaf in flat:
    names = tuple(p.key for p in path)
    # pylint: disable-next=protected-access
    shape = torch_convert._flax_to_torch_shape(names[-1], leaf.shape)
    state_dict[torch_convert.unet_torch_key(names)] = rng.standard_normal(shape).astype(np.float32)
  return state_dict


def test_torch_key_mapping():
  assert torch_convert.unet_torch_key(("noise_level_mlp", "dense_in", "kernel")) == "noise_level_mlp.1.weight"
  assert torch_convert.unet_torch_key(("noise_level_mlp", "dense_out", "bias")) == "noise_level_mlp.3.bias"
  assert torch_convert.unet_torch_key(("init_conv", "kernel")) == "init_conv.weight"
  assert (torch_convert.unet_torch_key(("downs_12", "res_block", "block1", "norm", "scale"))
          == "downs.12.res_block.block1.block.0.weight")
  assert (torch_convert.unet_torch_key(("ups_4", "res_block", "block2", "conv", "kernel"))
          == "ups.4.res_block.block2.block.3.weight")
  assert (torch_convert.unet_torch_key(("mid_0", "res_block", "noise_func", "kernel"))
          == "mid.0.res_block.noise_func.noise_func.0.weight")
  assert torch_convert.unet_torch_key(("downs_6", "attn", "qkv", "kernel")) == "downs.6.attn.qkv.weight"
  assert torch_convert.unet_torch_key(("ups_3", "conv", "bias")) == "ups.3.conv.bias"
  assert torch_convert.unet_torch_key(("final_conv", "conv", "kernel")) == "final_conv.block.3.weight"


def test_layouts_are_transposed():
  state_dict = fake_state_dict(MINI)
  params = torch_convert.unet_params_from_torch(state_dict, MINI)
  np.testing.assert_array_equal(params["init_conv"]["kernel"],
                                state_dict["init_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["noise_level_mlp"]["dense_in"]["kernel"],
                                state_dict["noise_level_mlp.1.weight"].T)
  np.testing.assert_array_equal(params["final_conv"]["norm"]["scale"],
                                state_dict["final_conv.block.0.weight"])


def test_prefixed_keys_and_schedule_buffers():
  state_dict = fake_state_dict(MINI)
  wrapped = {f"denoise_fn.{k}": v for k, v in state_dict.items()}
  for buffer in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped"):
    wrapped[buffer] = np.zeros((8,), np.float32)
  bare = torch_convert.unet_params_from_torch(state_dict, MINI)
  prefixed = torch_convert.unet_params_from_torch(wrapped, MINI)
  jax.tree_util.tree_map(np.testing.assert_array_equal, bare, prefixed)


def test_missing_key_is_named():
  state_dict = fake_state_dict(MINI)
  del state_dict["downs.0.res_block.block2.block.3.bias"]
  with pytest.raises(CheckpointError,
                     match=r"lacks key 'downs\.0\.res_block\.block2\.block\.3\.bias'"):
    torch_convert.unet_params_from_torch(state_dict, MINI)


def test_unexpected_key_is_named():
  state_dict = fake_state_dict(MINI)
  state_dict["downs.0.attn.qkv.weight"] = np.zeros((24, 8, 1, 1), np.float32)
  with pytest.raises(CheckpointError, match=r"unexpected key 'downs\.0\.attn\.qkv\.weight'"):
    torch_convert.unet_params_from_torch(state_dict, MINI)


def test_checkpoint_of_another_config_is_rejected():
  state_dict = fake_state_dict(MINI)
  other = dict(MINI, inner_channel=16)
  with pytest.raises(CheckpointError, match=(r"'downs\.0\.res_block\.block1\.block\.3\.bias' "
                                             r"has shape \(8,\).*expects \(16,\)")):
    torch_convert.unet_params_from_torch(state_dict, other)


def test_load_reports_missing_and_corrupt_files(tmp_path):
  pytest.importorskip("torch")
  with pytest.raises(CheckpointError, match="does not exist"):
    torch_convert.load_torch_state_dict(tmp_path / "absent.pth")
  corrupt = tmp_path / "corrupt.pth"
  corrupt.write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="corrupt.pth: cannot read it"):
    torch_convert.load_torch_state_dict(corrupt)


def test_load_unwraps_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "wrapped.pth"
  torch.save({"state_dict": {"a.weight": torch.ones(2, 3)}, "epoch": 3}, path)
  loaded = torch_convert.load_torch_state_dict(path)
  assert list(loaded) == ["a.weight"] and loaded["a.weight"].shape == (2, 3)
  assert isinstance(loaded["a.weight"], np.ndarray)


def test_load_without_torch_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(CheckpointError, match=r"dmfnet-jax\[torch\]"):
    torch_convert.load_torch_state_dict(tmp_path / "x.pth")


def test_tiny_reference_checkpoint_converts(parity_root):
  pytest.importorskip("torch")
  state_dict = torch_convert.load_torch_state_dict(parity_root / "tiny_stage1_unet.pth")
  params = torch_convert.unet_params_from_torch(state_dict, TINY)
  assert models.param_count(params) == sum(v.size for v in state_dict.values())
  with pytest.raises(CheckpointError, match="another model config"):
    torch_convert.unet_params_from_torch(state_dict, None)  # default config: 128 channels
