"""The trainers' speed paths, each beside the plain reference path it must agree with.

Each pair is checked by a test to a tolerance of 1e-5 (the batches and the loss in
tests/test_reward_model.py, the sampler and the logits in tests/test_fast.py), as
hhdata.pairs.transcript keeps its fast parser beside the plain one:

- packed batches, ``packed_batch`` (prompt | chosen | rejected in one sequence, the prompt
  computed once), against ``naive_batch`` (two sequences per pair); ``pair_rewards`` picks
  one, where ``prefix_sharing_problem`` says packing is exact;
- micro-batched loss, ``accumulate_pair_loss`` (length-sorted micro-batches, ``length_groups``),
  against one padded batch (``cost=-1``): the same loss, rewards and gradient;
- the key-value-cache sampler ``sample`` against ``sample_reference``, which runs the
  whole sequence again at every step: the same tokens from the same generator;
- reply-only logits ``reply_logprobs`` (the output layer only at the reply's positions)
  against ``reply_logprobs_reference`` (logits of every position, then the reply's picked).
- DPO's reply log-probabilities ``pair_logprobs`` (prompt | chosen | rejected packed as for
  the reward model, the output layer only at reply positions, micro-batched by
  ``accumulate_reply_loss``) against ``pair_logprobs_reference`` (each prompt + reply alone,
  every position's logits), in tests/test_dpo.py.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F

from hhdata.errors import HhDataError
from training import models

# ---- reward model: packed (prefix-shared) batches and the naive reference -----------------


def packed_batch(
    pairs: list[tuple[list[int], ...]], pad_id: int, boolean_mask: bool = False
) -> dict:
    """One sequence per pair, prompt|chosen|rejected, with a 4D mask and restarting positions.

    Token i may attend to token j when j <= i in the packed order and j is in the prompt or in
    i's own reply. Padding attends only to itself, so no softmax row is empty. The mask is
    additive (0 or the float minimum) unless `boolean_mask`, which SDPA takes as is (True =
    attend), faster on CPU than the additive mask (bench/reward_model.md).
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
        return (
            "is a bidirectional encoder: its prompt tokens attend to the reply, so sharing the "
            "prompt is not exact"
        )
    attention = config._attn_implementation
    if attention not in PREFIX_SHARING_ATTENTION:
        return (
            f"runs {attention!r} attention, which does not take the 4-D mask prefix sharing needs "
            f"(only {' and '.join(PREFIX_SHARING_ATTENTION)} do)"
        )
    if uses_alibi(config) or "position_ids" not in inspect.signature(backbone.forward).parameters:
        return (
            f"({config.model_type}) places tokens by ALiBi distances, not position ids, so the "
            "rejected reply cannot restart its positions after the prompt"
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
    loss_fn,
    model,
    pairs,
    pad_id: int,
    share_prefix: bool,
    device,
    cost: int,
    backward=None,
    no_sync=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of ``pairs`` with its gradient accumulated micro-batch by micro-batch
    (see length_groups): the same gradient as one padded batch (``cost=-1``), for less work.

    ``loss_fn(r_chosen, r_rejected, batch_pairs)`` is the batch's loss restricted to one
    micro-batch (reward_model.preference_loss: a sum over its pairs divided by the batch's
    pair count), so the micro-batches' losses add up to the batch's.
    ``backward(loss, last)`` runs each micro-batch's backward pass, `last` true for the final
    one (scale.backward, where DeepSpeed's engine steps at the last; default
    ``loss.backward()``); ``no_sync()`` wraps all but the last, so data-parallel processes
    reduce gradients once.
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
            part = loss_fn(chosen, rejected, len(pairs))
            if backward is None:
                part.backward()
            else:
                backward(part, last)
        chosen_parts.append(chosen.detach())
        rejected_parts.append(rejected.detach())
        loss = loss + part.detach()
    where = (
        torch.tensor([i for group in groups for i in group]).argsort().to(chosen_parts[0].device)
    )
    return torch.cat(chosen_parts)[where], torch.cat(rejected_parts)[where], loss


# ---- PPO: the key-value-cache sampler and reply-only logits, with their references --------


@torch.no_grad()
def sample(
    model,
    ids,
    mask,
    response_length: int,
    temperature: float,
    stop_id: int,
    generator,
    copies: int = 1,
):
    """Sample replies to left-padded queries with a key-value cache: the tokens and their
    log-probabilities under the sampling distribution, each of shape [batch * copies,
    response_length].

    Stops early once every reply has emitted `stop_id`; the rest is filled with `stop_id`,
    which truncation masks out anyway. The log-probabilities are not trained on: they check
    that scoring (`reply_logprobs`) reproduces the distribution that sampled.

    `copies` > 1 samples that many replies per query (best-of-N) from one forward pass over
    the queries: their key-value cache is repeated, not recomputed. Row i * copies + k is
    query i's k-th reply; the same as sampling `ids.repeat_interleave(copies, 0)` (a test
    checks it).

    A model whose every forward pass is a collective of all processes (a policy sharded by
    FSDP, rollout.PreparedPolicy) has ``all_finished(finished) -> bool``: the early stop then
    waits until every process's replies are done, a process whose own are done running on
    (drawing nothing, so its tokens and generator are what they would be alone) until then.
    """
    all_finished = getattr(model, "all_finished", bool)
    # left padding: the first real token is position 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    # logits_to_keep=1: only the last prompt position samples, so only it needs the output layer
    output = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache_name = "cache" if "cache" in output else "past_key_values"  # renamed in 5.x
    if copies > 1:  # shape: [batch * copies, ...]: the prompt's work shared by its replies
        output[cache_name].batch_repeat_interleave(copies)
        output.logits = output.logits.repeat_interleave(copies, 0)
        ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        positions = positions.repeat_interleave(copies, 0)
    tokens = torch.full((ids.shape[0], response_length), stop_id, device=ids.device)
    logprobs = torch.zeros(tokens.shape, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    position = positions[:, -1:]
    token = tokens[:, 0]  # what a process already done feeds while the others finish
    for t in range(response_length):
        if not done.all():
            logits = output.logits[:, -1].float() / temperature  # shape: [batch, vocab]
            token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            token = token.squeeze(1)
            step_logprobs = F.log_softmax(logits, dim=-1)
            tokens[:, t] = torch.where(done, stop_id, token)
            logprobs[:, t] = step_logprobs.gather(1, tokens[:, t : t + 1]).squeeze(1)
            done |= token == stop_id
        if all_finished(bool(done.all())) or t + 1 == response_length:
            break
        mask, position = F.pad(mask, (0, 1), value=1), position + 1
        output = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_name: output[cache_name]},
        )
    return tokens, logprobs


