"""The fusion engine: memory estimates, tile plans, seamless tiles, per-image failures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmfnet_jax
from dmfnet_jax import config_defaults, engine, imageio
from dmfnet_jax.data import phantoms
from dmfnet_jax.errors import DataError
from conftest import load_config

GIB = 2**30


@pytest.fixture(scope="module")
def micro_model(micro_stage2_workdir):
  return dmfnet_jax.load(micro_stage2_workdir, batch_size=2).model


@pytest.mark.parametrize("size", [64, 128])
def test_estimate_bounds_what_xla_allocates(micro_model, size):
  """The estimate is a safe upper bound of the compiled program's own memory analysis,
  close to it for the six UNet inputs at once (an accelerator's way), above it for one
  at a time (a CPU's)."""
  a = jnp.zeros((1, size, size, 1))
  keys = jnp.stack([jax.random.PRNGKey(0)])
  estimate = engine.estimate_bytes(micro_model.config.model, micro_model.config.fusion, size, size)
  for at_once in (engine.UNLIMITED_INPUTS, None):
    compiled = micro_model._fuse.lower(micro_model.unet_params, micro_model.head_params,  # pylint: disable=protected-access
                                       a, a, keys, at_once=at_once).compile()
    analysis = compiled.memory_analysis()
    actual = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
    assert actual <= estimate
    if at_once:
      assert estimate <= 4 * actual + engine.FIXED_BYTES


@pytest.mark.parametrize("size", [64, 128])
def test_one_at_a_time_estimate_bounds_what_xla_allocates(micro_model, size):
  a, key = jnp.zeros((size, size, 1)), jax.random.PRNGKey(0)
  queries = (size // 2)**2 // 4  # the micro model attends at level 1
  compiled = micro_model._fuse_one_at_a_time.lower(  # pylint: disable=protected-access
      micro_model.unet_params, micro_model.head_params, a, a, key, queries).compile()
  analysis = compiled.memory_analysis()
  actual = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
  estimate = engine.estimate_one_at_a_time_bytes(micro_model.config.model,
                                                 micro_model.config.fusion, size, size, queries)
  assert actual <= estimate <= 4 * actual + engine.FIXED_BYTES


def test_one_at_a_time_is_the_batched_result(micro_model):
  """The same noise draw and the same numbers, attention chunks included."""
  rng = np.random.default_rng(0)
  a, b = (rng.uniform(-1, 1, (48, 40)).astype(np.float32) for _ in range(2))
  key = jax.random.PRNGKey(3)
  batched = micro_model._fuse_chunk([a], [b], [key], micro_model.batch_for(1))[0]  # pylint: disable=protected-access
  for chunk in (None, 7):
    plan = engine.TilePlan(48, 48, query_chunk=chunk)
    alone = micro_model._fuse_whole_one_at_a_time(a, b, key, plan)  # pylint: disable=protected-access
    assert alone.shape == (48, 40)
    np.testing.assert_allclose(alone, batched, atol=1e-5)


@pytest.mark.parametrize("at_once", [2, engine.UNLIMITED_INPUTS])
def test_unet_inputs_at_once_leave_the_numbers(micro_model, at_once):
  """A CPU runs one UNet input at a time (its caches then hold a layer); any grouping
  gives the same fused images."""
  assert micro_model.unet_inputs_at_once == 1
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 1)), jnp.float32) for _ in range(2))
  keys = jnp.stack([jax.random.PRNGKey(5), jax.random.PRNGKey(6)])
  params = (micro_model.unet_params, micro_model.head_params)
  one = micro_model._fuse(*params, a, b, keys)  # pylint: disable=protected-access
  grouped = micro_model._fuse(*params, a, b, keys, at_once=at_once)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(one), atol=1e-5)
  # A pair's result does not depend on its batch mates.
  alone = micro_model._fuse(*params, a[1:], b[1:], keys[1:])  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(one)[1], atol=1e-5)


@pytest.mark.parametrize("preset, one_at_a_time, tiled", [("cpu", 2048, 4096),
                                                          ("reference", 1024, 2048)])
