"""Stage II fusion head: structure, parameter count, checkpoint import and parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import config_defaults, models
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.models import fusion_head as fh
from dmfnet_jax.models import torch_convert

FEAT_SCALES = [2, 5, 8, 11, 14]
TIMESTEPS = (5, 10, 20)
# A small head: 3 levels (4, 8, 16 px), 16 -> 8 -> 8 channels.
SMALL_DIMS = (16, 8, 8)


def _small_features(key, num_timesteps=3, batch=2, dims=SMALL_DIMS):
  keys = jax.random.split(key, len(dims))
  return [
      jax.random.normal(k, (2, num_timesteps, batch, 4 * 2**i, 4 * 2**i, d))
      for i, (k, d) in enumerate(zip(keys, dims))
  ]


def _to_state_dict(params, num_levels):
  """Our params back to a reference-layout state_dict (for checkpoint tests without torch)."""
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(p.key for p in path)
    value = np.asarray(leaf)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    state[torch_convert.head_torch_key(names, num_levels)] = value
  return state


def _tiny_cfgs(timesteps=TIMESTEPS):
  fusion = config_defaults.fusion_config()
  fusion.timesteps = list(timesteps)
  return config_defaults.model_config("tiny"), fusion


def test_param_count_at_reference_defaults():
  head = fh.fusion_head_from_config(config_defaults.model_config(),
                                    config_defaults.fusion_config())
  assert tuple(head.dims) == (256, 128, 128, 128, 128)
  assert models.param_count(fh.abstract_head_params(head)) == 3_026_640


def test_level_dims_sorts_scales_coarse_to_fine():
  model = config_defaults.model_config("tiny")
  assert fh.level_dims(model, [2, 5, 8, 11, 14]) == [64, 32, 32, 32, 32]
  assert fh.level_dims(model, [14, 2]) == fh.level_dims(model, [2, 14])


def test_upsample_matches_align_corners_formula():
  x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 3, 5, 2) ** 1.5
  out = np.asarray(fh.upsample2x_bilinear_align_corners(jnp.asarray(x)))
  assert out.shape == (1, 6, 10, 2)

  def interp_1d(n, size_out):
    mat = np.zeros((size_out, n))
    for o in range(size_out):
      c = o * (n - 1) / (size_out - 1)
      lo = min(int(np.floor(c)), n - 1)
      hi = min(lo + 1, n - 1)
      mat[o, lo] += 1 - (c - lo)
      mat[o, hi] += c - lo
    return mat

  want = np.einsum("oh,pw,bhwc->bopc", interp_1d(3, 6), interp_1d(5, 10), x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Corners coincide with the input's (align_corners=True).
  np.testing.assert_allclose(out[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]],
                             rtol=1e-6)


def test_a_tile_upsamples_as_the_whole_map_does():
  """align_corners maps output to input by the map's size, so a tile passes where it lies:
  away from its edges it then gets exactly the whole map's upsampling (tiled fusion)."""
  x = np.random.default_rng(1).normal(size=(1, 32, 24, 3)).astype(np.float32)
  whole = np.asarray(fh.upsample2x_bilinear_align_corners(jnp.asarray(x)))
  for top, left in [(0, 0), (13, 5), (12, 9)]:
    crop = jnp.asarray(x[:, top:top + 19, left:left + 15])
    tile = np.asarray(jax.jit(fh.upsample2x_bilinear_align_corners, static_argnums=2)(
        crop, jnp.asarray([top, left]), (32, 24)))
    inner = tile[:, 2:-2, 2:-2]
    np.testing.assert_allclose(  # to float rounding (jit fuses the multiply-adds)
        inner, whole[:, 2 * top + 2:2 * (top + 19) - 2, 2 * left + 2:2 * (left + 15) - 2],
        atol=1e-6)
    naive = np.asarray(fh.upsample2x_bilinear_align_corners(crop))[:, 2:-2, 2:-2]
    assert np.abs(naive - inner).max() > 0.05  # what a tile on its own would compute


def test_upsample_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 7)).astype(np.float32)  # NCHW
  want = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear",
                                         align_corners=True).numpy()
  got = fh.upsample2x_bilinear_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-6)


def test_forward_shape_range_and_init():
  head = fh.FusionHead(dims=SMALL_DIMS, num_timesteps=3)
  features = _small_features(jax.random.PRNGKey(0))
  params = jax.jit(head.init)(jax.random.PRNGKey(1), features)["params"]
  out = jax.jit(head.apply)({"params": params}, features)
  assert out.shape == (2, 16, 16, 1) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.abs(out) <= 1.0))
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path[-1].key == "bias":
      assert not np.any(np.asarray(leaf)), path
  # Orthogonal kernels (gain 1): (kh*kw*in, out) has orthonormal columns here.
  kernel = np.asarray(params["level0_aggregate"]["conv0"]["conv"]["kernel"]).reshape(-1, 16)
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(16), atol=1e-5)
  # Level 0 and 1 have no block1 (as the reference); the grouped conv has 2 inputs per group.
  assert "level1_block1" not in params and "level2_block1" in params
  assert params["level0_attention"]["pa"]["conv"]["kernel"].shape == (3, 3, 2, 16)