def reply_logprobs(model, ids, at, responses, temperature: float):
    """Log-probabilities of the reply tokens and the entropy at each step, shape [batch,
    response_length].

    `ids` are right-padded, so causal attention never reaches the padding from a real token:
    no attention mask is needed, and attention takes its plain causal path. Only the reply's
    positions go through the output layer: the vocabulary projection is the costliest layer of
    a small model, and the prompt's logits are never used. (Models that post-process logits,
    e.g. Gemma 2's soft-capping, would need it applied here.)
    """
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # shape: [batch, seq, hidden]
    # shape: [batch, response_length, hidden]
    hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.get_output_embeddings()(hidden) / temperature
    logprobs = F.log_softmax(logits.float(), dim=-1)  # shape: [batch, response_length, vocab]
    with torch.no_grad():  # entropy is reported, never optimised
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(2, responses[..., None]).squeeze(2), entropy


@torch.no_grad()
def sample_reference(
    model, ids, mask, response_length: int, temperature: float, stop_id: int, generator
):
    """What `sample` computes, without a key-value cache: every step runs the model over the
    whole left-padded sequence so far and samples from its last position.

    The same random draws in the same order, so the same tokens from the same generator.
    """
    tokens = torch.full((ids.shape[0], response_length), stop_id, device=ids.device)
    logprobs = torch.zeros(tokens.shape, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for t in range(response_length):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits = logits[:, -1].float() / temperature  # shape: [batch, vocab]
        token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        tokens[:, t] = torch.where(done, stop_id, token)
        logprobs[:, t] = F.log_softmax(logits, dim=-1).gather(1, tokens[:, t : t + 1]).squeeze(1)
        done |= token == stop_id
        if done.all():
            break
        ids, mask = torch.cat([ids, token[:, None]], 1), F.pad(mask, (0, 1), value=1)
    return tokens, logprobs


def reply_logprobs_reference(model, ids, at, responses, temperature: float):
    """What `reply_logprobs` computes, through the model's full logits at every position."""
    logits = model(input_ids=ids).logits  # shape: [batch, seq, vocab]
    logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])) / temperature
    logprobs = F.log_softmax(logits.float(), dim=-1)  # shape: [batch, response_length, vocab]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(2, responses[..., None]).squeeze(2), entropy.detach()


