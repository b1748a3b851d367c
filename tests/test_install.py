"""The package as a user installs it: the wheel holds the trainers, the data, the cards and the
local Hub, and an installed copy runs `hhdata train` and the demo without the checkout.

The full route (a fresh venv, `pip install '.[train]'`, the whole demo from another folder)
takes minutes and needs the registries: `make install-check` runs it (see README.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a build reads: the package sources and their data, never the tests or build output
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "hhdata", "training")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """hhdata's wheel, built from a copy of the checkout (a build writes into its source)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "--quiet", "--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [built] = out.glob("hhdata-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (without dependencies: this interpreter has them) into a folder."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def test_the_wheel_holds_trainers_data_cards_and_the_local_hub(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    trainers = {f"training/{p.name}" for p in (ROOT / "training").glob("*.py")}
    assert {"training/__init__.py", "training/reward_model.py", "training/ppo.py"} <= trainers
    assert trainers <= names, sorted(trainers - names)
    shipped = [
        *(p for p in (ROOT / "hhdata" / "hub" / "localserver").glob("*.py")),
        *(p for p in (ROOT / "hhdata" / "cards").iterdir()),
        *(p for p in (ROOT / "hhdata" / "schemas").iterdir()),
        *(p for p in (ROOT / "hhdata" / "data").rglob("*") if p.is_file()),
    ]
    expected = {p.relative_to(ROOT).as_posix() for p in shipped}
    assert "hhdata/data/hh-rlhf/harmless-base/test.jsonl.gz" in expected
    assert "hhdata/cards/model_card.md" in expected
    assert expected <= names, sorted(expected - names)
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]


def run_installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run `argv` with only the installed copy on the path (this interpreter's packages
    below it), from `cwd`, so nothing can come from the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_installed_copy_imports_from_itself_not_the_checkout(installed, tmp_path):
    code = (
        "import hhdata, training, pathlib; "
        "print(hhdata.__file__); print(training.__file__); "
        # the trainers read their card templates from hhdata beside them
        "print((pathlib.Path(training.__file__).parents[1] / 'hhdata/cards').is_dir())"
    )
    result = run_installed(installed, tmp_path, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    hhdata_file, training_file, cards = result.stdout.split()
    assert Path(hhdata_file).is_relative_to(installed), hhdata_file
    assert Path(training_file).is_relative_to(installed), training_file
    assert cards == "True"


def test_the_installed_hhdata_train_reaches_the_trainer(installed, tmp_path):
    result = run_installed(
        installed, tmp_path, str(installed / "bin" / "hhdata"), "train", "reward-model", "--help"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--run-dir" in result.stdout and "--max-steps" in result.stdout


def test_the_installed_demo_answers_help(installed, tmp_path):
    result = run_installed(installed, tmp_path, sys.executable, "-m", "hhdata.demo", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: python -m hhdata.demo" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "Example: cd /tmp && python -m hhdata.demo"
    assert not (tmp_path / ".demo").exists()  # --help ran nothing
