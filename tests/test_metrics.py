"""Metrics against the reference evaluator's test vectors and its building blocks."""

import json
import math

import numpy as np
import pytest

from dmfnet_jax import imageio, metrics


def _vector_cases(metrics_vectors_root, harvard_root):
  spec = json.loads((metrics_vectors_root / "expected_metrics.json").read_text())
  for case in spec["cases"]:
    yield (case,
           imageio.read_image(metrics_vectors_root / case["fused"]),
           imageio.read_image(harvard_root / case["source_a"]),
           imageio.read_image(harvard_root / case["source_b"]))


def test_matches_reference_vectors(metrics_vectors_root, harvard_root):
  for case, fused, a, b in _vector_cases(metrics_vectors_root, harvard_root):
    got = metrics.evaluate_pair(fused, a, b)
    for name, want in case["metrics"].items():
      assert got[name] == pytest.approx(want, rel=1e-3), (case["fused"], name)


def test_methods_agree_with_pair(metrics_vectors_root, harvard_root):
  cases = list(_vector_cases(metrics_vectors_root, harvard_root))[:2]
  fused, a, b = ([c[i] for c in cases] for i in (1, 2, 3))
  singles = [metrics.evaluate_pair(f, x, y) for f, x, y in zip(fused, a, b)]
  methods = metrics.evaluate_methods({"max": fused[0], "mean": fused[1]}, a[0], b[0])
  for name in metrics.ALL_METRIC_NAMES:
    assert methods["max"][name] == pytest.approx(singles[0][name], rel=1e-6)
    assert methods["mean"][name] == pytest.approx(singles[1][name], rel=1e-6)


def _random_pair(seed, size=64):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (size, size)).astype(np.float64)
  b = np.round(np.clip(a * 0.5 + rng.normal(60, 30, a.shape), 0, 255))
  f = np.round((a + b) / 2 + rng.normal(0, 5, a.shape)).clip(0, 255)
  return f, a, b


def test_building_blocks_match_scipy_and_sklearn():
  from scipy.signal import convolve2d
  from skimage.metrics import structural_similarity
  from sklearn.metrics import mutual_info_score
  f, a, b = _random_pair(0)
  got = metrics.evaluate_pair(f, a, b)
  mi = mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
  assert got["MI"] == pytest.approx(mi, rel=1e-9)
  ssim = (structural_similarity(f, a, data_range=255) + structural_similarity(f, b, data_range=255))
  assert got["SSIM"] == pytest.approx(ssim, rel=1e-5)
  # Sobel responses: true 2-D convolution, 'same', zero padding.
  h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
  h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)
  sx, sy = metrics._sobel(a.astype(np.float32)[None])
  np.testing.assert_array_equal(sx[0], convolve2d(a, h3, mode="same"))
  np.testing.assert_array_equal(sy[0], convolve2d(a, h1, mode="same"))
  # numpy.gradient for AG.
  gy, gx = np.gradient(f)
  assert got["AG"] == pytest.approx(np.mean(np.sqrt((gx ** 2 + gy ** 2) / 2)), rel=1e-12)


