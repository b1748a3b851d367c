"""Progress bars: drawn on a terminal (a real pseudo-terminal here), silent in pipes and CI."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from hhdata import progress

ROOT = Path(__file__).parent.parent


def run_hhdata(
    args: list[str], terminal: bool, size: tuple[int, int] = (24, 80), **env: str
) -> tuple[str, str]:
    """stdout and stderr of `python -m hhdata.cli ARGS`, stderr a pty of size (rows,
    columns) or a pipe; env is added to the environment, without any CI variable of ours."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "HHDATA_NO_PROGRESS")}
    environment |= env
    command = [sys.executable, "-m", "hhdata.cli", *args]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
        return done.stdout, done.stderr
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=secondary, env=environment, cwd=ROOT
    ) as child:
        os.close(secondary)
        shown = b""
        while True:
            try:
                piece = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not piece:
                break
            shown += piece
        out = child.stdout.read().decode()
    os.close(main)
    return out, shown.decode(errors="replace")


def run_validate(
    path: Path, terminal: bool, size: tuple[int, int] = (24, 80), **env: str
) -> tuple[str, str]:
    """stdout and stderr of `python -m hhdata.cli validate PATH` (see run_hhdata)."""
    return run_hhdata(["validate", str(path)], terminal, size, **env)


@pytest.mark.parametrize("size", [(24, 80), (0, 0)], ids=["24x80", "no-size"])
def test_a_terminal_shows_the_reading_bar(sample_path, size):
    out, err = run_validate(sample_path, terminal=True, size=size)
    assert "ok: every record was accepted" in out
    assert "read: 100%" in err  # tqdm's bar: the stage's label, then the share done


def test_a_pipe_gets_no_progress_text(sample_path):
    out, err = run_validate(sample_path, terminal=False)
    assert "ok: every record was accepted" in out
    assert err == ""


@pytest.mark.parametrize("variable", ["CI", "HHDATA_NO_PROGRESS"])
def test_ci_turns_the_bar_off_even_on_a_terminal(sample_path, variable):
    out, err = run_validate(sample_path, terminal=True, **{variable: "1"})
    assert "ok: every record was accepted" in out
    assert "read" not in err


def test_stage_counts_what_it_is_told(capsys):
    with progress.stage("hashing", total=10, unit="pairs", show=True) as advance:
        for _ in range(10):
            advance(1)
    assert "hashing: 100%" in capsys.readouterr().err
    with progress.stage("hashing", total=10, show=False) as advance:
        advance(10)
    assert capsys.readouterr().err == ""
