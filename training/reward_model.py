"""Train a reward (preference) model on an HH-RLHF release with the Bradley-Terry loss.

The model reads a conversation and returns one scalar: a backbone plus a linear head read at
the end-of-turn token closing the assistant's final reply (BERT: at its pooled first token),
saved as a standard transformers sequence-classification model. Trained on pairs with the pairwise loss
-log sigmoid(r_chosen - r_rejected) (Bai et al. 2022, section 2.2; Ouyang et al. 2022 eq. 1).

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

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from hhdata.errors import HhDataError
from hhdata.pairs.transcript import ASSISTANT_TAG, render_transcript
from training import models
from training.common import (
    load_pairs,
    optimizer_tensors,
    refuse_changed_settings,
    restore_optimizer,
    run_cli,
)

FAMILIES = ("helpful", "harmless")


@dataclass(frozen=True)
class Args:
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
    """render with the tokenizer's chat template when it has one (else the Human/Assistant format)"""
    precision: Literal["no", "bf16"] = "no"
    """mixed precision, passed to accelerate"""
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
        """The reward model inside a transformers sequence-classification model (shares its weights)."""
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
                "model is; use a Llama-style decoder (tiny, smollm2-135m) or a BERT encoder (minilm)"
            )
        if device != "meta":
            base.load_state_dict(self.backbone.state_dict())
            head.load_state_dict(self.score.state_dict())
        return classifier


