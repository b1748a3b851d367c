"""The house rules of hhdata's imports: they only go down, and no private name crosses a module.

The layers are the import-linter contracts in pyproject.toml; `lint-imports` checks them.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hhdata"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the hhdata found in `cwd` (the contracts in its pyproject.toml)."""
    command = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which(
        "lint-imports"
    )
    if command is None:
        pytest.fail(
            "lint-imports is missing: pip install -e '.[dev]' (import-linter is in the dev extra)"
        )
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_imports_only_go_down():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package where the floor imports a stage is refused."""
    shutil.copytree(
        PACKAGE, tmp_path / "hhdata", ignore=shutil.ignore_patterns("data", "__pycache__")
    )
    shutil.copytree(
        ROOT / "training", tmp_path / "training", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schema = tmp_path / "hhdata" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom hhdata.pairs import build  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "hhdata.schema is not allowed to import hhdata.pairs" in result.stdout


def test_an_upward_import_between_trainers_breaks_the_contract(tmp_path):
    """The trainers' layers can fail too: text.py (shared encoding) importing a trainer."""
    for package in ("hhdata", "training"):
        shutil.copytree(
            ROOT / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("data", "__pycache__"),
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    text = tmp_path / "training" / "text.py"
    text.write_text(text.read_text() + "\nfrom training import sft  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "training.text is not allowed to import training.sft" in result.stdout


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_across_modules(source: str) -> list[str]:
    """`from hhdata.x import _name` and `x._name` on an imported hhdata module, in one source.

    >>> private_names_across_modules("from hhdata.io import read\\nread._source_of(1)")
    ['read._source_of']
    >>> private_names_across_modules("from hhdata._arrow import ARROW_POOL\\nARROW_POOL._x")
    []
    """
    tree = ast.parse(source)
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hhdata"):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{node.module}.{alias.name}")
                elif alias.name[:1].islower():  # a module or function: its private attributes count
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(
                alias.asname or alias.name
                for alias in node.names
                if alias.name.startswith("hhdata")
            )
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value)
            if owner in modules:
                found.append(f"{owner}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(ROOT))
)
def test_no_private_names_across_modules(path):
    assert private_names_across_modules(path.read_text()) == []


SOURCES = ["hhdata", "training", "tests", "bench"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    command = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if command is None:
        pytest.fail("ruff is missing: pip install -e '.[dev]' (ruff is in the dev extra)")
    return subprocess.run(
        [command, *args, *SOURCES], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_the_code_passes_ruff():
    """ruff's lint rules in pyproject.toml (line length 100 included) hold for all the code."""
    result = _ruff("check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_code_is_ruff_formatted():
    """`ruff format` would change nothing: run it on the files it names."""
    result = _ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
