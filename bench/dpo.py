"""Benchmark training.dpo against TRL 1.16's DPOTrainer, side by side in one run, CPU.

Both start from the same saved model (policy and frozen reference), get the same token ids
(our encoding and truncation, handed to TRL pre-tokenized), the same batches in the same
order, batch size, beta, AdamW, linear schedule, gradient clipping and fp32, dropout off.
Reports pairs per CPU-second and per wall second of training (the reference's log-probs
included on both sides) and the largest per-step difference of the loss curves.

    python bench/dpo.py --model tiny --steps 20 --batch-size 8 --max-length 256
    python bench/dpo.py --model llama --hidden 256 --layers 4 --steps 10 --max-length 512

Not part of `make test`; results and exact commands go to bench/dpo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

from training import models
from training.common import load_pairs
from training.dpo import Args, held_out_pairs, main, step_batch
from training.text import encode_pair, uses_chat_template

TRL = "TRL 1.16 DPOTrainer"


class PreTokenized(DPOTrainer):
    """DPOTrainer fed our token ids (prompt_ids, chosen_ids, rejected_ids, the columns its
    own tokenisation writes), so both tools train on exactly the same tokens; times the
    reference pass when it is precomputed."""

    reference_cpu_seconds = reference_seconds = 0.0

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset

    def _precompute_ref_logps(self, *args, **kwargs):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = super()._precompute_ref_logps(*args, **kwargs)
        self.reference_seconds += time.perf_counter() - started
        self.reference_cpu_seconds += time.process_time() - cpu_started
        return result


class LossLog(TrainerCallback):
    """TRL's per-step training loss."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def base_model(work: Path, options) -> Path:
    """The starting policy, saved as an SFT run's model folder both tools load: the tiny model
    (models.TINY_CONFIG) or a wider Llama (--hidden, --layers), random init, with a BPE
    tokenizer trained on the bundled sample's training pairs."""
    splits, _ = load_pairs(None)
    train_rows, _ = held_out_pairs(splits, Args())
    tokenizer = models.train_tiny_tokenizer(
        t for r in train_rows for t in (r["chosen_text"], r["rejected_text"])
    )
    torch.manual_seed(options.seed)
    if options.model == "tiny":
        model = models.load_causal_lm(models.TINY, tokenizer, seed=options.seed)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=options.hidden,
            intermediate_size=3 * options.hidden,
            num_hidden_layers=options.layers,
            num_attention_heads=options.hidden // 64,
            num_key_value_heads=options.hidden // 64,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    folder = work / "sft"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def our_args(options, policy: Path, out: Path, **changes) -> Args:
    return Args(
        policy=str(policy),
        output_dir=str(out),
        max_steps=options.steps,
        batch_size=options.batch_size,
        max_length=options.max_length,
        learning_rate=options.learning_rate,
        warmup_fraction=0.0,
        beta=options.beta,
        max_eval_pairs=options.eval_pairs,
        seed=options.seed,
        **changes,
    )


def trl_dataset(args: Args) -> Dataset:
    """Our training pairs as TRL's tokenized columns, in the order our run takes them."""
    tokenizer = models.load_tokenizer(args.policy)
    splits, _ = load_pairs(None)
    train_rows, _ = held_out_pairs(splits, args)
    chat = uses_chat_template(tokenizer, args.chat_template)
    order = [i for step in range(args.max_steps) for i in step_batch(step, len(train_rows), args)]
    pairs = [encode_pair(tokenizer, train_rows[i], args.max_length, chat) for i in order]
    return Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in pairs],
            "chosen_ids": [c for _, c, _ in pairs],
            "rejected_ids": [r for _, _, r in pairs],
        }
    )


