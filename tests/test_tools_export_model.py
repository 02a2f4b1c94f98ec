"""Exporting a Stage II run keeps both stages' parameters and loads in fuse."""

import jax
import numpy as np
import pytest

from dmfnet_jax import checkpoints, inference
from dmfnet_jax.errors import CheckpointError
from dmfnet_jax.tools import export_model
from conftest import micro_config


def test_export_round_trip(micro_stage2_workdir, tmp_path):
  out = export_model.export(str(micro_stage2_workdir), str(tmp_path / "model"))
  config = micro_config("fuse")
  config.checkpoint = str(out)
  exported = inference.load_fusion_model(config)
  config.checkpoint = str(micro_stage2_workdir)
  original = inference.load_fusion_model(config)
  jax.tree.map(np.testing.assert_array_equal, exported.head_params, original.head_params)
  jax.tree.map(np.testing.assert_array_equal, exported.unet_params, original.unet_params)
  store = checkpoints.CheckpointStore(out, read_only=True)
  assert store.item_names_at(store.latest_step()) == ["meta", "params"]
  with pytest.raises(CheckpointError, match="not empty"):
    export_model.export(str(micro_stage2_workdir), str(out))
