"""Ctrl-C and SIGTERM end a command through its clean-up: the near stage's spill folder and
a release's staging folder are removed, the exit code is 130 or 143, and no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# `hhdata ARGS` in a process whose near stage streams the bundled sample in small batches
# (the command's own defaults stream only from 250,000 rows), a batch's sketches taking at
# least 50 ms more, so that the run is still sketching when the signal comes
SAMPLE_BATCHES = -(-2312 // 50)  # the bundled sample's pairs in batches of 50
DRIVER = """
import atexit, sys, time
from hhdata import dedup
from hhdata.cli import main
from hhdata.dedup import run

small = run.NearStream(min_rows=0, batch_rows=50, pairs_per_partition=3000)
whole = run.deduplicate

def streamed(pairs, settings=run.DedupSettings(), progress=False, stream=None):
    return whole(pairs, settings, progress, small)

sketches = run.sketches
batches = []
atexit.register(lambda: print(f"sketched {len(batches)} batches", file=sys.stderr))

def slow_sketches(pairs, settings):
    batches.append(pairs.num_rows)
    time.sleep(0.05)
    return sketches(pairs, settings)

run.deduplicate = dedup.deduplicate = streamed
run.sketches = slow_sketches
sys.exit(main(sys.argv[1:]))
"""


def _environment(temp: Path) -> dict[str, str]:
    """This environment without CI, with TMPDIR ``temp`` and no progress bars."""
    environment = {k: v for k, v in os.environ.items() if k != "CI"}
    return environment | {"TMPDIR": str(temp), "HHDATA_NO_PROGRESS": "1"}


def _spill_folders(temp: Path) -> list[Path]:
    return sorted(temp.glob("hhdata-near-*"))


def _interrupted(args: list[str], temp: Path, signum: int) -> tuple[int, str, list[Path]]:
    """Start the driver on ARGS, send ``signum`` once a spilled batch is on disk, and return
    (exit code, stderr, the spill folders seen while it ran)."""
    child = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        cwd=ROOT,
        env=_environment(temp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[Path] = []
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        seen = _spill_folders(temp)
        if seen and any(seen[0].iterdir()):
            child.send_signal(signum)
            break
        time.sleep(0.005)
    _, err = child.communicate(timeout=120)
    return child.returncode, err, seen


@pytest.mark.parametrize(
    "verb, signum, code, said",
    [
        ("dedup", signal.SIGTERM, 143, "terminated (SIGTERM)"),
        ("dedup", signal.SIGINT, 130, "interrupted"),
        ("build", signal.SIGTERM, 143, "terminated (SIGTERM)"),
    ],
)
def test_a_signal_during_the_streamed_near_stage_removes_its_files(
    sample_path, tmp_path, verb, signum, code, said
):
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "releases"
    args = [verb, str(sample_path)]
    if verb == "build":
        args += ["--version", "1.0.0", "--out", str(out)]
    returncode, err, seen = _interrupted(args, temp, signum)
    assert seen, f"the run never spilled a batch to {temp}: {err}"
    assert returncode == code, err
    assert f"hhdata {verb}: {said}; its temporary files were removed" in err
    assert "Traceback" not in err
    # the sketching thread stopped at the next batch rather than sketching them all
    assert int(err.split("sketched ")[1].split()[0]) < SAMPLE_BATCHES
    assert _spill_folders(temp) == []
    assert list(temp.iterdir()) == []
    if verb == "build":  # neither the staging folder nor a release is left
        assert not out.exists() or list(out.iterdir()) == []


def test_the_driver_runs_to_the_end_without_a_signal(sample_path, tmp_path):
    """The same streamed run, left alone, finishes and leaves no spill folder behind: the
    test above stops a run that works."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, "dedup", str(sample_path)],
        cwd=ROOT,
        env=_environment(temp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "read 2,312 records: kept" in done.stdout
    assert f"sketched {SAMPLE_BATCHES} batches" in done.stderr
    assert list(temp.iterdir()) == []


# a stand-in trainer that says when it is ready and how it was stopped (a real trainer
# would write a checkpoint there), and `hhdata train sft` pointed at it
TRAINER = """
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])

def stopped(signum, frame):
    log.write_text(log.read_text() + signal.Signals(signum).name + "\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, stopped)
signal.signal(signal.SIGINT, stopped)
log.write_text("ready\\n")
time.sleep(60)
log.write_text(log.read_text() + "not stopped\\n")
"""
TRAIN_DRIVER = """
import sys
from hhdata.cli import main, train
train.TRAINERS["sft"] = ("stand_in_trainer", "a stand-in")
sys.exit(main(["train", "sft", *sys.argv[1:]]))
"""


def test_sigterm_to_hhdata_train_reaches_the_trainer_which_stops_as_it_chooses(tmp_path):
    (tmp_path / "stand_in_trainer.py").write_text(TRAINER)
    log = tmp_path / "trainer.log"
    environment = {k: v for k, v in os.environ.items() if k != "CI"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(ROOT), environment.get("PYTHONPATH", "")]
    )
    # its own session: the signal goes to hhdata alone, as from `kill` or a scheduler
    parent = subprocess.Popen(
        [sys.executable, "-c", TRAIN_DRIVER, str(log)],
        cwd=ROOT,
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().startswith("ready")):
        assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
        time.sleep(0.01)
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 143, err
    assert log.read_text() == "ready\nSIGTERM\n"  # the trainer got it and ended its own way
    assert "hhdata train: terminated (SIGTERM); its temporary files were removed" in err
    assert "Traceback" not in err
