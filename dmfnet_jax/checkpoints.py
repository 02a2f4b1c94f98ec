"""Orbax checkpoints: train state, data iterator, frozen and exported parameters, metadata.

Each step directory holds the items `state` (the train state pytree), `data`
(the grain iterator state, so a resumed run continues the same stream), `meta`
(JSON: job, model/fusion/diffusion config) and, for Stage II, `unet` (the frozen
Stage I parameters, so one checkpoint holds both stages). Orbax writes a step into
a temporary directory and renames it when complete, so a killed save never shows
up as a step; a step that exists but fails to restore is skipped with a warning
and renamed `<step>.damaged-<time>`, so the resumed run can write that step again.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dmfnet_jax import runtime, validation
from dmfnet_jax.errors import CheckpointError

ITEM_NAMES = ("state", "data", "meta", "unet", "params")
DAMAGED_MARK = ".damaged-"  # `12.damaged-<time>`: a step set aside (not a step for Orbax)

# Test hook (tests/test_fault_tolerance.py): seconds each async save waits after its
# items are written but before its temporary folder is renamed to the step, so a
# test can kill a save in progress deterministically. Unset in normal use.
SAVE_DELAY_ENV = "DMFNET_TEST_SAVE_DELAY"


class DamagedCheckpointError(CheckpointError):
  """A step's files cannot be read (damage, not a mismatch with the config)."""


def _async_options() -> Optional[ocp.AsyncOptions]:
  delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
  if delay <= 0:
    return None
  return ocp.AsyncOptions(post_finalization_callback=lambda: time.sleep(delay))


def _restore_arg(name: str, target: Any):
  if name == "meta":
    return ocp.args.JsonRestore()
  if name == "data":
    return grain.checkpoint.CheckpointRestore(target)
  return ocp.args.StandardRestore(target)


def _save_arg(name: str, value: Any):
  if name == "meta":
    return ocp.args.JsonSave(value)
  if name == "data":
    return grain.checkpoint.CheckpointSave(value)
  return ocp.args.StandardSave(value)


class CheckpointStore:
  """A `CheckpointManager` with item names, keep policy and corrupt-step fallback."""

  def __init__(self, directory: os.PathLike | str, *, keep: int = 3,
               async_save: bool = True, read_only: bool = False, local: bool = False):
    """`local`: this process reads on its own (a model loaded for fusion in a multi-host
    run, where each process fuses its own pairs), with no coordination across hosts."""
    self.directory = runtime.workdir_path(directory)
    self.read_only = read_only
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"{self.directory}: no such checkpoint directory")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        async_options=_async_options() if async_save and not read_only else None,
    )
    if local and jax.process_count() > 1:
      options.multiprocessing_options = ocp.options.MultiprocessingOptions(
          primary_host=jax.process_index(), active_processes={jax.process_index()})
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=ITEM_NAMES)
    except Exception as err:  # orbax raises assorted errors for unusable paths
      raise CheckpointError(f"{self.directory}: cannot open checkpoint directory ({err})") from err

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, items: Mapping[str, Any], *, force: bool = True) -> None:
    args = ocp.args.Composite(**{name: _save_arg(name, value) for name, value in items.items()})
    self.manager.save(step, args=args, force=force)

  def item_names_at(self, step: int) -> list[str]:
    step_dir = self.directory / str(step)
    return [name for name in ITEM_NAMES if (step_dir / name).exists()]

  def read_meta(self, step: int) -> dict:
    path = self.directory / str(step) / "meta" / "metadata"
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as err:
      raise DamagedCheckpointError(f"{path}: cannot read checkpoint metadata ({err})") from err

  def restore(self, step: int, targets: Mapping[str, Any]) -> dict:
    """Restores the named items at `step`; `targets` maps item -> abstract target
    (or the grain iterator for `data`; None for `meta` or an untyped restore)."""
    args = ocp.args.Composite(
        **{name: _restore_arg(name, target) for name, target in targets.items()})
    restored = self.manager.restore(step, args=args)
    return {name: restored[name] for name in targets}

  def restore_numpy(self, step: int, name: str) -> Any:
    """One item as host numpy arrays, whatever devices saved it: how a model is read for
    fusion, where every process of a multi-host run loads all of it for itself."""
    path = self.directory / str(step) / name
    checkpointer = ocp.PyTreeCheckpointer()
    try:
      tree = checkpointer.metadata(path).item_metadata
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except (OSError, ValueError, KeyError) as err:
      raise DamagedCheckpointError(f"{path}: cannot read it ({err})") from err

  def restore_latest_good(self, targets_fn) -> tuple[Optional[int], Optional[dict]]:
    """Newest step that restores; corrupt or partial steps are skipped with a warning.

    `targets_fn(step)` gives the targets for that step (it may raise CheckpointError
    for a mismatch with the config, which is NOT skipped: it is the user's error).
    Skipped steps are renamed `<step>.damaged-<time>` (kept for inspection) so the
    resumed run can write those steps again and they are never taken as the latest.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, targets_fn(step))
      except DamagedCheckpointError as err:
        logging.warning("Checkpoint step %d in %s is damaged (%s); trying the previous one.",
                        step, self.directory, err)
      except CheckpointError:
        raise
      except Exception as err:  # a damaged step: fall back to the previous one
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); "
                        "trying the previous one.", step, self.directory,
                        type(err).__name__, err)
      else:
        self._set_aside(damaged)
        return step, restored
      damaged.append(step)
    self._set_aside(damaged)
    return None, None

  def _set_aside(self, steps: Sequence[int]) -> None:
    if not steps or self.read_only:
      return
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%dT%H%M%S")
      for step in steps:
        source = self.directory / str(step)
        target = self.directory / f"{step}{DAMAGED_MARK}{stamp}"
        try:
          source.rename(target)
        except OSError as err:
          raise CheckpointError(f"{source}: cannot be restored nor moved aside ({err}); "
                                "move or delete it, then rerun") from err
        logging.warning("Moved the damaged checkpoint step %d aside to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("dmfnet_checkpoint_set_aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_dir(workdir: os.PathLike | str) -> epath.Path:
  return runtime.workdir_path(workdir) / "checkpoints"


def resolve_checkpoint_path(path: os.PathLike | str) -> epath.Path:
  """A workdir, its `checkpoints/` folder, or one step folder -> the manager folder."""
  path = runtime.workdir_path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: checkpoint path does not exist")
  if (path / "checkpoints").is_dir():
    return path / "checkpoints"
  return path


def open_for_reading(path: os.PathLike | str, *, local: bool = False
                     ) -> tuple[CheckpointStore, int]:
  """Opens a checkpoint for reading; returns the store and the step to use.

  Accepts a workdir, a checkpoint manager folder, or a single step folder in one.
  `local`: see `CheckpointStore`.
  """
  path = resolve_checkpoint_path(path)
  if (path / "meta").is_dir() and path.name.isdigit():
    store = CheckpointStore(path.parent, read_only=True, local=local)
    return store, int(path.name)
  store = CheckpointStore(path, read_only=True, local=local)
  step = store.latest_step()
  if step is None:
    raise CheckpointError(f"{path}: contains no complete checkpoint")
  return store, step


# The config groups that describe a model; a checkpoint records those its job has.
MODEL_GROUPS = ("model", "fusion", "diffusion", "loss")
# Of those, the groups whose every key changes the parameters or the outputs.
STRUCTURE_GROUPS = ("model", "fusion")


def model_meta(config, job: str) -> dict:
  """The `meta` item of a checkpoint: its job and the model-describing config groups."""
  meta = {"job": job}
  for group in MODEL_GROUPS:
    if group in config:
      meta[group] = config[group].to_dict()
  return meta


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`key: checkpoint X vs config Y` for each key of `current` whose saved value differs."""
  diffs = []
  for key in sorted(current):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      a, b = list(a), list(b)
    if a != b:
      diffs.append(f"{key}: checkpoint {a!r} vs config {b!r}")
  return diffs


