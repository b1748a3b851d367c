"""Train a reward (preference) model on an HH-RLHF release with the Bradley-Terry loss.

The model reads a conversation and returns one scalar: a backbone plus a linear head read at
the end-of-turn token closing the assistant's final reply (BERT: at its pooled first token),
saved as a standard transformers sequence-classification model. Trained on pairs with the
pairwise loss -log sigmoid(r_chosen - r_rejected) (Bai et al. 2022, section 2.2; Ouyang et al.
2022 eq. 1).

Prefix sharing: chosen and rejected share the whole prompt, so each pair is packed into one
sequence `prompt | chosen reply | rejected reply`. An attention mask keeps the two replies
from seeing each other and the position ids of the rejected reply restart after the prompt,
so every token sees exactly what it would see in its own `prompt | reply` sequence, and the
prompt is computed once instead of twice. This is exact only for causal decoders; in a
bidirectional encoder the prompt tokens attend to the reply, so encoders run the two
sequences separately, and so do models whose attention ignores the 4-D mask or the position
ids (see docs/reward_model.md).

Run `python -m training.reward_model --help`; the run directory layout is in docs/reward_model.md.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hhdata.errors import HhDataError
from training import models, run, scale
from training.common import UsageError, load_pairs, run_cli
from training.fast import accumulate_pair_loss, pair_rewards, prefix_sharing_problem
from training.preference_eval import evaluation_metrics, held_out_margins, save_plots
from training.text import (
    encode_pair,
    end_of_turn_id,
    reward_pad_id,
    reward_text,
    template_end_id,
    uses_chat_template,
)

FAMILIES = ("helpful", "harmless")


@dataclass(frozen=True)
class Args(scale.ScaleArgs):
    data: str | None = None
    """pair rows: a local release directory, a Hub repo id, a .parquet file of pair rows, or
    (when omitted) the bundled harmless-base sample"""
    version: str | None = None
    """release version to pin when --data is a Hub repo"""
    train_config: Literal["all", "helpful", "harmless"] = "all"
    """which family to train on; evaluation always covers every family and subset"""
    model: str = "tiny"
    """tiny, minilm, smollm2-135m, a local model directory or a Hub id"""
    run_dir: str = "runs/reward-model"
    """where settings, checkpoints, the final model, metrics and plots go"""
    seed: int = 1
    """seed of the weights (tiny), the head, the data order and dropout"""
    max_length: int = 256
    """most tokens of prompt + one reply; prompts are cut from the left, replies from the right"""
    batch_size: int = 16
    """pairs per optimizer step, over all processes"""
    learning_rate: float = 5e-4
    """peak AdamW learning rate, after linear warm-up, then linear decay to zero"""
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
    """use only the first N training pairs (after the family filter)"""
    max_eval_pairs: int | None = None
    """evaluate on only the first N held-out pairs"""
    eval_fraction: float = 0.2
    """held-out share, chosen by pair id, when the release has no test split beside train"""
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    """pack prompt|chosen|rejected in one sequence; auto = on where exact (causal decoders with
    eager or sdpa attention and position ids), off otherwise"""
    micro_batch_cost: int = 64
    """what one more forward/backward pass costs, in padded tokens: each step's pairs are sorted
    by length and cut into micro-batches, each padded to its own longest, wherever that saves
    more padding than this (measured ~60 on CPU; on a GPU a larger value keeps batches
    whole); -1 pads the whole batch together. The gradient is the same either way"""
    dropout: bool = False
    """keep the backbone's dropout; off by default, as is usual for RLHF reward models (Huang et
    al. 2023, "The N+ Implementation Details of RLHF with PPO"; TRL's disable_dropout)"""
    chat_template: bool = True
    """render with the tokenizer's chat template when it has one (else the Human/Assistant
    format)"""
    eval_batch_size: int = 32
    """pairs per evaluation batch"""
    save_every: int = 50
    """save a resumable checkpoint every N steps (and at the end)"""
    resume: bool = False
    """continue from the latest checkpoint in run_dir (same settings required)"""
    stop_after: int | None = None
    """exit after saving the checkpoint of step N, as if killed (for testing resume)"""
    calibration_bins: int = 10
    """bins of the reliability diagram and the expected calibration error"""


