"""The prepared GPU check of issue 16 (run by bench/gpu_check.sh): the reward model and PPO on
SmolLM2-135M in bf16, each without and with LoRA, one after another in one process, with the
tokens per second, the peak GPU memory and the loss of each.

    python bench/gpu_check.py --out /tmp/gpu-check            # on a GPU machine
    python bench/gpu_check.py --out /tmp/gpu-check --dry-run  # CPU, tiny model, a few steps

Runs, all on the bundled harmless-base sample, bf16, seed 1:

1. reward model, full fine-tune; 2. reward model, LoRA rank 16;
3. PPO, full (policy = SmolLM2-135M-Instruct, reward model = run 1, value model from it);
4. PPO, LoRA rank 16 (reference = the policy with adapters off), same reward model;
5. when vllm imports (pip install 'hhdata[vllm]'): run 3 again with ``--generator vllm``, its
   rollouts sampled by a vLLM engine in the process (30% of the GPU's memory), the weights
   pushed after every update; its tokens/s beside run 3's is vLLM against transformers
   generation inside PPO, and its sampling_logprob_error says how far vLLM's log-probabilities
   are from the trainer's. Skipped (a line says so) where vllm is missing, and on --dry-run.

Tokens per second: reward model, the mean encoded length of a training pair (prompt + chosen
+ rejected) times the pairs per second of the training loop; PPO, the mean reply length
times the episodes per second (generated tokens), beside the episodes per second.
Writes results.json and results.md (a table for bench/gpu.md) to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# sized for < 8 minutes on one GPU; --dry-run shrinks them to seconds on a CPU
FULL = dict(
    model="smollm2-135m",
    rm=dict(batch_size=16, max_steps=120, max_length=512, max_eval_pairs=256),
    ppo=dict(
        total_episodes=512,
        batch_size=64,
        num_mini_batches=4,
        response_length=64,
        query_length=256,
        eval_prompts=64,
        learning_rate=1e-5,
    ),
)
DRY = dict(
    model="tiny",
    rm=dict(batch_size=8, max_steps=2, max_length=64, max_train_pairs=64, max_eval_pairs=16),
    ppo=dict(
        total_episodes=16,
        batch_size=8,
        num_mini_batches=2,
        response_length=6,
        query_length=32,
        eval_prompts=8,
        learning_rate=1e-3,
        reward_norm_samples=8,
    ),
)
LORA = dict(lora_rank=16, lora_alpha=32.0)


def peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    """Peak GPU memory allocated since the last reset, in GB (None on a CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def mean_pair_tokens(run_dir: Path, max_length: int) -> float:
    """Mean encoded length (prompt + chosen + rejected) of the pairs the run trained on."""
    from training.common import load_pairs
    from training.models import load_tokenizer
    from training.reward_model import Args, split_held_out
    from training.text import encode_pair

    settings = json.loads((run_dir / "settings.json").read_text())
    tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
    rows, _ = split_held_out(load_pairs(None)[0], Args.eval_fraction)
    rows = rows[: settings["args"]["max_train_pairs"]]
    chat = settings["chat_template"]
    return statistics.mean(
        sum(map(len, encode_pair(tokenizer, row, max_length, chat))) for row in rows
    )


def reward_model_run(out: Path, sizes: dict, lora: bool) -> dict:
    from training import reward_model

    run_dir = out / ("rm-lora" if lora else "rm")
    args = reward_model.Args(
        model=sizes["model"],
        run_dir=str(run_dir),
        precision="bf16",
        save_every=10_000,
        **sizes["rm"],
        **(LORA if lora else {}),
    )
    peak_memory_reset()
    metrics = reward_model.main(args)
    train = metrics["train"]
    tokens = mean_pair_tokens(run_dir, args.max_length)
    return {
        "run": f"reward model{' LoRA r16' if lora else ''}",
        "steps": train["steps"],
        "tokens_per_second": tokens * train["pairs_per_second"],
        "pairs_per_second": train["pairs_per_second"],
        "peak_memory_gb": peak_memory_gb(),
        "loss": train["final_loss"],
        "held_out_accuracy": metrics["overall"]["accuracy"],
    }


def policy_folder(out: Path, sizes: dict) -> Path:
    """The starting policy: SmolLM2-135M-Instruct (dequantised from its GGUF) saved as a plain
    transformers model with its tokenizer; for the dry run, a tiny model on the reward model's
    tokenizer."""
    from training import models

    folder = out / "policy-start"
    if sizes["model"] == models.TINY:
        tokenizer = models.load_tokenizer(str(out / "rm" / "tokenizer"))
    else:
        tokenizer = models.load_tokenizer(sizes["model"])
    models.load_causal_lm(sizes["model"], tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ppo_run(out: Path, sizes: dict, policy: Path, lora: bool, generator="transformers") -> dict:
    from training import ppo

    vllm = generator == "vllm"
    args = ppo.Args(
        policy=str(policy),
        reward_model=str(out / "rm"),
        output_dir=str(out / (("ppo-lora" if lora else "ppo") + ("-vllm" if vllm else ""))),
        precision="bf16",
        save_every=10_000,
        generator=generator,
        **sizes["ppo"],
        **(LORA if lora else {}),
    )
    peak_memory_reset()
    metrics = ppo.main(args)
    history = metrics["history"]
    reply = statistics.mean(record["reply_length"] for record in history)
    return {
        "run": f"PPO{' LoRA r16' if lora else ''}{' vLLM generation' if vllm else ''}",
        "steps": len(history),
        "tokens_per_second": reply * metrics["episodes_per_second"],
        "episodes_per_second": metrics["episodes_per_second"],
        "peak_memory_gb": peak_memory_gb(),
        "loss": history[-1]["pg_loss"] + args.vf_coef * history[-1]["value_loss"],
        "score": history[-1]["score"],
        "kl": history[-1]["kl"],
        "sampling_logprob_error": max(r["sampling_logprob_error"] for r in history),
    }


def vllm_skipped(options) -> str | None:
    """Why the PPO run with --generator vllm is skipped, or None when it runs."""
    if options.no_vllm:
        return "--no-vllm"
    if options.dry_run:
        return "dry run: vLLM needs a CUDA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed: pip install 'hhdata[vllm]'"
    return None


def vllm_line(rows: list[dict], note: str | None) -> str:
    """The line under the table on the vLLM run: the ratio of its PPO tokens/s to
    transformers generation's (run 3), and its sampling log-prob error; or why it did not run."""
    if note is not None:
        return f"\nPPO with --generator vllm: not run ({note})\n"
    plain, vllm = rows[2], rows[-1]
    return (
        f"\nPPO tokens/s, vLLM generation / transformers generation: "
        f"{vllm['tokens_per_second'] / plain['tokens_per_second']:.2f}x; largest sampling "
        f"log-prob error (vLLM's against the trainer's): {vllm['sampling_logprob_error']:.4f} "
        f"(transformers: {plain['sampling_logprob_error']:.4f})\n"
    )


def machine() -> dict:
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": commit,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | steps | tokens/s | pairs or episodes/s | peak GPU memory GB | final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = row.get("pairs_per_second") or row.get("episodes_per_second")
        memory = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
        lines.append(
            f"| {row['run']} | {row['steps']} | {row['tokens_per_second']:.0f} | {rate:.1f} "
            f"| {memory} | {row['loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a fresh folder for the runs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps")
    parser.add_argument(
        "--no-vllm", action="store_true", help="skip the PPO run with --generator vllm"
    )
    options = parser.parse_args()
    import torch

    if not options.dry_run and not torch.cuda.is_available():
        sys.exit("error: no GPU visible to torch; run on a GPU machine, or pass --dry-run")
    if options.out.exists() and any(options.out.iterdir()):
        sys.exit(f"error: {options.out} is not empty; pass a fresh --out")
    sizes = DRY if options.dry_run else FULL
    started = time.perf_counter()
    rows = [reward_model_run(options.out, sizes, lora) for lora in (False, True)]
    policy = policy_folder(options.out, sizes)
    rows += [ppo_run(options.out, sizes, policy, lora) for lora in (False, True)]
    vllm_note = vllm_skipped(options)
    if vllm_note is None:
        rows.append(ppo_run(options.out, sizes, policy, lora=False, generator="vllm"))
    result = {
        **machine(),
        "dry_run": options.dry_run,
        "seconds": time.perf_counter() - started,
        "runs": rows,
    }
    (options.out / "results.json").write_text(json.dumps(result, indent=2))
    text = (
        f"{result['date_utc']} UTC, commit {result['commit']}, {result['device']}, torch "
        f"{result['torch']}, {result['seconds']:.0f} s in all"
        f"{' (DRY RUN: tiny model on the CPU)' if options.dry_run else ''}\n\n{table(rows)}\n"
        + vllm_line(rows, vllm_note)
    )
    (options.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
