"""End to end on the real SmolLM2-135M-Instruct: reward model -> SFT -> a few PPO updates.

Each stage is the command a user runs (``python -m training...``), in its own process, on the
bundled harmless-base sample; the script times each command and collects the figures its
run wrote: reward-model held-out accuracy, SFT held-out loss before and after, PPO batch
score and KL per update and the held-out win rate. Settings are small (few steps, short
lengths) so that the whole chain finishes in minutes on two CPU cores; the figures show the
chain works with a pretrained model, not what a full run reaches. Results: smollm2_e2e.md.

    PYTHONPATH=. .venv/bin/python bench/smollm2_e2e.py --work /tmp/bench-e2e \
        --out bench/.cache/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def stages(work: Path, scale: int) -> list[tuple[str, list[str]]]:
    """(name, command) of each stage; `scale` multiplies the steps and episodes."""
    python = [sys.executable, "-m"]
    return [
        (
            "reward_model",
            python
            + [
                "training.reward_model",
                "--model",
                MODEL,
                "--run-dir",
                str(work / "rm"),
                "--max-length",
                "96",
                "--batch-size",
                "8",
                "--max-steps",
                str(8 * scale),
                "--learning-rate",
                "2e-5",
                "--max-eval-pairs",
                str(48 * scale),
                "--eval-batch-size",
                "16",
            ],
        ),
        (
            "sft",
            python
            + [
                "training.sft",
                "--model",
                MODEL,
                "--output-dir",
                str(work / "sft"),
                "--max-length",
                "128",
                "--batch-size",
                "8",
                "--max-steps",
                str(8 * scale),
                "--learning-rate",
                "2e-5",
                "--eval-rows",
                str(32 * scale),
            ],
        ),
        (
            "ppo",
            python
            + [
                "training.ppo",
                "--policy",
                str(work / "sft"),
                "--reward-model",
                str(work / "rm"),
                "--output-dir",
                str(work / "ppo"),
                "--total-episodes",
                str(24 * scale),
                "--batch-size",
                "8",
                "--num-mini-batches",
                "2",
                "--num-ppo-epochs",
                "2",
                "--query-length",
                "64",
                "--response-length",
                "16",
                "--reward-norm-samples",
                "16",
                "--eval-prompts",
                str(16 * scale),
                "--num-samples-shown",
                "1",
                "--learning-rate",
                "1e-5",
            ],
        ),
    ]


def figures(work: Path) -> dict:
    """What each run wrote that says it worked."""
    rm = json.loads((work / "rm" / "metrics.json").read_text())
    sft = json.loads((work / "sft" / "metrics.json").read_text())
    ppo = json.loads((work / "ppo" / "metrics.json").read_text())
    return {
        "reward_model": {
            "held_out_accuracy": rm["overall"]["accuracy"],
            "held_out_pairs": rm["overall"].get("pairs"),
            "final_train_loss": rm["train"]["final_loss"],
            "steps": rm["train"]["steps"],
        },
        "sft": {
            "eval_loss_before": sft["eval_loss_before"],
            "eval_loss_after": sft["eval_loss_after"],
            "steps": sft["steps"],
            "split": sft["split"],
        },
        "ppo": {
            "updates": [
                {k: r[k] for k in ("update", "score", "kl", "entropy", "reply_length")}
                for r in ppo["history"]
            ],
            "win_rate": ppo["evaluation"]["win_rate"],
            "prompts": ppo["evaluation"]["prompts"],
            "policy_score": ppo["evaluation"]["policy_score"],
            "reference_score": ppo["evaluation"]["reference_score"],
        },
    }


def run(work: Path, scale: int) -> dict:
    """Run the chain in a fresh `work` folder; returns wall seconds per stage and the figures."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")}
    seconds = {}
    for name, command in stages(work, scale):
        print("$", " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - started, 1)
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise SystemExit(
                f"{name} failed (exit {done.returncode}); see {work / f'{name}.log'}:\n"
                f"{done.stderr[-2000:]}"
            )
        print(f"  {name}: {seconds[name]} s", flush=True)
    return {"seconds": seconds, "total_seconds": round(sum(seconds.values()), 1), **figures(work)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", default="/tmp/bench-e2e", help="scratch folder for the three runs (emptied first)"
    )
    parser.add_argument("--out", help="write the results as JSON here too")
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply steps, episodes and held-out sizes"
    )
    args = parser.parse_args()
    result = run(Path(args.work), args.scale)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
