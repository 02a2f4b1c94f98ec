"""Stage I UNet: structure, the reference quirks, and numerical parity with PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import config_defaults, models
from dmfnet_jax.models import torch_convert
from dmfnet_jax.models import unet as unet_lib

TINY = dict(inner_channel=32, norm_groups=8, image_size=64)
# A very small model for behaviour tests that need real parameters.
MINI = dict(inner_channel=8, norm_groups=4, channel_mults=(1, 2), attn_res=(8,),
            res_blocks=1, image_size=16)
PARITY_TAGS = ("MRI_t5", "MRI_t10", "MRI_t20", "Other_t5", "Other_t10", "Other_t20")
FEAT_SCALES = [2, 5, 8, 11, 14]


def test_parameter_count_at_reference_defaults():
  # The released model (image_size 160 in training, 640 in testing): no level matches
  # attn_res, only the middle block attends. image_size 256 makes the attention quirk
  # fire at the lowest level too (256 halves to 16 at level 4).
  assert models.param_count(unet_lib.abstract_params(None)) == 20_670_081
  cfg = config_defaults.model_config("reference")
  assert models.param_count(unet_lib.abstract_params(cfg)) == 20_670_081
  assert models.param_count(unet_lib.abstract_params(dict(image_size=640))) == 20_670_081
  assert models.param_count(unet_lib.abstract_params(dict(image_size=256))) == 21_984_641
  assert models.param_count(unet_lib.abstract_params(TINY)) == 1_320_833


def test_params_are_float32_even_with_bf16_compute():
  model = unet_lib.unet_from_config(TINY, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)),
                          jnp.zeros((1,)))
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_attention_follows_image_size_quirk():
  def attention_layers(cfg):
    downs, ups = unet_lib.UNet(**unet_lib.unet_kwargs(cfg)).layout()
    return ([i for i, l in enumerate(downs) if l.with_attn],
            [i for i, l in enumerate(ups) if l.with_attn])

  assert attention_layers(dict(image_size=160)) == ([], [])  # 160, 80, 40, 20, 10: never 16
  assert attention_layers(None) == ([], [])  # the released structure
  assert attention_layers(dict(image_size=256)) == ([12, 13], [0, 1, 2])  # 16 at level 4
  assert attention_layers(TINY) == ([6, 7], [8, 9, 10])  # level 2 of 64 is 16
  params = unet_lib.abstract_params(None)
  assert "attn" in params["mid_0"] and "attn" not in params["mid_1"]


def test_decoder_channels():
  assert unet_lib.decoder_channels(TINY) == [32] * 12 + [64] * 3
  assert unet_lib.decoder_channels(None) == [128] * 12 + [256] * 3


def test_downsample_pads_one_on_every_side():
  # XLA "SAME" would pad a 4x4 input only at the end when striding by 2.
  layer = unet_lib.Downsample(1)
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 1)), "bias": jnp.zeros((1,))}}
  out = layer.apply({"params": params}, jnp.ones((1, 4, 4, 1)))
  np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def random_params(model_cfg, seed=0):
  """Cheap stand-in for model.init (orthogonal init compiles a QR per kernel shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1.0)
                ).astype(np.float32),
      unet_lib.abstract_params(model_cfg))


def test_init_is_orthogonal_with_zero_bias():
  params = unet_lib.Downsample(4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)))
  kernel = np.asarray(params["params"]["conv"]["kernel"]).reshape(36, 4)
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(4), atol=1e-5)
  assert not np.any(np.asarray(params["params"]["conv"]["bias"]))


def test_mini_model_modes_dropout_and_bf16():
  model = unet_lib.unet_from_config(MINI)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1), minval=-1, maxval=1)
  g = jnp.array([0.3, 0.9])
  params = random_params(MINI)

  @jax.jit
  def run(params, key):
    eval_out = model.apply({"params": params}, x, g)
    train_out = model.apply({"params": params}, x, g, train=True, rngs={"dropout": key})
    bf16_out = model.clone(dtype=jnp.bfloat16).apply({"params": params}, x, g)
    return eval_out, train_out, bf16_out

  eval_out, train_a, bf16_out = run(params, jax.random.PRNGKey(2))
  _, train_b, _ = run(params, jax.random.PRNGKey(3))
  assert eval_out.shape == (2, 16, 16, 1) and bf16_out.dtype == jnp.float32
  assert not np.allclose(train_a, train_b)  # dropout is live and keyed
  assert not np.allclose(train_a, eval_out)
  scale = float(jnp.max(jnp.abs(eval_out)))
  assert float(jnp.max(jnp.abs(bf16_out - eval_out))) < 0.05 * scale + 1e-3


def test_rejects_bad_decoder_indices():
  model = unet_lib.unet_from_config(MINI)
  x, g = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,))
  with pytest.raises(ValueError, match="decoder_feature_indices"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, g,
                                      decoder_feature_indices=[6]))