def test_output_layer_takes_finest_dims():
  """The reference hard-codes 128 input channels; we use dims[-1] (here 8)."""
  head = fh.FusionHead(dims=SMALL_DIMS, num_timesteps=1)
  shapes = fh.abstract_head_params(head)
  assert shapes["out_conv0"]["conv"]["kernel"].shape == (3, 3, 8, 64)
  assert shapes["out_conv1"]["conv"]["kernel"].shape == (3, 3, 64, 1)


def test_single_timestep_skips_aggregation_by_default():
  features = _small_features(jax.random.PRNGKey(0), num_timesteps=1)
  quirky = fh.FusionHead(dims=SMALL_DIMS, num_timesteps=1)
  fixed = fh.FusionHead(dims=SMALL_DIMS, num_timesteps=1,
                        skip_aggregation_for_single_timestep=False)
  params = jax.jit(quirky.init)(jax.random.PRNGKey(1), features)["params"]
  # The aggregation weights exist either way (checkpoint keys stay the same).
  assert "level0_aggregate" in params
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["level0_aggregate"] = jax.tree_util.tree_map(lambda x: x + 0.5,
                                                       params["level0_aggregate"])
  apply_quirky, apply_fixed = jax.jit(quirky.apply), jax.jit(fixed.apply)
  out = apply_quirky({"params": params}, features)
  np.testing.assert_array_equal(out, apply_quirky({"params": changed}, features))
  assert not np.allclose(apply_fixed({"params": params}, features),
                         apply_fixed({"params": changed}, features))


def test_torch_state_dict_round_trip():
  model, fusion = _tiny_cfgs()
  head = fh.fusion_head_from_config(model, fusion)
  params = fh.init_head_params(head, jax.random.PRNGKey(3))
  state = _to_state_dict(params, len(head.dims))
  assert "decoder.5.block1.0.weight" in state and "rgb_decode2.conv.bias" in state
  assert state["decoder.1.att.pa.pa2.weight"].shape == (64, 2, 3, 3)
  back = torch_convert.head_params_from_torch(state, model, fusion)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_checkpoint_errors_name_the_key():
  model, fusion = _tiny_cfgs()
  head = fh.fusion_head_from_config(model, fusion)
  state = _to_state_dict(fh.init_head_params(head, jax.random.PRNGKey(0)), len(head.dims))

  missing = dict(state)
  del missing["decoder.7.att.ca.ca.2.bias"]
  with pytest.raises(CheckpointError, match=r"decoder\.7\.att\.ca\.ca\.2\.bias"):
    torch_convert.head_params_from_torch(missing, model, fusion)

  extra = dict(state, **{"decoder.1.att.conv.weight": np.zeros((3,), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected key 'decoder\.1\.att\.conv\.weight'"):
    torch_convert.head_params_from_torch(extra, model, fusion)

  misshaped = dict(state, **{"rgb_decode2.conv.weight": np.zeros((64, 128, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match=r"rgb_decode2\.conv\.weight.*\(64, 128, 3, 3\)"):
    torch_convert.head_params_from_torch(misshaped, model, fusion)


def test_checkpoint_with_other_timestep_count_is_named():
  model, fusion = _tiny_cfgs()
  head = fh.fusion_head_from_config(model, fusion)
  state = _to_state_dict(fh.init_head_params(head, jax.random.PRNGKey(0)), len(head.dims))
  _, fusion_two = _tiny_cfgs(timesteps=(5, 10))
  with pytest.raises(CheckpointError, match=r"trained with 3 timestep.*fusion\.timesteps has 2"):
    torch_convert.head_params_from_torch(state, model, fusion_two)


def test_head_parity_with_reference(parity_root):
  pytest.importorskip("torch")
  
  model, fusion = _tiny_cfgs()
  head = fh.fusion_head_from_config(model, fusion)
  params = torch_convert.head_params_from_torch(
      torch_convert.load_torch_state_dict(parity_root / "tiny_stage2_head.pth"), model, fusion)
  vectors = np.load(parity_root / "tiny_vectors.npz")
  features = [
      np.stack([
          np.stack([vectors[f"{src}_t{t}_dec_{s}"].transpose(0, 2, 3, 1) for t in TIMESTEPS])
          for src in ("MRI", "Other")
      ]) for s in FEAT_SCALES
  ]
  fused = jax.jit(head.apply)({"params": params},
                              fh.order_features_coarse_to_fine(features, FEAT_SCALES))
  want = vectors["fused"].transpose(0, 2, 3, 1)
  assert np.max(np.abs(np.asarray(fused) - want)) < 1e-4
