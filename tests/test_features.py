"""Stage II feature extraction: one stacked UNet call, noise levels, padding, fusion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import config_defaults, diffusion, features, validation
from dmfnet_jax.models import fusion_head as fh
from dmfnet_jax.models import torch_convert
from dmfnet_jax.models import unet as unet_lib

TIMESTEPS = (5, 10, 20)
# A 2-level UNet small enough to compile in seconds; its decoder list has 6 entries.
SMALL_MODEL = dict(inner_channel=8, norm_groups=4, channel_mults=(1, 2), attn_res=(8,),
                   res_blocks=2, image_size=16, dropout=0.2)
SMALL_SCALES = (2, 5)


@pytest.fixture(scope="module")
def small_unet():
  unet = unet_lib.unet_from_config(SMALL_MODEL)
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)),
                              jnp.ones((1,)))["params"]
  return unet, params


@pytest.fixture(scope="module")
def sqrt_acp_prev():
  return diffusion.make_schedule("linear", 2000, 1e-6, 1e-2).sqrt_alphas_cumprod_prev


def _sources(key, batch=2, size=16):
  ka, kb = jax.random.split(key)
  return (jnp.tanh(jax.random.normal(ka, (batch, size, size, 1))),
          jnp.tanh(jax.random.normal(kb, (batch, size, size, 1))))


def test_noisy_inputs_levels_and_determinism(sqrt_acp_prev):
  a, b = _sources(jax.random.PRNGKey(1))
  noisy = jax.jit(features.noisy_inputs, static_argnums=4)
  x_t, g = noisy(a, b, jax.random.PRNGKey(2), sqrt_acp_prev, TIMESTEPS)
  assert x_t.shape == (2, 3, 2, 16, 16, 1) and g.shape == (2, 3, 2)
  for j, t in enumerate(TIMESTEPS):
    lo, hi = sqrt_acp_prev[t], sqrt_acp_prev[t - 1]
    assert np.all((np.asarray(g[:, j]) >= lo - 1e-7) & (np.asarray(g[:, j]) <= hi + 1e-7))
  # Per-sample draws, not one per batch.
  assert len(np.unique(np.asarray(g[:, 0]))) == 4
  # Source 0 is `a`: x_t stays close to g*a at these tiny noise levels.
  residual = x_t[0] - g[0][..., None, None, None] * a[None]
  assert float(jnp.max(jnp.abs(residual))) < 10 * float(np.sqrt(1 - sqrt_acp_prev[20]**2))
  x_t2, g2 = noisy(a, b, jax.random.PRNGKey(2), sqrt_acp_prev, TIMESTEPS)
  np.testing.assert_array_equal(x_t, x_t2)
  np.testing.assert_array_equal(g, g2)
  x_t3, _ = noisy(a, b, jax.random.PRNGKey(3), sqrt_acp_prev, TIMESTEPS)
  assert not np.allclose(x_t, x_t3)


def test_features_match_full_unet_features(small_unet):
  unet, params = small_unet
  x_t = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 1, 16, 16, 1))
  g = jax.random.uniform(jax.random.PRNGKey(5), (2, 3, 1), minval=0.9, maxval=1.0)
  got = jax.jit(features.features_from_noisy, static_argnums=(0, 4))(
      unet, params, x_t, g, SMALL_SCALES)
  _, dec, _ = jax.jit(functools.partial(unet.apply, return_features=True))(
      {"params": params}, x_t.reshape(6, 16, 16, 1), g.reshape(6))
  for scale, feature in zip(SMALL_SCALES, got):
    assert feature.shape == (2, 3, 1) + dec[scale].shape[1:]
    np.testing.assert_allclose(feature.reshape(dec[scale].shape), dec[scale], atol=1e-6)


def test_extract_features_skips_the_tail_of_the_unet(small_unet, sqrt_acp_prev):
  """One stacked call that never runs the blocks after the last feature nor final_conv."""
  unet, params = small_unet
  a, b = _sources(jax.random.PRNGKey(6), batch=1)
  extract = jax.jit(features.extract_features, static_argnums=(0, 6, 7))
  lowered = extract.lower(unet, params, a, b, jax.random.PRNGKey(0), sqrt_acp_prev, TIMESTEPS,
                          SMALL_SCALES)
  stacked = jnp.zeros((2 * len(TIMESTEPS), 16, 16, 1))
  full = jax.jit(unet.apply).lower({"params": params}, stacked, jnp.ones((6,)))

  def flops(lowered):
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  assert flops(lowered) < flops(full)
  # Op locations name the flax modules: the full-resolution blocks after the first
  # one at level 0 (ups_5, ups_6) and final_conv are absent.
  text, full_text = lowered.as_text(debug_info=True), full.as_text(debug_info=True)
  assert "final_conv" in full_text and "ups_6" in full_text
  assert "final_conv" not in text and "ups_5" not in text and "ups_6" not in text
  assert "ups_4" in text
  out = extract(unet, params, a, b, jax.random.PRNGKey(0), sqrt_acp_prev, TIMESTEPS, SMALL_SCALES)
  assert [f.shape for f in out] == [(2, 3, 1, 16, 16, 8), (2, 3, 1, 8, 8, 16)]


def test_fuse_images_jitted(small_unet, sqrt_acp_prev):
  unet, unet_params = small_unet
  fusion = config_defaults.fusion_config()
  fusion.feat_scales = list(SMALL_SCALES)
  head = fh.fusion_head_from_config(SMALL_MODEL, fusion)
  assert tuple(head.dims) == (16, 8)
  head_params = fh.init_head_params(head, jax.random.PRNGKey(1), coarsest=8)
  a, b = _sources(jax.random.PRNGKey(7))
  fuse = jax.jit(features.fuse_images, static_argnums=(0, 2, 8, 9))
  args = (unet, unet_params, head, head_params, a, b, jax.random.PRNGKey(8), sqrt_acp_prev,
          TIMESTEPS, SMALL_SCALES)
  fused = fuse(*args)
  assert fused.shape == (2, 16, 16, 1)
  assert bool(jnp.all(jnp.abs(fused) <= 1.0))
  np.testing.assert_array_equal(fused, fuse(*args))


@pytest.mark.parametrize("height, width, want", [
    (50, 70, (64, 80)),
    (100, 130, (112, 144)),
    (64, 160, (64, 160)),
    (17, 64, (64, 64)),
])
def test_pad_to_valid_and_crop_back(height, width, want):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, height, width, 1))
  padded, crop = features.pad_to_valid(x, levels=5)
  assert padded.shape[1:3] == want
  np.testing.assert_array_equal(features.crop_back(padded, crop), x)
  top, left = crop[0], crop[1]
  if top:  # reflect, not edge: the row above the image mirrors row 1
    np.testing.assert_array_equal(padded[:, top - 1, left:left + width], x[:, 1])


def test_pad_to_valid_under_jit_and_small_levels():
  x = jnp.ones((1, 20, 30, 1))
  padded = jax.jit(lambda x: features.pad_to_valid(x, 3)[0])(x)
  assert padded.shape == (1, 20, 32, 1)  # multiple of 4, coarsest >= 4 px (>= 16)
  assert validation.valid_fusion_side(5, 3) == 16


def test_end_to_end_parity_from_reference_noisy_inputs(parity_root):
  """Reference noisy inputs -> our UNet features -> our head == the reference `fused`."""
  pytest.importorskip("torch")
  
  model = config_defaults.model_config("tiny")
  fusion = config_defaults.fusion_config()
  unet = unet_lib.unet_from_config(model)
  unet_params = torch_convert.unet_params_from_torch(
      torch_convert.load_torch_state_dict(parity_root / "tiny_stage1_unet.pth"), model)
  head = fh.fusion_head_from_config(model, fusion)
  head_params = torch_convert.head_params_from_torch(
      torch_convert.load_torch_state_dict(parity_root / "tiny_stage2_head.pth"), model, fusion)
  vectors = np.load(parity_root / "tiny_vectors.npz")
  tags = [[f"{src}_t{t}" for t in TIMESTEPS] for src in ("MRI", "Other")]
  x_t = np.stack([np.stack([vectors[f"{tag}_x_noisy"].transpose(0, 2, 3, 1) for tag in row])
                  for row in tags])
  g = np.stack([np.stack([vectors[f"{tag}_noise_level"].reshape(1) for tag in row])
                for row in tags])
  scales = tuple(fusion.feat_scales)

  @jax.jit
  def fuse(unet_params, head_params, x_t, g):
    feats = features.features_from_noisy(unet, unet_params, x_t, g, scales)
    return head.apply({"params": head_params}, fh.order_features_coarse_to_fine(feats, scales))

  fused = fuse(unet_params, head_params, jnp.asarray(x_t), jnp.asarray(g))
  want = vectors["fused"].transpose(0, 2, 3, 1)
  assert np.max(np.abs(np.asarray(fused) - want)) < 1e-4
