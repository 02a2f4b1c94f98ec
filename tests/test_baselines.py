"""Classical baselines: registry, output format, and the reference files the metric
vectors score."""

import json

import numpy as np
import pytest

from dmfnet_jax import baselines, imageio


def _pair(seed=0, size=64):
  rng = np.random.default_rng(seed)
  mri = rng.integers(0, 256, (size, size), dtype=np.uint8)
  pet = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  return mri, pet


def test_registry_names():
  assert tuple(baselines.BASELINES) == ("max", "mean", "laplacian", "wavelet")
  with pytest.raises(KeyError, match="unknown baseline"):
    baselines.get_baseline("median")


@pytest.mark.parametrize("name", list(baselines.BASELINES))
def test_outputs_uint8_and_keep_colour(name):
  mri, pet = _pair()
  luma = baselines.fuse_luma_baseline(name, mri, pet)
  assert luma.dtype == np.uint8 and luma.shape == mri.shape
  # The evaluate job shows (and with ':colour' scores) the luma colourised this way.
  coloured = imageio.colourise(luma, pet)
  assert coloured.dtype == np.uint8 and coloured.shape == pet.shape
  gray = baselines.fuse_luma_baseline(name, mri, mri)
  assert gray.dtype == np.uint8 and gray.shape == mri.shape


@pytest.mark.parametrize("name", ["laplacian", "wavelet"])
@pytest.mark.parametrize("shape", [(64, 64), (75, 50)])
def test_multiscale_baselines_reconstruct_identical_sources(name, shape):
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 255, shape)
  np.testing.assert_allclose(baselines.get_baseline(name)(x, x), x, atol=1e-9)


def test_multiscale_baselines_keep_the_stronger_detail():
  flat = np.full((64, 64), 100.0)
  edge = flat.copy()
  edge[:, 32:] = 200.0
  for name in ("laplacian", "wavelet"):
    fused = baselines.get_baseline(name)(flat, edge)
    # Max-abs details keep the edge sharp (the mean halves it to 50); the coarse
    # levels are averaged.
    assert (fused[:, 32] - fused[:, 31]).mean() > 80, name


def test_max_and_mean_reproduce_reference_files(metrics_vectors_root, harvard_root):
  spec = json.loads((metrics_vectors_root / "expected_metrics.json").read_text())
  for case in spec["cases"]:
    name = case["fused"].rsplit("_", 1)[1].split(".")[0]
    a = imageio.read_image(harvard_root / case["source_a"])
    b = imageio.read_image(harvard_root / case["source_b"])
    want = imageio.read_image(metrics_vectors_root / case["fused"])
    np.testing.assert_array_equal(baselines.fuse_luma_baseline(name, a, b), want)


def test_mismatched_sources_raise():
  mri, pet = _pair()
  with pytest.raises(ValueError, match="differ in size"):
    baselines.fuse_luma_baseline("max", mri[:10], pet)