def test_images_are_fused_whole_while_one_input_at_a_time_fits(preset, one_at_a_time, tiled):
  """On a 24 GiB machine: the shipped model fuses 2048x2048 whole and exactly, the
  reference model 1024x1024; larger images go in tiles."""
  model, fusion = config_defaults.model_config(preset), config_defaults.fusion_config()
  budget = int(engine.DEFAULT_MEMORY_FRACTION * 24 * GIB)
  plan = engine.plan_tiles(model, fusion, one_at_a_time, one_at_a_time, budget)
  assert plan.tile is None and plan.query_chunk is not None
  assert engine.estimate_bytes(model, fusion, one_at_a_time, one_at_a_time) > budget
  assert engine.estimate_one_at_a_time_bytes(model, fusion, one_at_a_time, one_at_a_time,
                                             plan.query_chunk) <= budget
  assert engine.plan_tiles(model, fusion, tiled, tiled, budget).tile is not None


def test_attention_makes_memory_grow_with_the_square_of_the_pixels():
  model, fusion = config_defaults.model_config("cpu"), config_defaults.fusion_config()
  small, large = (engine.estimate_bytes(model, fusion, s, s) - engine.FIXED_BYTES
                  for s in (2048, 4096))
  assert large > 5 * small  # 4x the pixels, more than 4x the memory


@pytest.mark.parametrize("preset", ["cpu", "reference"])
def test_an_8192_pair_gets_a_plan_on_a_24_gib_machine(preset):
  model, fusion = config_defaults.model_config(preset), config_defaults.fusion_config()
  budget = int(engine.DEFAULT_MEMORY_FRACTION * 24 * GIB)
  plan = engine.plan_tiles(model, fusion, 8192, 8192, budget)
  assert plan.tile is not None and plan.tile < 8192 and plan.tile % 16 == 0
  assert engine.estimate_bytes(model, fusion, plan.tile, plan.tile, attention_queries=0) <= budget
  # The whole image's coarse levels (from level 4: a 512x512 map) in attention chunks.
  assert engine.split_level(model) == 4 and 0 < plan.query_chunk < 512 * 512
  assert engine.estimate_bytes(model, fusion, 8192, 8192, levels=range(4, 5), images=1,
                               attention_queries=plan.query_chunk) <= budget
  covered = np.zeros((8192, 8192), bool)
  owned = np.zeros((8192, 8192), int)
  rows, cols = (dict(zip(plan.starts(8192), plan.owned(8192, 16))) for _ in range(2))
  for y, x in plan.tiles:
    covered[y:y + plan.tile, x:x + plan.tile] = True
    (y0, y1), (x0, x1) = rows[y], cols[x]
    assert y <= y0 < y1 <= y + plan.tile and x <= x0 < x1 <= x + plan.tile
    owned[y0:y1, x0:x1] += 1
  assert covered.all() and (owned == 1).all() and plan.overlap >= 16
  assert engine.plan_tiles(model, fusion, 256, 256, budget).tile is None


def test_an_impossible_budget_is_a_clear_refusal():
  model, fusion = config_defaults.model_config("reference"), config_defaults.fusion_config()
  with pytest.raises(DataError, match="even a 64x64 tile needs about .* GiB, more than the "
                     "memory budget"):
    engine.plan_tiles(model, fusion, 512, 512, engine.FIXED_BYTES + 1, "a.png")


def test_a_model_attending_at_full_resolution_is_not_tiled():
  model = config_defaults.model_config("tiny")
  model.attn_res = (64,)  # image_size 64: level 0 attends
  assert engine.split_level(model) == 0
  with pytest.raises(DataError, match="a.png: .*attends at full resolution, so it cannot be "
                     "tiled"):
    engine.plan_tiles(model, config_defaults.fusion_config(), 512, 512, 2**30, "a.png")


def _downscaled_statistics(model):
  """Makes `model` estimate the GroupNorm statistics on a half-size copy, as it does when
  not even one UNet input of the image fits its budget (a 4096x4096 image on 24 GiB)."""
  exact = model._whole_image_statistics  # pylint: disable=protected-access

  def downscaled(a, b, x_t, g, key):
    budget = model.budget
    model.budget = engine.estimate_bytes(model.config.model, model.config.fusion,
                                         *a.shape, images=1, attention_queries=32) - 1
    try:
      stats, is_exact = exact(a, b, x_t, g, key)
    finally:
      model.budget = budget
    assert not is_exact
    return stats, is_exact

  model._whole_image_statistics = downscaled  # pylint: disable=protected-access


