"""The layers (pyproject's [tool.importlinter]): dagster_project imports unicorn_assets, which imports
unicorn_resources, never the other way; the stage logic in unicorn_assets/logic imports no Dagster.
`lint-imports` checks the tree, and on a copy with one bad import it must fail naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("dagster_project", "unicorn_assets", "unicorn_resources")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).with_name("lint-imports")
    if not command.exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    return subprocess.run([str(command), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, check=False)


def test_the_code_keeps_its_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("unicorn_resources/storage.py", "import unicorn_assets.partitions", "Imports point downward"),
    ("unicorn_assets/checks.py", "import dagster_project.jobs", "Imports point downward"),
    ("unicorn_assets/logic/text.py", "import dagster", "The stage logic imports no Dagster"),
])
def test_an_import_against_the_layers_is_reported(tmp_path: Path, module, line, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / module).open("a", encoding="utf-8") as handle:
        handle.write(f"\n{line}  # against the layers\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
    assert module.removesuffix(".py").replace("/", ".") in result.stdout