# ---- DPO: log-probabilities of both replies, the prompt computed once ----------------------


def reply_slots(pairs: list[tuple[list[int], ...]], share_prefix: bool) -> dict:
    """Where each reply token is predicted, in the batch packed_batch (share_prefix) or
    naive_batch builds: `at` (the position whose output predicts it), `targets` (the token)
    and `slot` (0 chosen, 1 rejected, -1 padding), each of shape [rows, tokens].

    Packed, a chosen token k is predicted at p - 1 + k; the rejected reply's first token also
    at the prompt's last position p - 1 (it continues the prompt, not the chosen reply), and
    its token k >= 1 at p + c + k - 1. Naive, rows are the chosen sequences, then the rejected.

    >>> reply_slots([([1, 2], [3, 4], [5])], share_prefix=True)["at"].tolist()
    [[1, 2, 1]]
    """
    if share_prefix:
        rows = [
            (
                [p - 1 + k for k in range(len(c))]
                + [p - 1]
                + [p + len(c) + k for k in range(len(r) - 1)],
                c + r,
                [0] * len(c) + [1] * len(r),
            )
            for p, c, r in ((len(prompt), chosen, rejected) for prompt, chosen, rejected in pairs)
        ]
    else:
        rows = [
            ([len(prompt) - 1 + k for k in range(len(reply))], reply, [slot] * len(reply))
            for slot in (0, 1)
            for prompt, reply in ((pair[0], pair[1 + slot]) for pair in pairs)
        ]
    width = max(len(targets) for _, targets, _ in rows)
    at = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    slot = torch.full((len(rows), width), -1)
    for row, (positions, tokens, slots) in enumerate(rows):
        at[row, : len(tokens)] = torch.tensor(positions)
        targets[row, : len(tokens)] = torch.tensor(tokens)
        slot[row, : len(tokens)] = torch.tensor(slots)
    return {"at": at, "targets": targets, "slot": slot}


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 where the model computes in float64: a log-softmax over
    the vocabulary in half precision loses the small probabilities."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ReplyLogprobs(torch.nn.Module):
    """A causal LM that returns the summed log-probabilities of the replies of a batch from
    packed_batch or naive_batch plus reply_slots, shape [rows, 2] (chosen, rejected).

    A module, so that a data-parallel wrapper sees the forward pass. Only the reply tokens'
    positions go through the output layer (the vocabulary projection is the costliest layer of
    a small model; the prompt's logits are never used), as reply_logprobs does for PPO.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str]:
        """The model's layer classes, which FSDP (accelerate's transformer-layer wrapping)
        shards one by one."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def tie_weights(self) -> None:
        """Tie the model's embeddings and output layer again (accelerate calls it when FSDP
        loads the weights, which unties them)."""
        self.model.tie_weights()

    def forward(self, input_ids, attention_mask, position_ids, at, targets, slot):
        decoder = self.model.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # shape: [rows, seq, hidden]
        # shape: [rows, tokens, hidden]
        picked = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = at_least_fp32(self.model.get_output_embeddings()(picked))  # [rows, tokens, vocab]
        logprobs = logits.log_softmax(-1).gather(2, targets[..., None]).squeeze(2)
        return torch.stack([(logprobs * (slot == s)).sum(1) for s in (0, 1)], 1)


