"""The whole chain on the real SmolLM2-135M: reward model -> SFT -> PPO (bench/smollm2_e2e.py).

Benchmark-sized (minutes on two cores), so excluded from make test: run it with
`pytest -m benchmark tests/test_smollm2_e2e.py`. Figures and timings: bench/smollm2_e2e.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.benchmark
def test_reward_model_sft_and_ppo_run_end_to_end_on_smollm2(tmp_path):
    script = Path(__file__).parent.parent / "bench" / "smollm2_e2e.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "e2e.json"),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert 0.0 <= result["reward_model"]["held_out_accuracy"] <= 1.0
    # a pretrained model fine-tuned on chosen replies gets better at them, even in a few steps
    assert result["sft"]["eval_loss_after"] < result["sft"]["eval_loss_before"]
    assert [u["update"] for u in result["ppo"]["updates"]] == [1, 2, 3]
    assert all(
        u["kl"] == u["kl"] and u["reply_length"] > 0 for u in result["ppo"]["updates"]
    )  # no NaN, replies sampled
    assert result["ppo"]["prompts"] == 16
