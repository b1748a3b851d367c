"""PPO episodes per second: hhdata's reference trainer against TRL 1.12.0's PPOTrainer, one run.

Both sides get the same tiny policy and reference (one saved causal LM), the same reward
model and a value model copied from it (one LlamaForSequenceClassification; hhdata's side
reads the same weights as a `training.reward_model.RewardModel`), the same token ids of the
same prompts, batch, reply length, PPO epochs, temperature and KL coefficient, on the CPU.
Each side runs in its own subprocess (TRL in its own virtual environment, .venv-trl112),
alternating, and reports the episodes trained divided by the seconds of its training loop.

    python bench/ppo.py --out bench/.cache/ppo --repeats 2    # from the repository root

`prepare` (in this project's venv) writes the shared models and prompts; `ours` and `trl`
are the two sides, called by the default `compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_PYTHON = ROOT / ".venv-trl112" / "bin" / "python"


def prepare(out: Path, settings: dict) -> None:
    """Tokenizer, policy (= reference), reward model (HF and hhdata layouts) and prompt ids."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForSequenceClassification

    from training import models
    from training.common import load_pairs
    from training.reward_model import RewardModel, save_reward_model
    from training.rollout import fit_query
    from training.text import encode_prompt

    rows = load_pairs(None)[0]["test"]
    tokenizer = models.train_tiny_tokenizer(
        [row["chosen_text"] for row in rows], vocab_size=settings["vocab_size"]
    )
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=1)
    policy.save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    torch.manual_seed(2)
    config = models.tiny_config(tokenizer)
    config.num_labels = 1
    scorer = LlamaForSequenceClassification(config)
    scorer.save_pretrained(out / "rm-hf")
    tokenizer.save_pretrained(out / "rm-hf")
    ours = RewardModel(scorer.model)
    ours.score.weight.data.copy_(scorer.score.weight.data)
    save_reward_model(
        ours,
        tokenizer,
        out / "rm" / "model",
        {"max_length": 512, "chat_template": False, "base_model": "tiny"},
    )
    # each prompt's start token and its latest tokens, as training.ppo cuts them (fit_query)
    queries = [
        fit_query(
            encode_prompt(tokenizer, row["prompt"], chat=False)[0], settings["query_length"], 1
        )
        for row in rows
    ]
    (out / "queries.json").write_text(json.dumps(queries))


def run_ours(out: Path, settings: dict) -> dict:
    """hhdata's training.ppo.main on the prepared models; seconds of its update loop."""
    sys.path.insert(0, str(ROOT))
    from training.ppo import Args, main

    target = out / "ours-run"
    shutil.rmtree(target, ignore_errors=True)
    updates = settings["episodes"] // settings["batch_size"]
    args = Args(
        policy=str(out / "sft"),
        reward_model=str(out / "rm"),
        output_dir=str(target),
        seed=1,
        total_episodes=settings["episodes"],
        batch_size=settings["batch_size"],
        num_mini_batches=1,
        num_ppo_epochs=settings["ppo_epochs"],
        learning_rate=3e-4,
        query_length=settings["query_length"],
        response_length=settings["response_length"],
        temperature=0.7,
        missing_stop_penalty=1.0,
        normalize_reward=False,
        kl_coef=0.05,
        adaptive_kl=False,
        eval_prompts=16,
        num_samples_shown=0,
        save_every=updates,
    )
    metrics = main(args)
    history = metrics["history"]
    return {
        "episodes": history[-1]["episodes"],
        "seconds": history[-1]["seconds"],
        "cpu_seconds": history[-1]["cpu_seconds"],
        "final_score": history[-1]["score"],
        "final_kl": history[-1]["kl"],
    }


