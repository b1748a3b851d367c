"""Iterated online RLHF against one-shot, at an equal label budget and equal PPO compute.

The claim of Bai et al. 2022 (section 4.5): rounds of sample -> label -> retrain beat
labelling everything from the initial policy. Here, on tiny models and the bundled real
data, with a gold reward model as the annotator (the synthetic-gold setup of Gao et al.):

- iterated: R rounds of B/R comparisons each, every round sampled from the last round's
  policy; PPO continues from the last round's policy (--ppo-from last) for E/R episodes a
  round, so the final policy has had E episodes of PPO in all;
- one-shot: 1 round of B comparisons sampled from the SFT policy, then E episodes of PPO.

Both arms share the starting release, SFT policy, gold model, seed and held-out prompts;
the number compared is the final policy's mean gold reward on those prompts. Every loop is
a `python -m training.online` subprocess, as a user runs it.

    python bench/online.py --out bench/.cache/online --seeds 1 2 3   # from the repository root
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(out: Path, train: int, test: int) -> None:
    """Release 1.0.0 (bundled real pairs as a helpful-base release: harmless-online is not a
    known subset yet), a proxy reward model (tokenizer), SFT, and the gold model."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from hhdata.io.read import bundled_sample_path
    from hhdata.pipeline import build_release
    from training import reward_model, sft

    lines = gzip.open(bundled_sample_path(), "rt", encoding="utf-8").read().splitlines()
    raw = out / "raw" / "helpful-base"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.jsonl").write_text("\n".join(lines[:train]) + "\n", encoding="utf-8")
    (raw / "test.jsonl").write_text("\n".join(lines[train : train + test]) + "\n")
    release = build_release([out / "raw"], version="1.0.0", out=out / "releases").path
    common = dict(data=str(release), max_length=192, batch_size=16, max_eval_pairs=64)
    reward_model.main(reward_model.Args(run_dir=str(out / "rm0"), max_steps=20, **common))
    sft.main(
        sft.Args(
            data=str(release),
            tokenizer=str(out / "rm0"),
            output_dir=str(out / "sft"),
            max_steps=60,
            batch_size=16,
            max_length=192,
        )
    )
    # the gold model: every bundled pair (its own 80/20 split by id), another seed, 2 epochs
    gold_release = build_release(
        [bundled_sample_path()], version="1.0.0", out=out / "gold-release"
    ).path
    reward_model.main(
        reward_model.Args(
            data=str(gold_release),
            run_dir=str(out / "gold"),
            seed=7,
            max_length=192,
            batch_size=16,
            epochs=2,
            max_eval_pairs=256,
        )
    )


def loop(out: Path, arm: str, seed: int, settings: argparse.Namespace) -> dict:
    """One loop as a subprocess; returns its rounds.json and the wall seconds."""
    rounds = settings.rounds if arm == "iterated" else 1
    work_dir = out / f"{arm}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "training.online",
        "--data",
        str(out / "releases" / "1.0.0"),
        "--policy",
        str(out / "sft"),
        "--labeller",
        f"gold:{out / 'gold'}",
        "--reward-model",
        str(out / "rm0"),
        "--work-dir",
        str(work_dir),
        "--seed",
        str(seed),
        "--tau",
        str(settings.tau),
        "--rounds",
        str(rounds),
        "--comparisons-per-round",
        str(settings.budget // rounds),
        "--ppo-from",
        "last",
        "--ppo-total-episodes",
        str(settings.episodes // rounds),
        "--ppo-batch-size",
        "16",
        "--ppo-learning-rate",
        "1e-3",
        "--ppo-reward-norm-samples",
        "32",
        "--ppo-eval-prompts",
        "16",
        "--response-length",
        "16",
        "--query-length",
        "160",
        "--rm-batch-size",
        "16",
        "--rm-epochs",
        "1",
        "--rm-max-length",
        "192",
        "--rm-learning-rate",
        "1e-3",
        "--rm-max-eval-pairs",
        "64",
        "--rm-max-steps",
        str(settings.rm_max_steps),
        "--eval-prompts",
        str(settings.eval_prompts),
        "--sample-batch-size",
        "32",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    report = json.loads((work_dir / "rounds.json").read_text())
    return {"seconds": time.perf_counter() - started, "rounds": report["rounds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "online")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3, help="R of the iterated arm")
    parser.add_argument("--budget", type=int, default=192, help="B: labels per arm")
    parser.add_argument("--episodes", type=int, default=192, help="E: PPO episodes per arm")
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--rm-max-steps", type=int, default=30, help="per reward model")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    settings = parser.parse_args()
    settings.out.mkdir(parents=True, exist_ok=True)
    if not (settings.out / "gold" / "model").is_dir():
        prepare(settings.out, settings.train, settings.test)
    results: dict[str, list] = {"iterated": [], "one-shot": []}
    for seed in settings.seeds:
        for arm in results:
            outcome = loop(settings.out, arm, seed, settings)
            final = outcome["rounds"][-1]
            results[arm].append(
                {
                    "seed": seed,
                    "gold_score": final["gold_score"],
                    "kl_to_reference": final["kl_to_reference"],
                    "gold_agreement": [r["gold_agreement"] for r in outcome["rounds"]],
                    "proxy_accuracy_before": [
                        r["proxy_accuracy_before"] for r in outcome["rounds"]
                    ],
                    "seconds": outcome["seconds"],
                }
            )
            print(arm, seed, json.dumps(results[arm][-1]), flush=True)
    summary = {}
    for arm, runs in results.items():
        scores = [run["gold_score"]["mean"] for run in runs]
        summary[arm] = {
            "mean": statistics.mean(scores),
            "stdev": statistics.stdev(scores) if len(scores) > 1 else None,
            "min": min(scores),
            "max": max(scores),
        }
    record = {"settings": vars(settings) | {"out": str(settings.out)}, "runs": results}
    record["summary"] = summary
    name = "results-seeds-" + "-".join(map(str, settings.seeds)) + ".json"
    (settings.out / name).write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