def _reference_vifp(ref, dist):
  """The reference's VIF written out with 2-D convolutions (slow; small images)."""
  from scipy.signal import convolve2d
  num = den = 0.0
  for scale in range(1, 5):
    n = 2 ** (4 - scale + 1) + 1
    sd = n / 5.0
    m = (n - 1.0) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sd * sd))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    win = h / h.sum()
    if scale > 1:
      ref = convolve2d(ref, np.rot90(win, 2), mode="valid")[::2, ::2]
      dist = convolve2d(dist, np.rot90(win, 2), mode="valid")[::2, ::2]
    mu1 = convolve2d(ref, np.rot90(win, 2), mode="valid")
    mu2 = convolve2d(dist, np.rot90(win, 2), mode="valid")
    s1 = convolve2d(ref * ref, np.rot90(win, 2), mode="valid") - mu1 * mu1
    s2 = convolve2d(dist * dist, np.rot90(win, 2), mode="valid") - mu2 * mu2
    s12 = convolve2d(ref * dist, np.rot90(win, 2), mode="valid") - mu1 * mu2
    s1[s1 < 0] = 0
    s2[s2 < 0] = 0
    g = s12 / (s1 + 1e-10)
    sv = s2 - g * s12
    g[s1 < 1e-10] = 0
    sv[s1 < 1e-10] = s2[s1 < 1e-10]
    s1[s1 < 1e-10] = 0
    g[s2 < 1e-10] = 0
    sv[s2 < 1e-10] = 0
    sv[g < 0] = s2[g < 0]
    g[g < 0] = 0
    sv[sv <= 1e-10] = 1e-10
    num += np.sum(np.log10(1.0 + g ** 2 * s1 / (sv + 2)))
    den += np.sum(np.log10(1.0 + s1 / 2))
  return 1.0 if np.isnan(num / den) else num / den


def test_vif_matches_direct_convolution():
  f, a, b = _random_pair(1, size=72)
  a[:20, :30] = 0  # flat regions exercise the eps branches
  f[:20, :30] = 0
  got = metrics.evaluate_pair(f, a, b)["VIF"]
  assert got == pytest.approx(_reference_vifp(a, f) + _reference_vifp(b, f), rel=1e-9)


@pytest.mark.parametrize("value", [0.0, 128.0, 255.0])
def test_flat_fused_image_never_crashes(value):
  _, a, b = _random_pair(2)
  got = metrics.evaluate_pair(np.full_like(a, value), a, b)
  for name in ("EN", "SD", "SF", "AG", "MI", "VIF", "Qabf", "SSIM", "MSE"):
    assert math.isfinite(got[name]), name
  assert got["EN"] == 0 and got["SD"] == 0 and got["SF"] == 0 and got["AG"] == 0
  assert got["MI"] == 0 and got["VIF"] == 0
  assert math.isnan(got["CC"])  # documented: correlation with a constant
  assert math.isfinite(got["SCD"])
  assert math.isnan(got["PSNR"]) if value == 0 else math.isfinite(got["PSNR"])


def test_flat_sources_give_documented_values():
  flat = np.zeros((32, 32))  # all-zero: no gradient even at the zero-padded border
  f = np.arange(32 * 32, dtype=np.float64).reshape(32, 32) % 256
  got = metrics.evaluate_pair(f, flat, flat)
  assert got["VIF"] == 2.0  # 0/0 -> 1.0 per source, as the reference
  assert math.isnan(got["Qabf"]) and math.isnan(got["CC"]) and math.isnan(got["SCD"])
  assert all(math.isfinite(got[n]) for n in ("EN", "SD", "SF", "AG", "MI", "SSIM", "PSNR"))


def test_rgb_inputs_use_metric_gray(harvard_root):
  pet = imageio.read_image(harvard_root / "MRI-PET/test/PET/25015.png")
  mri = imageio.read_image(harvard_root / "MRI-PET/test/MRI/25015.png")
  gray = imageio.metric_gray(pet)
  assert metrics.evaluate_pair(pet, mri, mri) == metrics.evaluate_pair(gray, mri, mri)


@pytest.mark.filterwarnings("ignore:Clustering metrics expects discrete values")
def test_non_integer_inputs_use_distinct_values_for_mi():
  from sklearn.metrics import mutual_info_score
  f, a, b = _random_pair(3, size=32)
  f = f + 0.25
  got = metrics.evaluate_pair(f, a, b)
  want = mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
  assert got["MI"] == pytest.approx(want, rel=1e-9)


def test_rejects_mismatched_and_tiny_images():
  f, a, b = _random_pair(4, size=32)
  with pytest.raises(ValueError, match="differ in size"):
    metrics.evaluate_pair(f[:-1], a, b)
  with pytest.raises(ValueError, match="at least"):
    metrics.evaluate_pair(f[:5, :5], a[:5, :5], b[:5, :5])