class RewardModel(nn.Module):
    """A backbone and a scalar head, laid out as the backbone's sequence-classification model.

    Decoders read a bias-free linear head (`score`, as LlamaForSequenceClassification) at
    chosen positions, the end-of-turn token of each reply. Encoders with a pooler read
    BERT's way: the pooled first token ([CLS], which attends to the whole sequence) through a
    linear head with a bias (BertForSequenceClassification's `classifier`). Either way
    `to_classifier` gives the standard transformers model with the same function.
    """

    def __init__(self, backbone: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooled = getattr(backbone, "pooler", None) is not None
        if score is None:
            hidden = backbone.config.hidden_size
            score = nn.Linear(hidden, 1, bias=self.pooled)
            # a small head so initial rewards are near zero (lm-human-preference-details)
            nn.init.normal_(score.weight, std=1 / math.sqrt(hidden + 1))
            if score.bias is not None:
                nn.init.zeros_(score.bias)
        self.score = score

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's layer classes, which FSDP (accelerate's transformer-layer wrapping)
        shards one by one."""
        return list(getattr(self.backbone, "_no_split_modules", None) or [])

    def forward(self, input_ids, attention_mask, position_ids, read_at):
        """Rewards at positions `read_at` (shape [batch, k]) -> shape [batch, k].

        A pooled encoder has one reward per sequence, returned at every requested position.
        """
        output = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        if self.pooled:
            pooled = self.score(output.pooler_output).float()  # shape: [batch, 1]
            return pooled.expand(read_at.shape)
        hidden = output.last_hidden_state  # shape: [batch, seq, hidden]
        picked = hidden.gather(1, read_at[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.score(picked).squeeze(-1).float()  # shape: [batch, k]

    @classmethod
    def from_classifier(cls, classifier) -> RewardModel:
        """The reward model inside a transformers sequence-classification model (shares its
        weights)."""
        backbone = getattr(classifier, classifier.base_model_prefix)
        head = classifier_head(classifier)
        model = cls(backbone, head)
        if model.pooled != (head.bias is not None):
            raise HhDataError(
                f"{type(classifier).__name__}: its head does not read what the reward model reads "
                "(pooled first token with a bias, or the last token without); use a Llama-style "
                "decoder or a BERT encoder"
            )
        return model

    def to_classifier(self, pad_token_id: int, device: str | torch.device = "cpu"):
        """This model as AutoModelForSequenceClassification (num_labels 1), weights copied.

        The classifier pools at the last token that is not `pad_token_id` (decoders) or at the
        first token (BERT), which is where this model reads when pad_token_id never occurs
        in the scored text (reward_pad_id). On the meta device it only checks the layout.
        """
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.backbone.config)
        config.num_labels, config.pad_token_id = 1, pad_token_id
        config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
        with torch.device(device):
            classifier = AutoModelForSequenceClassification.from_config(
                config, dtype=self.score.weight.dtype
            )
        base = getattr(classifier, classifier.base_model_prefix)
        head = classifier_head(classifier)
        if (
            set(base.state_dict()) != set(self.backbone.state_dict())
            or (head.bias is None) == self.pooled
        ):
            raise HhDataError(
                f"{type(classifier).__name__} is not a backbone plus one linear head as the reward "
                "model is; use a Llama-style decoder (tiny, smollm2-135m) or a BERT encoder "
                "(minilm)"
            )
        if device != "meta":
            base.load_state_dict(self.backbone.state_dict())
            head.load_state_dict(self.score.state_dict())
        return classifier


def classifier_head(classifier) -> nn.Linear:
    """The linear head of a sequence-classification model: `score` (decoders) or `classifier`
    (BERT)."""
    for name in ("score", "classifier"):
        head = getattr(classifier, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise HhDataError(
        f"{type(classifier).__name__} has no single linear head (score or classifier); the reward "
        "model supports Llama-style decoders and BERT encoders"
    )


def preference_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, batch_pairs: int | None = None
) -> torch.Tensor:
    """The Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged over the pairs
    (Bai et al. 2022, section 2.2; Ouyang et al. 2022, eq. 1).

    `batch_pairs`, when these pairs are one micro-batch of a larger batch, divides the sum
    instead of their own count, so the micro-batches' losses add up to the batch's mean.

    >>> preference_loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    tensor(0.6931)
    """
    margins = r_chosen - r_rejected  # shape: [pairs]
    return -F.logsigmoid(margins).sum() / (len(margins) if batch_pairs is None else batch_pairs)


# ---- the saved model -----------------------------------------------------------------


def save_reward_model(model: RewardModel, tokenizer, folder: Path, settings: dict) -> None:
    """A standard transformers sequence-classification model directory (num_labels 1) with its
    tokenizer and reward_model.json (max_length, chat_template, base_model, end_of_turn_id).

    `AutoModelForSequenceClassification.from_pretrained(folder)` loads every weight, and its
    logit on reward_text is the reward. The saved pad token never occurs in a scored text
    (reward_pad_id), so the classifier pools at the end-of-turn token, where training read.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chat = settings["chat_template"]
    pad_id = reward_pad_id(tokenizer, chat)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model.to_classifier(pad_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = {**settings, "end_of_turn_id": end_of_turn_id(tokenizer, chat), "pad_token_id": pad_id}
    (folder / "reward_model.json").write_text(json.dumps(saved, indent=2))


def load_reward_model(run_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The trained reward model of a run directory (or of its model/ folder), and its tokenizer.

    Returns (model, tokenizer, settings): `model` is a RewardModel sharing the weights of the
    saved AutoModelForSequenceClassification (`model.backbone`, `model.score`); `settings`
    holds max_length and whether the chat template was used, which `score` needs. Loads
    safetensors and JSON only.

    >>> model, tokenizer, settings = load_reward_model("runs/reward-model")  # doctest: +SKIP
    >>> reply = [{"role": "assistant", "content": "..."}]  # doctest: +SKIP
    >>> score(model, tokenizer, settings, [prompt_turns], [reply])  # doctest: +SKIP
    tensor([0.83])
    """
    from transformers import AutoModelForSequenceClassification

    folder = Path(run_dir)
    folder = folder / "model" if (folder / "model").is_dir() else folder
    if not (folder / "reward_model.json").is_file():
        raise HhDataError(f"{folder}: no reward_model.json; is this a finished reward-model run?")
    if (folder / "reward_head.safetensors").is_file():
        raise HhDataError(
            f"{folder}: a reward model in the old layout (reward_head.safetensors); retrain it, "
            "runs now save a standard sequence-classification model"
        )
    tokenizer = models.load_tokenizer(str(folder))
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
    return (
        RewardModel.from_classifier(classifier).eval(),
        tokenizer,
        json.loads((folder / "reward_model.json").read_text()),
    )


@torch.no_grad()
def score(
    model, tokenizer, settings: dict, prompts: list[list[dict]], replies: list[list[dict]]
) -> torch.Tensor:
    """Rewards of `replies` (each a list with one assistant turn) after `prompts`, shape [n]."""
    pairs = [
        encode_pair(
            tokenizer,
            {"prompt": p, "chosen": r, "rejected": r},
            settings["max_length"],
            settings["chat_template"],
        )
        for p, r in zip(prompts, replies)
    ]
    device = next(model.parameters()).device
    pad_id = reward_pad_id(tokenizer, settings["chat_template"])
    return pair_rewards(model, pairs, pad_id, False, device)[0].cpu()


def split_held_out(
    splits: dict[str, list[dict]], eval_fraction: float
) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): the release's own splits, or a split by pair id."""
    if "train" in splits and "test" in splits:
        return splits["train"], splits["test"]
    rows = [row for split in splits.values() for row in split]
    held = {row["id"] for row in rows if int(row["id"][:8], 16) % 1000 < eval_fraction * 1000}
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


def learning_rate(step: int, total: int, args: Args) -> float:
    """Linear warm-up to the peak, then linear decay to zero at the last step."""
    warmup = int(args.warmup_fraction * total)
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    return args.learning_rate * (total - step) / max(1, total - warmup)


EXAMPLE = (
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "assistant", "content": "Mix flour, water and yeast."}],
)