def pair_logprobs(scorer, pairs, pad_id: int, share_prefix: bool, device) -> torch.Tensor:
    """Summed log-probabilities of (chosen, rejected) for each pair, shape [batch, 2].

    `scorer` is a ReplyLogprobs (possibly wrapped for data parallelism). With `share_prefix`
    the pair is one packed sequence (packed_batch): the prompt is computed once for both
    replies; otherwise each reply is its own right-padded sequence after the prompt.
    """
    model = getattr(scorer, "module", scorer).model
    if share_prefix:
        problem = prefix_sharing_problem(model.get_decoder())
        if problem is not None:
            raise HhDataError(f"prefix sharing: the model {problem}; run with --prefix-sharing off")
        sdpa = model.config._attn_implementation == "sdpa"
        batch = packed_batch(pairs, pad_id, boolean_mask=sdpa)
    else:
        batch = naive_batch(pairs, pad_id)
    del batch["read_at"]
    batch |= reply_slots(pairs, share_prefix)
    sums = scorer(**{k: v.to(device) for k, v in batch.items()})  # shape: [rows, 2]
    if share_prefix:
        return sums
    return torch.stack([sums[: len(pairs), 0], sums[len(pairs) :, 1]], 1)


def pair_logprobs_reference(model, pairs) -> torch.Tensor:
    """What pair_logprobs computes, the plain way: each prompt + reply run alone through the
    whole model, log-softmax of every position's logits, the reply's tokens picked and
    summed. Shape [batch, 2]."""
    sums = []
    for prompt, *replies in pairs:
        for reply in replies:
            ids = torch.tensor([prompt + reply])
            logprobs = at_least_fp32(model(input_ids=ids).logits[0, :-1]).log_softmax(-1)
            picked = logprobs.gather(1, ids[0, 1:, None]).squeeze(1)  # shape: [seq - 1]
            sums.append(picked[len(prompt) - 1 :].sum())
    return torch.stack(sums).view(len(pairs), 2)


def accumulate_reply_loss(
    loss_fn,
    scorer,
    pairs,
    pad_id: int,
    share_prefix: bool,
    device,
    cost: int,
    backward=None,
    no_sync=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """accumulate_pair_loss for losses of reply log-probabilities (DPO): the gradient of the
    batch's loss accumulated micro-batch by micro-batch of similar length (length_groups).

    ``loss_fn(logprobs, indices, batch_pairs)`` gets the micro-batch's [n, 2] log-probs, the
    indices of its pairs in ``pairs`` (to look up the reference's) and the batch's pair count,
    and returns the micro-batch's share of the batch's mean loss.
    Returns the log-probs (detached, [batch, 2], in the order of ``pairs``) and the loss.
    """
    groups = length_groups([pair_length(pair, share_prefix) for pair in pairs], cost)
    parts, loss = [], 0.0
    for number, group in enumerate(groups):
        last = number == len(groups) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            logprobs = pair_logprobs(
                scorer, [pairs[i] for i in group], pad_id, share_prefix, device
            )
            part = loss_fn(logprobs, group, len(pairs))
            if backward is None:
                part.backward()
            else:
                backward(part, last)
        parts.append(logprobs.detach())
        loss = loss + part.detach()
    where = torch.tensor([i for group in groups for i in group]).argsort().to(parts[0].device)
    return torch.cat(parts)[where], loss