def classifier_head(classifier) -> nn.Linear:
    """The linear head of a sequence-classification model: `score` (decoders) or `classifier` (BERT)."""
    for name in ("score", "classifier"):
        head = getattr(classifier, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise HhDataError(
        f"{type(classifier).__name__} has no single linear head (score or classifier); the reward "
        "model supports Llama-style decoders and BERT encoders"
    )


# ---- turning rows into token ids -------------------------------------------------------
#
# One conversation is scored as  start | prompt | reply | end-of-turn, and the reward is read
# at the end-of-turn token (decoders) or at the start token through the pooler (BERT).


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    """Whether rows are rendered with the tokenizer's chat template (asked for, and it has one)."""
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> tuple[str, str]:
    """The text of the prompt and of the reply after it; their concatenation is the transcript.

    >>> render(None, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}], False)
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Yo')
    """
    if not chat:
        return render_transcript(prompt) + ASSISTANT_TAG, render_transcript(reply)[
            len(ASSISTANT_TAG) :
        ]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not whole.startswith(head):
        raise HhDataError(
            f"the chat template of {tokenizer.name_or_path!r} renders the prompt differently "
            "with and without the reply; run with --no-chat-template"
        )
    return head, whole[len(head) :]


def start_token_id(tokenizer) -> int | None:
    """The token that opens a sequence: cls, else bos, else none (id 0 is a token like any other)."""
    for candidate in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    return None


def special_token_ids(tokenizer) -> list[int]:
    """Ids of every special token, named (bos, eos, ...) or added as special, in id order."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted({*tokenizer.all_special_ids, *added})


PROBE = ([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}])


def template_end_id(tokenizer) -> int | None:
    """The last special token a chat template writes after a reply (`<|im_end|>` for ChatML), or None."""
    _, reply_text = render(tokenizer, *PROBE, chat=True)
    special = set(special_token_ids(tokenizer))
    written = [
        t for t in tokenizer(reply_text, add_special_tokens=False)["input_ids"] if t in special
    ]
    return written[-1] if written else None


def end_of_turn_id(tokenizer, chat: bool) -> int:
    """The one token that closes an assistant turn; the reward is read there, PPO stops there.

    With a chat template: the last special token the template writes after a reply
    (`<|im_end|>` for ChatML, eos for templates that end turns with it). Plain HH text, or a
    template that writes none (the tiny tokenizer's HH template): the tokenizer's sep, else
    its eos; the trainers append it to every reply.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["hi there"] * 10, vocab_size=300)
    >>> tok.convert_ids_to_tokens(end_of_turn_id(tok, chat=True))
    '</s>'
    """
    written = template_end_id(tokenizer) if chat else None
    if written is not None:
        return written
    for candidate in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise HhDataError(
        f"the tokenizer of {tokenizer.name_or_path!r} has no end-of-sequence or separator token "
        "to close a reply with; set tokenizer.eos_token (or use a chat template that ends turns)"
    )


def reward_pad_id(tokenizer, chat: bool) -> int:
    """A pad id that never occurs in a scored text, so a classifier that pools at the last
    non-pad token reads the end-of-turn token (SmolLM2 pads with `<|im_end|>`, its end of turn).

    The tokenizer's own pad when it is not the start or end token, else the first special
    token the format never writes (SmolLM2: `<|endoftext|>`).
    """
    end, start = end_of_turn_id(tokenizer, chat), start_token_id(tokenizer)
    used = {end, start}
    if chat:
        prompt_text, reply_text = render(tokenizer, *PROBE, chat=True)
        used |= set(tokenizer(prompt_text + reply_text, add_special_tokens=False)["input_ids"])
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in used:
        return tokenizer.pad_token_id
    spare = [t for t in special_token_ids(tokenizer) if t not in used]
    if not spare:
        raise HhDataError(
            f"the tokenizer of {tokenizer.name_or_path!r} pads with its end-of-turn token and has no "
            "spare special token to pad with instead; add one (tokenizer.add_special_tokens("
            "{'pad_token': '<pad>'}) and resize the model's embeddings)"
        )
    return spare[0]


def reply_body(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> tuple[str, str]:
    """(prompt text, reply text without the end-of-turn token a chat template writes, and
    without anything after it, such as ChatML's newline)."""
    prompt_text, reply_text = render(tokenizer, prompt, reply, chat)
    written = template_end_id(tokenizer) if chat else None
    if written is not None:
        reply_text = reply_text[: reply_text.rfind(tokenizer.convert_ids_to_tokens(written))]
    return prompt_text, reply_text


def truncate_pair(
    start: list[int], prompt: list[int], replies: list[list[int]], end: int, max_length: int
) -> tuple[list[int], ...]:
    """(start + prompt, reply + [end] for each reply), at most max_length tokens per sequence.

    When start + prompt + the longest reply + end fits, nothing is cut. Otherwise each reply
    keeps at least max_length // 2 tokens including its end token (more where the prompt is
    short), and the prompt keeps its last tokens, exactly as many as fit beside the longer one.

    >>> truncate_pair([0], [1, 2], [[5, 6], [7]], 9, max_length=6)  # fits: nothing cut
    ([0, 1, 2], [5, 6, 9], [7, 9])
    >>> truncate_pair([0], [1, 2, 3, 4], [[5, 6], [7]], 9, max_length=6)
    ([0, 3, 4], [5, 6, 9], [7, 9])
    """
    cap = max(max(max_length - len(start) - len(prompt), max_length // 2) - 1, 0)
    closed = [reply[:cap] + [end] for reply in replies]
    room = max_length - len(start) - max(map(len, closed))
    return (start + prompt[max(len(prompt) - room, 0) :], *closed)


def encode_pair(tokenizer, row: dict, max_length: int, chat: bool) -> tuple[list[int], ...]:
    """Token ids of (prompt, chosen reply, rejected reply), truncated to fit max_length.

    The start token (cls/bos) opens the prompt unless the chat template writes it; each reply
    ends with the end-of-turn token (end_of_turn_id), kept through truncation; see
    truncate_pair for what is cut.
    """
    end = end_of_turn_id(tokenizer, chat)
    replies = []
    for reply in (row["chosen"], row["rejected"]):
        prompt_text, body_text = reply_body(tokenizer, row["prompt"], reply, chat)
        replies.append(tokenizer(body_text, add_special_tokens=False)["input_ids"])
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    start = [start_token_id(tokenizer)]
    if start[0] is None or prompt[:1] == start:
        start = []
    return truncate_pair(start, prompt, replies, end, max_length)


def reward_text(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> str:
    """The text whose `tokenizer(text)` ids (default special tokens) are those encode_pair
    gives untruncated: what the saved sequence-classification model, or
    pipeline("text-classification", function_to_apply="none"), scores.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["hi there"] * 10, vocab_size=300)
    >>> reward_text(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}], chat=False)
    '<s>\\n\\nHuman: Hi\\n\\nAssistant: Yo</s>'
    """
    end, start = end_of_turn_id(tokenizer, chat), start_token_id(tokenizer)
    prompt_text, body_text = reply_body(tokenizer, prompt, reply, chat)
    text = prompt_text + body_text
    added = tokenizer("")["input_ids"]  # what the tokenizer adds by itself (BERT: [CLS] [SEP])
    first = tokenizer(prompt_text, add_special_tokens=False)["input_ids"][:1]
    if start is not None and first != [start] and added[:1] != [start]:
        text = tokenizer.convert_ids_to_tokens(start) + text
    if added[-1:] != [end]:
        text += tokenizer.convert_ids_to_tokens(end)
    return text


# ---- batches: packed (prefix shared) or naive (two sequences per pair) -----------------


def packed_batch(
    pairs: list[tuple[list[int], ...]], pad_id: int, boolean_mask: bool = False
) -> dict:
    """One sequence per pair, prompt|chosen|rejected, with a 4D mask and restarting positions.

    Token i may attend to token j when j <= i in the packed order and j is in the prompt or in
    i's own reply. Padding attends only to itself, so no softmax row is empty. The mask is
    additive (0 or the float minimum) unless `boolean_mask`, which SDPA takes as is (True =
    attend): measured ~15% faster forward on CPU than the additive mask.
    """
    length = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    ids = torch.full((len(pairs), length), pad_id)
    positions = torch.zeros((len(pairs), length), dtype=torch.long)
    segment = torch.full((len(pairs), length), -1)  # -1 pad, 0 prompt, 1 chosen, 2 rejected
    read_at = torch.zeros((len(pairs), 2), dtype=torch.long)
    for row, (prompt, chosen, rejected) in enumerate(pairs):
        p, c, r = len(prompt), len(chosen), len(rejected)
        ids[row, : p + c + r] = torch.tensor(prompt + chosen + rejected)
        positions[row, : p + c] = torch.arange(p + c)
        positions[row, p + c : p + c + r] = torch.arange(p, p + r)  # restart after the prompt
        segment[row, :p], segment[row, p : p + c], segment[row, p + c : p + c + r] = 0, 1, 2
        read_at[row] = torch.tensor([p + c - 1, p + c + r - 1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # shape: [seq, seq]
    query, key = segment[:, :, None], segment[:, None, :]  # shape: [batch, seq, 1], [batch, 1, seq]
    allowed = causal & (query != -1) & (key != -1) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool) & (query == -1)
    mask = allowed
    if not boolean_mask:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {
        "input_ids": ids,
        "attention_mask": mask[:, None],  # shape: [batch, 1, seq, seq]
        "position_ids": positions,
        "read_at": read_at,
    }


def naive_batch(pairs: list[tuple[list[int], ...]], pad_id: int) -> dict:
    """Two right-padded sequences per pair: all the chosen ones, then all the rejected ones."""
    sequences = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": torch.arange(length).expand(len(sequences), -1),
        "read_at": torch.tensor([len(s) - 1 for s in sequences])[:, None],
    }


PREFIX_SHARING_ATTENTION = ("eager", "sdpa")  # take a 4-D mask as given (checked by the tests)


def uses_alibi(config) -> bool:
    """Whether a model adds ALiBi distance biases (BLOOM, Falcon/MPT with alibi, ALiBi BERTs),
    which come from token distances, not from position ids."""
    attn_config = getattr(config, "attn_config", None)  # MPT keeps it there
    alibi_in_attn = (
        attn_config.get("alibi")
        if isinstance(attn_config, dict)
        else getattr(attn_config, "alibi", False)
    )
    return bool(
        config.model_type == "bloom"
        or getattr(config, "alibi", False) is True
        or getattr(config, "position_embedding_type", None) == "alibi"
        or alibi_in_attn
    )


def prefix_sharing_problem(backbone) -> str | None:
    """Why packing prompt|chosen|rejected would not be exact for this backbone, or None.

    Exact needs a causal decoder that applies the 4-D mask as given (eager or sdpa attention;
    flash-attention-2 and others rebuild their own causal mask) and places tokens by the
    position ids (ALiBi models derive positions from distances in the packed sequence).
    """
    config = backbone.config
    if models.is_encoder(config):
        return "is a bidirectional encoder: its prompt tokens attend to the reply, so sharing the prompt is not exact"
    attention = config._attn_implementation
    if attention not in PREFIX_SHARING_ATTENTION:
        return (
            f"runs {attention!r} attention, which does not take the 4-D mask prefix sharing needs "
            f"(only {' and '.join(PREFIX_SHARING_ATTENTION)} do)"
        )
    if uses_alibi(config) or "position_ids" not in inspect.signature(backbone.forward).parameters:
        return (
            f"({config.model_type}) places tokens by ALiBi distances, not position ids, so the rejected "
            "reply cannot restart its positions after the prompt"
        )
    return None


def pair_rewards(
    model, pairs, pad_id: int, share_prefix: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected replies of `pairs`, each of shape [batch]."""
    if share_prefix:
        backbone = getattr(model, "module", model).backbone
        problem = prefix_sharing_problem(backbone)
        if problem is not None:
            raise HhDataError(f"prefix sharing: the model {problem}; run with --prefix-sharing off")
        batch = packed_batch(
            pairs, pad_id, boolean_mask=backbone.config._attn_implementation == "sdpa"
        )
        rewards = model(**{k: v.to(device) for k, v in batch.items()})  # shape: [batch, 2]
        return rewards[:, 0], rewards[:, 1]
    batch = naive_batch(pairs, pad_id)
    rewards = model(**{k: v.to(device) for k, v in batch.items()})[:, 0]  # shape: [2 * batch]
    return rewards[: len(pairs)], rewards[len(pairs) :]


def pair_length(pair: tuple[list[int], ...], share_prefix: bool) -> int:
    """Tokens of the longest sequence the pair puts in a batch."""
    prompt, chosen, rejected = map(len, pair)
    return prompt + chosen + rejected if share_prefix else prompt + max(chosen, rejected)


def length_groups(lengths: list[int], cost: int) -> list[list[int]]:
    """Indices of ``lengths`` cut into micro-batches of similar length, shortest first.

    A batch padded to its longest sequence is mostly padding (at max length 512, 57% of the
    tokens of the bundled sample's batches of 16). A micro-batch costs its size times its
    longest length plus ``cost`` for the extra pass; the cheapest cut of the sorted lengths
    is found by dynamic programming. ``cost < 0`` keeps one group.

    >>> length_groups([500, 20, 30, 480], cost=64)
    [[1, 2], [3, 0]]
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if cost < 0 or len(order) < 2:
        return [order]
    ranked = [lengths[i] for i in order]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            total = best[start] + (end - start) * ranked[end - 1] + cost
            if total < best[end]:
                best[end], cut[end] = total, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def accumulate_pair_loss(
    model, pairs, pad_id: int, share_prefix: bool, device, cost: int, backward=None, no_sync=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss of ``pairs`` with its gradient accumulated micro-batch by micro-batch
    (see length_groups): the same gradient as one padded batch, for less work.

    ``backward`` runs each micro-batch's backward pass (default ``Tensor.backward``);
    ``no_sync()`` wraps all but the last, so data-parallel processes reduce gradients once.
    Returns the rewards of chosen and rejected (detached, in the order of ``pairs``) and
    the batch's mean loss.
    """
    groups = length_groups([pair_length(pair, share_prefix) for pair in pairs], cost)
    chosen_parts, rejected_parts, loss = [], [], 0.0
    for number, group in enumerate(groups):
        last = number == len(groups) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            chosen, rejected = pair_rewards(
                model, [pairs[i] for i in group], pad_id, share_prefix, device
            )
            part = -F.logsigmoid(chosen - rejected).sum() / len(pairs)
            (backward or torch.Tensor.backward)(part)
        chosen_parts.append(chosen.detach())
        rejected_parts.append(rejected.detach())
        loss = loss + part.detach()
    where = (
        torch.tensor([i for group in groups for i in group]).argsort().to(chosen_parts[0].device)
    )
    return torch.cat(chosen_parts)[where], torch.cat(rejected_parts)[where], loss


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


# ---- the run directory: checkpoints, final model --------------------------------------


def save_checkpoint(run_dir: Path, step: int, model, optimizer, log_lines: list[str]) -> None:
    """Weights, optimizer moments and the RNG state as safetensors; scalars as JSON."""
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    tensors, param_groups = optimizer_tensors(optimizer)
    tensors["torch_rng_state"] = torch.get_rng_state()
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "state.json").write_text(json.dumps({"step": step, "param_groups": param_groups}))
    (folder / "train_log.jsonl").write_text("".join(log_lines))
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-2]:  # keep the last two
        for file in old.iterdir():
            file.unlink()
        old.rmdir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [
        c
        for c in sorted((run_dir / "checkpoints").glob("step-*"))
        if (c / "train_log.jsonl").exists()
    ]
    return complete[-1] if complete else None


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list[str]]:
    """Restore what save_checkpoint wrote; returns the step and the training log so far."""
    model.load_state_dict(load_file(folder / "model.safetensors"))
    tensors = load_file(folder / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("torch_rng_state"))
    scalars = json.loads((folder / "state.json").read_text())
    restore_optimizer(optimizer, tensors, scalars["param_groups"])
    log = (folder / "train_log.jsonl").read_text().splitlines(keepends=True)
    return scalars["step"], log


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
    >>> score(model, tokenizer, settings, [prompt_turns], [[{"role": "assistant", "content": "..."}]])  # doctest: +SKIP
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


# ---- evaluation: accuracy, margin, calibration ------------------------------------------


def summarize(margins: torch.Tensor, bins: int) -> dict:
    """Accuracy, mean margin and expected calibration error of r_chosen - r_rejected values.

    The model's probability that the chosen reply is preferred is sigmoid(margin); a pair is
    counted right when the margin is positive (a tie counts half).

    >>> summarize(torch.tensor([2.0, -1.0, 3.0, 0.0]), bins=5)["accuracy"]
    0.625
    """
    correct = (margins > 0).float() + 0.5 * (margins == 0).float()
    return {
        "pairs": len(margins),
        "accuracy": correct.mean().item(),
        "mean_margin": margins.mean().item(),
        "ece": reliability(margins, bins)[0],
    }


def reliability(margins: torch.Tensor, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability table, over confidence max(p, 1 - p).

    Confidence lies in [0.5, 1]; each bin compares the mean confidence with the share of
    pairs whose more likely reply was the chosen one (Guo et al. 2017, eq. 3).
    """
    probability = torch.sigmoid(margins.double())
    confidence = torch.maximum(probability, 1 - probability)
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    which = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean_confidence = confidence[inside].mean().item()
            accuracy = correct[inside].mean().item()
            ece += inside.double().mean().item() * abs(accuracy - mean_confidence)
            table.append(
                {
                    "low": 0.5 + b / (2 * bins),
                    "high": 0.5 + (b + 1) / (2 * bins),
                    "pairs": int(inside.sum()),
                    "confidence": mean_confidence,
                    "accuracy": accuracy,
                }
            )
    return ece, table


def evaluation_metrics(rows: list[dict], margins: torch.Tensor, bins: int) -> dict:
    """metrics.json's evaluation part: overall, per family (config) and per subset."""
    groups: dict[str, dict[str, list[int]]] = {"family": {}, "subset": {}}
    for index, row in enumerate(rows):
        for key in groups:
            groups[key].setdefault(row[key], []).append(index)
    return {
        "overall": summarize(margins, bins),
        "by_family": {
            name: summarize(margins[i], bins) for name, i in sorted(groups["family"].items())
        },
        "by_subset": {
            name: summarize(margins[i], bins) for name, i in sorted(groups["subset"].items())
        },
        "reliability": reliability(margins, bins)[1],
    }


def save_plots(
    run_dir: Path, margins: torch.Tensor, rows: list[dict], metrics: dict, log: list[dict]
) -> None:
    """reliability.png, margins.png (per family) and loss.png in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    table = metrics["reliability"]
    axis.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfectly calibrated")
    axis.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], "o-", label="model")
    axis.set(
        xlabel="predicted probability of the preferred reply",
        ylabel="frequency it was preferred",
        title=f"ECE {metrics['overall']['ece']:.3f}",
    )
    axis.legend()
    figure.savefig(run_dir / "reliability.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for family in sorted({row["family"] for row in rows}):
        axis.hist(
            [m for m, row in zip(margins.tolist(), rows) if row["family"] == family],
            bins=40,
            alpha=0.6,
            label=family,
        )
    axis.set(xlabel="r_chosen - r_rejected", ylabel="pairs", title="held-out margins")
    axis.legend()
    figure.savefig(run_dir / "margins.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in log], [r["loss"] for r in log])
    axis.set(xlabel="step", ylabel="training loss", title="-log sigmoid(r_chosen - r_rejected)")
    figure.savefig(run_dir / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(figure)


@torch.no_grad()
def held_out_margins(
    model, pairs, pad_id: int, share_prefix: bool, batch_size: int, accelerator
) -> torch.Tensor:
    """r_chosen - r_rejected for every pair, each process scoring every world_size-th pair."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    padded = pairs + pairs[-1:] * (-len(pairs) % world)  # equal shares, trimmed after gather
    mine = padded[rank::world]
    # batches of similar length pad less; the margins go back to the pairs' order
    order = sorted(range(len(mine)), key=lambda i: pair_length(mine[i], share_prefix))
    margins = []
    for start in range(0, len(mine), batch_size):
        batch = [mine[i] for i in order[start : start + batch_size]]
        chosen, rejected = pair_rewards(model, batch, pad_id, share_prefix, accelerator.device)
        margins.append(chosen - rejected)
    where = torch.tensor(order).argsort().to(margins[0].device)
    gathered = accelerator.gather(
        torch.cat(margins)[where]
    )  # shape: [world * share], process-major
    model.train()
    return gathered.view(world, -1).t().reshape(-1)[: len(pairs)].cpu()


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
        reads = "BERT's pooler over the first token and a linear `classifier`, as `BertForSequenceClassification`"
    else:
        reads = (
            f"a linear `score` head read at the end-of-turn token `{end}` that closes the assistant's "
            f"final reply: the last token, where the sequence-classification model pools (the last "
            f"token that is not the pad token `{pad}`, which never occurs in a scored text)"
        )
    rendering = (
        f"the conversation through the tokenizer's chat template (`apply_chat_template(prompt + [reply])`), "
        f"cut right after the final `{end}`"
        if chat and template_end_id(tokenizer) is not None
        else "the HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`, byte for byte, ending with "
        f"the final reply) closed by `{end}`"
    )
    text = reward_text(tokenizer, *EXAMPLE, chat)
    described = (
        f"The reward of one conversation is the model's logit (no sigmoid) on one text: {rendering}. "
        f"Start and end tokens are written into the text where the tokenizer does not add them "
        f"itself, so `tokenizer(text)` (default settings) gives exactly the ids the trainer scored. "
        f"For example, as a Python string:\n\n"
        f"```python\ntext = {json.dumps(text, ensure_ascii=False)}\n```\n\n"
        f"Training saw at most {max_length} tokens per conversation: longer ones kept the final reply "
        f"(at least half the budget, with its end token) and the prompt's most recent tokens. A "
        f"plain tokenizer call does not cut that way; score long conversations with `score` below."
    )
    return reads, described


def write_card(run_dir: Path, settings: dict, metrics: dict, tokenizer, pooled: bool) -> None:
    """model/README.md from hhdata/cards/model_card.md."""
    template = (Path(__file__).resolve().parent.parent / "hhdata/cards/model_card.md").read_text()
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
    card = template.format(
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
    (run_dir / "model" / "README.md").write_text(card)


# ---- the run --------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train, evaluate and save a reward model; returns the metrics written to metrics.json."""
    run_dir = Path(args.run_dir)
    accelerator = Accelerator(mixed_precision=args.precision)
    torch.manual_seed(args.seed)
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
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if not args.resume and (run_dir / "checkpoints").exists():
        raise HhDataError(
            f"{run_dir} already holds a run; pass --resume to continue it or pick another --run-dir"
        )
    comparable = dataclasses.asdict(args)
    del comparable["resume"], comparable["stop_after"]
    if checkpoint is not None:
        refuse_changed_settings(run_dir, "settings.json", comparable)

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
    if not args.dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    model.to_classifier(
        tokenizer.pad_token_id, device="meta"
    )  # fail now, not at the end, if it cannot be saved
    # prefix sharing only where it is exact: causal decoders with eager/sdpa attention and position ids
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
    settings = {
        "args": comparable,
        "command": " ".join(["python -m training.reward_model", *sys.argv[1:]])
        if __name__ == "__main__"
        else "training.reward_model.main(Args(...))",
        "provenance": provenance,
        "train_pairs": len(train_rows),
        "eval_pairs": len(eval_rows),
        "total_steps": total_steps,
        "share_prefix": share_prefix,
        "chat_template": chat,
        "processes": accelerator.num_processes,
        "versions": {
            "torch": torch.__version__,
            "transformers": sys.modules["transformers"].__version__,
        },
    }
    if accelerator.is_main_process and checkpoint is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.json").write_text(json.dumps(settings, indent=2))
        tokenizer.save_pretrained(run_dir / "tokenizer")

    train_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in train_rows]
    eval_pairs = [encode_pair(tokenizer, row, args.max_length, chat) for row in eval_rows]
    pad_id = reward_pad_id(tokenizer, chat)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    start_step, log_lines = 0, []
    if checkpoint is not None:
        start_step, log_lines = load_checkpoint(checkpoint, model, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1)

    # 4. train: each step takes the next batch of a seeded per-epoch permutation
    model.train()
    started, cpu_started, trained = time.perf_counter(), time.process_time(), 0
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_pairs), generator=generator)
        batch = order[index * args.batch_size : (index + 1) * args.batch_size].tolist()
        mine = batch[accelerator.process_index :: accelerator.num_processes]
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen, rejected, loss = accumulate_pair_loss(
            model,
            [train_pairs[i] for i in mine],
            pad_id,
            share_prefix,
            accelerator.device,
            args.micro_batch_cost,
            accelerator.backward,
            lambda: accelerator.no_sync(model),
        )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        trained += len(batch)
        margin = accelerator.gather(chosen.detach() - rejected.detach())
        record = {
            "step": step + 1,
            "loss": accelerator.reduce(loss.detach(), "mean").item(),
            "accuracy": (margin > 0).float().mean().item(),
            "margin": margin.mean().item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        log_lines.append(json.dumps(record) + "\n")
        if writer is not None:
            for key in ("loss", "accuracy", "margin", "lr", "grad_norm"):
                writer.add_scalar(f"train/{key}", record[key], step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 in (total_steps, args.stop_after):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    run_dir, step + 1, accelerator.unwrap_model(model), optimizer, log_lines
                )
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
        "cpu_seconds": cpu_seconds,  # this process, all threads: steadier than wall time on a busy machine
        "final_loss": json.loads(log_lines[-1])["loss"],
    }
    if accelerator.is_main_process:
        saved = {"max_length": args.max_length, "chat_template": chat, "base_model": args.model}
        save_reward_model(accelerator.unwrap_model(model), tokenizer, run_dir / "model", saved)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_plots(run_dir, margins, eval_rows, metrics, [json.loads(line) for line in log_lines])
        write_card(run_dir, settings, metrics, tokenizer, accelerator.unwrap_model(model).pooled)
        writer.add_scalar("eval/accuracy", metrics["overall"]["accuracy"], total_steps)
        writer.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, Args)
