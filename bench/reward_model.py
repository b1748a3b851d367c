"""Benchmark training.reward_model against TRL 1.16's RewardTrainer, side by side in one run, CPU.

throughput: the same initial weights (our seeded model; TRL gets the same backbone and head
    in the AutoModelForSequenceClassification the trainer saves), the same token ids (our
    truncation, handed to TRL pre-tokenized), the same batches in the same order, batch size,
    max length, optimizer, learning-rate schedule and fp32 precision. Reports pairs per second
    of the training loop and the largest per-step loss difference (the same math should give
    the same curve).

cv: 5-fold cross-validation on the real harmless-base test split with the minilm backbone:
    train on four folds, test on the fifth, one epoch at the same budget for both tools. Both
    read BertForSequenceClassification's pooled [CLS] and get the same (truncated) token ids.

crosstable: the paper's helpful-vs-harmless table (train on one config, evaluate on every
    family) on synthetic pairs whose families prefer opposite things: a helpful pair prefers the
    reply with "certainly" over the one with "sorry", a harmless pair the reverse.

    python bench/reward_model.py throughput --model tiny --steps 40
    python bench/reward_model.py cv --folds 5
    python bench/reward_model.py crosstable

Not part of `make test`; results and exact commands go to bench/reward_model.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback
from trl import RewardConfig, RewardTrainer

from hhdata.pairs.transcript import render_transcript
from hhdata.schema import PAIR_SCHEMA, pair_id
from training import models
from training.common import load_pairs
from training.reward_model import Args, RewardModel, main, split_held_out
from training.text import encode_pair, reward_pad_id, uses_chat_template


class LossLog(TrainerCallback):
    """Collects TRL's per-step training loss and times the training loop alone."""

    def __init__(self):
        self.losses, self.seconds = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def trl_config(out: str, args: Args, steps: int, seed: int) -> RewardConfig:
    return RewardConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(args.warmup_fraction * steps),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_steps=steps,
        max_length=None,  # the ids are already truncated exactly as ours
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # we hand over the batches in our order
        disable_dropout=False,
        bf16=args.precision == "bf16",  # TRL turns bf16 on by default; compare at one precision
        fp16=False,
    )


def trl_dataset(pairs) -> Dataset:
    return Dataset.from_dict(
        {"chosen_ids": [p + c for p, c, _ in pairs], "rejected_ids": [p + r for p, _, r in pairs]}
    )


def base_model(work: Path, options) -> str:
    """A randomly initialised Llama decoder (--hidden, --layers) with a BPE tokenizer trained on
    the bundled sample's training pairs, saved to a folder both tools load."""
    from transformers import LlamaConfig, LlamaModel

    splits, _ = load_pairs(None)
    train_rows, _ = split_held_out(splits, Args.eval_fraction)
    tokenizer = models.train_tiny_tokenizer(
        t for r in train_rows for t in (r["chosen_text"], r["rejected_text"])
    )
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
    torch.manual_seed(options.seed)
    folder = work / "base-model"
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def throughput(options) -> dict:
    """Our trainer (prefix sharing on, then off) and TRL on identical batches."""
    work = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    model_name = base_model(work, options) if options.model == "llama" else options.model
    args = Args(
        model=model_name,
        max_length=options.max_length,
        batch_size=options.batch_size,
        max_steps=options.steps,
        learning_rate=options.learning_rate,
        warmup_fraction=0.0,
        max_eval_pairs=options.batch_size,
        save_every=10**9,
        seed=options.seed,
    )
    results = {}
    variants = (("on", args.micro_batch_cost), ("on", -1), ("off", args.micro_batch_cost))
    for sharing, cost in variants[: 1 if options.ours == "default" else None]:
        name = f"ours-{sharing}" + ("-one-batch" if cost < 0 else "")
        metrics = main(
            replace(args, prefix_sharing=sharing, micro_batch_cost=cost, run_dir=str(work / name))
        )
        log = (
            (work / f"{name}/checkpoints/step-{options.steps:07d}/train_log.jsonl")
            .read_text()
            .splitlines()
        )
        batching = "one padded batch" if cost < 0 else "length-sorted micro-batches"
        results[f"ours, prefix sharing {sharing}, {batching}"] = {
            "pairs_per_second": metrics["train"]["pairs_per_second"],
            "pairs_per_cpu_second": options.steps
            * args.batch_size
            / metrics["train"]["cpu_seconds"],
            "losses": [json.loads(line)["loss"] for line in log],
        }

    # rebuild what main() trained on: the same rows, tokenizer, ids, order and initial weights
    splits, _ = load_pairs(None)
    train_rows, _ = split_held_out(splits, args.eval_fraction)
    tokenizer = (
        models.load_tokenizer(str(work / "ours-on/tokenizer"))
        if args.model == models.TINY
        else models.load_tokenizer(args.model)
    )
    chat = uses_chat_template(tokenizer, args.chat_template)
    pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in train_rows]
    order = torch.randperm(
        len(pairs), generator=torch.Generator().manual_seed(args.seed * 1_000_003)
    )
    ordered = [pairs[i] for i in order[: options.steps * args.batch_size].tolist()]
    torch.manual_seed(args.seed)
    ours = RewardModel(models.load_backbone(args.model, tokenizer, seed=args.seed))
    model = ours.to_classifier(
        reward_pad_id(tokenizer, chat)
    )  # the same weights, transformers' layout
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    log = LossLog()
    trainer = RewardTrainer(
        model=model,
        args=trl_config(str(work / "trl"), args, options.steps, args.seed),
        train_dataset=trl_dataset(ordered),
        processing_class=tokenizer,
        callbacks=[log],
    )
    trainer.train()
    results["TRL 1.16 RewardTrainer"] = {
        "pairs_per_second": options.steps * args.batch_size / log.seconds,
        "pairs_per_cpu_second": options.steps * args.batch_size / log.cpu_seconds,
        "losses": log.losses,
    }
    return results


