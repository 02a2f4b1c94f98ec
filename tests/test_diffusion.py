"""Schedules (against the reference arrays), the x0 loss and the ancestral sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax import diffusion
from dmfnet_jax.errors import ConfigError
from dmfnet_jax.models import unet as unet_lib

MINI = dict(inner_channel=8, norm_groups=4, channel_mults=(1, 2), attn_res=(8,),
            res_blocks=1, image_size=16)
SCHEDULE_FIELDS = ("betas", "alphas_cumprod", "sqrt_alphas_cumprod_prev",
                   "posterior_mean_coef1", "posterior_mean_coef2",
                   "posterior_log_variance_clipped")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_match_reference(parity_root, kind):
  schedule = diffusion.make_schedule(kind, 2000, 1e-6, 1e-2)
  assert schedule.num_timesteps == 2000
  assert schedule.sqrt_alphas_cumprod_prev.shape == (2001,)
  with np.load(parity_root / "schedules_and_losses.npz") as reference:
    for field in SCHEDULE_FIELDS:
      ours = getattr(schedule, field)
      assert ours.dtype == np.float64, field
      np.testing.assert_allclose(ours, reference[f"{kind}_{field}"], rtol=1e-6, atol=0,
                                 err_msg=f"{kind}_{field}")


def test_cosine_betas_are_clipped_and_unknown_kind_rejected():
  assert diffusion.make_schedule("cosine", 10).betas.max() <= 0.999
  with pytest.raises(ConfigError, match="quad"):
    diffusion.make_schedule("quad", 10)


def test_noise_levels_lie_between_neighbouring_steps():
  sqrt_acp_prev = jnp.asarray(diffusion.make_schedule("linear", 100, 1e-4, 0.2)
                              .sqrt_alphas_cumprod_prev, jnp.float32)
  t = jnp.array([1, 5, 50, 100])
  g = diffusion.noise_levels_for_steps(jax.random.PRNGKey(0), sqrt_acp_prev, t[:, None],
                                       (4, 256))
  assert g.shape == (4, 256)
  assert jnp.all(g <= sqrt_acp_prev[t - 1][:, None]) and jnp.all(g >= sqrt_acp_prev[t][:, None])
  assert jnp.all(jnp.std(g, axis=1) > 0)  # per-sample draws, not one per step
  scalar = diffusion.noise_levels_for_steps(jax.random.PRNGKey(1), sqrt_acp_prev, 7, (3,))
  assert scalar.shape == (3,)


def test_q_sample_formula():
  x0 = jnp.ones((2, 4, 4, 1))
  noise = jnp.full((2, 4, 4, 1), 2.0)
  g = jnp.array([0.6, 1.0])
  x_t = diffusion.q_sample(x0, g, noise)
  np.testing.assert_allclose(x_t[0], 0.6 + 0.8 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(x_t[1], 1.0, rtol=1e-6)


def test_training_inputs_one_step_per_batch_and_loss():
  sqrt_acp_prev = jnp.asarray(diffusion.make_schedule("cosine", 50).sqrt_alphas_cumprod_prev,
                              jnp.float32)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1), minval=-1, maxval=1)

  @jax.jit
  @jax.vmap
  def draw(key):
    return diffusion.sample_training_inputs(key, x0, sqrt_acp_prev)

  x_t, g, t = draw(jax.random.split(jax.random.PRNGKey(1), 64))
  assert t.shape == (64,) and int(t.min()) >= 1 and int(t.max()) <= 50
  assert len(np.unique(np.asarray(t))) > 10
  assert jnp.all(g <= sqrt_acp_prev[t - 1][:, None]) and jnp.all(g >= sqrt_acp_prev[t][:, None])
  # the noise really is the complement of g: recover it and check it is ~N(0, 1)
  noise = (x_t - g[:, :, None, None, None] * x0) / jnp.sqrt(1 - g**2)[:, :, None, None, None]
  keep = g < 0.99  # the recovery is ill-conditioned where g ~ 1
  assert abs(float(jnp.mean(noise[keep]))) < 0.1 and abs(float(jnp.std(noise[keep])) - 1) < 0.1

  zero_model = lambda params, x, g, key: jnp.zeros_like(x)
  loss = diffusion.x0_loss(zero_model, None, x0, jax.random.PRNGKey(2), sqrt_acp_prev)
  np.testing.assert_allclose(loss, jnp.mean(x0**2), rtol=1e-6)
  oracle = lambda params, x, g, key: x0
  assert float(diffusion.x0_loss(oracle, None, x0, jax.random.PRNGKey(2), sqrt_acp_prev)) == 0


def _random_params(model_cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1.0)
                ).astype(np.float32),
      unet_lib.abstract_params(model_cfg))


def test_x0_loss_trains_through_the_unet_with_dropout():
  model = unet_lib.unet_from_config(MINI)
  params = _random_params(MINI)
  sqrt_acp_prev = jnp.asarray(diffusion.make_schedule("cosine", 8).sqrt_alphas_cumprod_prev,
                              jnp.float32)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1), minval=-1, maxval=1)

  def apply_fn(params, x, g, key):
    return model.apply({"params": params}, x, g, train=True, rngs={"dropout": key})

  loss, grads = jax.jit(jax.value_and_grad(
      lambda p, k: diffusion.x0_loss(apply_fn, p, x0, k, sqrt_acp_prev)))(
          params, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and float(loss) > 0
  grad_norm = sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads))
  assert np.isfinite(grad_norm) and grad_norm > 0


def test_ancestral_sampler_is_one_loop_and_deterministic():
  model = unet_lib.unet_from_config(MINI)
  params = _random_params(MINI)
  schedule = diffusion.make_schedule("linear", 8, 1e-3, 0.2)
  shape = (2, 16, 16, 1)

  def sample(params, key):
    apply_fn = lambda p, x, level: model.apply({"params": p}, x, level)
    return diffusion.ancestral_sample(apply_fn, params, key, shape, schedule)

  jaxpr = str(jax.make_jaxpr(sample)(params, jax.random.PRNGKey(0)))
  assert "while" in jaxpr or "scan" in jaxpr
  # the UNet appears once in the program, not once per step
  one_call = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, jnp.ones((2,))))(
      params, jnp.zeros(shape)))
  assert jaxpr.count("conv_general_dilated") == one_call.count("conv_general_dilated") > 0

  sample = jax.jit(sample)
  a = sample(params, jax.random.PRNGKey(0))
  b = sample(params, jax.random.PRNGKey(0))
  c = sample(params, jax.random.PRNGKey(1))
  assert a.shape == shape and bool(jnp.all(jnp.isfinite(a)))
  assert float(a.min()) >= -1 and float(a.max()) <= 1  # t=0 step returns the clipped x0_hat
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