def input_format(tokenizer, chat: bool, max_length: int, pooled: bool) -> tuple[str, str]:
    """(what the head reads, the exact input format) for the model card."""
    end = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer, chat))
    pad = tokenizer.convert_ids_to_tokens(reward_pad_id(tokenizer, chat))
    if pooled:
        reads = (
            "BERT's pooler over the first token and a linear `classifier`, as "
            "`BertForSequenceClassification`"
        )
    else:
        reads = (
            f"a linear `score` head read at the end-of-turn token `{end}` that closes the "
            "assistant's final reply: the last token, where the sequence-classification model "
            "pools (the last "
            f"token that is not the pad token `{pad}`, which never occurs in a scored text)"
        )
    rendering = (
        "the conversation through the tokenizer's chat template (`apply_chat_template(prompt + "
        f"[reply])`), cut right after the final `{end}`"
        if chat and template_end_id(tokenizer) is not None
        else "the HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`, byte for byte, "
        f"ending with the final reply) closed by `{end}`"
    )
    text = reward_text(tokenizer, *EXAMPLE, chat)
    described = (
        "The reward of one conversation is the model's logit (no sigmoid) on one text: "
        f"{rendering}. "
        f"Start and end tokens are written into the text where the tokenizer does not add them "
        "itself, so `tokenizer(text)` (default settings) gives exactly the ids the trainer "
        "scored. "
        f"For example, as a Python string:\n\n"
        f"```python\ntext = {json.dumps(text, ensure_ascii=False)}\n```\n\n"
        f"Training saw at most {max_length} tokens per conversation: longer ones kept the final "
        "reply "
        f"(at least half the budget, with its end token) and the prompt's most recent tokens. A "
        f"plain tokenizer call does not cut that way; score long conversations with `score` below."
    )
    return reads, described