def run_trl(out: Path, settings: dict) -> dict:
    """TRL 1.12.0's trl.experimental.ppo.PPOTrainer on the same models; seconds of
    trainer.train()."""
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assert trl.__version__ == "1.12.0", (
        f"TRL side needs trl 1.12.0, found {trl.__version__} ({trl.__file__})"
    )
    tokenizer = AutoTokenizer.from_pretrained(out / "sft", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(out / "sft")
    reference = AutoModelForCausalLM.from_pretrained(out / "sft")
    reward = AutoModelForSequenceClassification.from_pretrained(out / "rm-hf", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(out / "rm-hf", num_labels=1)
    queries = json.loads((out / "queries.json").read_text())
    dataset = Dataset.from_dict({"input_ids": queries})
    config = PPOConfig(
        output_dir=str(out / "trl-run"),
        seed=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=settings["batch_size"],
        total_episodes=settings["episodes"],
        num_ppo_epochs=settings["ppo_epochs"],
        learning_rate=3e-4,
        response_length=settings["response_length"],
        temperature=0.7,
        stop_token="eos",
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        num_sample_generations=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
    )
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    logged = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    return {
        "episodes": int(trainer.state.episode),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "final_score": logged[-1]["objective/scores"] if logged else None,
        "final_kl": logged[-1].get("objective/kl") if logged else None,
    }


def side(name: str, out: Path, settings: dict, threads: int) -> dict:
    """Run one side in a fresh subprocess (its own interpreter and venv) and read its JSON line."""
    python = str(TRL_PYTHON) if name == "trl" else sys.executable
    command = [
        python,
        __file__,
        name,
        "--out",
        str(out),
        "--settings",
        json.dumps(settings),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(out: Path, settings: dict, repeats: int, threads: int) -> None:
    """Prepare once, alternate the sides `repeats` times, print a markdown table."""
    if not TRL_PYTHON.exists():
        raise SystemExit(
            "no .venv-trl112: python -m venv .venv-trl112 && echo "
            "$PWD/.venv/lib/python3.11/site-packages > "
            ".venv-trl112/lib/python3.11/site-packages/zz_main.pth && .venv-trl112/bin/pip install "
            "--no-deps trl==1.12.0"
        )
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "prepare",
            "--out",
            str(out),
            "--settings",
            json.dumps(settings),
        ],
        check=True,
        cwd=ROOT,
    )
    results = {"ours": [], "trl": []}
    for _ in range(repeats):
        for name in ("ours", "trl"):
            results[name].append(side(name, out, settings, threads))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"threads {threads}; settings {json.dumps(settings)}"
    )
    print(
        "| trainer | run | episodes | loop wall s | episodes/s (wall) | loop CPU s | episodes/s "
        "(CPU) | final score | final KL |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rates: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for name, label in (("ours", "hhdata training.ppo"), ("trl", "TRL 1.12.0 PPOTrainer")):
        for index, result in enumerate(results[name], 1):
            wall, cpu = (
                result["episodes"] / result["seconds"],
                result["episodes"] / result["cpu_seconds"],
            )
            rates["wall"].setdefault(name, []).append(wall)
            rates["cpu"].setdefault(name, []).append(cpu)
            print(
                f"| {label} | {index} | {result['episodes']} | {result['seconds']:.1f} | "
                f"{wall:.2f} | "
                f"{result['cpu_seconds']:.1f} | {cpu:.2f} | {result['final_score']:.3f} | "
                f"{result['final_kl']:.3f} |"
            )
    print()
    for clock, by_side in rates.items():
        pairs = sorted(o / t for o, t in zip(by_side["ours"], by_side["trl"]))
        median = (
            pairs[len(pairs) // 2]
            if len(pairs) % 2
            else (pairs[len(pairs) // 2 - 1] + pairs[len(pairs) // 2]) / 2
        )
        print(
            f"speed-up by {clock} time: median of the {len(pairs)} alternating pairs "
            f"{median:.2f}x, "
            f"best against best {max(by_side['ours']) / max(by_side['trl']):.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "prepare", "ours", "trl"]
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/.cache/ppo")
    parser.add_argument(
        "--settings", type=json.loads, default=None, help="JSON of the shared settings"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    options = parser.parse_args()
    settings = options.settings or {
        "episodes": options.episodes,
        "batch_size": options.batch_size,
        "response_length": options.response_length,
        "query_length": options.query_length,
        "ppo_epochs": options.ppo_epochs,
        "vocab_size": 1024,
    }
    if options.mode == "compare":
        compare(options.out, settings, options.repeats, options.threads)
        return
    if options.mode == "prepare":
        prepare(options.out, settings)
        return
    import torch

    torch.set_num_threads(options.threads)
    result = (run_ours if options.mode == "ours" else run_trl)(options.out, settings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
