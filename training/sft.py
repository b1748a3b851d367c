"""Supervised fine-tuning (SFT): a causal LM learns the chosen conversations of a release.

This is the starting policy for PPO (``training/ppo.py``) and its frozen reference. The
loss covers the assistant turns only (their content and the end-of-sequence token after
the final reply); the ``Human:``/``Assistant:`` tags and the user's words are context, never
targets (Ouyang et al. 2022 train SFT on the labeller's demonstrations only).

    python -m training.sft --model tiny --tokenizer runs/rm --output-dir runs/sft
    accelerate launch -m training.sft --model smollm2-135m --learning-rate 1e-5

Under accelerate every optimiser step's batch of ``--batch-size`` rows is dealt out across
the processes (disjoint rows), and the loss is the mean over the whole batch's assistant
tokens, however they fall across the processes, so N processes take one process's step;
``--resume`` continues from ``output_dir/checkpoints`` with
the same weights, optimizer moments, data order and per-process RNG as an unbroken run.

Pass the reward model's run directory as ``--tokenizer`` for the ``tiny`` model, so that the
policy and the reward model read the same token ids (PPO checks this).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object

from training import run, scale
from training.common import UsageError, choose_split, load_pairs, prompt_key, run_cli
from training.models import load_causal_lm, load_tokenizer
from training.text import IGNORE_INDEX, encode_example, uses_chat_template


@dataclass(frozen=True)
class Args(scale.ScaleArgs):
    """Supervised fine-tuning on the chosen transcripts, loss on assistant turns only."""

    model: str = "tiny"
    """`tiny` (random init, for tests), `smollm2-135m` (pretrained, offline), a Hub id or a local
    path"""
    tokenizer: str | None = None
    """directory of a saved tokenizer to use instead of the model's own, e.g. the reward model's
    run dir"""
    data: str | None = None
    """a release directory, a .parquet of pair rows or a Hub repo id; default: the bundled sample"""
    split: str | None = None
    """split to train on; default `train` where the release has it, else its only split (the
    bundled sample: `test`)"""
    output_dir: str = "runs/sft"
    """where the model, tokenizer, metrics.json and args.json are written"""
    seed: int = 1
    """seed of the data order and of the tiny model's initial weights"""
    learning_rate: float = 1e-3
    """AdamW learning rate, decayed linearly to zero (use ~1e-5 for a pretrained model)"""
    batch_size: int = 8
    """transcripts per optimiser step"""
    num_epochs: int = 1
    """passes over the training rows"""
    max_steps: int = 0
    """stop after this many optimiser steps (0: run all epochs)"""
    max_length: int = 256
    """longest transcript in tokens; longer ones keep their end (the final reply)"""
    eval_rows: int = 64
    """rows held out (by a seeded shuffle) to measure the loss before and after training"""
    chat_template: bool = True
    """render with the tokenizer's chat template when it has one, as the reward model does"""
    save_every: int = 50
    """save a resumable checkpoint every N steps (and at the end)"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir (same settings required)"""
    stop_after: int = 0
    """exit after saving the checkpoint of step N, as if killed (for testing resume; 0: never)"""


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and labels."""
    width = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = width - len(example["input_ids"])
        batch["input_ids"].append(example["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        batch["labels"].append(example["labels"] + [IGNORE_INDEX] * pad)
    return {name: torch.tensor(values) for name, values in batch.items()}


def held_out_split(rows: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded shuffle, the last `eval_rows` held out.

    Training then drops every row whose prompt is a held-out one: a prompt compared several
    times would otherwise be trained on under another row and evaluated as if unseen.
    """
    order = sorted(rows, key=lambda row: row["id"])
    random.Random(seed).shuffle(order)
    cut = len(order) - min(eval_rows, len(order) // 2)
    held_out = order[cut:]
    held_out_prompts = {prompt_key(row) for row in held_out}
    return [row for row in order[:cut] if prompt_key(row) not in held_out_prompts], held_out


def rank_batch(
    step: int, num_examples: int, batch_size: int, seed: int, rank: int, world: int
) -> list[int]:
    """Indices of the examples process `rank` of `world` trains on at optimiser step `step`.

    Each epoch is a fresh seeded permutation cut into batches of `batch_size` (a tail shorter
    than a batch waits for the next epoch's permutation); each batch is dealt out across the
    processes, so they see disjoint rows and together the whole batch.

    >>> [rank_batch(0, 8, 4, seed=0, rank=r, world=2) for r in (0, 1)]
    [[4, 7], [0, 3]]
    """
    epoch, index = divmod(step, num_examples // batch_size)
    order = torch.randperm(
        num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    )
    return order[index * batch_size : (index + 1) * batch_size][rank::world].tolist()


def target_count(example: dict[str, list[int]]) -> int:
    """Tokens of `example` the loss covers: its labelled positions after the first (a causal LM
    predicts token t from the tokens before it, so the first label has nothing to predict from).

    >>> target_count({"labels": [IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8]})
    3
    """
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled tokens, each predicted from the ones before it.

    Summed, not averaged: the caller divides by the token count of the whole batch, which a
    process holding part of the batch cannot see in its own labels.
    """
    predicted = logits[:, :-1].float().flatten(0, 1)  # shape: [batch * (seq - 1), vocab]
    targets = labels[:, 1:].flatten()  # shape: [batch * (seq - 1)]
    return torch.nn.functional.cross_entropy(
        predicted, targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def mean_loss(model, examples: list[dict], pad_token_id: int, batch_size: int, device) -> float:
    """Token-weighted mean cross-entropy on the assistant tokens of `examples`."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / max(count, 1)


def load_policy_tokenizer(args: Args, rows: list[dict]):
    """The tokenizer named by --tokenizer, else the model's own (tiny trains one on `rows`)."""
    if args.tokenizer is not None:
        folder = Path(args.tokenizer)
        folder = folder / "model" if (folder / "model" / "tokenizer.json").is_file() else folder
        return load_tokenizer(str(folder))
    texts = [row["chosen_text"] for row in rows] + [row["rejected_text"] for row in rows]
    return load_tokenizer(args.model, texts=texts)


# ---- the run ---------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train, save model + tokenizer + metrics.json + args.json to args.output_dir; return
    metrics."""
    # SFT does not clip its gradients, nor does DeepSpeed's engine then (gradient_clipping 0)
    accelerator = scale.make_accelerator(
        args.precision, allow_fsdp=True, deepspeed=scale.DeepSpeedStep(0.0, args.batch_size)
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % world:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the {world} processes; pick a "
            "multiple"
        )
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    checkpoint = run.start_or_resume(output_dir, args, "args.json", "--output-dir")

    # 1. data: the training split, less a held-out share whose prompts are never trained on
    splits, provenance = load_pairs(args.data)
    split = choose_split(splits, args.split, provenance["source"])
    train_rows, eval_rows = held_out_split(splits[split], args.eval_rows, args.seed)
    if len(train_rows) < args.batch_size:
        raise UsageError(
            f"{provenance['source']}: split {split!r} leaves {len(train_rows)} training rows after "
            f"holding out {len(eval_rows)}, fewer than --batch-size {args.batch_size}; lower it or "
            "--eval-rows"
        )
    if accelerator.is_main_process:
        print(
            f"sft: training on split {split!r} of {provenance['source']}: {len(train_rows)} rows, "
            f"{len(eval_rows)} held out (their prompts never trained on)"
        )

    # 2. tokenizer and model; a resumed run reads the tokenizer it saved
    tokenizer = (
        load_tokenizer(str(output_dir)) if checkpoint else load_policy_tokenizer(args, train_rows)
    )
    model = load_causal_lm(args.model, tokenizer, seed=args.seed)
    if args.gradient_checkpointing:
        scale.enable_gradient_checkpointing(model)
    lora = scale.maybe_add_lora(model, args)
    chat = uses_chat_template(tokenizer, args.chat_template)
    train_examples, eval_examples = (
        [encode_example(tokenizer, row, args.max_length, chat) for row in rows]
        for rows in (train_rows, eval_rows)
    )
    settings = run.settings_record(
        args, split=split, data=provenance, chat_template=chat, processes=world
    )
    if accelerator.is_main_process and checkpoint is None:
        run.write_json(output_dir / "args.json", settings)
        tokenizer.save_pretrained(output_dir)

    steps_per_epoch = len(train_examples) // args.batch_size
    num_steps = steps_per_epoch * args.num_epochs
    if args.max_steps:
        num_steps = min(num_steps, args.max_steps)
    optimizer = torch.optim.AdamW(scale.trainable_parameters(model), lr=args.learning_rate)
    pad, device = tokenizer.pad_token_id, accelerator.device
    state = {"step": 0, "log": [], "eval_loss_before": None}
    skeleton = run.skeleton(accelerator, model, lora)  # sharded: where the final save gathers
    model, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None:
        state = run.load_checkpoint(checkpoint, {"model": model}, optimizer, accelerator)
    if state["eval_loss_before"] is None:
        with accelerator.autocast():
            state["eval_loss_before"] = mean_loss(
                accelerator.unwrap_model(model), eval_examples, pad, args.batch_size, device
            )
    writer = run.tensorboard(output_dir, state["step"] + 1, accelerator)
    if checkpoint is None:
        run.add_scalars(writer, "eval", {"loss": state["eval_loss_before"]}, 0)

    # 3. train: cross-entropy on the assistant tokens; lr decays linearly to zero
    start = time.perf_counter()
    model.train()
    for step in range(state["step"], num_steps):
        mine = rank_batch(step, len(train_examples), args.batch_size, args.seed, rank, world)
        lr = args.learning_rate * (1 - step / num_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {
            name: tensor.to(device)
            for name, tensor in collate([train_examples[i] for i in mine], pad).items()
        }
        # the mean over the whole batch's assistant tokens: each process divides its sum by the
        # batch's token count over the processes' number, and data parallelism averages the
        # gradients (a mean of each process's own token mean would weight the tokens of a
        # process holding fewer of them more)
        whole = rank_batch(step, len(train_examples), args.batch_size, args.seed, 0, 1)
        tokens = sum(target_count(train_examples[i]) for i in whole)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = summed_loss(logits, batch["labels"]) * world / max(tokens, 1)
        scale.backward(accelerator, loss)  # DeepSpeed steps here, at the lr set above
        optimizer.step()
        optimizer.zero_grad()
        record = {
            "step": step + 1,
            "loss": accelerator.reduce(loss.detach(), "mean").item(),
            "lr": lr,
            "rows": gather_object(
                [[train_rows[i]["id"] for i in mine]]
            ),  # per process, in rank order
        }
        state["log"].append(record)
        state["step"] = step + 1
        run.add_scalars(writer, "train", {"loss": record["loss"], "lr": lr}, step + 1)
        if accelerator.is_main_process:
            if (step + 1) % 20 == 0 or step + 1 == num_steps:
                recent = [r["loss"] for r in state["log"][-20:]]
                print(f"sft step {step + 1}/{num_steps} loss {sum(recent) / len(recent):.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 in (num_steps, args.stop_after):
            run.save_checkpoint(
                output_dir, step + 1, {"model": model}, optimizer, accelerator, state
            )
        if step + 1 == args.stop_after:
            return {"stopped_after": step + 1}
    model.eval()
    with accelerator.autocast():
        eval_loss_after = mean_loss(
            accelerator.unwrap_model(model), eval_examples, pad, args.batch_size, device
        )

    metrics = {
        "split": split,
        "train_loss": [record["loss"] for record in state["log"]],
        "eval_loss_before": state["eval_loss_before"],
        "eval_loss_after": eval_loss_after,
        "steps": num_steps,
        "train_rows": len(train_examples),
        "eval_rows": len(eval_examples),
        "processes": world,
        "seconds": time.perf_counter() - start,  # wall time of this (possibly resumed) process
    }
    trained_model, lora = run.whole_model(accelerator, model, lora, skeleton)
    if accelerator.is_main_process:
        scale.merge_lora(lora)  # a plain causal LM is saved, whatever trained
        trained_model.save_pretrained(output_dir, safe_serialization=True)
        run.write_json(output_dir / "metrics.json", metrics)
        (output_dir / "train_log.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in state["log"])
        )
        writer.add_scalar("eval/loss", eval_loss_after, num_steps)
        writer.close()
        print(
            f"sft: held-out loss {state['eval_loss_before']:.3f} -> {eval_loss_after:.3f}; saved "
            f"{output_dir}"
        )
    return metrics


if __name__ == "__main__":
    run_cli(main, Args)
