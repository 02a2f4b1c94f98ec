"""Stage II hybrid loss: parity with the reference and its quirks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import config_defaults, losses


def _nhwc(array):
  return jnp.asarray(array.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", [0, 1, 2])
def test_loss_parity_with_reference(parity_root, case):
  vectors = np.load(parity_root / "schedules_and_losses.npz")
  fused, mri, other = (_nhwc(vectors[f"loss{case}_{name}"]) for name in ("fused", "ir", "vis"))
  total, terms = jax.jit(losses.fusion_loss)(fused, mri, other)
  for name in ("loss_in", "loss_grad", "ssim_term"):
    want = float(vectors[f"loss{case}_{name}"])
    assert float(terms[name]) == pytest.approx(want, rel=1e-5), name
  assert float(total) == pytest.approx(float(terms["loss_in"] + terms["loss_grad"]), rel=1e-6)


def test_quality_choice_keeps_nan_semantics():
  """sqrt of a negative variance is NaN and NaN >= x is False: q_FB is chosen."""
  var_a = jnp.array([0.0, -1e-9, 0.0, -1e-9, 2.0, 1.0])
  var_b = jnp.array([0.0, 0.0, -1e-9, -1e-9, 1.0, 2.0])
  q_fa = jnp.full(6, 1.0)
  q_fb = jnp.full(6, 2.0)
  got = losses.select_quality(var_a, var_b, q_fa, q_fb)
  np.testing.assert_array_equal(got, [1.0, 2.0, 2.0, 2.0, 1.0, 2.0])


def test_sobel_is_zero_padded_cross_correlation():
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 2, 3, 0] = 1.0
  grad = np.asarray(losses.sobel_magnitude(jnp.asarray(x)))[0, :, :, 0]
  # Response of an impulse: the kernels, flipped (magnitudes only; parity covers the sign).
  want = np.zeros((5, 5))
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      y, xx = 2 - dy, 3 - dx
      want[y, xx] = abs(losses.SOBEL_X[1 + dy, 1 + dx]) + abs(losses.SOBEL_Y[1 + dy, 1 + dx])
  np.testing.assert_allclose(grad, want)
  # Zero padding: a constant image has edge responses at the border.
  ones = np.asarray(losses.sobel_magnitude(jnp.ones((1, 4, 4, 1))))[0, :, :, 0]
  assert ones[1:-1, 1:-1].max() == 0 and ones[0, 0] > 0


def test_gaussian_window_is_normalised():
  window = losses.gaussian_window()
  assert window.shape == (11, 11)
  assert window.sum() == pytest.approx(1.0, abs=1e-6)
  assert window[5, 5] == window.max()


def test_batch_loss_is_mean_of_per_image_losses_and_differentiable():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  fused, a, b = (jnp.tanh(jax.random.normal(k, (2, 24, 20, 1))) for k in keys)
  loss = jax.jit(lambda f, a, b: losses.fusion_loss(f, a, b)[0])
  total = loss(fused, a, b)
  per_image = [loss(fused[i:i + 1], a[i:i + 1], b[i:i + 1]) for i in range(2)]
  assert float(total) == pytest.approx(float(np.mean(per_image)), rel=1e-5)
  grad = jax.jit(jax.grad(loss))(fused, a, b)
  assert grad.shape == fused.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_identical_images():
  x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 1)))
  total, terms = jax.jit(losses.fusion_loss)(x, x, x)
  assert float(terms["loss_in"]) == 0.0
  assert float(terms["ssim_term"]) == pytest.approx(1.0, abs=1e-4)
  assert float(total) == pytest.approx(0.0, abs=1e-4)


def test_default_weights_are_the_reference_and_weights_scale_their_terms():
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  fused, a, b = (jnp.tanh(jax.random.normal(k, (1, 16, 16, 1))) for k in keys)
  ref_total, ref = losses.fusion_loss(fused, a, b)
  same_total, _ = losses.fusion_loss(fused, a, b, **config_defaults.REFERENCE_LOSS_WEIGHTS)
  assert float(same_total) == float(ref_total)
  assert config_defaults.REFERENCE_LOSS_WEIGHTS == {"intensity_weight": 1.5, "gradient_weight": 1.0,
                                      "ssim_weight": 0.5}
  l1_to_max = float(ref["loss_in"]) / 1.5
  sobel = float(ref["loss_grad"]) - 0.5 * (1 - float(ref["ssim_term"]))
  total, terms = losses.fusion_loss(fused, a, b, intensity_weight=4.0, gradient_weight=2.0,
                                    ssim_weight=0.0)
  assert float(terms["loss_in"]) == pytest.approx(4.0 * l1_to_max, rel=1e-5)
  assert float(terms["loss_grad"]) == pytest.approx(2.0 * sobel, rel=1e-5)
  assert float(total) == pytest.approx(4.0 * l1_to_max + 2.0 * sobel, rel=1e-5)
