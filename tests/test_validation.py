"""Start-up config checks name the key and the problem."""

import pytest

from dmfnet_jax import config_defaults, validation
from dmfnet_jax.errors import ConfigError
from conftest import load_config


@pytest.mark.parametrize("name", ["stage1", "stage2", "fuse", "evaluate", "demo"])
@pytest.mark.parametrize("preset", [None, "tiny", "cpu"])
def test_shipped_configs_validate(name, preset):
  if name in ("evaluate", "demo") and preset:
    pytest.skip(f"no {preset} preset")
  validation.validate(load_config(name, preset))


@pytest.mark.parametrize("key, value, message", [
    ("model.norm_groups", 7, "norm_groups"),
    ("model.channel_mults", [], "channel_mults"),
    ("model.dropout", 1.5, "dropout"),
    ("train.learning_rate", 0.0, "learning_rate"),
    ("train.checkpoint_every", 0, "checkpoint_every"),
    ("train.compute_dtype", "float16", "compute_dtype"),
    ("data.crop_size", 72, "crop_size"),
    ("diffusion.schedule", "quadratic", "schedule"),
    ("fusion.feat_scales", [2, 99], "feat_scales"),
    ("loss.intensity_weight", -1.0, "loss.intensity_weight"),
    ("loss.ssim_weight", float("nan"), "loss.ssim_weight"),
])
def test_impossible_values_name_their_key(key, value, message):
  config = load_config("stage2", "tiny")
  config.model.update(config_defaults.TINY_MODEL)  # as a Stage I checkpoint would say
  config.fusion.update(config_defaults.fusion_config())
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ConfigError, match=message):
    validation.validate(config)


def test_stage2_crop_too_small_for_reflect_padding():
  config = load_config("stage2", "tiny")
  config.model.update(config_defaults.TINY_MODEL)
  config.data.crop_size = 32  # 5 levels: coarsest 2 px < 4
  with pytest.raises(ConfigError, match="reflect"):
    validation.validate(config)


def test_stage2_loss_weights_default_to_the_reference():
  for preset in (None, "tiny", "cpu"):
    assert load_config("stage2", preset).loss.to_dict() == {
        "intensity_weight": 1.5, "gradient_weight": 1.0, "ssim_weight": 0.5}


def test_all_zero_loss_weights_are_refused():
  config = load_config("stage2", "tiny")
  config.loss.update(intensity_weight=0.0, gradient_weight=0.0, ssim_weight=0.0)
  with pytest.raises(ConfigError, match="at least one weight"):
    validation.validate(config)


def test_attention_levels_follow_the_reference_rule():
  mults = (1, 1, 1, 1, 2)
  assert validation.attention_levels(mults, (16,), 160) == ((), ())
  assert validation.attention_levels(mults, (16,), 640) == ((), ())
  assert validation.attention_levels(mults, (16,), 256) == ((4,), (4,))
  assert validation.attention_levels(mults, (16,), 64) == ((2,), (2,))
  # Integer halving on the way down, doubling on the way up: 100 -> 50, 25, 12, 6 but
  # 6 -> 12, 24, 48, 96, so attn_res 25 attends on the down path only (as the reference).
  assert validation.attention_levels(mults, (25,), 100) == ((2,), ())


def test_model_keys_read_from_a_checkpoint_are_checked_once_known():
  config = load_config("stage2", "tiny")
  assert not validation.is_resolved(config.model)
  validation.validate(config)  # the other groups are checked now, the model after resolution
  config.train.learning_rate = 0.0
  with pytest.raises(ConfigError, match="learning_rate"):
    validation.validate(config)
