"""Atomic writes with the umask's permissions; outputs that would touch inputs."""

import os
import stat
import subprocess
import sys

import pytest

from dmfnet_jax import runtime
from dmfnet_jax.errors import DataError, DmfnetError


@pytest.fixture
def umask():
  """Sets the process umask for a test and restores it (and the cached value) after."""
  previous = os.umask(0o022)
  os.umask(previous)

  def set_mask(mask):
    os.umask(mask)
    runtime.reset_umask_cache()

  yield set_mask
  os.umask(previous)
  runtime.reset_umask_cache()


@pytest.mark.parametrize("mask, mode", [(0o077, 0o600), (0o027, 0o640), (0o002, 0o664),
                                        (0o000, 0o666)])
def test_atomic_writes_get_the_umask_permissions(umask, tmp_path, mask, mode):
  umask(mask)
  assert runtime.current_umask() == mask
  for path in (runtime.write_bytes_atomic(tmp_path / "a.bin", b"x"),
               runtime.write_json_atomic(tmp_path / "b.json", {"x": float("nan")})):
    assert stat.S_IMODE(path.stat().st_mode) == mode
  assert (tmp_path / "b.json").read_text().strip() == '{\n  "x": null\n}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    runtime.write_bytes_atomic(tmp_path / "a.bin", b"x")
  assert list(tmp_path.iterdir()) == []


def test_outputs_that_touch_inputs_are_refused(tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  mri = inputs / "mri.png"
  mri.write_bytes(b"x")
  (tmp_path / "link.png").symlink_to(mri)
  with pytest.raises(DataError, match="output .*mri.png is the input"):
    runtime.refuse_writing_inputs([mri], [inputs / "mri.png"])
  with pytest.raises(DataError, match="link.png is the input"):
    runtime.refuse_writing_inputs([mri], [tmp_path / "link.png"])
  with pytest.raises(DataError, match="output folder .*in holds the input .*mri.png"):
    runtime.refuse_writing_inputs([mri], [], [inputs])
  with pytest.raises(DataError, match="holds the input"):
    runtime.refuse_writing_inputs([], [], [tmp_path / "methods"], [tmp_path / "methods"])
  runtime.refuse_writing_inputs([mri], [tmp_path / "out" / "mri.png"], [tmp_path / "out"])


def test_stale_temporaries_are_removed(tmp_path):
  (tmp_path / ".a.png.k3j2.tmp").write_bytes(b"half")
  (tmp_path / "keep.png").write_bytes(b"x")
  assert runtime.remove_stale_temporaries(tmp_path) == 1
  assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def _devices_after(code: str, **env) -> list:
  from test_distributed import child_env  # pylint: disable=g-import-not-at-top
  environment = {**child_env(), **env}
  result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return [int(v) for v in result.stdout.split()]


@pytest.mark.parametrize("asked, made", [(3, 3), (0, min(runtime.usable_cores(),
                                                          runtime.MAX_AUTOMATIC_CPU_DEVICES))])
def test_cpu_cores_become_devices_before_jax_starts(asked, made):
  code = ("from dmfnet_jax import runtime; import jax\n"
          f"print(runtime.use_cpu_cores_as_devices({asked}), jax.device_count())")
  assert _devices_after(code) == [made, made]


def test_a_started_jax_or_the_users_choice_keeps_its_devices():
  started = ("from dmfnet_jax import runtime; import jax; jax.devices()\n"
             "print(runtime.use_cpu_cores_as_devices(3), jax.device_count())")
  assert _devices_after(started) == [0, 1]
  chosen = ("from dmfnet_jax import runtime; import jax\n"
            "print(runtime.use_cpu_cores_as_devices(3), jax.device_count())")
  assert _devices_after(chosen, XLA_FLAGS="--xla_force_host_platform_device_count=2") == [0, 2]
  with pytest.raises(DmfnetError, match="fuse.cpu_devices"):
    runtime.use_cpu_cores_as_devices(-1)
