"""`hhdata train reward-model|sft|ppo`: the trainers' own command lines, reached from hhdata."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hhdata.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_flags_after_the_trainer_reach_it_and_its_exit_code_is_ours(tmp_path, capfd):
    """A trainer's usage error (exit 2, one line naming --data) comes back unchanged."""
    missing = tmp_path / "no-such-release"
    assert main(["train", "sft", "--data", str(missing), "--max-steps", "1"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: {missing}: no such file") and "--data" in err
    assert "\n" not in err


def test_help_after_the_trainer_is_the_trainers_help(capfd):
    assert main(["train", "reward-model", "--help"]) == 0
    out = capfd.readouterr().out
    assert "--run-dir" in out and "--max-steps" in out


@pytest.mark.parametrize("package", ["torch", "transformers", "accelerate"])
def test_without_the_train_extra_one_line_names_the_install(package, monkeypatch, capsys):
    # None in sys.modules is how Python marks a module as not importable
    monkeypatch.setitem(sys.modules, package, None)
    assert main(["train", "ppo", "--help"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"hhdata train: error: the trainers need {package}, which this environment lacks; "
        "install them with pip install 'hhdata[train]'\n"
    )


def test_hhdata_help_imports_no_trainer_and_no_torch():
    code = textwrap.dedent(
        """
        import sys
        from hhdata.cli import main
        for argv in (["--help"], ["train", "--help"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = {"torch", "transformers", "training"} & {m.split(".")[0] for m in sys.modules}
        heavy = sorted(heavy)
        print("heavy:", heavy, file=sys.stderr)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "heavy: []"
