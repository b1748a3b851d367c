"""PPO against a trained reward model on the prompts of a release (RLHF, Ziegler et al. 2019).

The policy (initialised from the SFT model, ``training/sft.py``) samples a reply to each
prompt. The reward of a reply is the reward model's score at its last token minus a per-token
KL penalty to the frozen reference (the SFT model again). A value model, initialised from the
reward model, gives GAE advantages; the clipped PPO losses (Schulman et al. 2017) update both.

The implementation details that make RLHF-PPO work are numbered in ``main`` and each cites
its source; "N+" is Huang et al. 2023, "The N+ Implementation Details of RLHF with PPO".

    python -m training.ppo --policy runs/sft --reward-model runs/reward-model --output-dir runs/ppo
    accelerate launch -m training.ppo --policy runs/sft --reward-model runs/reward-model
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model

import hhdata
from hhdata.errors import HhDataError
from training import models
from training.common import (
    choose_split,
    load_pairs,
    optimizer_tensors,
    prompt_key,
    refuse_changed_settings,
    restore_optimizer,
    run_cli,
)
from training.reward_model import (
    RewardModel,
    end_of_turn_id,
    load_reward_model,
    split_held_out,
    start_token_id,
    uses_chat_template,
)
from training.reward_model import score as text_scores
from training.sft import encode_prompt


@dataclass(frozen=True)
class Args:
    """PPO against a trained reward model, on the prompts of a release."""

    policy: str = "runs/sft"
    """the SFT run directory: the policy's starting weights and the frozen reference"""
    reward_model: str = "runs/reward-model"
    """the reward-model run directory (training/reward_model.py); the value model starts from it"""
    data: str | None = None
    """a release directory, a .parquet of pair rows or a Hub repo id; default: the bundled sample"""
    split: str | None = None
    """which split's prompts to train on; default `train` where the data has it, else its only
    split (the bundled sample has only `test`)"""
    judge: str | None = None
    """a second reward-model run directory, trained apart (other seed or data), that PPO never
    optimises: it judges the held-out win rate beside the proxy reward model"""
    output_dir: str = "runs/ppo"
    """where checkpoints, metrics.json, plots, TensorBoard logs and the final policy go"""
    seed: int = 1
    """seed of the prompt order, the sampling and the minibatch order"""
    total_episodes: int = 256
    """prompts answered over the whole run (per process); updates = total_episodes // batch_size"""
    batch_size: int = 16
    """replies sampled per update (per process)"""
    num_mini_batches: int = 2
    """minibatches each batch is split into for the PPO epochs"""
    num_ppo_epochs: int = 4
    """passes of PPO over each batch of rollouts"""
    learning_rate: float = 1e-5
    """Adam learning rate of policy and value model (use ~1e-3 for the tiny model)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    query_length: int = 128
    """longest prompt in tokens; longer prompts keep their end (the latest turns)"""
    response_length: int = 32
    """most tokens sampled per reply"""
    temperature: float = 0.7
    """sampling temperature; the same temperature divides the logits when scoring"""
    missing_stop_penalty: float = 1.0
    """subtracted from the score of a reply that never emits the end token"""
    normalize_reward: bool = True
    """shift and scale reward-model scores to mean 0, std 1 on the reference's replies"""
    reward_norm_samples: int = 64
    """reference replies sampled to estimate the reward normalisation"""
    kl_coef: float = 0.05
    """initial coefficient of the per-token KL penalty to the reference"""
    adaptive_kl: bool = True
    """adapt kl_coef so the KL per reply tracks target_kl"""
    target_kl: float = 6.0
    """target KL to the reference, in nats per reply, of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive KL controller"""
    gamma: float = 1.0
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    clip_coef: float = 0.2
    """PPO clipping of the probability ratio"""
    vf_clip_coef: float = 0.2
    """clipping of the value prediction around the rollout's value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards of each batch before GAE"""
    eval_prompts: int = 64
    """held-out prompts (never trained on by PPO or the reward models) on which the final policy
    meets the reference (win rate)"""
    num_samples_shown: int = 4
    """held-out replies printed side by side with the reference's"""
    save_every: int = 4
    """every N updates (and at the end): save a resumable checkpoint and score the held-out
    prompts (reward and KL to the reference)"""
    resume: bool = False
    """continue from the checkpoint in output_dir (same settings required)"""
    stop_after: int = 0
    """end the run after this update, leaving its checkpoint, as if killed (0: run to the end)"""


# ---- the RLHF-PPO math, each checked against a plain loop in tests/test_ppo.py --------------


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, refusing a remainder with a message that says the numbers."""
    if a % b:
        raise HhDataError(f"{what}: {a} is not divisible by {b}; pick sizes that divide exactly")
    return a // b


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(values - mean) / std over the masked entries; shift_mean=False keeps the mean."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, gae_lambda: float):
    """Advantages and returns by GAE (Schulman et al. 2016), both of shape [batch, steps].

    Rewards and values are zero past each reply's end, so the last real step bootstraps
    from a value of zero.
    """
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * gae_lambda * last
        advantages[:, t] = last
    return advantages, advantages + values


def policy_loss(new_logprobs, old_logprobs, advantages, mask, clip_coef: float):
    """The clipped surrogate loss of PPO, its clip fraction and the approximate KL (k3)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3, Schulman's "Approximating KL"
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(new_values, old_values, returns, mask, vf_clip_coef: float):
    """The clipped value loss: 0.5 * max of the plain and clipped squared errors, and its clip fraction."""
    clipped_values = old_values + (new_values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, +-0.2)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch of `n_steps` episodes whose mean KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> torch.Tensor:
    """-kl_coef * KL at every reply token, plus the score at the reply's last real token.

    Shape [batch, response_length]; the last real token is the stop token where the reply
    stopped (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020).

    >>> per_token_rewards(torch.tensor([1.0]), torch.tensor([[0.5, 1.0, 0.0]]), 0.5, torch.tensor([[1.0, 1.0, 0.0]])).tolist()
    [[-0.25, 0.5, 0.0]]
    """
    rewards = torch.where(response_mask.bool(), -kl_coef * kl, 0.0)
    last = response_mask.sum(1).long() - 1  # shape: [batch]
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    return rewards


