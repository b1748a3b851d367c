"""PPO against a trained reward model on the prompts of a release (RLHF, Ziegler et al. 2019).

The policy (initialised from the SFT model, ``training/sft.py``) samples a reply to each
prompt. The reward of a reply is the reward model's score at its last token minus a per-token
KL penalty to the frozen reference (the SFT model again). A value model, initialised from the
reward model, gives GAE advantages; the clipped PPO losses (Schulman et al. 2017) update both.

The implementation details that make RLHF-PPO work are numbered in ``main`` and
``minibatch_step``, and each cites its source; "N+" is Huang et al. 2023, "The N+
Implementation Details of RLHF with PPO".

    python -m training.ppo --policy runs/sft --reward-model runs/reward-model --output-dir runs/ppo
    accelerate launch -m training.ppo --policy runs/sft --reward-model runs/reward-model
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from hhdata.errors import HhDataError
from training import models, run, scale, vllm_generation
from training.common import UsageError, choose_split, load_pairs, run_cli
from training.fast import reply_logprobs, sample
from training.ppo_eval import (
    evaluate,
    held_out_point,
    held_out_prompts,
    make_judge,
    save_plots,
    sqrt_kl_fit,
    summary,
    write_card,
)
from training.reward_model import RewardModel, load_reward_model
from training.rollout import (
    PolicyAndValue,
    PreparedPolicy,
    fit_query,
    make_scorer,
    query_limit,
    rollout,
    start_length,
)
from training.text import encode_prompt, end_of_turn_id, uses_chat_template


@dataclass(frozen=True)
class Args(scale.ScaleArgs, vllm_generation.GeneratorArgs):
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
    gradient_accumulation_steps: int = 1
    """micro-batches each minibatch is cut into, their gradients summed before the one optimizer
    step (the same step as the whole minibatch at once, for less memory)"""
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
    """The clipped value loss: 0.5 * max of the plain and clipped squared errors, and its clip
    fraction."""
    clipped_values = old_values + (new_values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1,
    +-0.2)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch of `n_steps` episodes whose mean KL was
        `current_kl`."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> torch.Tensor:
    """-kl_coef * KL at every reply token, plus the score at the reply's last real token.

    Shape [batch, response_length]; the last real token is the stop token where the reply
    stopped (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020).

    >>> kl, mask = torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    >>> per_token_rewards(torch.tensor([1.0]), kl, 0.5, mask).tolist()
    [[-0.25, 0.5, 0.0]]
    """
    rewards = torch.where(response_mask.bool(), -kl_coef * kl, 0.0)
    last = response_mask.sum(1).long() - 1  # shape: [batch]
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    return rewards


@dataclass
class Experience:
    """One batch of rollouts as PPO's update reads it: the sampled sequences and, per reply
    token, what the rollout phase computed (each of shape [batch, response_length] unless
    said)."""

    ids: torch.Tensor  # shape: [batch, query + response], right-padded
    mask: torch.Tensor  # shape: [batch, query + response]
    at: torch.Tensor  # column predicting each reply token
    responses: torch.Tensor
    response_mask: torch.Tensor  # float, 1 on the reply's real tokens
    logprobs: torch.Tensor  # the policy's at sampling time
    values: torch.Tensor  # the value model's at sampling time
    advantages: torch.Tensor
    returns: torch.Tensor


def minibatch_step(
    model, optimizer, accelerator, experience: Experience, minibatch, micro_batch_size, args
) -> dict:
    """One optimizer step of the clipped PPO losses on the rows `minibatch` of `experience`,
    cut into micro-batches of `micro_batch_size` rows whose gradients are summed.

    Returns this process's share of the minibatch's token means of the losses, clip fractions
    and approximate KL (their mean over the processes is the whole minibatch's token mean), and
    (as `ratio_error`, `first_approx_kl`) the probability-ratio error and approximate KL of its
    first micro-batch, before any step.
    """
    mask = experience.response_mask
    # 13. data parallelism: the minibatch's reply tokens counted over all processes, divided by
    # their number; each process's token sums over this, averaged across the processes, are
    # token means over the whole minibatch, as one process would take them (a mean of each
    # process's own token mean would give more weight to each token of a process holding
    # fewer). One scalar all-reduce per minibatch; with one process, its own count.
    minibatch_tokens = (
        accelerator.reduce(mask[minibatch].sum(), "sum").clamp(min=1) / accelerator.num_processes
    )
    sums = dict.fromkeys(("pg_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl"), 0.0)
    firsts = {}
    for start in range(0, len(minibatch), micro_batch_size):
        i = minibatch[start : start + micro_batch_size]
        # 12. gradient accumulation: each micro-batch's masked means weighted by its share of
        # the minibatch's tokens (13: per process), so the summed gradient is exactly the whole
        # minibatch's (not a mean of per-micro-batch means); processes reduce gradients once,
        # at the last micro-batch
        share = mask[i].sum() / minibatch_tokens
        last = start + micro_batch_size >= len(minibatch)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            new_logprobs, _, new_values = model(
                experience.ids[i],
                experience.mask[i],
                experience.at[i],
                experience.responses[i],
                args.temperature,
            )
            pg_loss, pg_clipfrac, approx_kl = policy_loss(
                new_logprobs,
                experience.logprobs[i],
                experience.advantages[i],
                mask[i],
                args.clip_coef,
            )
            if not firsts:
                ratio = (new_logprobs.detach() - experience.logprobs[i]).exp()
                firsts = {
                    "ratio_error": ((ratio - 1).abs() * mask[i]).max(),
                    "first_approx_kl": approx_kl,
                }
            # 10. value clipping around the rollout's values (N+ "value function loss clipping")
            vf_loss, vf_clipfrac = value_loss(
                new_values, experience.values[i], experience.returns[i], mask[i], args.vf_clip_coef
            )
            loss = pg_loss + args.vf_coef * vf_loss
            scale.backward(accelerator, loss * share, last)  # DeepSpeed: clips, steps at last
        parts = (pg_loss.detach(), vf_loss.detach(), pg_clipfrac, vf_clipfrac, approx_kl)
        for name, value in zip(sums, parts):
            sums[name] = sums[name] + value * share
    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return sums | firsts


# ---- the run -------------------------------------------------------------------------------


def main(args: Args, score_fn=None) -> dict:
    """Train the policy with PPO; returns the metrics written to metrics.json.

    `score_fn(responses, response_mask) -> scores [batch]` replaces the reward model with a
    rule on the reply tokens (a known-answer reward for tests); the value model then starts
    from the policy's own backbone.
    """
    vllm_generation.require(args.generator)
    mini_batch_size = exact_div(
        args.batch_size, args.num_mini_batches, "--batch-size / --num-mini-batches"
    )
    micro_batch_size = exact_div(
        mini_batch_size,
        args.gradient_accumulation_steps,
        "--batch-size / --num-mini-batches / --gradient-accumulation-steps",
    )
    # DeepSpeed's engine clips at --max-grad-norm and steps at the last micro-batch of each
    # minibatch (minibatch_step); the batch it is told of only labels its throughput reports
    accelerator = scale.make_accelerator(
        args.precision,
        allow_fsdp=True,
        deepspeed=scale.DeepSpeedStep(args.max_grad_norm, micro_batch_size),
    )
    if run.sharded(accelerator) and args.generator == "vllm":
        raise UsageError(
            "--generator vllm under FSDP or DeepSpeed: the engine needs the policy's whole "
            "weights, which these launches keep in shards; launch with "
            "training/configs/ddp.yaml or drop --generator"
        )
    device = accelerator.device
    output_dir = Path(args.output_dir)
    num_updates = exact_div(args.total_episodes, args.batch_size, "--total-episodes / --batch-size")
    if num_updates < 1:
        raise HhDataError(
            f"--total-episodes {args.total_episodes} is less than one batch of "
            f"{args.batch_size}; raise it"
        )
    torch.manual_seed(args.seed)
    resume_from = run.start_or_resume(output_dir, args, "settings.json", "--output-dir")
    if (
        args.judge is not None
        and score_fn is None
        and Path(args.judge).resolve() == Path(args.reward_model).resolve()
    ):
        raise HhDataError(
            f"--judge {args.judge} is the reward model PPO optimises; pass one trained apart "
            "(other --seed or data)"
        )

    # Prompts: train on --split (default `train`); hold out prompts that neither PPO nor the
    # reward models (proxy and judge) ever trained on, so the win rate is measured honestly.
    splits, provenance = load_pairs(args.data)
    train_split = choose_split(splits, args.split, provenance["source"])
    rated_by = ((args.reward_model,) if score_fn is None else ()) + (
        (args.judge,) * bool(args.judge)
    )
    train_rows, eval_rows, known, unknown = held_out_prompts(
        splits, train_split, provenance, rated_by, args.eval_prompts, args.seed
    )
    if not eval_rows:
        raise HhDataError(
            f"{provenance['source']}: every prompt was trained on by the reward model(s); "
            "hold some out when training them (--eval-fraction) or pass other --data"
        )
    if accelerator.is_main_process:
        print(
            f"ppo: training on split {train_split!r} ({len(train_rows)} rows); {len(eval_rows)} "
            "held-out prompts, "
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
    if score_fn is None:
        reward_model, reward_tokenizer, reward_settings = load_reward_model(args.reward_model)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise HhDataError(
                f"{args.policy} and {args.reward_model} tokenize differently; train the SFT policy "
                f"with --tokenizer {args.reward_model} (or on the same --model) so they "
                "share token ids"
            )
        chat, reward_max_length = (
            reward_settings["chat_template"],
            reward_settings.get("max_length"),
        )
        # 1. the value model starts as a copy of the reward model (Ouyang et al. 2022, appendix
        # C.3; N+ detail)
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
        # no reward model to start from: values start at 0
        torch.nn.init.zeros_(value_model.score.weight)
    # 2. dropout off in every model, so the log-probabilities of rollout and update agree (Ziegler
    # et al. 2019; N+)
    for each in (policy, value_model, reward_model):
        if each is not None:
            run.disable_dropout(each)
            each.eval()
    if args.gradient_checkpointing:
        scale.enable_gradient_checkpointing(policy)
        scale.enable_gradient_checkpointing(value_model.backbone)
    policy_lora = scale.maybe_add_lora(policy, args)
    value_lora = scale.maybe_add_lora(value_model.backbone, args)  # its head trains in full
    if policy_lora is None:
        # the frozen reference: a second copy of the SFT weights, whole on every process (under
        # FSDP too: only the trained models are sharded)
        reference = models.load_causal_lm(args.policy, tokenizer).requires_grad_(False)
        run.disable_dropout(reference)
        reference.eval().to(device)
    if reward_model is not None:
        reward_model.to(device)
    score = make_scorer(reward_model, score_fn)
    judge = make_judge(args.judge, args.batch_size) if args.judge else None
    # the end-of-turn token: sampling stops at it and the reward is read there, where the reward
    # model read it in training (the last token of prompt + reply)
    pad_id, stop_id = tokenizer.pad_token_id, end_of_turn_id(tokenizer, chat)
    # queries keep their start token and their latest turns, and leave room for a full reply
    # within the reward model's max length, as in its training (text.encode_pair)
    start = start_length(tokenizer, chat)
    limit = query_limit(args, reward_max_length, start)
    train_queries, eval_queries = (
        [fit_query(encode_prompt(tokenizer, row["prompt"], chat)[0], limit, start) for row in rows]
        for rows in (train_rows, eval_rows)
    )

    # 3. Adam with eps 1e-5 over policy and value (CleanRL ppo.py; N+ "Adam epsilon")
    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.Adam(
        scale.trainable_parameters(model), lr=args.learning_rate, eps=args.adam_eps
    )
    generator = torch.Generator(device).manual_seed(
        args.seed * 1_000_003 + accelerator.process_index
    )
    kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    state = {"update": 0, "history": [], "held_out": [], "reward_mean": 0.0, "reward_std": 1.0}
    loras = (policy_lora, value_lora)
    skeleton = run.skeleton(accelerator, model, loras)  # FSDP: where the final save gathers
    model, optimizer = accelerator.prepare(model, optimizer)
    modules = {"policy": policy, "value": value_model}  # what a checkpoint holds
    if resume_from is not None:
        state = run.load_checkpoint(resume_from, modules, optimizer, accelerator, generator)
        kl_controller.value = state["kl_coef"]
    if run.sharded(accelerator):
        # FSDP, DeepSpeed: sampling and the reference's scoring call the policy through the
        # prepared module (its forward gathers the sharded weights, FSDP's or ZeRO-3's; every
        # process runs as many passes)
        policy = PreparedPolicy(model, accelerator)
    if policy_lora is not None:
        # the frozen reference is the SFT policy, which is the policy with its adapters off: one
        # copy of the weights serves both (as TRL does with peft)
        reference = (
            PreparedPolicy(model, accelerator, policy_lora)
            if run.sharded(accelerator)
            else scale.AdapterDisabled(policy, policy_lora)
        )
    # the training rollouts' sampler: transformers' (fast.sample) or a vLLM engine holding the
    # policy's current weights, pushed again after every update (held-out scoring stays on
    # transformers: it samples the reference too, on the same random numbers)
    engine = None
    if args.generator == "vllm":
        engine = vllm_generation.engine(args.policy, args, limit + args.response_length, args.seed)
        engine.sync_weights(policy)  # a resumed policy, or an engine another run built
    settings = run.settings_record(
        args,
        data=provenance,
        updates=num_updates,
        chat_template=chat,
        split=train_split,
        train_prompts=len(train_rows),
        held_out_prompts=len(eval_rows),
        held_out_excludes_training_prompts_of=known,
        stop_token=tokenizer.convert_ids_to_tokens(stop_id),
        query_limit=limit,
        reward="rule (score_fn)" if score_fn is not None else args.reward_model,
        processes=accelerator.num_processes,
    )
    settings |= run.input_runs(  # the inputs' own settings and data versions
        policy=Path(args.policy) / "args.json",
        reward_model=Path(args.reward_model) / "settings.json",
        judge=args.judge and Path(args.judge) / "settings.json",
    )
    if accelerator.is_main_process and resume_from is None:
        run.write_json(output_dir / "settings.json", settings)
    writer = run.tensorboard(output_dir, state["update"] + 1, accelerator)

    # 4. reward normalisation: shift and scale scores to mean 0, std 1 on the reference's own
    # replies, once before training (Ziegler et al. 2019, section 2.2; N+ "reward normalization")
    if args.normalize_reward and not args.resume:
        picks = torch.randperm(
            len(train_queries), generator=torch.Generator().manual_seed(args.seed)
        )[: args.reward_norm_samples]
        with accelerator.autocast():  # generation at the run's precision
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
            f"{provenance['source']}: {len(train_queries)} training prompts, fewer than one "
            f"batch of {args.batch_size} x {accelerator.num_processes} processes; lower "
            "--batch-size or --eval-prompts"
        )

    def held_out(update: int) -> dict:
        """The policy's held-out score and KL to the reference now (ppo_eval.held_out_point)."""
        with accelerator.autocast():
            return held_out_point(
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

        with torch.no_grad(), accelerator.autocast():
            # 5. left padding for generation, right padding for scoring (N+ "padding"): all replies
            # start in the same column while sampling; scoring sees plain positions 0..n
            batch = rollout(
                policy,
                [train_queries[i] for i in mine],
                args,
                pad_id,
                stop_id,
                generator,
                device,
                sampler=sample if engine is None else engine.sample,
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
            # 7. truncation at the stop token (above, in rollout) and a penalty for replies that
            # never stop (Ziegler et al. 2019 "penalty_reward_value"; TRL's missing_eos_penalty)
            scores = scores - args.missing_stop_penalty * (~batch.has_stop).float()
            # 8. per-token KL penalty to the reference, score added at the reply's last token
            # (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020)
            kl = (logprobs - ref_logprobs) * mask  # shape: [batch, response_length]
            rewards = per_token_rewards(scores, kl, kl_controller.value, mask)
            # N+ "reward whitening" (off by default, as in lm-human-preferences' sentiment task)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, args.gamma, args.gae_lambda)
            # 9. advantages whitened over the batch's real tokens (N+ "advantage whitening")
            advantages = masked_whiten(advantages, mask) * mask

        experience = Experience(
            batch.ids,
            batch.mask,
            batch.at,
            batch.responses,
            mask,
            logprobs,
            values,
            advantages,
            returns,
        )
        stats = {
            name: []
            for name in ("pg_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl")
        }
        # checks of the plumbing, not of learning: scoring reproduces the sampling distribution
        # (temperature, positions, padding), and before the first step the ratio is exactly 1
        sampling_error = ((logprobs - batch.sample_logprobs).abs() * mask).max()
        first_ratio_error = None
        # gradient checkpointing acts in training mode only (dropout is off either way)
        with scale.training_mode(model, args.gradient_checkpointing):
            for _ in range(args.num_ppo_epochs):
                permutation = torch.randperm(args.batch_size, generator=generator, device=device)
                for first in range(0, args.batch_size, mini_batch_size):
                    minibatch = permutation[first : first + mini_batch_size]
                    step = minibatch_step(
                        model, optimizer, accelerator, experience, minibatch, micro_batch_size, args
                    )
                    if first_ratio_error is None:
                        first_ratio_error = step["ratio_error"]
                        first_approx_kl = step["first_approx_kl"]
                    for name in stats:
                        stats[name].append(step[name])

        if engine is not None and update + 1 < num_updates:  # the next rollout: updated policy
            engine.sync_weights(policy)
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
        # wall clock since this process's first update, and its CPU time (steadier on a
        # shared machine), both without the held-out scoring
        record["seconds"] = time.perf_counter() - started - paused
        record["cpu_seconds"] = time.process_time() - started_cpu - paused_cpu
        state["history"].append(record)
        if accelerator.is_main_process:
            print(
                f"ppo update {record['update']}/{num_updates} score {record['score']:.3f} kl "
                f"{record['kl']:.3f} "
                f"entropy {record['entropy']:.2f} length {record['reply_length']:.1f} clipfrac "
                f"{record['pg_clipfrac']:.3f} "
                f"value_loss {record['value_loss']:.3f} kl_coef {record['kl_coef']:.4f}"
            )
        run.add_scalars(writer, "ppo", record, update + 1)
        state.update(update=update + 1, kl_coef=kl_controller.value)
        if (update + 1) % args.save_every == 0 or update + 1 in (num_updates, args.stop_after):
            clock, cpu_clock = time.perf_counter(), time.process_time()
            state["held_out"].append(held_out(update + 1))
            paused, paused_cpu = (
                paused + time.perf_counter() - clock,
                paused_cpu + time.process_time() - cpu_clock,
            )
            run.save_checkpoint(
                output_dir, update + 1, modules, optimizer, accelerator, state, generator
            )
        if update + 1 == args.stop_after:
            return {
                "stopped_after": update + 1,
                "history": state["history"],
                "held_out": state["held_out"],
            }

    # The held-out judgement: final policy against the reference, same prompts, same judge.
    with accelerator.autocast():
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
    trained, loras = run.whole_model(accelerator, model, loras, skeleton)
    if accelerator.is_main_process:
        final = output_dir / "policy"
        for lora in loras:
            scale.merge_lora(lora)  # plain transformers models are saved
        trained.policy.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        save_model(trained.value_model, output_dir / "value.safetensors")
        run.write_json(output_dir / "metrics.json", metrics)
        save_plots(output_dir, state["history"], state["held_out"])
        write_card(final, settings, evaluation)
        writer.close()
        print(summary(evaluation, state["history"]))
    return metrics


if __name__ == "__main__":
    run_cli(main, Args)
