"""Supervised fine-tuning (SFT): a causal LM learns the chosen conversations of a release.

This is the starting policy for PPO (``training/ppo.py``) and its frozen reference. The
loss covers the assistant turns only (their content and the end-of-sequence token after
the final reply); the ``Human:``/``Assistant:`` tags and the user's words are context, never
targets (Ouyang et al. 2022 train SFT on the labeller's demonstrations only).

    python -m training.sft --model tiny --tokenizer runs/rm --output-dir runs/sft
    accelerate launch -m training.sft --model smollm2-135m --learning-rate 1e-5

Pass the reward model's run directory as ``--tokenizer`` for the ``tiny`` model, so that the
policy and the reward model read the same token ids (PPO checks this).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

import hhdata
from training.common import load_pairs, parse_args
from training.models import load_causal_lm, load_tokenizer
from training.reward_model import render, uses_chat_template

IGNORE_INDEX = -100  # label value torch's cross-entropy skips


@dataclass(frozen=True)
class Args:
    """Supervised fine-tuning on the chosen transcripts, loss on assistant turns only."""

    model: str = "tiny"
    """`tiny` (random init, for tests), `smollm2-135m` (pretrained, offline), a Hub id or a local path"""
    tokenizer: str | None = None
    """directory of a saved tokenizer to use instead of the model's own, e.g. the reward model's run dir"""
    data: str | None = None
    """a release directory, a .parquet of pair rows or a Hub repo id; default: the bundled sample"""
    split: str = "test"
    """which split of the release to train on (the bundled sample has only `test`)"""
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


def encode_prompt(tokenizer, prompt: list[dict[str, str]], chat: bool) -> tuple[list[int], list[int]]:
    """Token ids of a prompt rendered as the reward model renders it, and their labels.

    Labels are IGNORE_INDEX except on the words of the prompt's earlier assistant turns. The
    ids (without labels) are PPO's queries, so policy and reward model read the same tokens.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["\\n\\nHuman: hi\\n\\nAssistant: hello"] * 20, vocab_size=300)
    >>> ids, labels = encode_prompt(tok, [{"role": "user", "content": "hi"}], chat=False)
    >>> tok.decode(ids, skip_special_tokens=True), set(labels)
    ('\\n\\nHuman: hi\\n\\nAssistant:', {-100})
    """
    text, _ = render(tokenizer, prompt, [{"role": "assistant", "content": ""}], chat)
    start = [tokenizer.bos_token_id] if not chat and tokenizer.bos_token_id is not None else []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # character spans of the assistant turns' words, found in order; a token that overlaps one
    # is a target (e.g. " Are", whose space belongs to the tag but whose word is the reply's)
    spans, cursor = [], 0
    for turn in prompt:
        found = text.find(turn["content"], cursor)
        if found >= 0:
            cursor = found + len(turn["content"])
            if turn["role"] == "assistant":
                spans.append((found, cursor))
    labels = [
        token if any(first < high and low < last for low, high in spans) else IGNORE_INDEX
        for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return start + encoded["input_ids"], [IGNORE_INDEX] * len(start) + labels


def encode_reply(tokenizer, prompt: list[dict[str, str]], content: str, chat: bool) -> list[int]:
    """Token ids of a final reply as it follows its prompt, closed by the end-of-sequence token."""
    _, text = render(tokenizer, prompt, [{"role": "assistant", "content": content}], chat)
    end = [] if chat else [tokenizer.eos_token_id]  # a chat template writes its own end token
    return tokenizer(text, add_special_tokens=False)["input_ids"] + end


def encode_example(tokenizer, row: dict, max_length: int, chat: bool) -> dict[str, list[int]]:
    """input_ids and labels of one chosen conversation; labels are IGNORE_INDEX off the assistant turns.

    The reply's end token is a target too: PPO truncates replies at it. Long conversations
    keep their end (the final reply) and lose their oldest tokens.
    """
    ids, labels = encode_prompt(tokenizer, row["prompt"], chat)
    reply = encode_reply(tokenizer, row["prompt"], row["chosen"][0]["content"], chat)
    ids, labels = ids + reply, labels + reply
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}


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
    """(train, eval): a seeded shuffle, the last `eval_rows` held out."""
    order = sorted(rows, key=lambda row: row["id"])
    random.Random(seed).shuffle(order)
    cut = len(order) - min(eval_rows, len(order) // 2)
    return order[:cut], order[cut:]


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


def main(args: Args) -> dict:
    """Train, save model + tokenizer + metrics.json + args.json to args.output_dir; return metrics."""
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    splits, provenance = load_pairs(args.data)
    train_rows, eval_rows = held_out_split(splits[args.split], args.eval_rows, args.seed)
    tokenizer = load_policy_tokenizer(args, train_rows)
    model = load_causal_lm(args.model, tokenizer, seed=args.seed)
    chat = uses_chat_template(tokenizer, args.chat_template)
    encode = lambda row: encode_example(tokenizer, row, args.max_length, chat)  # noqa: E731
    train_examples = [encode(row) for row in train_rows]
    eval_examples = [encode(row) for row in eval_rows]

    steps_per_epoch = math.ceil(len(train_examples) / args.batch_size)
    num_steps = steps_per_epoch * args.num_epochs
    if args.max_steps:
        num_steps = min(num_steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    pad = tokenizer.pad_token_id

    eval_loss_before = mean_loss(model, eval_examples, pad, args.batch_size, device)
    losses, step, start = [], 0, time.perf_counter()
    generator = random.Random(args.seed)
    model.train()
    while step < num_steps:
        order = list(range(len(train_examples)))
        generator.shuffle(order)
        for first in range(0, len(order), args.batch_size):
            if step == num_steps:
                break
            batch = collate([train_examples[i] for i in order[first : first + args.batch_size]], pad)
            loss = model(**{name: tensor.to(device) for name, tensor in batch.items()}).loss
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if accelerator.is_main_process and (step % 20 == 0 or step == num_steps):
                print(f"sft step {step}/{num_steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    eval_loss_after = mean_loss(model, eval_examples, pad, args.batch_size, device)

    metrics = {
        "train_loss": losses,
        "eval_loss_before": eval_loss_before,
        "eval_loss_after": eval_loss_after,
        "steps": num_steps,
        "train_rows": len(train_examples),
        "eval_rows": len(eval_examples),
        "seconds": time.perf_counter() - start,
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        settings = {"args": dataclasses.asdict(args), "data": provenance, "hhdata": hhdata.__version__, "chat_template": chat}
        (output_dir / "args.json").write_text(json.dumps(settings, indent=2))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"sft: held-out loss {eval_loss_before:.3f} -> {eval_loss_after:.3f}; saved {output_dir}")
    return metrics


if __name__ == "__main__":
    main(parse_args(Args, sys.argv[1:]))
