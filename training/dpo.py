"""Direct preference optimisation (DPO): the policy learns the preferences themselves, no reward
model and no sampling (Rafailov et al. 2023, "Direct Preference Optimization").

The frozen reference is the SFT policy the run starts from. For each pair, the implicit
reward of a reply is beta * (log pi(reply | prompt) - log pi_ref(reply | prompt)), and the
loss is the Bradley-Terry loss of the two implicit rewards, -log sigmoid(r_chosen -
r_rejected). ``--label-smoothing eps`` makes it conservative DPO (each label wrong with
probability eps; Mitchell 2023); ``--loss ipo`` is IPO's squared loss (Azar et al. 2023).

    python -m training.dpo --policy runs/sft --output-dir runs/dpo
    python -m training.dpo --policy tiny --learning-rate 1e-3  # random tiny model: smoke runs
    accelerate launch -m training.dpo --policy runs/sft --beta 0.1

The prompt is computed once per pair for the policy and once for the reference (prompt |
chosen | rejected packed in one sequence with a block mask, as the reward model does;
``training/fast.py``); the reference's log-probabilities are computed once per pair before
training and kept (the reference is frozen). Held out: the implicit-reward accuracy and
margins per family and subset (``training/preference_eval.py``).

The scale flags (``training/scale.py``: ``--precision``, ``--gradient-checkpointing``,
``--lora-rank``) apply; under LoRA the reference is the policy with its adapters off, so one
copy of the SFT weights serves both, and the saved policy is merged. DPO runs under DDP, FSDP and
DeepSpeed ZeRO-2/3 (the last two with ``--micro-batch-cost -1``; docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from training import models, run, scale
from training.common import UsageError, load_pairs, prompt_key, run_cli
from training.fast import (
    ReplyLogprobs,
    accumulate_reply_loss,
    pair_length,
    pair_logprobs,
    prefix_sharing_problem,
)
from training.preference_eval import evaluation_metrics, save_plots
from training.reward_model import split_held_out
from training.text import encode_pair, uses_chat_template


@dataclass(frozen=True)
class Args(scale.ScaleArgs):
    """DPO of a policy on the preference pairs of a release, against its frozen SFT reference."""

    policy: str = "runs/sft"
    """the SFT run directory (training/sft.py): the policy's starting weights and the frozen
    reference; or a model option (tiny, smollm2-135m, a local model directory, a Hub id)"""
    data: str | None = None
    """pair rows: a local release directory, a Hub repo id, a .parquet file of pair rows, raw HH
    files, or (when omitted) the bundled harmless-base sample"""
    version: str | None = None
    """release version to pin when --data is a Hub repo or a folder of releases"""
    output_dir: str = "runs/dpo"
    """where settings, checkpoints, the final policy, metrics, plots and TensorBoard logs go"""
    seed: int = 1
    """seed of the data order and of the tiny model's initial weights"""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * h) (Rafailov et al. 2023, eq. 7); ipo: (h / tokens -
    1 / (2 beta))^2 (Azar et al. 2023, eq. 17, with each reply's log-ratio averaged over its
    tokens, as TRL does), where h is the chosen reply's log-ratio to the reference minus the
    rejected one's"""
    beta: float = 0.1
    """strength of the tie to the reference (DPO's beta; IPO's tau)"""
    label_smoothing: float = 0.0
    """conservative DPO: the probability that a label is flipped, in [0, 0.5) (Mitchell 2023,
    "A note on DPO with noisy preferences"); sigmoid loss only"""
    max_length: int = 256
    """most tokens of prompt + one reply; prompts are cut from the left, replies from the right"""
    batch_size: int = 8
    """pairs per optimizer step, over all processes"""
    learning_rate: float = 1e-5
    """peak AdamW learning rate, after linear warm-up, then linear decay to zero (use ~1e-3 for
    the tiny model)"""
    warmup_fraction: float = 0.1
    """fraction of the steps spent warming the learning rate up from zero"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradients are clipped to this global norm"""
    epochs: int = 1
    """passes over the training pairs"""
    max_steps: int | None = None
    """stop after this many optimizer steps (the schedule is sized to it)"""
    max_train_pairs: int | None = None
    """use only the first N training pairs"""
    max_eval_pairs: int | None = None
    """evaluate on only the first N held-out pairs"""
    eval_fraction: float = 0.2
    """held-out share, chosen by pair id, when the release has no test split beside train"""
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    """compute each prompt once for both replies (prompt|chosen|rejected in one sequence); auto =
    on where exact (causal decoders with eager or sdpa attention and position ids)"""
    micro_batch_cost: int = 64
    """what one more forward/backward pass costs, in padded tokens: each step's pairs are sorted
    by length and cut into micro-batches wherever that saves more padding than this; -1 pads
    the whole batch together. The gradient is the same either way"""
    chat_template: bool = True
    """render with the tokenizer's chat template when it has one (else the Human/Assistant
    format); must match how the SFT policy was trained"""
    eval_batch_size: int = 32
    """pairs per batch when computing log-probabilities without gradients"""
    save_every: int = 50
    """save a resumable checkpoint every N steps (and at the end)"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir (same settings required)"""
    stop_after: int | None = None
    """exit after saving the checkpoint of step N, as if killed (for testing resume)"""
    calibration_bins: int = 10
    """bins of the reliability diagram of sigmoid(implicit-reward margin)"""