def write_card(run_dir: Path, settings: dict, metrics: dict, tokenizer, pooled: bool) -> None:
    """model/README.md from hhdata/cards/model_card.md."""
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
    reads, described = input_format(
        tokenizer, settings["chat_template"], args["max_length"], pooled
    )
    run.write_card(
        run_dir / "model" / "README.md",
        "model_card.md",
        reads=reads,
        input_format=described,
        model=args["model"],
        train_config=args["train_config"],
        source=settings["provenance"]["source"],
        provenance=json.dumps(settings["provenance"]),
        train_pairs=settings["train_pairs"],
        eval_pairs=settings["eval_pairs"],
        prefix_sharing=settings["share_prefix"],
        chat_template=settings["chat_template"],
        metrics_table="\n".join(lines),
        settings=json.dumps(args, indent=2),
        command=settings["command"],
    )


# ---- the run --------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train, evaluate and save a reward model; returns the metrics written to metrics.json."""
    run_dir = Path(args.run_dir)
    accelerator = scale.make_accelerator(
        args.precision,
        allow_fsdp=True,
        deepspeed=scale.DeepSpeedStep(args.max_grad_norm, args.batch_size),
    )
    torch.manual_seed(args.seed)
    if run.sharded(accelerator) and args.micro_batch_cost >= 0:
        raise UsageError(
            f"--micro-batch-cost {args.micro_batch_cost} under FSDP or DeepSpeed: every process "
            "must run as many passes as the others (each pass gathers the layers or reduces the "
            "gradients across them); pass --micro-batch-cost -1"
        )
    if args.batch_size % accelerator.num_processes:
        raise HhDataError(
            f"--batch-size {args.batch_size} is not divisible by the "
            f"{accelerator.num_processes} processes; pick a multiple"
        )

    # 1. data: the release's pairs, the family to train on, the held-out pairs
    splits, provenance = load_pairs(args.data, args.version)
    train_rows, eval_rows = split_held_out(splits, args.eval_fraction)
    train_rows = [r for r in train_rows if args.train_config in ("all", r["family"])]
    train_rows = train_rows[: args.max_train_pairs]
    eval_rows = eval_rows[: args.max_eval_pairs]
    steps_per_epoch = len(train_rows) // args.batch_size
    if steps_per_epoch == 0 or not eval_rows:
        raise HhDataError(
            f"{provenance['source']}: {len(train_rows)} training and {len(eval_rows)} held-out "
            f"pairs for --train-config {args.train_config}; need at least --batch-size "
            f"{args.batch_size} and 1"
        )
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    # 2. the run directory: a fresh one, or the same settings when resuming
    checkpoint = run.start_or_resume(run_dir, args, "settings.json", "--run-dir")

    # 3. tokenizer and model; the tiny tokenizer is trained once and kept with the run
    if args.model == models.TINY:
        if checkpoint is not None:
            tokenizer = models.load_tokenizer(str(run_dir / "tokenizer"))
        else:
            texts = [text for r in train_rows for text in (r["chosen_text"], r["rejected_text"])]
            tokenizer = models.load_tokenizer(models.TINY, texts=texts)
    else:
        tokenizer = models.load_tokenizer(args.model)
    model = RewardModel(models.load_backbone(args.model, tokenizer, seed=args.seed))
    if not args.dropout:  # as usual for RLHF reward models (N+; TRL's disable_dropout)
        run.disable_dropout(model)
    model.to_classifier(tokenizer.pad_token_id, device="meta")  # fail now if it cannot be saved
    if args.gradient_checkpointing:
        scale.enable_gradient_checkpointing(model.backbone)
    lora = scale.maybe_add_lora(model.backbone, args)  # adapters in the backbone; the head trains
    # prefix sharing only where it is exact: causal decoders, eager/sdpa attention, position ids
    problem = prefix_sharing_problem(model.backbone)
    if args.prefix_sharing == "on" and problem is not None:
        raise HhDataError(
            f"--prefix-sharing on: --model {args.model} {problem}; run with --prefix-sharing off "
            "(auto turns it off for such models)"
        )
    share_prefix = args.prefix_sharing == "on" or (
        args.prefix_sharing == "auto" and problem is None
    )
    chat = uses_chat_template(tokenizer, args.chat_template)
    settings = run.settings_record(
        args,
        command=run.command("training.reward_model", __name__),
        provenance=provenance,
        train_pairs=len(train_rows),
        eval_pairs=len(eval_rows),
        total_steps=total_steps,
        share_prefix=share_prefix,
        chat_template=chat,
        processes=accelerator.num_processes,
    )
    if accelerator.is_main_process and checkpoint is None:
        run.write_json(run_dir / "settings.json", settings)
        tokenizer.save_pretrained(run_dir / "tokenizer")

    train_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in train_rows]
    eval_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in eval_rows]
    pad_id = reward_pad_id(tokenizer, chat)
    optimizer = torch.optim.AdamW(
        scale.trainable_parameters(model), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    state = {"step": 0, "log": []}
    skeleton = run.skeleton(accelerator, model, lora)  # sharded: where the final save gathers
    model, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None:
        state = run.load_checkpoint(checkpoint, {"model": model}, optimizer, accelerator)
    writer = run.tensorboard(run_dir, state["step"] + 1, accelerator)

    # 4. train: each step takes the next batch of a seeded per-epoch permutation
    model.train()
    started, cpu_started, trained = time.perf_counter(), time.process_time(), 0
    for step in range(state["step"], total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_pairs), generator=generator)
        batch = order[index * args.batch_size : (index + 1) * args.batch_size].tolist()
        mine = batch[accelerator.process_index :: accelerator.num_processes]
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the loss: preference_loss = -log sigmoid(r_chosen - r_rejected), its gradient
        # accumulated over micro-batches of similar length (the same as one padded batch)
        r_chosen, r_rejected, loss = accumulate_pair_loss(
            preference_loss,
            model,
            [train_pairs[i] for i in mine],
            pad_id,
            share_prefix,
            accelerator.device,
            args.micro_batch_cost,
            functools.partial(scale.backward, accelerator),  # DeepSpeed: clips and steps
            lambda: accelerator.no_sync(model),
        )
        # DeepSpeed clipped and stepped in the last backward pass; these give its norm and pass
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        trained += len(batch)
        margin = accelerator.gather(r_chosen - r_rejected)
        record = {
            "step": step + 1,
            "loss": accelerator.reduce(loss, "mean").item(),
            "accuracy": (margin > 0).float().mean().item(),
            "margin": margin.mean().item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        state["log"].append(record)
        state["step"] = step + 1
        run.add_scalars(writer, "train", {k: v for k, v in record.items() if k != "step"}, step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 in (total_steps, args.stop_after):
            run.save_checkpoint(run_dir, step + 1, {"model": model}, optimizer, accelerator, state)
        if step + 1 == args.stop_after:
            return {"stopped_after": step + 1}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    # 5. evaluate on every family and subset of the held-out pairs; save model, metrics, card
    margins = held_out_margins(
        model, eval_pairs, pad_id, share_prefix, args.eval_batch_size, accelerator
    )
    metrics = evaluation_metrics(eval_rows, margins, args.calibration_bins)
    metrics["train"] = {
        "steps": total_steps,
        "pairs_per_second": trained / seconds if trained else None,
        "cpu_seconds": cpu_seconds,  # this process, all threads: steadier than wall time
        "final_loss": state["log"][-1]["loss"],
    }
    trained_model, lora = run.whole_model(accelerator, model, lora, skeleton)
    if accelerator.is_main_process:
        scale.merge_lora(lora)  # a plain sequence classifier is saved
        saved = {"max_length": args.max_length, "chat_template": chat, "base_model": args.model}
        save_reward_model(trained_model, tokenizer, run_dir / "model", saved)
        run.write_json(run_dir / "metrics.json", metrics)
        save_plots(run_dir, margins, eval_rows, metrics, state["log"])
        write_card(run_dir, settings, metrics, tokenizer, trained_model.pooled)
        writer.add_scalar("eval/accuracy", metrics["overall"]["accuracy"], total_steps)
        writer.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, Args)