@pytest.mark.parametrize("task, within_2, mean", [("MRI-PET", 0.999, 0.2),
                                                   ("MRI-CT", 0.995, 0.3)])
def test_tiles_reproduce_the_whole_image(task, within_2, mean):
  """The shipped model on a 512x512 pair, tiled (a small budget forces it) and whole.

  The coarse levels (attention included) run on the whole image, the head pools and
  upsamples as on the whole image, the GroupNorm statistics are the whole image's (one
  UNet input fits), each tile owns only pixels 96 px from its cut edges: every pixel
  within 2 grey levels of the untiled result (measured: at most 1, mean 0.02 / 0.03).
  When the statistics must be estimated (downscaled copy, then one round measured on
  the tiles): measured MRI-PET 99.97% within 2, mean 0.15, max 4; MRI-CT 99.75%, mean
  0.21, max 7. (Tiles that attended, normalised, pooled and upsampled on their own:
  99.7% / 0.23 / 4 and 98.1% / 0.34 / 22.) The ramps leave no seam."""
  mri, other = phantoms.phantom_pair(3, size=512, task=task, seed=4)
  whole = dmfnet_jax.load(batch_size=1)
  # Just below what fusing it whole one UNet input at a time needs (one attention row at
  # a time): nine 304 px tiles.
  budget = (engine.estimate_one_at_a_time_bytes(whole.config.model, whole.config.fusion,
                                                512, 512, 32) - 1) / GIB
  tiled = dmfnet_jax.load(batch_size=1, memory_budget_gb=budget)
  plan = tiled.model.plan(512, 512)
  assert plan.tile == 304 and len(plan.tiles) == 9
  luma = lambda image: (imageio.rgb_to_ycrcb(image)[..., 0] if image.ndim == 3
                        else image).astype(int)
  untiled = luma(whole.fuse(mri, other))
  difference = np.abs(luma(tiled.fuse(mri, other)) - untiled)[16:-16, 16:-16]
  assert difference.max() <= 2, (difference.max(), difference.mean())

  _downscaled_statistics(tiled.model)
  estimated = luma(tiled.fuse(mri, other))
  difference = np.abs(estimated - untiled)[16:-16, 16:-16]
  assert (difference <= 2).mean() >= within_2 and difference.mean() <= mean, (
      difference.max(), difference.mean(), (difference <= 2).mean())
  # No seam: across the tiles' edges the tiled result changes as smoothly as elsewhere.
  residual = (estimated - untiled).astype(float)
  edges = sorted({y + plan.tile for y in plan.starts(512)} | set(plan.starts(512)))
  edges = [e for e in edges if 16 < e < 496]
  jumps = np.abs(np.diff(residual, axis=1))[16:-16, 16:-17]
  assert all(jumps[:, e - 17].mean() <= 3 * jumps.mean() + 0.1 for e in edges)


def test_a_bad_image_fails_alone(micro_model):
  good = np.zeros((32, 32), np.float32)
  keys = [jax.random.PRNGKey(i) for i in range(3)]
  results = micro_model.fuse_images([good, np.zeros((1, 1), np.float32), good],
                                    [good, np.zeros((1, 1), np.float32), good], keys, 2,
                                    names=["a", "tiny.png", "c"])
  assert isinstance(results[1], DataError) and "tiny.png: 1x1 pixels is too small" in str(results[1])
  assert results[0].shape == results[2].shape == (32, 32)


def test_a_failing_batch_is_retried_image_by_image(micro_model, monkeypatch):
  good = np.zeros((32, 32), np.float32)
  original = micro_model._fuse_chunk  # pylint: disable=protected-access

  def flaky(a_images, b_images, keys, batch_size):
    if len(a_images) > 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return original(a_images, b_images, keys, batch_size)

  monkeypatch.setattr(micro_model, "_fuse_chunk", flaky)
  results = micro_model.fuse_images([good, good], [good, good],
                                    [jax.random.PRNGKey(0)] * 2, 2)
  assert all(isinstance(r, np.ndarray) for r in results)


def test_the_default_budget_is_a_share_of_the_machine():
  assert engine.memory_budget_bytes() == int(engine.DEFAULT_MEMORY_FRACTION
                                              * engine.machine_memory_bytes())
  cfg = load_config("fuse").fuse
  cfg.memory_budget_gb = 1.5
  assert engine.memory_budget_bytes(cfg) == int(1.5 * GIB)
