"""Every trainer's command line: a usage or data error is one line on stderr and exit code 2.

Each case runs the real module in a subprocess, as a user would, and stops before training;
each trainer meets at least one bad flag or flag combination and one missing or wrong data
source (a subprocess costs an import of torch and transformers: the cases are few).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MISSING = "/nonexistent/hh-release"

CASES = [
    # PPO: a batch that does not split into the minibatches (the case issue 9 names)
    (
        "training.ppo",
        ["--batch-size", "16", "--num-mini-batches", "3"],
        "--batch-size / --num-mini-batches: 16 is not divisible by 3",
    ),
    ("training.ppo", ["--data", MISSING], f"{MISSING}: no such file or directory"),
    ("training.reward_model", ["--data", MISSING], f"{MISSING}: no such file or directory"),
    (
        "training.reward_model",
        ["--max-train-pairs", "2", "--batch-size", "4"],
        "need at least --batch-size 4",
    ),
    (
        "training.sft",
        ["--split", "validation"],
        "no split 'validation' (it has ['test']); pass --split",
    ),
    (
        "training.sft",
        ["--batch-size", "eight"],
        "argument --batch-size: invalid int value: 'eight'",
    ),
]


@pytest.mark.parametrize(
    ("module", "flags", "message"), CASES, ids=[f"{m}:{' '.join(f)}" for m, f, _ in CASES]
)
def test_a_bad_command_line_is_one_line_and_exit_2(tmp_path, module, flags, message):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            *flags,
            "--output-dir" if module != "training.reward_model" else "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
