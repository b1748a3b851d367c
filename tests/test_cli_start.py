"""`hhdata --help` and every `hhdata VERB --help` import nothing heavy (they start at once).

Checked by the modules a fresh interpreter holds after printing the help, not by the
clock: the machine is shared, and a heavy import is what made the help slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hhdata.cli import build_parser

ROOT = Path(__file__).parent.parent
# what the parser must not import: Arrow and numpy (0.3-0.5 s with pandas), the Hub
# client, the readers, and the training stack
HEAVY_PACKAGES = (
    "pyarrow",
    "numpy",
    "pandas",
    "polars",
    "huggingface_hub",
    "datasets",
    "torch",
    "transformers",
    "trl",
    "jsonschema",
    "msgspec",
    "tqdm",
)
HEAVY_MODULES = ("hhdata.io.read", "hhdata.hub", "hhdata.load", "hhdata.pipeline")

_PROBE = """
import contextlib, io, json, sys
from hhdata.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def verbs() -> list[str]:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    return sorted(choices)


def loaded_after(*argv: str) -> set[str]:
    """The modules a fresh interpreter has imported after running `hhdata ARGV`."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY_MODULES or m.split(".")[0] in HEAVY_PACKAGES)


@pytest.mark.parametrize("verb", [None, *verbs()])
def test_help_imports_nothing_heavy(verb):
    modules = loaded_after(*([verb] if verb else []), "--help")
    assert "hhdata.cli" in modules  # the probe did run the command line
    assert heavy(modules) == []


def test_the_probe_sees_a_heavy_import_when_a_command_runs(sample_path):
    """The same probe after a real validation finds Arrow: the check above can fail."""
    modules = loaded_after("validate", str(sample_path))
    assert "pyarrow" in heavy(modules)
    assert "pandas" not in modules  # validate declines pyarrow's probe for pandas


def test_pandas_still_imports_after_a_validation(sample_path):
    code = (
        "import contextlib, io\n"
        "from hhdata.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['validate', {str(sample_path)!r}]) == 0\n"
        "import pyarrow as pa\n"
        "print(pa.table({'a': [1, 2]}).to_pandas()['a'].sum())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.split() == ["3"]


def test_importing_hhdata_is_light_and_its_names_still_work():
    modules = loaded_after("--version")
    assert heavy(modules) == []
    import hhdata

    assert callable(hhdata.load) and callable(hhdata.scan)
    assert hhdata.parse_transcript("\n\nHuman: Hi") == [{"role": "user", "content": "Hi"}]


def test_the_submodule_hhdata_load_does_not_replace_the_function():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hhdata.load, hhdata.scan, hhdata; print(callable(hhdata.load), "
            "callable(hhdata.scan))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert done.stdout.split() == ["True", "True"]
