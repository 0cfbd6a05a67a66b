"""The layers (pyproject's [tool.importlinter]): dagster_project imports unicorn_assets, which imports
unicorn_resources, never the other way; the stage logic in unicorn_assets/logic imports no Dagster;
nothing imports Dagster's private modules (`dagster._…`, `dagster_shared`) but the one quarantined
module, dagster_project/dagster_internal.py. `lint-imports` checks the tree (and the scan below
the private `dagster._…` modules, which import-linter cannot name), and on a copy with one bad
import each must fail naming the import."""

from __future__ import annotations

import ast
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
    assert "3 kept, 0 broken" in result.stdout


QUARANTINE = "dagster_project/dagster_internal.py"


def private_dagster_imports(root: Path) -> list[str]:
    """`file:line module` of each import of a private Dagster module (dagster._…, dagster_shared)
    in the packages, the quarantined module excepted."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative == QUARANTINE:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{relative}:{node.lineno} {name}" for name in names
                          if name.startswith(("dagster._", "dagster_shared"))]
    return found


def test_only_the_quarantined_module_uses_dagster_internals():
    assert private_dagster_imports(ROOT) == []
    assert "from dagster._core" in (ROOT / QUARANTINE).read_text(encoding="utf-8")


def test_a_private_dagster_import_elsewhere_is_reported(tmp_path: Path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "dagster_project/jobs.py").open("a", encoding="utf-8") as handle:
        handle.write("\nfrom dagster._core.utils import make_new_backfill_id  # private\n")
    (found,) = private_dagster_imports(tmp_path)
    assert found.startswith("dagster_project/jobs.py:") and found.endswith("dagster._core.utils")


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("unicorn_resources/storage.py", "import unicorn_assets.partitions", "Imports point downward"),
    ("unicorn_assets/checks.py", "import dagster_project.jobs", "Imports point downward"),
    ("unicorn_assets/logic/text.py", "import dagster", "The stage logic imports no Dagster"),
    ("unicorn_resources/storage.py", "import dagster_shared.record", "Public Dagster APIs only"),
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
