"""The package layout shows the architecture (docs/architecture.md): training is a leaf.

Checked on the source, statically: `train/` may import the rest of the package, but
nothing outside `train/` imports it (main.py's job table names the training jobs as
strings), and config files load nothing heavier than ml_collections.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "dmfnet_jax"


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Absolute module names a file imports (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _outside_train():
  return [p for p in sorted(PACKAGE.rglob("*.py")) if "train" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("path", _outside_train(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_nothing_outside_train_imports_train(path):
  offending = sorted(m for m in _imported_modules(path)
                     if m == "dmfnet_jax.train" or m.startswith("dmfnet_jax.train."))
  assert not offending, f"{path.relative_to(REPO_ROOT)} imports {offending}"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.py")),
                         ids=lambda p: p.name)
def test_config_files_import_only_ml_collections_and_the_defaults(path):
  allowed = {"ml_collections", "dmfnet_jax", "dmfnet_jax.config_defaults"}
  assert _imported_modules(path) <= allowed


def test_loading_every_config_imports_no_framework():
  script = (
      "import importlib.util, pathlib, sys\n"
      "for path in sorted(pathlib.Path('configs').glob('*.py')):\n"
      "  spec = importlib.util.spec_from_file_location(path.stem, path)\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  module.get_config(None)\n"
      "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
      "{'jax', 'flax', 'grain', 'orbax', 'optax', 'numpy', 'torch'})\n"
      "print(','.join(heavy))\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True)
  assert result.stdout.strip() == ""
