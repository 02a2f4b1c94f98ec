"""Atomic writes with the umask's permissions; outputs that would touch inputs."""

import os
import stat

import pytest

from dmfnet_jax import runtime
from dmfnet_jax.errors import DataError


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