# ---- prompts: the end-of-turn token, truncation, the held-out split ----------------------


def start_length(tokenizer, chat: bool) -> int:
    """How many start tokens open a query: encode_prompt opens every prompt with the start
    token (start_token_id) unless the tokenizer has none."""
    return int(start_token_id(tokenizer) is not None)


def query_limit(args: Args, reward_max_length: int | None, start: int) -> int:
    """The longest query that leaves room for a full reply within the reward model's max length.

    The reward model never saw a sequence longer than its max length; PPO's queries are cut
    (from the left, keeping the start token) so that query + reply fits.
    """
    limit = args.query_length
    if reward_max_length is not None:
        limit = min(limit, reward_max_length - args.response_length)
    if limit <= start:
        raise HhDataError(
            f"--response-length {args.response_length} leaves no room for a prompt within the reward model's "
            f"max length {reward_max_length}; lower --response-length"
        )
    return limit


def fit_query(ids: list[int], limit: int, start: int) -> list[int]:
    """The query cut to `limit` tokens: its `start` tokens, then its latest tokens.

    >>> fit_query([1, 10, 11, 12, 13], limit=3, start=1)
    [1, 12, 13]
    """
    return ids if len(ids) <= limit else ids[:start] + ids[len(ids) - (limit - start) :]


def reward_model_training_prompts(
    run_dir: str | None, splits: dict, provenance: dict
) -> set[tuple] | None:
    """The prompts a reward-model run trained on, rebuilt from its settings.json (None: unknown).

    The run's own rule picks its rows (reward_model.split_held_out, the family filter and
    --max-train-pairs), on the run's own data, or on PPO's when both name the same source.
    """
    settings_path = Path(run_dir) / "settings.json" if run_dir else None
    if settings_path is None or not settings_path.is_file():
        return None
    settings = json.loads(settings_path.read_text())
    rm_args = settings["args"]
    same = settings.get("provenance") == provenance
    rm_splits = splits if same else load_pairs(rm_args.get("data"), rm_args.get("version"))[0]
    rows, _ = split_held_out(rm_splits, rm_args.get("eval_fraction", 0.2))
    rows = [row for row in rows if rm_args.get("train_config", "all") in ("all", row["family"])]
    return {prompt_key(row) for row in rows[: rm_args.get("max_train_pairs")]}