def _comparable(group: str, values: Mapping[str, Any]) -> dict:
  """A config group as far as it decides the parameters and outputs of a model.

  Model groups compare the levels that attend rather than `image_size`/`attn_res`
  (160 and 640 build the same released model) and leave out dropout, which the
  parameters do not depend on."""
  values = {k: v for k, v in values.items() if v is not None}
  if group != "model" or not {"image_size", "attn_res", "channel_mults"} <= set(values):
    return values
  down, up = validation.attention_levels(values["channel_mults"], values["attn_res"],
                                         values["image_size"])
  values = {k: v for k, v in values.items() if k not in ("image_size", "attn_res", "dropout")}
  values["attention_levels"] = [list(down), list(up)]
  return values


def check_model_matches(meta: Mapping[str, Any], groups: Mapping[str, Mapping[str, Any]],
                        where: Any, hint: str = "Use the config it was trained with, or a "
                        "fresh --workdir.") -> None:
  """The one checkpoint-versus-config check: raises CheckpointError naming every key of
  `groups` whose value differs from what the checkpoint records (`meta`).

  Groups the checkpoint does not record, and unset (None) config values, are not compared."""
  problems = []
  for group, current in groups.items():
    saved = meta.get(group)
    if saved is not None:
      current = _comparable(group, dict(current))
      problems += [f"{group}.{d}" for d in config_mismatch(_comparable(group, saved), current)]
  if problems:
    raise CheckpointError(f"{where} was made with a different model config:\n  "
                          + "\n  ".join(problems) + "\n" + hint)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      tree, shardings)


def conform_params(params: Any, abstract: Any, where: str) -> Any:
  """Checks restored parameters against the config's shapes (naming every missing,
  unexpected or mis-shaped leaf) and casts them to the config's dtypes."""
  flat_p = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"missing {k}" for k in sorted(set(flat_a) - set(flat_p))]
  problems += [f"unexpected {k}" for k in sorted(set(flat_p) - set(flat_a))]
  problems += [f"{k}: shape {tuple(flat_p[k].shape)}, config expects {tuple(flat_a[k].shape)}"
               for k in sorted(set(flat_a) & set(flat_p))
               if tuple(flat_p[k].shape) != tuple(flat_a[k].shape)]
  if problems:
    raise CheckpointError(f"{where}: parameters do not match the model config: "
                          + "; ".join(problems[:6]))
  return jax.tree.map(lambda p, a: jax.numpy.asarray(p, a.dtype), params, abstract)
