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
from training.common import load_pairs, optimizer_tensors, restore_optimizer, run_cli
from training.reward_model import RewardModel, load_reward_model, uses_chat_template
from training.sft import encode_prompt, held_out_split


@dataclass(frozen=True)
class Args:
    """PPO against a trained reward model, on the prompts of a release."""

    policy: str = "runs/sft"
    """the SFT run directory: the policy's starting weights and the frozen reference"""
    reward_model: str = "runs/reward-model"
    """the reward-model run directory (training/reward_model.py); the value model starts from it"""
    data: str | None = None
    """a release directory, a .parquet of pair rows or a Hub repo id; default: the bundled sample"""
    split: str = "test"
    """which split's prompts to train on (the bundled sample has only `test`)"""
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
    """held-out prompts on which the final policy meets the reference (win rate)"""
    num_samples_shown: int = 4
    """held-out replies printed side by side with the reference's"""
    save_every: int = 1
    """save a resumable checkpoint every N updates (and at the end)"""
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


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
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


# ---- rollouts ---------------------------------------------------------------------------


def left_pad(queries: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, shape [batch, longest]."""
    width = max(map(len, queries))
    ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in queries])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries])
    return ids, mask


@torch.no_grad()
def sample(model, ids, mask, response_length: int, temperature: float, stop_id: int, generator):
    """Sample replies to left-padded queries with a key-value cache, shape [batch, response_length].

    Stops early once every reply has emitted `stop_id`; the rest is filled with `stop_id`,
    which truncation masks out anyway.
    """
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: the first real token is position 0
    # logits_to_keep=1: only the last prompt position samples, so only it needs the output layer
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens = torch.full((ids.shape[0], response_length), stop_id, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    position = positions[:, -1:]
    for t in range(response_length):
        probs = F.softmax(output.logits[:, -1].float() / temperature, dim=-1)  # shape: [batch, vocab]
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens[:, t] = torch.where(done, stop_id, token)
        done |= token == stop_id
        if done.all() or t + 1 == response_length:
            break
        mask, position = F.pad(mask, (0, 1), value=1), position + 1
        cache_name = "cache" if "cache" in output else "past_key_values"  # renamed in transformers 5.x
        output = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True, **{cache_name: output[cache_name]})
    return tokens


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
    hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # shape: [batch, response_length, hidden]
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
    return value_model(input_ids=ids, attention_mask=scoring_mask(value_model, mask), position_ids=positions, read_at=at)


def reward_model_scores(reward_model, ids, mask, last) -> torch.Tensor:
    """The reward model's score read at each reply's last token, shape [batch]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    mask = scoring_mask(reward_model, mask)
    return reward_model(input_ids=ids, attention_mask=mask, position_ids=positions, read_at=last[:, None])[:, 0]


def disable_dropout(model) -> None:
    """Zero every dropout probability, in modules and in the config that functional dropout reads."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
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
    last: torch.Tensor  # shape: [batch], column of each reply's last token


@torch.no_grad()
def rollout(model, queries: list[list[int]], args: Args, pad_id: int, stop_id: int, generator, device) -> Rollout:
    """Sample replies with left padding, truncate at the stop token, re-pad to the right for scoring."""
    ids, mask = (tensor.to(device) for tensor in left_pad(queries, pad_id))
    responses = sample(model, ids, mask, args.response_length, args.temperature, stop_id, generator)
    response_mask, has_stop = truncate_at_stop(responses, stop_id)
    sequence, sequence_mask, query_lengths = right_pad(ids, mask, responses, response_mask)
    at = reply_positions(query_lengths, args.response_length, sequence.shape[1])
    last = query_lengths + response_mask.sum(1) - 1
    return Rollout(sequence, sequence_mask, responses, response_mask, has_stop, at, last)


def make_scorer(reward_model, score_fn):
    """score(rollout) -> raw scores [batch]: the reward model's, or a rule's on the reply tokens."""
    if score_fn is not None:
        return lambda r: score_fn(r.responses, r.response_mask).float()
    return lambda r: reward_model_scores(reward_model, r.ids, r.mask, r.last).float()


@torch.no_grad()
def evaluate(policy, reference, score, rows, queries, args, pad_id, stop_id, tokenizer, device) -> dict:
    """Held-out replies of the policy and of the reference on the same prompts, judged by `score`.

    The win rate counts a tie as half; it is reported overall and per family.
    """
    generator = torch.Generator(device).manual_seed(args.seed + 7919)
    scores = {"policy": [], "reference": []}
    texts = {"policy": [], "reference": []}
    for start in range(0, len(queries), args.batch_size):
        chunk = queries[start : start + args.batch_size]
        for name, model in (("policy", policy), ("reference", reference)):
            batch = rollout(model, chunk, args, pad_id, stop_id, generator, device)
            scores[name].append(score(batch).cpu())
            texts[name] += [
                tokenizer.decode(reply[keep], skip_special_tokens=True)
                for reply, keep in zip(batch.responses.cpu(), batch.response_mask.cpu())
            ]
    mine, theirs = torch.cat(scores["policy"]), torch.cat(scores["reference"])
    wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
    result = {"prompts": len(rows), "win_rate": wins.mean().item(), "policy_score": mine.mean().item(), "reference_score": theirs.mean().item(), "by_family": {}}
    for family in sorted({row["family"] for row in rows}):
        inside = torch.tensor([row["family"] == family for row in rows])
        result["by_family"][family] = {"prompts": int(inside.sum()), "win_rate": wins[inside].mean().item(), "policy_score": mine[inside].mean().item(), "reference_score": theirs[inside].mean().item()}
    result["samples"] = [
        {"prompt": row["prompt"][-1]["content"], "reference": texts["reference"][i], "reference_score": theirs[i].item(), "policy": texts["policy"][i], "policy_score": mine[i].item()}
        for i, row in enumerate(rows[: args.num_samples_shown])
    ]
    return result


# ---- checkpoints: safetensors for tensors, JSON for the rest -----------------------------


def save_checkpoint(folder: Path, policy, value_model, optimizer, generator, state: dict) -> None:
    """Weights, optimizer moments and the sampling RNG (safetensors) and the run's scalars (JSON)."""
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_model(policy, partial / "policy.safetensors")  # save_model handles tied weights
    save_model(value_model, partial / "value.safetensors")
    tensors, param_groups = optimizer_tensors(optimizer)
    tensors["generator_state"] = generator.get_state()
    save_file(tensors, partial / "optimizer.safetensors")
    (partial / "state.json").write_text(json.dumps({**state, "param_groups": param_groups}))
    if folder.exists():  # replace the previous checkpoint only once the new one is complete
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    partial.rename(folder)


def load_checkpoint(folder: Path, policy, value_model, optimizer, generator) -> dict:
    """Restore what save_checkpoint wrote; returns the run's scalars."""
    load_model(policy, folder / "policy.safetensors")
    load_model(value_model, folder / "value.safetensors")
    tensors = load_file(folder / "optimizer.safetensors")
    generator.set_state(tensors.pop("generator_state"))
    state = json.loads((folder / "state.json").read_text())
    restore_optimizer(optimizer, tensors, state.pop("param_groups"))
    return state


# ---- reports: plots, model card ------------------------------------------------------------

CURVES = ("score", "kl", "sqrt_kl", "entropy", "reply_length", "pg_clipfrac", "vf_clipfrac", "value_loss")


def save_plots(output_dir: Path, history: list[dict]) -> None:
    """training.png (a curve per metric) and reward_vs_sqrt_kl.png with its linear fit."""
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
    x = np.array([record["sqrt_kl"] for record in history])
    y = np.array([record["score"] for record in history])
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.scatter(x, y, c=updates, cmap="viridis", label="updates")
    fit = sqrt_kl_fit(history)
    if fit is not None:
        slope, intercept = fit["slope"], fit["intercept"]
        axis.plot(x, slope * x + intercept, "r--", label=f"fit: {slope:.3f} sqrt(KL) + {intercept:.3f}")
    axis.set(xlabel="sqrt(KL to the reference) (sqrt nats)", ylabel="reward-model score", title="reward vs sqrt(KL)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "reward_vs_sqrt_kl.png", dpi=90)
    plt.close(figure)


def sqrt_kl_fit(history: list[dict]) -> dict | None:
    """Least-squares line score = slope * sqrt(KL) + intercept over the updates (Bai et al. 2022, fig. 4)."""
    import numpy as np

    x = np.array([record["sqrt_kl"] for record in history])
    y = np.array([record["score"] for record in history])
    if len(history) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def write_card(folder: Path, settings: dict, evaluation: dict) -> None:
    """README.md of the final policy from hhdata/cards/policy_card.md."""
    template = (Path(__file__).resolve().parent.parent / "hhdata/cards/policy_card.md").read_text()
    rows = ["| prompts | n | win rate vs reference | policy score | reference score |", "|---|---|---|---|---|"]
    for name, part in [("all", evaluation)] + list(evaluation["by_family"].items()):
        rows.append(f"| {name} | {part['prompts']} | {part['win_rate']:.3f} | {part['policy_score']:.3f} | {part['reference_score']:.3f} |")
    samples = "\n\n".join(
        f"**Prompt:** {s['prompt']!r}\n\n- reference ({s['reference_score']:.2f}): {s['reference']!r}\n- policy ({s['policy_score']:.2f}): {s['policy']!r}"
        for s in evaluation["samples"]
    )
    args = settings["args"]
    (folder / "README.md").write_text(
        template.format(
            policy=args["policy"], reward_model=args["reward_model"], data=json.dumps(settings["data"]),
            episodes=args["total_episodes"], updates=settings["updates"], eval_table="\n".join(rows),
            samples=samples, settings=json.dumps(args, indent=2),
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
    mini_batch_size = exact_div(args.batch_size, args.num_mini_batches, "--batch-size / --num-mini-batches")
    if num_updates < 1:
        raise HhDataError(f"--total-episodes {args.total_episodes} is less than one batch of {args.batch_size}; raise it")
    torch.manual_seed(args.seed)
    comparable = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "stop_after")}
    checkpoint = output_dir / "checkpoint"
    if args.resume:
        if not checkpoint.is_dir():
            raise HhDataError(f"{output_dir}: no checkpoint to resume from; run without --resume")
        saved = json.loads((output_dir / "settings.json").read_text())["args"]
        changed = sorted(k for k in comparable if saved.get(k) != comparable[k])
        if changed:
            raise HhDataError(f"{output_dir}: cannot resume with changed settings {changed}; use those in settings.json")
    elif checkpoint.exists():
        raise HhDataError(f"{output_dir} already holds a run; pass --resume to continue it or pick another --output-dir")

    # Prompts: the release's rows, a seeded held-out share for the final evaluation.
    splits, provenance = load_pairs(args.data)
    if args.split not in splits:
        raise HhDataError(f"{provenance['source']}: no split {args.split!r} (it has {sorted(splits)}); pass --split")
    train_rows, eval_rows = held_out_split(splits[args.split], args.eval_prompts, args.seed)

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
        chat = reward_settings["chat_template"]
        # 1. the value model starts as a copy of the reward model (Ouyang et al. 2022, appendix C.3; N+ detail)
        value_model = copy.deepcopy(reward_model)
        reward_model.requires_grad_(False)
    else:
        reward_model = None
        sft_settings = Path(args.policy) / "args.json"
        chat = json.loads(sft_settings.read_text()).get("chat_template", False) if sft_settings.is_file() else uses_chat_template(tokenizer, True)
        value_model = RewardModel(copy.deepcopy(policy.get_decoder()))
        torch.nn.init.zeros_(value_model.score.weight)  # no reward model to start from: values start at 0
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
    pad_id, stop_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    encode = lambda row: encode_prompt(tokenizer, row["prompt"], chat)[0][-args.query_length :]  # noqa: E731
    train_queries = [encode(row) for row in train_rows]
    eval_queries = [encode(row) for row in eval_rows]

    # 3. Adam with eps 1e-5 over policy and value (CleanRL ppo.py; N+ "Adam epsilon")
    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + accelerator.process_index)
    kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    state = {"update": 0, "history": [], "reward_mean": 0.0, "reward_std": 1.0}
    if args.resume:
        state = load_checkpoint(checkpoint, policy, value_model, optimizer, generator)
        kl_controller.value = state["kl_coef"]
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = {
        "args": comparable, "data": provenance, "updates": num_updates, "chat_template": chat,
        "reward": "rule (score_fn)" if score_fn is not None else args.reward_model,
        "processes": accelerator.num_processes,
        "versions": {"hhdata": hhdata.__version__, "torch": torch.__version__, "transformers": sys.modules["transformers"].__version__},
    }
    for name in ("policy", "reward_model"):
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
        picks = torch.randperm(len(train_queries), generator=torch.Generator().manual_seed(args.seed))[: args.reward_norm_samples]
        raw = torch.cat([
            score(rollout(reference, [train_queries[i] for i in picks[s : s + args.batch_size]], args, pad_id, stop_id, generator, device))
            for s in range(0, len(picks), args.batch_size)
        ])
        raw = accelerator.gather(raw)
        state["reward_mean"], state["reward_std"] = raw.mean().item(), max(raw.std().item(), 1e-6)

    batches_per_epoch = len(train_queries) // (args.batch_size * accelerator.num_processes)
    if batches_per_epoch == 0:
        raise HhDataError(f"{provenance['source']}: {len(train_queries)} training prompts, fewer than one batch of "
                          f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch-size or --eval-prompts")
    started, started_cpu = time.perf_counter(), time.process_time()
    for update in range(state["update"], num_updates):
        epoch, index = divmod(update, batches_per_epoch)
        order = torch.randperm(len(train_queries), generator=torch.Generator().manual_seed(args.seed * 7 + epoch))
        width = args.batch_size * accelerator.num_processes
        mine = order[index * width : (index + 1) * width][accelerator.process_index :: accelerator.num_processes]
        lr = args.learning_rate * (1 - update / num_updates if args.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        with torch.no_grad():
            # 5. left padding for generation, right padding for scoring (N+ "padding"): all replies
            # start in the same column while sampling; scoring sees plain positions 0..n
            batch = rollout(policy, [train_queries[i] for i in mine], args, pad_id, stop_id, generator, device)
            mask = batch.response_mask.float()  # shape: [batch, response_length]
            # 6. logits divided by the sampling temperature when scoring, so the log-probabilities
            # are those of the distribution that sampled (N+ "temperature")
            logprobs, entropy, values = model(batch.ids, batch.mask, batch.at, batch.responses, args.temperature)
            ref_logprobs, _ = reply_logprobs(reference, batch.ids, batch.at, batch.responses, args.temperature)
            values = values * mask
            raw_scores = score(batch)
            scores = (raw_scores - state["reward_mean"]) / state["reward_std"]
            # 7. truncation at the stop token (above, in rollout) and a penalty for replies that never
            # stop (Ziegler et al. 2019 "penalty_reward_value"; TRL's missing_eos_penalty)
            scores = scores - args.missing_stop_penalty * (~batch.has_stop).float()
            # 8. per-token KL penalty to the reference, score added at the reply's last token
            # (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020)
            kl = (logprobs - ref_logprobs) * mask  # shape: [batch, response_length]
            rewards = -kl_controller.value * kl
            last = batch.response_mask.sum(1) - 1
            rewards[torch.arange(len(last), device=device), last] += scores
            if args.whiten_rewards:  # N+ "reward whitening" (off by default, as in lm-human-preferences' sentiment task)
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, args.gamma, args.gae_lambda)
            # 9. advantages whitened over the batch's real tokens (N+ "advantage whitening")
            advantages = masked_whiten(advantages, mask) * mask

        stats = {name: [] for name in ("pg_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl")}
        for _ in range(args.num_ppo_epochs):
            permutation = torch.randperm(args.batch_size, generator=generator, device=device)
            for first in range(0, args.batch_size, mini_batch_size):
                i = permutation[first : first + mini_batch_size]
                new_logprobs, _, new_values = model(batch.ids[i], batch.mask[i], batch.at[i], batch.responses[i], args.temperature)
                pg_loss, pg_clipfrac, approx_kl = policy_loss(new_logprobs, logprobs[i], advantages[i], mask[i], args.clip_coef)
                # 10. value clipping around the rollout's values (N+ "value function loss clipping")
                vf_loss, vf_clipfrac = value_loss(new_values, values[i], returns[i], mask[i], args.vf_clip_coef)
                loss = pg_loss + args.vf_coef * vf_loss
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                for name, value in zip(stats, (pg_loss.detach(), vf_loss.detach(), pg_clipfrac, vf_clipfrac, approx_kl)):
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
            **{name: accelerator.reduce(torch.stack(values).mean(), "mean").item() for name, values in stats.items()},
            "kl_coef": kl_controller.value,
            "lr": lr,
        }
        # 11. adaptive KL controller, updated with this batch's KL per reply (Ziegler et al. 2019)
        if args.adaptive_kl:
            kl_controller.update(sequence_kl, args.batch_size * accelerator.num_processes)
        record["seconds"] = time.perf_counter() - started  # wall clock since this process's first update
        record["cpu_seconds"] = time.process_time() - started_cpu  # this process's CPU time, steadier on a shared machine
        state["history"].append(record)
        if accelerator.is_main_process:
            print(f"ppo update {record['update']}/{num_updates} score {record['score']:.3f} kl {record['kl']:.3f} "
                  f"entropy {record['entropy']:.2f} length {record['reply_length']:.1f} clipfrac {record['pg_clipfrac']:.3f} "
                  f"value_loss {record['value_loss']:.3f} kl_coef {record['kl_coef']:.4f}")
            for name, value in record.items():
                writer.add_scalar(f"ppo/{name}", value, update + 1)
        state.update(update=update + 1, kl_coef=kl_controller.value)
        if (update + 1) % args.save_every == 0 or update + 1 in (num_updates, args.stop_after):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, policy, value_model, optimizer, generator, state)
        if update + 1 == args.stop_after:
            return {"stopped_after": update + 1, "history": state["history"]}

    # The held-out judgement: final policy against the reference, same prompts, same judge.
    evaluation = evaluate(policy, reference, score, eval_rows, eval_queries, args, pad_id, stop_id, tokenizer, device)
    metrics = {"history": state["history"], "evaluation": evaluation, "reward_mean": state["reward_mean"], "reward_std": state["reward_std"]}
    metrics["reward_vs_sqrt_kl"] = sqrt_kl_fit(state["history"])
    if state["history"]:
        seconds = state["history"][-1]["seconds"]
        metrics["episodes_per_second"] = (num_updates - (state["history"][0]["update"] - 1)) * args.batch_size / seconds if seconds else None
    if accelerator.is_main_process:
        final = output_dir / "policy"
        policy.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        save_model(value_model, output_dir / "value.safetensors")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_plots(output_dir, state["history"])
        write_card(final, settings, evaluation)
        writer.close()
        print(summary(evaluation, state["history"]))
    return metrics


def summary(evaluation: dict, history: list[dict]) -> str:
    """The printed end of a run: training's course, win rate overall and per family, replies side by side."""
    first, last = history[0], history[-1]
    lines = [f"ppo: {last['update']} updates, {last['episodes']} episodes; batch score {first['score']:.3f} -> {last['score']:.3f} "
             f"at KL {last['kl']:.2f} nats per reply to the reference",
             f"held-out: policy wins {evaluation['win_rate']:.1%} of {evaluation['prompts']} prompts against the reference "
             f"(score {evaluation['policy_score']:.3f} vs {evaluation['reference_score']:.3f})"]
    for family, part in evaluation["by_family"].items():
        lines.append(f"  {family}: win rate {part['win_rate']:.1%} over {part['prompts']} prompts, score {part['policy_score']:.3f} vs {part['reference_score']:.3f}")
    for sample in evaluation["samples"]:
        lines += [f"\nprompt:    {sample['prompt'][:200]!r}", f"reference: {sample['reference'][:200]!r} ({sample['reference_score']:.2f})",
                  f"policy:    {sample['policy'][:200]!r} ({sample['policy_score']:.2f})"]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, Args)