def fold_rows(rows: list[dict], folds: int, seed: int) -> list[list[dict]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[rows[i] for i in order[k::folds]] for k in range(folds)]


@torch.no_grad()
def trl_accuracy(model, pairs, pad_id: int, batch_size: int = 32) -> float:
    model.eval()
    right = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sequences = [p + c for p, c, _ in chunk] + [p + r for p, _, r in chunk]
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), pad_id)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        margin = rewards[: len(chunk)] - rewards[len(chunk) :]
        right += ((margin > 0).float() + 0.5 * (margin == 0).float()).sum().item()
    return right / len(pairs)


def cross_validation(options) -> dict:
    """k-fold accuracy of both tools with the minilm backbone on the real harmless-base test
    split."""
    work = Path(tempfile.mkdtemp(prefix="bench-rm-cv-"))
    splits, _ = load_pairs(None)
    folds = fold_rows(splits["test"], options.folds, options.seed)
    tokenizer = models.load_tokenizer(models.MINILM)
    results = {
        "ours": [],
        "TRL 1.16 RewardTrainer": [],
        "seconds": {"ours": 0.0, "TRL 1.16 RewardTrainer": 0.0},
    }
    for k in range(options.folds):
        if options.only_fold is not None and k != options.only_fold:
            continue
        train_rows = [row for j, fold in enumerate(folds) if j != k for row in fold][
            : options.max_train_pairs
        ]
        test_rows = folds[k]
        path = work / f"fold-{k}.parquet"
        rows = [{**row, "split": "train"} for row in train_rows] + [
            {**row, "split": "test"} for row in test_rows
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
        steps = options.epochs * (len(train_rows) // options.batch_size)
        args = Args(
            data=str(path),
            model=models.MINILM,
            max_train_pairs=options.max_train_pairs,
            run_dir=str(work / f"ours-{k}"),
            max_length=options.max_length,
            batch_size=options.batch_size,
            epochs=options.epochs,
            learning_rate=options.learning_rate,
            save_every=10**9,
            seed=options.seed,
        )
        if "ours" in options.tools:
            started = time.perf_counter()
            results["ours"].append(
                main(replace(args, dropout=options.dropout))["overall"]["accuracy"]
            )
            results["seconds"]["ours"] += time.perf_counter() - started
        if "trl" not in options.tools:
            print(json.dumps({"fold": k, "ours": results["ours"][-1]}), flush=True)
            if options.out:
                Path(options.out).write_text(json.dumps(results, indent=1))
            continue

        started = time.perf_counter()
        train_pairs = [encode_pair(tokenizer, row, options.max_length, False) for row in train_rows]
        order = torch.randperm(
            len(train_pairs), generator=torch.Generator().manual_seed(options.seed)
        ).tolist()
        torch.manual_seed(options.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(models.minilm_dir()), num_labels=1
        )
        trainer = RewardTrainer(
            model=model,
            args=replace(
                trl_config(str(work / f"trl-{k}"), args, steps, options.seed),
                train_sampling_strategy="random",
                disable_dropout=True,
            ),
            train_dataset=trl_dataset([train_pairs[i] for i in order]),
            processing_class=tokenizer,
        )
        trainer.train()
        test_pairs = [encode_pair(tokenizer, row, options.max_length, False) for row in test_rows]
        results["TRL 1.16 RewardTrainer"].append(
            trl_accuracy(trainer.model, test_pairs, tokenizer.pad_token_id)
        )
        results["seconds"]["TRL 1.16 RewardTrainer"] += time.perf_counter() - started
        print(
            json.dumps(
                {
                    "fold": k,
                    "ours": results["ours"][-1:],
                    "trl": results["TRL 1.16 RewardTrainer"][-1],
                }
            ),
            flush=True,
        )
        if options.out:  # keep finished folds if the run is cut short
            Path(options.out).write_text(json.dumps(results, indent=1))
    return results


def family_marker_rows(count: int, seed: int) -> list[dict]:
    """Synthetic pairs whose preferred reply depends on the family, as helpful/harmless do."""
    rng = torch.Generator().manual_seed(seed)
    words = "the a cat dog tree house river blue green quick slow happy run jump sing read".split()

    def text(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=rng).tolist())

    rows = []
    for index in range(count):
        family = "helpful" if index % 2 else "harmless"
        # helpful prefers the compliant reply, harmless the refusal: each family's rejected
        # reply carries the other family's marker, the tension the paper reports
        good, bad = ("certainly", "sorry") if family == "helpful" else ("sorry", "certainly")
        prompt = [{"role": "user", "content": text(12)}]
        chosen, rejected = f"{text(4)} {good} {text(4)}", f"{text(4)} {bad} {text(4)}"
        chosen_text = render_transcript(prompt + [{"role": "assistant", "content": chosen}])
        rejected_text = render_transcript(prompt + [{"role": "assistant", "content": rejected}])
        rows.append(
            {
                "id": pair_id(chosen_text, rejected_text),
                "subset": f"synth-{family}-base",
                "family": family,
                "split": "test" if index % 5 == 0 else "train",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "chosen_text": chosen_text,
                "rejected_text": rejected_text,
                "flags": [],
            }
        )
    return rows


def cross_table(options) -> dict:
    """Held-out accuracy per family of a tiny model trained on each config."""
    work = Path(tempfile.mkdtemp(prefix="bench-rm-cross-"))
    path = work / "pairs.parquet"
    pq.write_table(
        pa.Table.from_pylist(family_marker_rows(1200, options.seed), schema=PAIR_SCHEMA), path
    )
    table = {}
    for config in ("helpful", "harmless", "all"):
        args = Args(
            data=str(path),
            train_config=config,
            run_dir=str(work / config),
            max_length=64,
            batch_size=16,
            epochs=2,
            learning_rate=3e-3,
            save_every=10**9,
            seed=options.seed,
        )
        metrics = main(args)
        table[config] = {family: part["accuracy"] for family, part in metrics["by_family"].items()}
    return table


def encoding(options) -> dict:
    """Seconds to encode the first --pairs bundled pairs with encode_pair (tiny tokenizer and
    its chat template, --max-length), and a digest of the ids (the same before and after)."""
    import hashlib

    rows = load_pairs(None)[0]["test"][: options.pairs]
    tokenizer = models.load_tokenizer(models.TINY, texts=[r["chosen_text"] for r in rows])
    chat = uses_chat_template(tokenizer, True)
    started, cpu_started = time.perf_counter(), time.process_time()
    pairs = [encode_pair(tokenizer, row, options.max_length, chat) for row in rows]
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "digest": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16],
    }


def describe() -> dict:
    return {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["throughput", "cv", "crosstable", "encode"])
    parser.add_argument(
        "--model",
        default=models.TINY,
        help="tiny, llama (random decoder of --hidden/--layers), or any --model value",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=1000, help="encode: pairs to encode")
    parser.add_argument("--tools", default="ours,trl", help="cv: which trainers to run")
    parser.add_argument(
        "--ours",
        choices=["all", "default"],
        default="all",
        help="throughput: our three variants, or only the default (prefix sharing, micro-batches)",
    )
    parser.add_argument(
        "--dropout", action="store_true", help="cv: keep minilm's dropout in our trainer"
    )
    parser.add_argument(
        "--max-train-pairs",
        type=int,
        default=None,
        help="cv: train on the first N pairs of the four folds",
    )
    parser.add_argument("--only-fold", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    options = parser.parse_args()
    modes = {
        "throughput": throughput,
        "cv": cross_validation,
        "crosstable": cross_table,
        "encode": encoding,
    }
    results = modes[options.what](options)
    results["machine"] = describe()
    text = json.dumps(results, indent=1)
    print(text)
    if options.out:
        Path(options.out).write_text(text)