def test_the_three_parts_compose_to_the_whole_network():
  """Tiled fusion runs the UNet as fine_down -> coarse -> fine_up around a level: the
  same decoder features as one call (TINY attends at level 2, inside the coarse part)."""
  model = unet_lib.unet_from_config(TINY)
  params = random_params(TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 1), minval=-1, maxval=1)
  g = jnp.array([0.3, 0.9])
  assert unet_lib.validation.attention_levels((1, 1, 1, 1, 2), (16,), 64) == ((2,), (2,))

  @jax.jit
  def run(params):
    whole = model.apply({"params": params}, x, g, decoder_feature_indices=FEAT_SCALES)
    h = model.apply({"params": params}, x, g, part="fine_down", split_level=2)
    coarse = model.apply({"params": params}, h, g, part="coarse", split_level=2)
    parts = model.apply({"params": params}, x, g, part="fine_up", split_level=2,
                        coarse_out=coarse, decoder_feature_indices=FEAT_SCALES)
    return whole, parts, h.shape, len(coarse[1])

  whole, parts, h_shape, coarse_blocks = run(params)
  assert h_shape == (2, 8, 8, 32) and coarse_blocks == 9  # levels 2-4, 3 blocks each
  for a, b in zip(whole, parts):
    np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="split_level"):
    model.apply({"params": params}, x, g, part="fine_down", split_level=5)
  with pytest.raises(ValueError, match="coarse_out"):
    model.apply({"params": params}, x, g, part="fine_up", split_level=2)


@pytest.mark.parametrize("chunk", [5, 12, 48])
def test_attention_in_query_chunks_is_the_same_attention(chunk):
  """Chunks that do not divide the 48 positions are filled up and cut back."""
  layer = unet_lib.SelfAttention(4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 16))
  params = layer.init(jax.random.PRNGKey(1), x)
  whole = layer.apply(params, x)
  chunked = layer.clone(query_chunk=chunk).apply(params, x)
  np.testing.assert_allclose(chunked, whole, atol=1e-5)


@pytest.fixture(scope="module")
def parity(parity_root):
  pytest.importorskip("torch")
  state_dict = torch_convert.load_torch_state_dict(parity_root / "tiny_stage1_unet.pth")
  params = torch_convert.unet_params_from_torch(state_dict, TINY)
  with np.load(parity_root / "tiny_vectors.npz") as vectors:
    vectors = dict(vectors)
  x = np.concatenate([vectors[f"{tag}_x_noisy"] for tag in PARITY_TAGS]).transpose(0, 2, 3, 1)
  g = np.concatenate([vectors[f"{tag}_noise_level"] for tag in PARITY_TAGS]).reshape(-1)
  return params, vectors, jnp.asarray(x), jnp.asarray(g)


def _nchw(a):
  return np.asarray(a, np.float32).transpose(0, 3, 1, 2)


def test_parity_with_reference(parity):
  params, vectors, x, g = parity
  model = unet_lib.unet_from_config(TINY)
  full = jax.jit(lambda p, x, g: model.apply({"params": p}, x, g, return_features=True))
  enc, dec, out = full(params, x, g)
  assert len(enc) == 15 and len(dec) == 15
  for i, tag in enumerate(PARITY_TAGS):
    for j in range(15):
      np.testing.assert_allclose(_nchw(enc[j])[i:i + 1], vectors[f"{tag}_enc_{j}"],
                                 atol=1e-4, rtol=0, err_msg=f"{tag}_enc_{j}")
      np.testing.assert_allclose(_nchw(dec[j])[i:i + 1], vectors[f"{tag}_dec_{j}"],
                                 atol=1e-4, rtol=0, err_msg=f"{tag}_dec_{j}")
    np.testing.assert_allclose(_nchw(out)[i:i + 1], vectors[f"{tag}_unet_out"],
                               atol=1e-4, rtol=0, err_msg=f"{tag}_unet_out")


def _flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def test_early_exit_matches_full_and_skips_work(parity):
  params, _, x, g = parity
  x, g = x[:2], g[:2]
  model = unet_lib.unet_from_config(TINY)
  full = jax.jit(lambda p, x, g: model.apply({"params": p}, x, g, return_features=True))
  early = jax.jit(lambda p, x, g: model.apply({"params": p}, x, g,
                                             decoder_feature_indices=FEAT_SCALES))
  full_compiled = full.lower(params, x, g).compile()
  early_compiled = early.lower(params, x, g).compile()
  _, dec, _ = full_compiled(params, x, g)
  feats = early_compiled(params, x, g)
  assert len(feats) == len(FEAT_SCALES)
  for feat, index in zip(feats, FEAT_SCALES):
    np.testing.assert_allclose(np.asarray(feat), np.asarray(dec[index]), atol=1e-6, rtol=0)
  # The skipped tail is two full-resolution resnet blocks plus final_conv: with these
  # sizes that is well over 10% of the network's arithmetic.
  assert _flops(early_compiled) < 0.9 * _flops(full_compiled)
