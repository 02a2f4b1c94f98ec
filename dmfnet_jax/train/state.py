"""Train state, optimizer and sharded initialisation shared by both stages."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dmfnet_jax import sharding as sharding_lib
from dmfnet_jax import validation


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  rng: jax.Array  # raw uint32 key data; `fold_in(step)` gives each step its key


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW for Stage I, Adam for Stage II (as the reference), optional clipping."""
  validation.validate_optimizer(train_cfg)
  if train_cfg.optimizer == "adamw":
    opt = optax.adamw(train_cfg.learning_rate, b1=train_cfg.b1, b2=train_cfg.b2,
                      eps=train_cfg.eps, weight_decay=train_cfg.weight_decay)
  else:
    opt = optax.adam(train_cfg.learning_rate, b1=train_cfg.b1, b2=train_cfg.b2,
                     eps=train_cfg.eps)
  if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), opt)
  return opt


def learning_rate_factor(train_cfg) -> Callable[[jax.Array], jax.Array]:
  """The learning-rate multiplier as a function of the global step.

  `constant` (the reference: its decay is stepped only after the last epoch) is 1.
  `linear_decay` holds 1 until `train.decay_start_step`, then falls linearly to 0 at
  `train.num_steps` (a stable-then-decay tail for short runs). `train.warmup_steps`
  (0 = none, the reference) ramps the factor linearly up over the first steps, e.g.
  while a fine-tune's fresh Adam moments settle. It scales the optimizer's updates
  instead of living inside the optimizer, so the optimizer state is the same for every
  schedule and a run may switch schedule when it resumes.
  """
  validation.validate_lr_schedule(train_cfg)
  if train_cfg.get("lr_schedule", "constant") == "linear_decay":
    start = int(train_cfg.decay_start_step)
    schedule = optax.join_schedules(
        [optax.constant_schedule(1.0),
         optax.linear_schedule(1.0, 0.0, max(int(train_cfg.num_steps) - start, 1))], [start])
  else:
    schedule = optax.constant_schedule(1.0)
  warmup = int(train_cfg.get("warmup_steps", 0))
  if warmup <= 1:  # a one-step ramp is the full rate from the first step
    return lambda step: jnp.asarray(schedule(step), jnp.float32)
  # (step + 1) / warmup: the first step already moves the parameters.
  ramp = optax.linear_schedule(1.0 / warmup, 1.0, warmup - 1)
  return lambda step: jnp.asarray(schedule(step) * ramp(step), jnp.float32)


def apply_gradients(state: "TrainState", grads: Any, tx: optax.GradientTransformation,
                    lr_factor: Callable[[jax.Array], jax.Array]):
  """(new params, new optimizer state) for one step at the scheduled rate."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  factor = lr_factor(state.step)
  updates = jax.tree.map(lambda u: factor * u, updates)
  return optax.apply_updates(state.params, updates), opt_state


def create_state(init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array, *, ema: bool, params: Optional[Any] = None) -> TrainState:
  params = init_params_fn(rng) if params is None else params
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      rng=jax.random.fold_in(rng, 1),
  )


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Parameters, EMA and moments share one rule (fsdp-sharded or replicated);
  scalars and the key are replicated."""
  return jax.tree.map(lambda leaf: sharding_lib.param_sharding(leaf, mesh), abstract_state)


def init_sharded_state(init_params_fn, tx, rng, mesh: Mesh, *, ema: bool,
                       params: Optional[Any] = None):
  """Shapes first (`eval_shape`), then initialise directly into the shardings.

  `params` (e.g. from a configured checkpoint) replaces the fresh initialisation.
  """

  def build(rng, params):
    return create_state(init_params_fn, tx, rng, ema=ema, params=params)

  abstract = jax.eval_shape(build, rng, params)
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(build, out_shardings=shardings)(rng, params)
  return state, shardings


def ema_update(ema_params, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