def split_prompts(
    splits: dict, train_split: str, excluded: set[tuple], count: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): `count` held-out rows with distinct prompts, none in `excluded`
    (the reward models' training prompts); PPO trains on the rest of `train_split`, never on a
    held-out prompt. Rows of other splits are held out first, then rows of `train_split`.
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = lambda rows: [
        rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()
    ]  # noqa: E731
    others = [row for name, rows in sorted(splits.items()) if name != train_split for row in rows]
    held_out, chosen = [], set()
    for row in shuffled(others) + shuffled(splits[train_split]):
        key = prompt_key(row)
        if len(held_out) == count:
            break
        if key not in excluded and key not in chosen:
            held_out.append(row)
            chosen.add(key)
    return [row for row in splits[train_split] if prompt_key(row) not in chosen], held_out


# ---- rollouts ---------------------------------------------------------------------------


def left_pad(queries: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, shape [batch, longest]."""
    width = max(map(len, queries))
    ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in queries])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries])
    return ids, mask


@torch.no_grad()
def sample(model, ids, mask, response_length: int, temperature: float, stop_id: int, generator):
    """Sample replies to left-padded queries with a key-value cache: the tokens and their
    log-probabilities under the sampling distribution, each of shape [batch, response_length].

    Stops early once every reply has emitted `stop_id`; the rest is filled with `stop_id`,
    which truncation masks out anyway. The log-probabilities are not trained on: they check
    that scoring (`reply_logprobs`) reproduces the distribution that sampled.
    """
    positions = (mask.cumsum(1) - 1).clamp(
        min=0
    )  # left padding: the first real token is position 0
    # logits_to_keep=1: only the last prompt position samples, so only it needs the output layer
    output = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    tokens = torch.full((ids.shape[0], response_length), stop_id, device=ids.device)
    logprobs = torch.zeros(tokens.shape, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    position = positions[:, -1:]
    for t in range(response_length):
        logits = output.logits[:, -1].float() / temperature  # shape: [batch, vocab]
        token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        step_logprobs = F.log_softmax(logits, dim=-1)
        tokens[:, t] = torch.where(done, stop_id, token)
        logprobs[:, t] = step_logprobs.gather(1, tokens[:, t : t + 1]).squeeze(1)
        done |= token == stop_id
        if done.all() or t + 1 == response_length:
            break
        mask, position = F.pad(mask, (0, 1), value=1), position + 1
        cache_name = (
            "cache" if "cache" in output else "past_key_values"
        )  # renamed in transformers 5.x
        output = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_name: output[cache_name]},
        )
    return tokens, logprobs


def truncate_at_stop(responses: torch.Tensor, stop_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first stop token, and whether there was one."""
    is_stop = responses == stop_id
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # shape: [batch, response_length]
    return ~after_stop, is_stop.any(1)


def right_pad(queries, query_mask, responses, response_mask):
    """Query and reply as one right-padded sequence each; returns ids, mask and query lengths.

    Shifting every row left by its query padding puts all padding at the end, so positions
    are plain 0..n and the reply of row i starts at column query_lengths[i].
    """
    ids = torch.cat([queries, responses], 1)  # shape: [batch, query + response]
    mask = torch.cat([query_mask, response_mask.long()], 1)
    shift = (query_mask == 0).sum(1)  # left padding per row
    columns = (torch.arange(ids.shape[1], device=ids.device) + shift[:, None]) % ids.shape[1]
    return ids.gather(1, columns), mask.gather(1, columns), query_mask.sum(1)


def reply_positions(query_lengths: torch.Tensor, response_length: int, width: int) -> torch.Tensor:
    """Column of the token that predicts each reply token, shape [batch, response_length]."""
    steps = torch.arange(response_length, device=query_lengths.device)
    return (query_lengths[:, None] - 1 + steps).clamp(max=width - 1)


def reply_logprobs(model, ids, at, responses, temperature: float):
    """Log-probabilities of the reply tokens and the entropy at each step, shape [batch, response_length].

    `ids` are right-padded, so causal attention never reaches the padding from a real token:
    no attention mask is needed, and attention takes its plain causal path. Only the reply's
    positions go through the output layer: the vocabulary projection is the costliest layer of
    a small model, and the prompt's logits are never used. (Models that post-process logits,
    e.g. Gemma 2's soft-capping, would need it applied here.)
    """
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # shape: [batch, seq, hidden]
    hidden = hidden.gather(
        1, at[..., None].expand(-1, -1, hidden.shape[-1])
    )  # shape: [batch, response_length, hidden]
    logits = model.get_output_embeddings()(hidden) / temperature
    logprobs = F.log_softmax(logits.float(), dim=-1)  # shape: [batch, response_length, vocab]
    with torch.no_grad():  # entropy is reported, never optimised
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(2, responses[..., None]).squeeze(2), entropy


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so one `accelerator.prepare` (DDP) wraps both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, ids, mask, at, responses, temperature: float):
        """Reply log-probabilities, entropies and values, each of shape [batch, response_length]."""
        logprobs, entropy = reply_logprobs(self.policy, ids, at, responses, temperature)
        return logprobs, entropy, per_token_values(self.value_model, ids, mask, at)


def scoring_mask(model, mask):
    """The attention mask a scoring model needs on right-padded ids: none for a causal decoder."""
    return mask if models.is_encoder(model.backbone.config) else None


def per_token_values(value_model, ids, mask, at) -> torch.Tensor:
    """The value model's prediction before each reply token, shape [batch, response_length]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return value_model(
        input_ids=ids,
        attention_mask=scoring_mask(value_model, mask),
        position_ids=positions,
        read_at=at,
    )


def reward_model_scores(reward_model, ids, mask, last) -> torch.Tensor:
    """The reward model's score read at each reply's last token, shape [batch]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    mask = scoring_mask(reward_model, mask)
    return reward_model(
        input_ids=ids, attention_mask=mask, position_ids=positions, read_at=last[:, None]
    )[:, 0]


def disable_dropout(model) -> None:
    """Zero every dropout probability, in modules and in the config that functional dropout reads."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None) or getattr(
        getattr(model, "backbone", None), "config", None
    )
    for name in list(vars(config)) if config is not None else []:
        if "dropout" in name and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


@dataclass
class Rollout:
    """A batch of replies, their query in one right-padded sequence, and the reply's mask."""

    ids: torch.Tensor  # shape: [batch, query + response], right-padded
    mask: torch.Tensor  # shape: [batch, query + response]
    responses: torch.Tensor  # shape: [batch, response_length]
    response_mask: torch.Tensor  # shape: [batch, response_length], true up to the stop token
    has_stop: torch.Tensor  # shape: [batch]
    at: torch.Tensor  # shape: [batch, response_length], column predicting each reply token
    last: (
        torch.Tensor
    )  # shape: [batch], column of each reply's last token (the stop token if it stopped)
    sample_logprobs: (
        torch.Tensor
    )  # shape: [batch, response_length], under the sampling distribution


@torch.no_grad()
def rollout(
    model, queries: list[list[int]], args: Args, pad_id: int, stop_id: int, generator, device
) -> Rollout:
    """Sample replies with left padding, truncate at the stop token, re-pad to the right for scoring."""
    ids, mask = (tensor.to(device) for tensor in left_pad(queries, pad_id))
    responses, sample_logprobs = sample(
        model, ids, mask, args.response_length, args.temperature, stop_id, generator
    )
    response_mask, has_stop = truncate_at_stop(responses, stop_id)
    sequence, sequence_mask, query_lengths = right_pad(ids, mask, responses, response_mask)
    at = reply_positions(query_lengths, args.response_length, sequence.shape[1])
    last = query_lengths + response_mask.sum(1) - 1
    return Rollout(
        sequence, sequence_mask, responses, response_mask, has_stop, at, last, sample_logprobs
    )


def make_scorer(reward_model, score_fn):
    """score(rollout) -> raw scores [batch]: the reward model's, or a rule's on the reply tokens."""
    if score_fn is not None:
        return lambda r: score_fn(r.responses, r.response_mask).float()
    return lambda r: reward_model_scores(reward_model, r.ids, r.mask, r.last).float()


@torch.no_grad()
def held_out_rollouts(model, queries, args, pad_id: int, stop_id: int, device) -> list[Rollout]:
    """Replies to the held-out queries, sampled from one fixed seed, so the policy at every
    saved update and the reference meet the same random numbers (common random numbers)."""
    generator = torch.Generator(device).manual_seed(args.seed + 7919)
    return [
        rollout(model, queries[s : s + args.batch_size], args, pad_id, stop_id, generator, device)
        for s in range(0, len(queries), args.batch_size)
    ]


def reply_texts(batches: list[Rollout], tokenizer) -> list[str]:
    """The replies' words, up to their end-of-turn token, as a judge reads them."""
    return [
        tokenizer.decode(reply[keep], skip_special_tokens=True)
        for batch in batches
        for reply, keep in zip(batch.responses.cpu(), batch.response_mask.cpu())
    ]


def make_judge(run_dir: str, batch_size: int):
    """judge(rows, texts) -> scores [n] of a separately trained reward model, which reads the
    replies' text in exactly the format it was trained on (reward_model.score encodes it)."""
    model, tokenizer, settings = load_reward_model(run_dir)
    disable_dropout(model)

    def judge(rows: list[dict], texts: list[str]) -> torch.Tensor:
        replies = [[{"role": "assistant", "content": text}] for text in texts]
        return torch.cat(
            [
                text_scores(
                    model,
                    tokenizer,
                    settings,
                    [row["prompt"] for row in rows[s : s + batch_size]],
                    replies[s : s + batch_size],
                )
                for s in range(0, len(rows), batch_size)
            ]
        ).float()

    return judge


@torch.no_grad()
def held_out_kl(policy, reference, batches: list[Rollout], temperature: float) -> torch.Tensor:
    """KL of the policy to the reference on its held-out replies, in nats per reply, shape [n]."""
    parts = []
    for batch in batches:
        mine, _ = reply_logprobs(policy, batch.ids, batch.at, batch.responses, temperature)
        theirs, _ = reply_logprobs(reference, batch.ids, batch.at, batch.responses, temperature)
        parts.append(((mine - theirs) * batch.response_mask).sum(1).cpu())
    return torch.cat(parts)


def held_out_point(
    update: int,
    policy,
    reference,
    score,
    judge,
    rows,
    queries,
    args,
    pad_id,
    stop_id,
    tokenizer,
    device,
) -> dict:
    """One point of the held-out reward-vs-sqrt(KL) curve: the policy's mean proxy (and judge)
    score and its KL to the reference on the held-out prompts."""
    batches = held_out_rollouts(policy, queries, args, pad_id, stop_id, device)
    kl = held_out_kl(policy, reference, batches, args.temperature).mean().item()
    point = {
        "update": update,
        "kl": kl,
        "sqrt_kl": math.sqrt(max(kl, 0.0)),
        "score": torch.cat([score(batch).cpu() for batch in batches]).mean().item(),
    }
    if judge is not None:
        point["judge_score"] = judge(rows, reply_texts(batches, tokenizer)).mean().item()
    return point


def verdict(rows: list[dict], mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Win rate of `mine` over `theirs` (a tie counts half) and mean scores, overall and per family."""
    wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
    result = {
        "prompts": len(rows),
        "win_rate": wins.mean().item(),
        "policy_score": mine.mean().item(),
        "reference_score": theirs.mean().item(),
        "by_family": {},
    }
    for family in sorted({row["family"] for row in rows}):
        inside = torch.tensor([row["family"] == family for row in rows])
        result["by_family"][family] = {
            "prompts": int(inside.sum()),
            "win_rate": wins[inside].mean().item(),
            "policy_score": mine[inside].mean().item(),
            "reference_score": theirs[inside].mean().item(),
        }
    return result


@torch.no_grad()
def evaluate(
    policy, reference, score, judge, rows, queries, args, pad_id, stop_id, tokenizer, device
) -> dict:
    """Held-out replies of the policy and of the reference on the same prompts, judged by the proxy
    reward model PPO optimised and, when given, by a judge it never saw.

    The proxy's verdict is the top level (and `proxy`); the judge's is under `judge`. A policy
    that wins under the proxy but not under the judge has learned the proxy's mistakes (reward
    hacking, Gao et al. 2022).
    """
    replies = {
        name: held_out_rollouts(model, queries, args, pad_id, stop_id, device)
        for name, model in (("policy", policy), ("reference", reference))
    }
    texts = {name: reply_texts(batches, tokenizer) for name, batches in replies.items()}
    proxy = {
        name: torch.cat([score(batch).cpu() for batch in batches])
        for name, batches in replies.items()
    }
    result = verdict(rows, proxy["policy"], proxy["reference"])
    result["proxy"] = {key: value for key, value in result.items()}
    judged = None
    if judge is not None:
        judged = {name: judge(rows, texts[name]) for name in replies}
        result["judge"] = verdict(rows, judged["policy"], judged["reference"])
    result["samples"] = [
        {
            "prompt": row["prompt"][-1]["content"],
            "reference": texts["reference"][i],
            "reference_score": proxy["reference"][i].item(),
            "policy": texts["policy"][i],
            "policy_score": proxy["policy"][i].item(),
            **(
                {
                    "reference_judge": judged["reference"][i].item(),
                    "policy_judge": judged["policy"][i].item(),
                }
                if judged
                else {}
            ),
        }
        for i, row in enumerate(rows[: args.num_samples_shown])
    ]
    return result


# ---- checkpoints: safetensors for tensors, JSON for the rest -----------------------------


def rng_state(generator) -> dict[str, torch.Tensor]:
    """This process's random state: its sampling generator, torch's CPU RNG and every CUDA device's."""
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def restore_rng(state: dict[str, torch.Tensor], generator) -> None:
    """Set what rng_state saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[f"cuda_{i}"] for i in range(len(state)) if f"cuda_{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_folders(folder: Path) -> tuple[Path, Path, Path]:
    """The checkpoint, the new one being written, and the previous one while it is swapped out."""
    return (
        folder,
        folder.with_name(folder.name + ".partial"),
        folder.with_name(folder.name + ".old"),
    )


def save_checkpoint(
    folder: Path, accelerator, policy, value_model, optimizer, generator, state: dict
) -> None:
    """Weights, optimizer moments (safetensors), each process's RNG (rng-rank{N}.safetensors) and
    the run's scalars (state.json, written last: a folder without it is incomplete).

    The swap never leaves the run without a complete checkpoint: write the new one beside the
    old, rename the old aside, rename the new into place, then delete the old. A kill at any
    point leaves one complete folder that find_checkpoint picks.
    """
    current, partial, old = checkpoint_folders(folder)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a half-written one from a killed run
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(rng_state(generator), partial / f"rng-rank{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    save_model(policy, partial / "policy.safetensors")  # save_model handles tied weights
    save_model(value_model, partial / "value.safetensors")
    tensors, param_groups = optimizer_tensors(optimizer)
    save_file(tensors, partial / "optimizer.safetensors")
    scalars = {**state, "param_groups": param_groups, "processes": accelerator.num_processes}
    (partial / "state.tmp").write_text(json.dumps(scalars))
    (partial / "state.tmp").rename(partial / "state.json")
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    partial.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint with the latest update among those a swap can leave, or None."""
    complete = [f for f in checkpoint_folders(folder) if (f / "state.json").is_file()]
    if not complete:
        return None
    return max(complete, key=lambda f: json.loads((f / "state.json").read_text())["update"])


def load_checkpoint(folder: Path, accelerator, policy, value_model, optimizer, generator) -> dict:
    """Restore what save_checkpoint wrote, each process its own RNG; returns the run's scalars."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("processes") != accelerator.num_processes:
        raise HhDataError(
            f"{folder} was written by {state.get('processes', 'another number of')} processes; resume with the same number "
            f"(this run has {accelerator.num_processes})"
        )
    load_model(policy, folder / "policy.safetensors")
    load_model(value_model, folder / "value.safetensors")
    restore_optimizer(
        optimizer, load_file(folder / "optimizer.safetensors"), state.pop("param_groups")
    )
    restore_rng(load_file(folder / f"rng-rank{accelerator.process_index}.safetensors"), generator)
    return state


# ---- reports: plots, model card ------------------------------------------------------------

CURVES = (
    "score",
    "kl",
    "sqrt_kl",
    "entropy",
    "reply_length",
    "pg_clipfrac",
    "vf_clipfrac",
    "value_loss",
)


def save_plots(output_dir: Path, history: list[dict], held_out: list[dict]) -> None:
    """training.png (a curve per metric) and reward_vs_sqrt_kl.png: the score against sqrt(KL),
    per training batch and on the held-out prompts at each saved update (proxy and judge), each
    with its linear fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    updates = [record["update"] for record in history]
    figure, axes = plt.subplots(2, 4, figsize=(14, 6))
    for axis, name in zip(axes.flat, CURVES):
        axis.plot(updates, [record[name] for record in history])
        axis.set(title=name, xlabel="update")
    figure.tight_layout()
    figure.savefig(output_dir / "training.png", dpi=90)
    plt.close(figure)
    # Bai et al. 2022 (fig. 4): the reward-model score grows roughly linearly in sqrt(KL)
    series = [
        ("training batches (proxy)", history, "score", "o"),
        ("held-out (proxy)", held_out, "score", "s"),
    ]
    if held_out and "judge_score" in held_out[0]:
        series.append(("held-out (judge)", held_out, "judge_score", "^"))
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for label, points, name, marker in series:
        x = np.array([point["sqrt_kl"] for point in points])
        line = axis.scatter(x, [point[name] for point in points], marker=marker, label=label)
        fit = sqrt_kl_fit(points, name)
        if fit is not None:
            axis.plot(
                x,
                fit["slope"] * x + fit["intercept"],
                "--",
                color=line.get_facecolor()[0],
                label=f"fit: {fit['slope']:.3f} sqrt(KL) + {fit['intercept']:.3f}",
            )
    axis.set(
        xlabel="sqrt(KL to the reference) (sqrt nats)",
        ylabel="reward-model score",
        title="reward vs sqrt(KL)",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "reward_vs_sqrt_kl.png", dpi=90)
    plt.close(figure)


def sqrt_kl_fit(points: list[dict], name: str = "score") -> dict | None:
    """Least-squares line points[name] = slope * sqrt(KL) + intercept (Bai et al. 2022, fig. 4).

    >>> sqrt_kl_fit([{"sqrt_kl": 0.0, "score": 1.0}, {"sqrt_kl": 2.0, "score": 2.0}])
    {'slope': 0.5, 'intercept': 1.0}
    """
    import numpy as np

    x = np.array([point["sqrt_kl"] for point in points])
    y = np.array([point[name] for point in points])
    if len(points) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": round(float(slope), 12), "intercept": round(float(intercept), 12)}


def verdict_rows(name: str, verdict_: dict) -> list[str]:
    """Table rows of one judge's verdict: overall, then per family."""
    return [
        f"| {name} | {part_name} | {part['prompts']} | {part['win_rate']:.3f} | {part['policy_score']:.3f} | {part['reference_score']:.3f} |"
        for part_name, part in [("all", verdict_)] + list(verdict_["by_family"].items())
    ]


def write_card(folder: Path, settings: dict, evaluation: dict) -> None:
    """README.md of the final policy from hhdata/cards/policy_card.md."""
    template = (Path(__file__).resolve().parent.parent / "hhdata/cards/policy_card.md").read_text()
    rows = [
        "| judged by | prompts | n | win rate vs reference | policy score | reference score |",
        "|---|---|---|---|---|---|",
    ]
    rows += verdict_rows("proxy (optimised)", evaluation["proxy"])
    if "judge" in evaluation:
        rows += verdict_rows("judge (never optimised)", evaluation["judge"])
    samples = "\n\n".join(
        f"**Prompt:** {s['prompt']!r}\n\n- reference ({s['reference_score']:.2f}): {s['reference']!r}\n- policy ({s['policy_score']:.2f}): {s['policy']!r}"
        for s in evaluation["samples"]
    )
    args = settings["args"]
    (folder / "README.md").write_text(
        template.format(
            policy=args["policy"],
            reward_model=args["reward_model"],
            judge=args["judge"] or "none (pass --judge)",
            data=json.dumps(settings["data"]),
            split=settings["split"],
            held_out=settings["held_out_prompts"],
            episodes=args["total_episodes"],
            updates=settings["updates"],
            eval_table="\n".join(rows),
            samples=samples,
            settings=json.dumps(args, indent=2),
        )
    )


# ---- the run -------------------------------------------------------------------------------


def main(args: Args, score_fn=None) -> dict:
    """Train the policy with PPO; returns the metrics written to metrics.json.

    `score_fn(responses, response_mask) -> scores [batch]` replaces the reward model with a
    rule on the reply tokens (a known-answer reward for tests); the value model then starts
    from the policy's own backbone.
    """
    accelerator = Accelerator()
    device = accelerator.device
    output_dir = Path(args.output_dir)
    num_updates = exact_div(args.total_episodes, args.batch_size, "--total-episodes / --batch-size")
    mini_batch_size = exact_div(
        args.batch_size, args.num_mini_batches, "--batch-size / --num-mini-batches"
    )
    if num_updates < 1:
        raise HhDataError(
            f"--total-episodes {args.total_episodes} is less than one batch of {args.batch_size}; raise it"
        )
    torch.manual_seed(args.seed)
    comparable = {
        k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "stop_after")
    }
    checkpoint = output_dir / "checkpoint"
    resume_from = find_checkpoint(checkpoint)
    if args.resume:
        if resume_from is None:
            raise HhDataError(
                f"{output_dir}: no complete checkpoint to resume from; run without --resume"
            )
        refuse_changed_settings(output_dir, "settings.json", comparable)
    elif any(folder.exists() for folder in checkpoint_folders(checkpoint)):
        raise HhDataError(
            f"{output_dir} already holds a run; pass --resume to continue it or pick another --output-dir"
        )
    if (
        args.judge is not None
        and score_fn is None
        and Path(args.judge).resolve() == Path(args.reward_model).resolve()
    ):
        raise HhDataError(
            f"--judge {args.judge} is the reward model PPO optimises; pass one trained apart (other --seed or data)"
        )

    # Prompts: train on --split (default `train`); hold out prompts that neither PPO nor the
    # reward models (proxy and judge) ever trained on, so the win rate is measured honestly.
    splits, provenance = load_pairs(args.data)
    train_split = choose_split(splits, args.split, provenance["source"])
    excluded, known, unknown = set(), [], []
    for run_dir in ((args.reward_model,) if score_fn is None else ()) + (
        (args.judge,) if args.judge else ()
    ):
        prompts = reward_model_training_prompts(run_dir, splits, provenance)
        (unknown if prompts is None else known).append(run_dir)
        excluded |= prompts or set()
    train_rows, eval_rows = split_prompts(
        splits, train_split, excluded, args.eval_prompts, args.seed
    )
    if not eval_rows:
        raise HhDataError(
            f"{provenance['source']}: every prompt was trained on by the reward model(s); "
            "hold some out when training them (--eval-fraction) or pass other --data"
        )
    if accelerator.is_main_process:
        print(
            f"ppo: training on split {train_split!r} ({len(train_rows)} rows); {len(eval_rows)} held-out prompts, "
            f"none trained on by PPO{' or the reward model(s)' if not unknown else ''}"
            + (
                f"; the training prompts of {unknown} are unknown (no settings.json)"
                if unknown
                else ""
            )
        )

    # Models: policy and frozen reference from the SFT run; reward and value from the reward model.
    tokenizer = models.load_tokenizer(args.policy)
    policy = models.load_causal_lm(args.policy, tokenizer)
    reference = models.load_causal_lm(args.policy, tokenizer)
    if score_fn is None:
        reward_model, reward_tokenizer, reward_settings = load_reward_model(args.reward_model)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise HhDataError(
                f"{args.policy} and {args.reward_model} tokenize differently; train the SFT policy "
                f"with --tokenizer {args.reward_model} (or on the same --model) so they share token ids"
            )
        chat, reward_max_length = (
            reward_settings["chat_template"],
            reward_settings.get("max_length"),
        )
        # 1. the value model starts as a copy of the reward model (Ouyang et al. 2022, appendix C.3; N+ detail)
        value_model = copy.deepcopy(reward_model)
        reward_model.requires_grad_(False)
    else:
        reward_model, reward_max_length = None, None
        sft_settings = Path(args.policy) / "args.json"
        chat = (
            json.loads(sft_settings.read_text()).get("chat_template", False)
            if sft_settings.is_file()
            else uses_chat_template(tokenizer, True)
        )
        value_model = RewardModel(copy.deepcopy(policy.get_decoder()))
        torch.nn.init.zeros_(
            value_model.score.weight
        )  # no reward model to start from: values start at 0
    reference.requires_grad_(False)
    # 2. dropout off in every model, so the log-probabilities of rollout and update agree (Ziegler et al. 2019; N+)
    for each in (policy, reference, value_model, reward_model):
        if each is not None:
            disable_dropout(each)
            each.eval()
    reference.to(device)
    if reward_model is not None:
        reward_model.to(device)
    score = make_scorer(reward_model, score_fn)
    judge = make_judge(args.judge, args.batch_size) if args.judge else None
    # the end-of-turn token: sampling stops at it and the reward is read there, where the reward
    # model read it in training (the last token of prompt + reply)
    pad_id, stop_id = tokenizer.pad_token_id, end_of_turn_id(tokenizer, chat)
    # queries keep their start token and their latest turns, and leave room for a full reply
    # within the reward model's max length, as in its training (reward_model.encode_pair)
    start = start_length(tokenizer, chat)
    limit = query_limit(args, reward_max_length, start)
    encode = lambda row: fit_query(encode_prompt(tokenizer, row["prompt"], chat)[0], limit, start)  # noqa: E731
    train_queries = [encode(row) for row in train_rows]
    eval_queries = [encode(row) for row in eval_rows]

    # 3. Adam with eps 1e-5 over policy and value (CleanRL ppo.py; N+ "Adam epsilon")
    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    generator = torch.Generator(device).manual_seed(
        args.seed * 1_000_003 + accelerator.process_index
    )
    kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    state = {"update": 0, "history": [], "held_out": [], "reward_mean": 0.0, "reward_std": 1.0}
    if args.resume:
        state = load_checkpoint(resume_from, accelerator, policy, value_model, optimizer, generator)
        kl_controller.value = state["kl_coef"]
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = {
        "args": comparable,
        "data": provenance,
        "updates": num_updates,
        "chat_template": chat,
        "split": train_split,
        "train_prompts": len(train_rows),
        "held_out_prompts": len(eval_rows),
        "held_out_excludes_training_prompts_of": known,
        "stop_token": tokenizer.convert_ids_to_tokens(stop_id),
        "query_limit": limit,
        "reward": "rule (score_fn)" if score_fn is not None else args.reward_model,
        "processes": accelerator.num_processes,
        "versions": {
            "hhdata": hhdata.__version__,
            "torch": torch.__version__,
            "transformers": sys.modules["transformers"].__version__,
        },
    }
    for name in ("policy", "reward_model", "judge"):
        if getattr(args, name) is None:
            continue
        source = Path(getattr(args, name)) / ("args.json" if name == "policy" else "settings.json")
        if source.is_file():  # the inputs' own settings and data versions
            settings[f"{name}_run"] = json.loads(source.read_text())
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (output_dir / "settings.json").write_text(json.dumps(settings, indent=2))
        writer = SummaryWriter(output_dir / "tensorboard", purge_step=state["update"] + 1)

    # 4. reward normalisation: shift and scale scores to mean 0, std 1 on the reference's own
    # replies, once before training (Ziegler et al. 2019, section 2.2; N+ "reward normalization")
    if args.normalize_reward and not args.resume:
        picks = torch.randperm(
            len(train_queries), generator=torch.Generator().manual_seed(args.seed)
        )[: args.reward_norm_samples]
        raw = torch.cat(
            [
                score(
                    rollout(
                        reference,
                        [train_queries[i] for i in picks[s : s + args.batch_size]],
                        args,
                        pad_id,
                        stop_id,
                        generator,
                        device,
                    )
                )
                for s in range(0, len(picks), args.batch_size)
            ]
        )
        raw = accelerator.gather(raw)
        state["reward_mean"], state["reward_std"] = raw.mean().item(), max(raw.std().item(), 1e-6)

    batches_per_epoch = len(train_queries) // (args.batch_size * accelerator.num_processes)
    if batches_per_epoch == 0:
        raise HhDataError(
            f"{provenance['source']}: {len(train_queries)} training prompts, fewer than one batch of "
            f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch-size or --eval-prompts"
        )
    held_out = lambda update: held_out_point(  # noqa: E731
        update,
        policy,
        reference,
        score,
        judge,
        eval_rows,
        eval_queries,
        args,
        pad_id,
        stop_id,
        tokenizer,
        device,
    )
    if not args.resume:  # the start of the held-out reward-vs-sqrt(KL) curve: the reference itself
        state["held_out"].append(held_out(0))
    started, started_cpu = time.perf_counter(), time.process_time()
    paused, paused_cpu = 0.0, 0.0  # time spent on held-out scoring, left out of the loop's time
    for update in range(state["update"], num_updates):
        epoch, index = divmod(update, batches_per_epoch)
        order = torch.randperm(
            len(train_queries), generator=torch.Generator().manual_seed(args.seed * 7 + epoch)
        )
        width = args.batch_size * accelerator.num_processes
        mine = order[index * width : (index + 1) * width][
            accelerator.process_index :: accelerator.num_processes
        ]
        lr = args.learning_rate * (1 - update / num_updates if args.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        with torch.no_grad():
            # 5. left padding for generation, right padding for scoring (N+ "padding"): all replies
            # start in the same column while sampling; scoring sees plain positions 0..n
            batch = rollout(
                policy, [train_queries[i] for i in mine], args, pad_id, stop_id, generator, device
            )
            mask = batch.response_mask.float()  # shape: [batch, response_length]
            # 6. logits divided by the sampling temperature when scoring, so the log-probabilities
            # are those of the distribution that sampled (N+ "temperature")
            logprobs, entropy, values = model(
                batch.ids, batch.mask, batch.at, batch.responses, args.temperature
            )
            ref_logprobs, _ = reply_logprobs(
                reference, batch.ids, batch.at, batch.responses, args.temperature
            )
            values = values * mask
            raw_scores = score(batch)
            scores = (raw_scores - state["reward_mean"]) / state["reward_std"]
            # 7. truncation at the stop token (above, in rollout) and a penalty for replies that never
            # stop (Ziegler et al. 2019 "penalty_reward_value"; TRL's missing_eos_penalty)
            scores = scores - args.missing_stop_penalty * (~batch.has_stop).float()
            # 8. per-token KL penalty to the reference, score added at the reply's last token
            # (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020)
            kl = (logprobs - ref_logprobs) * mask  # shape: [batch, response_length]
            rewards = per_token_rewards(scores, kl, kl_controller.value, mask)
            if (
                args.whiten_rewards
            ):  # N+ "reward whitening" (off by default, as in lm-human-preferences' sentiment task)
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, args.gamma, args.gae_lambda)
            # 9. advantages whitened over the batch's real tokens (N+ "advantage whitening")
            advantages = masked_whiten(advantages, mask) * mask

        stats = {
            name: []
            for name in ("pg_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl")
        }
        # checks of the plumbing, not of learning: scoring reproduces the sampling distribution
        # (temperature, positions, padding), and before the first step the ratio is exactly 1
        sampling_error = ((logprobs - batch.sample_logprobs).abs() * mask).max()
        first_ratio_error = None
        for _ in range(args.num_ppo_epochs):
            permutation = torch.randperm(args.batch_size, generator=generator, device=device)
            for first in range(0, args.batch_size, mini_batch_size):
                i = permutation[first : first + mini_batch_size]
                new_logprobs, _, new_values = model(
                    batch.ids[i], batch.mask[i], batch.at[i], batch.responses[i], args.temperature
                )
                pg_loss, pg_clipfrac, approx_kl = policy_loss(
                    new_logprobs, logprobs[i], advantages[i], mask[i], args.clip_coef
                )
                if first_ratio_error is None:
                    first_ratio_error = (
                        ((new_logprobs.detach() - logprobs[i]).exp() - 1).abs() * mask[i]
                    ).max()
                    first_approx_kl = approx_kl
                # 10. value clipping around the rollout's values (N+ "value function loss clipping")
                vf_loss, vf_clipfrac = value_loss(
                    new_values, values[i], returns[i], mask[i], args.vf_clip_coef
                )
                loss = pg_loss + args.vf_coef * vf_loss
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                for name, value in zip(
                    stats, (pg_loss.detach(), vf_loss.detach(), pg_clipfrac, vf_clipfrac, approx_kl)
                ):
                    stats[name].append(value)

        sequence_kl = accelerator.reduce(kl.sum(1).mean(), "mean").item()
        record = {
            "update": update + 1,
            "episodes": (update + 1) * args.batch_size * accelerator.num_processes,
            "score": accelerator.reduce(raw_scores.mean(), "mean").item(),
            "score_normalized": accelerator.reduce(scores.mean(), "mean").item(),
            "kl": sequence_kl,
            "sqrt_kl": math.sqrt(max(sequence_kl, 0.0)),
            "entropy": accelerator.reduce(masked_mean(entropy, mask), "mean").item(),
            "reply_length": accelerator.reduce(mask.sum(1).mean(), "mean").item(),
            "no_stop_fraction": accelerator.reduce((~batch.has_stop).float().mean(), "mean").item(),
            **{
                name: accelerator.reduce(torch.stack(values).mean(), "mean").item()
                for name, values in stats.items()
            },
            "kl_coef": kl_controller.value,
            "lr": lr,
            "sampling_logprob_error": accelerator.reduce(sampling_error, "max").item(),
            "first_minibatch_ratio_error": accelerator.reduce(first_ratio_error, "max").item(),
            "first_minibatch_approx_kl": accelerator.reduce(first_approx_kl, "max").item(),
        }
        # 11. adaptive KL controller, updated with this batch's KL per reply (Ziegler et al. 2019)
        if args.adaptive_kl:
            kl_controller.update(sequence_kl, args.batch_size * accelerator.num_processes)
        record["seconds"] = (
            time.perf_counter() - started - paused
        )  # wall clock since this process's first update
        record["cpu_seconds"] = (
            time.process_time() - started_cpu - paused_cpu
        )  # this process's CPU time, steadier on a shared machine
        state["history"].append(record)
        if accelerator.is_main_process:
            print(
                f"ppo update {record['update']}/{num_updates} score {record['score']:.3f} kl {record['kl']:.3f} "
                f"entropy {record['entropy']:.2f} length {record['reply_length']:.1f} clipfrac {record['pg_clipfrac']:.3f} "
                f"value_loss {record['value_loss']:.3f} kl_coef {record['kl_coef']:.4f}"
            )
            for name, value in record.items():
                writer.add_scalar(f"ppo/{name}", value, update + 1)
        state.update(update=update + 1, kl_coef=kl_controller.value)
        if (update + 1) % args.save_every == 0 or update + 1 in (num_updates, args.stop_after):
            clock, cpu_clock = time.perf_counter(), time.process_time()
            state["held_out"].append(held_out(update + 1))
            paused, paused_cpu = (
                paused + time.perf_counter() - clock,
                paused_cpu + time.process_time() - cpu_clock,
            )
            save_checkpoint(
                checkpoint, accelerator, policy, value_model, optimizer, generator, state
            )
        if update + 1 == args.stop_after:
            return {
                "stopped_after": update + 1,
                "history": state["history"],
                "held_out": state["held_out"],
            }

    # The held-out judgement: final policy against the reference, same prompts, same judge.
    evaluation = evaluate(
        policy,
        reference,
        score,
        judge,
        eval_rows,
        eval_queries,
        args,
        pad_id,
        stop_id,
        tokenizer,
        device,
    )
    metrics = {
        "history": state["history"],
        "held_out": state["held_out"],
        "evaluation": evaluation,
        "reward_mean": state["reward_mean"],
        "reward_std": state["reward_std"],
    }
    metrics["reward_vs_sqrt_kl"] = sqrt_kl_fit(state["history"])
    metrics["held_out_reward_vs_sqrt_kl"] = {
        name: sqrt_kl_fit(state["held_out"], name)
        for name in ("score", "judge_score")
        if name in state["held_out"][0]
    }
    if state["history"]:
        seconds = state["history"][-1]["seconds"]
        metrics["episodes_per_second"] = (
            (num_updates - (state["history"][0]["update"] - 1)) * args.batch_size / seconds
            if seconds
            else None
        )
    if accelerator.is_main_process:
        final = output_dir / "policy"
        policy.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        save_model(value_model, output_dir / "value.safetensors")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_plots(output_dir, state["history"], state["held_out"])
        write_card(final, settings, evaluation)
        writer.close()
        print(summary(evaluation, state["history"]))
    return metrics