# ---- the losses (each checked against hand-computed values in tests/test_dpo.py) -----------


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    tokens: torch.Tensor,
    args: Args,
    batch_pairs: int | None = None,
) -> torch.Tensor:
    """The mean DPO (or IPO) loss of pairs, from summed log-probs of shape [pairs, 2] (chosen,
    rejected) under the policy and the reference, and the replies' token counts [pairs, 2].

    `batch_pairs`, when these pairs are one micro-batch of a larger batch, divides the sum
    instead of their own count, so the micro-batches' losses add up to the batch's mean.

    >>> dpo_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), None, Args())
    tensor(0.6931)
    """
    log_ratios = policy - reference  # shape: [pairs, 2]
    if args.loss == "ipo":
        # IPO regresses the (per-token) log-ratio difference onto 1 / (2 tau) (Azar et al. 2023,
        # eq. 17); averaging over tokens keeps tau's meaning across reply lengths (TRL)
        per_token = log_ratios / tokens.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * args.beta)) ** 2
    else:
        h = args.beta * (log_ratios[:, 0] - log_ratios[:, 1])  # r_chosen - r_rejected
        # conservative DPO: the expected loss when each label is flipped with probability eps
        eps = args.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return losses.sum() / (len(losses) if batch_pairs is None else batch_pairs)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of each reply, beta * log(pi / pi_ref), shape [pairs, 2]
    (Rafailov et al. 2023, section 5)."""
    return beta * (policy - reference)


def step_batch(step: int, num_pairs: int, args: Args) -> list[int]:
    """Indices of the training pairs of optimizer step `step`, over all processes: each epoch
    is a fresh seeded permutation cut into batches (a tail shorter than a batch is skipped).

    >>> step_batch(0, 10, Args(batch_size=4, seed=0))
    [4, 1, 7, 5]
    """
    epoch, index = divmod(step, num_pairs // args.batch_size)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator)
    return order[index * args.batch_size : (index + 1) * args.batch_size].tolist()


def learning_rate(step: int, total: int, args: Args) -> float:
    """Linear warm-up from zero, then linear decay to zero (transformers' linear schedule).

    >>> learning_rate(5, 10, Args(learning_rate=1.0, warmup_fraction=0.0))
    0.5
    """
    warmup = int(args.warmup_fraction * total)
    if step < warmup:
        return args.learning_rate * step / warmup
    return args.learning_rate * max(0, total - step) / max(1, total - warmup)


# ---- data and models -------------------------------------------------------------------------


def held_out_pairs(splits: dict, args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): the release's test split (or a share by pair id), and no
    training row whose prompt is a held-out one (a prompt compared several times would
    otherwise be trained on under another row and evaluated as if unseen)."""
    train_rows, eval_rows = split_held_out(splits, args.eval_fraction)
    eval_rows = eval_rows[: args.max_eval_pairs]
    held_out = {prompt_key(row) for row in eval_rows}
    train_rows = [row for row in train_rows if prompt_key(row) not in held_out]
    return train_rows[: args.max_train_pairs], eval_rows


def load_policy_tokenizer(args: Args, output_dir: Path, rows: list[dict], resumed: bool):
    """The SFT run's tokenizer; for `tiny`, one trained on `rows` (a resumed run reads the one
    it saved)."""
    if args.policy != models.TINY:
        return models.load_tokenizer(args.policy)
    if resumed:
        return models.load_tokenizer(str(output_dir / "tokenizer"))
    texts = [text for r in rows for text in (r["chosen_text"], r["rejected_text"])]
    return models.load_tokenizer(models.TINY, texts=texts)


def check_chat_template(args: Args, chat: bool) -> None:
    """Refuse to render differently from how the SFT policy learned its text (args.json of an
    SFT run records it)."""
    sft_settings = Path(args.policy) / "args.json"
    if not sft_settings.is_file():
        return
    trained_with = json.loads(sft_settings.read_text()).get("chat_template", chat)
    if trained_with != chat:
        flag = "--chat-template" if trained_with else "--no-chat-template"
        raise UsageError(
            f"{args.policy} was trained with chat_template={trained_with} and this run renders "
            f"with chat_template={chat}; pass {flag}"
        )


@torch.no_grad()
def all_logprobs(
    scorer, pairs, pad_id: int, share_prefix: bool, batch_size: int, accelerator
) -> torch.Tensor:
    """Summed log-probs of (chosen, rejected) for every pair, shape [pairs, 2], on the CPU.

    Each process computes every world_size-th pair in length-sorted batches (less padding),
    and the results are gathered back into the pairs' order. The batches depend only on the
    pairs, so a resumed run computes the same values.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    padded = pairs + pairs[-1:] * (-len(pairs) % world)  # equal shares, trimmed after gather
    mine = padded[rank::world]
    order = sorted(range(len(mine)), key=lambda i: pair_length(mine[i], share_prefix))
    parts = [
        pair_logprobs(
            scorer,
            [mine[i] for i in order[start : start + batch_size]],
            pad_id,
            share_prefix,
            accelerator.device,
        )
        for start in range(0, len(mine), batch_size)
    ]
    where = torch.tensor(order).argsort().to(parts[0].device)
    gathered = accelerator.gather(torch.cat(parts)[where])  # shape: [world * share, 2]
    return gathered.view(world, -1, 2).transpose(0, 1).reshape(-1, 2)[: len(pairs)].cpu()


def reference_logprobs(
    scorer, lora, pairs, pad_id: int, share_prefix: bool, batch_size: int, accelerator
) -> torch.Tensor:
    """Summed log-probs of (chosen, rejected) of `pairs` under the frozen reference, shape
    [pairs, 2], computed through the prepared `scorer` before the policy's first step.

    The reference is the SFT policy the run starts from, which is the policy before it trains:
    with LoRA, the policy with its adapters off (peft's disable_adapter; one copy of the
    weights serves both, as TRL does); without, the policy itself, before the first step (and
    before a resumed run loads its checkpoint), so no second copy is held. Through the
    prepared scorer under the run's autocast, as the policy's passes, so the two agree at step
    0 in bf16 too, and under FSDP the passes gather the shards like the policy's.
    """
    adapters = lora.disable_adapter() if lora is not None else contextlib.nullcontext()
    with adapters, accelerator.autocast():
        return all_logprobs(scorer, pairs, pad_id, share_prefix, batch_size, accelerator)


# ---- the model card --------------------------------------------------------------------------


def write_card(folder: Path, settings: dict, metrics: dict) -> None:
    """README.md of the final policy from hhdata/cards/dpo_card.md."""
    lines = ["| held-out part | pairs | accuracy | mean margin | ECE |", "|---|---|---|---|---|"]
    parts = [("all", metrics["overall"])]
    parts += [(f"family {name}", part) for name, part in metrics["by_family"].items()]
    parts += [(f"subset {name}", part) for name, part in metrics["by_subset"].items()]
    for name, part in parts:
        lines.append(
            f"| {name} | {part['pairs']} | {part['accuracy']:.3f} "
            f"| {part['mean_margin']:.3f} | {part['ece']:.3f} |"
        )
    args = settings["args"]
    loss = {
        "sigmoid": "-log sigmoid(r_chosen - r_rejected)"
        + (f" with label smoothing {args['label_smoothing']}" if args["label_smoothing"] else ""),
        "ipo": "IPO's (h / tokens - 1 / (2 beta))^2",
    }[args["loss"]]
    run.write_card(
        folder / "README.md",
        "dpo_card.md",
        policy=args["policy"],
        loss=loss,
        beta=args["beta"],
        steps=settings["total_steps"],
        batch_size=args["batch_size"],
        train_pairs=settings["train_pairs"],
        eval_pairs=settings["eval_pairs"],
        source=settings["data"]["source"],
        provenance=json.dumps(settings["data"]),
        prefix_sharing=settings["share_prefix"],
        chat_template=settings["chat_template"],
        metrics_table="\n".join(lines),
        command=settings["command"],
        settings=json.dumps(args, indent=2),
    )


# ---- the run ---------------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train the policy with DPO; returns the metrics written to metrics.json."""
    if not 0 <= args.label_smoothing < 0.5:
        raise UsageError(
            f"--label-smoothing {args.label_smoothing}: the probability that a label is flipped "
            "must be in [0, 0.5)"
        )
    if args.label_smoothing and args.loss == "ipo":
        raise UsageError("--label-smoothing applies to --loss sigmoid only; drop one of them")
    output_dir = Path(args.output_dir)
    accelerator = scale.make_accelerator(
        args.precision,
        allow_fsdp=True,
        deepspeed=scale.DeepSpeedStep(args.max_grad_norm, args.batch_size),
    )
    world = accelerator.num_processes
    if run.sharded(accelerator) and args.micro_batch_cost >= 0:
        raise UsageError(
            f"--micro-batch-cost {args.micro_batch_cost} under FSDP or DeepSpeed: every process "
            "must run as many passes as the others (each pass gathers the layers or reduces the "
            "gradients across them); pass "
            "--micro-batch-cost -1"
        )
    if args.batch_size % world:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the {world} processes; pick a "
            "multiple"
        )
    torch.manual_seed(args.seed)
    checkpoint = run.start_or_resume(output_dir, args, "settings.json", "--output-dir")

    # 1. data: training pairs, and held-out pairs whose prompts are never trained on
    splits, provenance = load_pairs(args.data, args.version)
    train_rows, eval_rows = held_out_pairs(splits, args)
    steps_per_epoch = len(train_rows) // args.batch_size
    if steps_per_epoch == 0 or not eval_rows:
        raise UsageError(
            f"{provenance['source']}: {len(train_rows)} training and {len(eval_rows)} held-out "
            f"pairs; need at least --batch-size {args.batch_size} and 1 (lower --batch-size or "
            "raise --eval-fraction)"
        )
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    # 2. the policy and its frozen reference, both from the SFT run; dropout off in both, so a
    # reply's log-probability does not depend on the pass (TRL's disable_dropout)
    tokenizer = load_policy_tokenizer(args, output_dir, train_rows, checkpoint is not None)
    chat = uses_chat_template(tokenizer, args.chat_template)
    check_chat_template(args, chat)
    policy = models.load_causal_lm(args.policy, tokenizer, seed=args.seed)
    run.disable_dropout(policy)
    if args.gradient_checkpointing:
        scale.enable_gradient_checkpointing(policy)
    lora = scale.maybe_add_lora(policy, args)
    problem = prefix_sharing_problem(policy.get_decoder())
    if args.prefix_sharing == "on" and problem is not None:
        raise UsageError(
            f"--prefix-sharing on: --policy {args.policy} {problem}; run with --prefix-sharing "
            "off (auto turns it off for such models)"
        )
    share_prefix = args.prefix_sharing == "on" or (
        args.prefix_sharing == "auto" and problem is None
    )
    settings = run.settings_record(
        args,
        command=run.command("training.dpo", __name__),
        data=provenance,
        train_pairs=len(train_rows),
        eval_pairs=len(eval_rows),
        total_steps=total_steps,
        share_prefix=share_prefix,
        chat_template=chat,
        processes=world,
    )
    settings |= run.input_runs(policy=Path(args.policy) / "args.json")
    if accelerator.is_main_process and checkpoint is None:
        run.write_json(output_dir / "settings.json", settings)
        tokenizer.save_pretrained(output_dir / "tokenizer")

    train_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in train_rows]
    eval_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in eval_rows]
    tokens = torch.tensor([[len(c), len(r)] for _, c, r in train_pairs])  # shape: [pairs, 2]
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(
        scale.trainable_parameters(policy), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    scorer = ReplyLogprobs(policy)
    skeleton = run.skeleton(accelerator, scorer, lora)  # sharded: where the final save gathers
    scorer, optimizer = accelerator.prepare(scorer, optimizer)

    # 3. the reference's log-probs, once per pair the run trains on and per held-out pair: it is
    # frozen, so every epoch reuses them; computed by the policy before its first step
    # (reference_logprobs), so a resumed run loads its checkpoint only after
    def reference_of(pairs: list) -> torch.Tensor:
        return reference_logprobs(
            scorer, lora, pairs, pad_id, share_prefix, args.eval_batch_size, accelerator
        )

    reference_eval = reference_of(eval_pairs)
    started, cpu_started = time.perf_counter(), time.process_time()
    used = sorted({i for s in range(total_steps) for i in step_batch(s, len(train_pairs), args)})
    reference = torch.full((len(train_pairs), 2), math.nan)  # shape: [pairs, 2]
    reference[used] = reference_of([train_pairs[i] for i in used])
    reference = reference.to(accelerator.device)
    tokens = tokens.to(accelerator.device)
    state = {"step": 0, "log": []}
    if checkpoint is not None:
        state = run.load_checkpoint(checkpoint, {"policy": policy}, optimizer, accelerator)
    writer = run.tensorboard(output_dir, state["step"] + 1, accelerator)

    # 4. train: each step takes the next batch of a seeded per-epoch permutation
    scorer.train()
    trained = 0
    for step in range(state["step"], total_steps):
        batch = step_batch(step, len(train_pairs), args)
        mine = batch[accelerator.process_index :: world]
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def loss_fn(logprobs, group, batch_pairs, mine=mine):
            """This micro-batch's share of the batch's DPO loss."""
            picked = torch.tensor([mine[i] for i in group], device=logprobs.device)
            return dpo_loss(logprobs, reference[picked], tokens[picked], args, batch_pairs)

        # the loss's gradient accumulated over micro-batches of similar length (the same as
        # one padded batch; fast.accumulate_reply_loss)
        logprobs, loss = accumulate_reply_loss(
            loss_fn,
            scorer,
            [train_pairs[i] for i in mine],
            pad_id,
            share_prefix,
            accelerator.device,
            args.micro_batch_cost,
            functools.partial(scale.backward, accelerator),  # DeepSpeed: clips and steps
            lambda: accelerator.no_sync(scorer),
        )
        # DeepSpeed clipped and stepped in the last backward pass; these give its norm and pass
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        trained += len(batch)
        rewards = accelerator.gather(
            implicit_rewards(logprobs, reference[mine], args.beta)
        )  # shape: [batch, 2]
        margins = rewards[:, 0] - rewards[:, 1]
        record = {
            "step": step + 1,
            "loss": accelerator.reduce(loss, "mean").item(),
            "accuracy": (margins > 0).float().mean().item(),
            "margin": margins.mean().item(),
            "reward_chosen": rewards[:, 0].mean().item(),
            "reward_rejected": rewards[:, 1].mean().item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        state["log"].append(record)
        state["step"] = step + 1
        run.add_scalars(writer, "train", {k: v for k, v in record.items() if k != "step"}, step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 in (total_steps, args.stop_after):
            run.save_checkpoint(
                output_dir, step + 1, {"policy": policy}, optimizer, accelerator, state
            )
        if step + 1 == args.stop_after:
            return {"stopped_after": step + 1}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    # 5. held out: implicit-reward margins per family and subset; save policy, metrics, card
    scorer.eval()
    policy_eval = all_logprobs(
        scorer, eval_pairs, pad_id, share_prefix, args.eval_batch_size, accelerator
    )
    rewards = implicit_rewards(policy_eval, reference_eval, args.beta)  # shape: [pairs, 2]
    margins = rewards[:, 0] - rewards[:, 1]
    metrics = evaluation_metrics(eval_rows, margins, args.calibration_bins)
    metrics["reward_chosen"] = rewards[:, 0].mean().item()
    metrics["reward_rejected"] = rewards[:, 1].mean().item()
    metrics["train"] = {
        "steps": total_steps,
        "loss": [record["loss"] for record in state["log"]],
        # this process's pairs per second of the reference pass and the loop, wall and CPU
        # time (all threads; steadier than wall time on a shared machine)
        "pairs_per_second": trained / seconds if trained else None,
        "pairs_per_cpu_second": trained / cpu_seconds if trained else None,
        "cpu_seconds": cpu_seconds,
    }
    whole, lora = run.whole_model(accelerator, scorer, lora, skeleton)
    if accelerator.is_main_process:
        final = output_dir / "policy"
        scale.merge_lora(lora)  # a plain causal LM is saved, whatever trained
        whole.model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        run.write_json(output_dir / "metrics.json", metrics)
        save_plots(output_dir, margins, eval_rows, metrics, state["log"])
        write_card(final, settings, metrics)
        writer.add_scalar("eval/accuracy", metrics["overall"]["accuracy"], total_steps)
        writer.close()
        print(
            f"dpo: {total_steps} steps; held-out implicit-reward accuracy "
            f"{metrics['overall']['accuracy']:.3f}, mean margin "
            f"{metrics['overall']['mean_margin']:.3f}; saved {final}"
        )
    return metrics


if __name__ == "__main__":
    run_cli(main, Args)
