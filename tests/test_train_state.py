"""Optimizers, the learning-rate schedule and the EMA of the train state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmfnet_jax import config_defaults, validation
from dmfnet_jax.errors import ConfigError
from dmfnet_jax.train import state as state_lib


def _train_cfg(**overrides):
  return config_defaults.train_config(num_steps=100, optimizer="adam", learning_rate=1e-2,
                                      weight_decay=0.0, **overrides)


def test_constant_schedule_is_the_reference():
  factor = state_lib.learning_rate_factor(_train_cfg())
  assert [float(factor(jnp.int32(s))) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_linear_decay_holds_then_falls_to_zero():
  factor = state_lib.learning_rate_factor(_train_cfg(lr_schedule="linear_decay",
                                                     decay_start_step=60))
  values = [float(factor(jnp.int32(s))) for s in (0, 60, 80, 90, 100, 120)]
  np.testing.assert_allclose(values, [1.0, 1.0, 0.5, 0.25, 0.0, 0.0])


@pytest.mark.parametrize("kind", ["constant", "linear_decay"])
def test_warmup_ramps_up_then_leaves_the_schedule(kind):
  factor = state_lib.learning_rate_factor(_train_cfg(lr_schedule=kind, decay_start_step=60,
                                                     warmup_steps=10))
  values = [float(factor(jnp.int32(s))) for s in (0, 4, 9, 60, 80)]
  tail = [1.0, 0.5] if kind == "linear_decay" else [1.0, 1.0]
  np.testing.assert_allclose(values, [0.1, 0.5, 1.0] + tail, rtol=1e-6)
  assert float(state_lib.learning_rate_factor(_train_cfg(lr_schedule=kind))(jnp.int32(0))) == 1.0


def test_schedule_does_not_change_the_optimizer_state():
  """So a run can resume under another schedule."""
  params = {"w": jnp.ones((3,))}
  trees = [jax.tree.structure(state_lib.make_optimizer(_train_cfg(**kw)).init(params))
           for kw in ({}, {"lr_schedule": "linear_decay", "decay_start_step": 10})]
  assert trees[0] == trees[1]


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0])
def test_apply_gradients_scales_the_adam_update(factor):
  cfg = _train_cfg()
  tx = state_lib.make_optimizer(cfg)
  state = state_lib.create_state(lambda r: {"w": jnp.arange(3.0)}, tx, jax.random.PRNGKey(0),
                                 ema=False)
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  params, _ = state_lib.apply_gradients(state, grads, tx, lambda step: jnp.float32(factor))
  plain_updates, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(state.params))
  np.testing.assert_allclose(params["w"], jnp.arange(3.0) + factor * plain_updates["w"], rtol=1e-6)


def test_bad_schedule_settings_name_the_setting():
  with pytest.raises(ConfigError, match="train.lr_schedule"):
    state_lib.learning_rate_factor(_train_cfg(lr_schedule="cosine"))
  with pytest.raises(ConfigError, match="train.lr_schedule"):
    validation.validate_train(_train_cfg(lr_schedule="cosine"), stage="stage2")
  with pytest.raises(ConfigError, match="train.warmup_steps"):
    validation.validate_train(_train_cfg(warmup_steps=-1), stage="stage2")
  with pytest.raises(ConfigError, match="train.decay_start_step"):
    validation.validate_train(_train_cfg(lr_schedule="linear_decay", decay_start_step=100),
                              stage="stage2")