def summary(evaluation: dict, history: list[dict]) -> str:
    """The printed end of a run: training's course, win rates (proxy, judge) overall and per family,
    replies side by side."""
    first, last = history[0], history[-1]
    lines = [
        f"ppo: {last['update']} updates, {last['episodes']} episodes; batch score {first['score']:.3f} -> {last['score']:.3f} "
        f"at KL {last['kl']:.2f} nats per reply to the reference"
    ]
    for name, part in (
        ("proxy reward model (optimised)", evaluation["proxy"]),
        ("judge reward model (never optimised)", evaluation.get("judge")),
    ):
        if part is None:
            continue
        lines.append(
            f"held-out, judged by the {name}: policy wins {part['win_rate']:.1%} of {part['prompts']} prompts "
            f"against the reference (score {part['policy_score']:.3f} vs {part['reference_score']:.3f})"
        )
        for family, share in part["by_family"].items():
            lines.append(
                f"  {family}: win rate {share['win_rate']:.1%} over {share['prompts']} prompts, "
                f"score {share['policy_score']:.3f} vs {share['reference_score']:.3f}"
            )
    if (
        "judge" in evaluation
        and evaluation["proxy"]["win_rate"] > 0.5 >= evaluation["judge"]["win_rate"]
    ):
        lines.append(
            "the proxy prefers the policy but the judge does not: the policy learned the proxy's mistakes (reward hacking)"
        )
    for sample in evaluation["samples"]:
        lines += [
            f"\nprompt:    {sample['prompt'][:200]!r}",
            f"reference: {sample['reference'][:200]!r} ({sample['reference_score']:.2f})",
            f"policy:    {sample['policy'][:200]!r} ({sample['policy_score']:.2f})",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, Args)
