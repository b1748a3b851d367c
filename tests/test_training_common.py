"""training.common: per-process RNG state survives a checkpoint; run_cli's contract."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hhdata.errors import HhDataError
from training.common import UsageError, load_rng_state, rng_state_path, run_cli, save_rng_state


def draws(generator: torch.Generator) -> list:
    return [
        random.random(),
        float(np.random.rand()),
        float(torch.rand(1)),
        float(torch.rand(1, generator=generator)),
    ]


def test_each_rank_gets_back_its_own_random_numbers(tmp_path):
    generators = {}
    expected = {}
    for rank in (0, 1):  # two processes' streams, seeded apart as trainers seed them
        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(rank)
        generators[rank] = torch.Generator().manual_seed(100 + rank)
        draws(generators[rank])
        save_rng_state(tmp_path, rank, generators[rank])
        expected[rank] = draws(generators[rank])
    assert expected[0] != expected[1]
    assert rng_state_path(tmp_path, 0) != rng_state_path(tmp_path, 1)
    for rank in (1, 0):
        fresh = torch.Generator().manual_seed(7)
        random.seed(99)
        load_rng_state(tmp_path, rank, fresh)
        assert draws(fresh) == expected[rank]


def test_a_missing_rank_file_says_how_to_resume(tmp_path):
    save_rng_state(tmp_path, 0)
    with pytest.raises(
        HhDataError, match="no RNG state for process 1; resume with the number of processes"
    ):
        load_rng_state(tmp_path, 1)


@dataclass(frozen=True)
class Settings:
    """A command for the test."""

    size: int = 1
    """how many"""


def test_run_cli_turns_usage_errors_into_exit_2_and_keeps_bugs_loud(capsys):
    def refuse(settings):
        raise UsageError(f"--size {settings.size} is too big;\n  pick 1")

    with pytest.raises(SystemExit) as stopped:
        run_cli(refuse, Settings, ["--size", "5"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --size 5 is too big; pick 1\n"

    def broken(settings):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(broken, Settings, [])