def run_trl(options, args: Args, out: Path, precompute: bool) -> dict:
    tokenizer = models.load_tokenizer(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy)
    reference = AutoModelForCausalLM.from_pretrained(args.policy)
    config = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_steps=args.max_steps,
        max_length=None,  # the ids are already truncated exactly as ours
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.eval_batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # we hand over the batches in our order
        disable_dropout=True,
        gradient_checkpointing=False,  # DPOConfig turns it on by default; ours does not
        bf16=False,  # DPOConfig turns bf16 on by default; compare at one precision
        fp16=False,
    )
    log = LossLog()
    started = time.perf_counter()
    trainer = PreTokenized(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=trl_dataset(args),
        processing_class=tokenizer,
        callbacks=[log],
    )
    setup = time.perf_counter() - started
    train_started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - train_started + trainer.reference_seconds
    cpu_seconds = time.process_time() - cpu_started + trainer.reference_cpu_seconds
    pairs = args.max_steps * args.batch_size
    return {
        "losses": log.losses,
        "pairs_per_cpu_second": pairs / cpu_seconds,
        "pairs_per_second": pairs / seconds,
        "whole_seconds": time.perf_counter() - started,
        "setup_seconds": setup,
    }


def run_ours(options, args: Args) -> dict:
    started = time.perf_counter()
    metrics = main(args)
    train = metrics["train"]
    return {
        "losses": train["loss"],
        "pairs_per_cpu_second": train["pairs_per_cpu_second"],
        "pairs_per_second": train["pairs_per_second"],
        "whole_seconds": time.perf_counter() - started,  # with loading, encoding, evaluation
        "held_out_accuracy": metrics["overall"]["accuracy"],
    }


def throughput(options) -> dict:
    work = Path(options.work or tempfile.mkdtemp(prefix="dpo-bench-"))
    policy = base_model(work, options)
    results = {}
    for name in options.runs.split(","):
        if name == "ours":
            results["ours (default: prefix sharing, micro-batches)"] = run_ours(
                options, our_args(options, policy, work / "ours")
            )
        elif name == "ours-plain":
            results["ours, prefix sharing off, one padded batch"] = run_ours(
                options,
                our_args(
                    options,
                    policy,
                    work / "ours-plain",
                    prefix_sharing="off",
                    micro_batch_cost=-1,
                ),
            )
        elif name in ("trl", "trl-precompute"):
            label = TRL + (" (precompute_ref_log_probs)" if name == "trl-precompute" else "")
            results[label] = run_trl(
                options, our_args(options, policy, work / name), work / name, name != "trl"
            )
    first = next(iter(results.values()))
    base = results.get(TRL)
    for result in results.values():
        result["max_loss_difference"] = max(
            abs(a - b) for a, b in zip(result["losses"], first["losses"])
        )
        if base is not None:
            result["cpu_ratio_to_trl"] = (
                result["pairs_per_cpu_second"] / base["pairs_per_cpu_second"]
            )
            result["wall_ratio_to_trl"] = result["pairs_per_second"] / base["pairs_per_second"]
    return results


def table(results: dict) -> str:
    lines = [
        "| trainer | pairs / CPU-second | ratio to TRL | wall pairs / s | ratio to TRL "
        "| largest loss difference to the first row |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['pairs_per_cpu_second']:.2f} | {r.get('cpu_ratio_to_trl', 0):.2f}x "
            f"| {r['pairs_per_second']:.2f} | {r.get('wall_ratio_to_trl', 0):.2f}x "
            f"| {r['max_loss_difference']:.1e} |"
        )
    return "\n".join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "llama"], default="tiny")
    parser.add_argument("--hidden", type=int, default=256, help="llama: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="llama: decoder layers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eval-pairs", type=int, default=32, help="ours: held-out pairs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--runs",
        default="ours,trl,trl-precompute,ours-plain",
        help="comma-separated: ours, ours-plain, trl, trl-precompute (the first: loss baseline)",
    )
    parser.add_argument("--work", help="folder for the runs (default: a new temp folder)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse()
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = throughput(options)
    record = {
        "options": vars(options),
        "commit": commit,
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "results": results,
    }
    if options.out:
        Path(options.out).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "results"}))
    print(table(results))
