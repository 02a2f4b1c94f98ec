"""The training scaffold: workdir, mesh, optimizer, abstract state, loop settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfnet_jax.errors import ConfigError
from dmfnet_jax.train import trainer
from conftest import micro_config


def test_start_run_writes_config_and_builds_what_jobs_share(tmp_path):
  config = micro_config("stage2", learning_rate=3e-4)
  basics = trainer.start_run(config, str(tmp_path / "w"))
  saved = json.loads((tmp_path / "w" / "config.json").read_text())
  assert saved["train"]["learning_rate"] == 3e-4
  assert basics.global_batch == 2 and basics.mesh.size == jax.device_count()
  assert basics.store.directory == tmp_path / "w" / "checkpoints"
  np.testing.assert_array_equal(jax.random.key_data(basics.root_key),
                                jax.random.key_data(jax.random.PRNGKey(config.seed)))
  basics.store.close()


def test_start_run_rejects_a_mesh_larger_than_the_devices(tmp_path):
  config = micro_config("stage1")
  config.mesh.data = jax.device_count() + 1
  with pytest.raises(ConfigError, match="config.mesh"):
    trainer.start_run(config, str(tmp_path / "w"))


def test_abstract_state_allocates_nothing_and_carries_shardings(tmp_path):
  basics = trainer.start_run(micro_config("stage1"), str(tmp_path / "w"))
  init = lambda rng: {"w": jax.random.normal(rng, (3, 4))}
  shardings, abstract = trainer.abstract_sharded_state(init, basics, jax.random.PRNGKey(0), ema=True)
  assert isinstance(abstract.params["w"], jax.ShapeDtypeStruct)
  assert abstract.params["w"].shape == (3, 4) and abstract.params["w"].dtype == jnp.float32
  assert abstract.ema_params["w"].sharding == shardings.ema_params["w"]
  basics.store.close()


def test_loop_settings_read_the_train_group():
  settings = trainer.loop_settings(micro_config("stage1", num_steps=7, log_every=3).train, 4)
  assert (settings.num_steps, settings.log_every, settings.images_per_step) == (7, 3, 4)
