"""PPO's queries and rollouts: prompts cut to leave room for a full reply; replies sampled to
left-padded queries, cut at the stop token, re-padded to the right for scoring (Huang et al.
2023, "The N+ Implementation Details of RLHF with PPO", "padding"); the reward model's score
read at each reply's last token and the value model's before each reply token.

The sampler itself (key-value cache, beside its plain reference) is in training.fast.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hhdata.errors import HhDataError
from training import models
from training.fast import reply_logprobs, sample
from training.text import start_token_id

# ---- queries: the prompt's latest tokens, room for a full reply ----------------------------


def start_length(tokenizer, chat: bool) -> int:
    """How many start tokens open a query: encode_prompt opens every prompt with the start
    token (start_token_id) unless the tokenizer has none."""
    return int(start_token_id(tokenizer) is not None)


def query_limit(args, reward_max_length: int | None, start: int) -> int:
    """The longest query that leaves room for a full reply within the reward model's max length.

    The reward model never saw a sequence longer than its max length; PPO's queries are cut
    (from the left, keeping the start token) so that query + reply fits.
    """
    limit = args.query_length
    if reward_max_length is not None:
        limit = min(limit, reward_max_length - args.response_length)
    if limit <= start:
        raise HhDataError(
            f"--response-length {args.response_length} leaves no room for a prompt within the "
            "reward model's "
            f"max length {reward_max_length}; lower --response-length"
        )
    return limit


def fit_query(ids: list[int], limit: int, start: int) -> list[int]:
    """The query cut to `limit` tokens: its `start` tokens, then its latest tokens.

    >>> fit_query([1, 10, 11, 12, 13], limit=3, start=1)
    [1, 12, 13]
    """
    return ids if len(ids) <= limit else ids[:start] + ids[len(ids) - (limit - start) :]


# ---- sampling and scoring ------------------------------------------------------------------


def left_pad(queries: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, shape [batch, longest]."""
    width = max(map(len, queries))
    ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in queries])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries])
    return ids, mask


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


def scoring_mask(model, mask):
    """The attention mask a scoring model needs on right-padded ids: none for a causal decoder."""
    return mask if models.is_encoder(model.backbone.config) else None


def reward_model_scores(reward_model, ids, mask, last) -> torch.Tensor:
    """The reward model's score read at each reply's last token, shape [batch]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    mask = scoring_mask(reward_model, mask)
    return reward_model(
        input_ids=ids, attention_mask=mask, position_ids=positions, read_at=last[:, None]
    )[:, 0]


@dataclass
class Rollout:
    """A batch of replies, their query in one right-padded sequence, and the reply's mask."""

    ids: torch.Tensor  # shape: [batch, query + response], right-padded
    mask: torch.Tensor  # shape: [batch, query + response]
    responses: torch.Tensor  # shape: [batch, response_length]
    response_mask: torch.Tensor  # shape: [batch, response_length], true up to the stop token
    has_stop: torch.Tensor  # shape: [batch]
    at: torch.Tensor  # shape: [batch, response_length], column predicting each reply token
    # shape: [batch], column of each reply's last token (the stop token if it stopped)
    last: torch.Tensor
    # shape: [batch, response_length], under the sampling distribution
    sample_logprobs: torch.Tensor


@torch.no_grad()
def rollout(
    model,
    queries: list[list[int]],
    args,
    pad_id: int,
    stop_id: int,
    generator,
    device,
    sampler=sample,
) -> Rollout:
    """Sample replies with left padding, truncate at the stop token, re-pad to the right for
    scoring. `sampler` is fast.sample or what takes its place (a vLLM engine's ``sample``)."""
    ids, mask = (tensor.to(device) for tensor in left_pad(queries, pad_id))
    responses, sample_logprobs = sampler(
        model, ids, mask, args.response_length, args.temperature, stop_id, generator
    )
    response_mask, has_stop = truncate_at_stop(responses, stop_id)
    sequence, sequence_mask, query_lengths = right_pad(ids, mask, responses, response_mask)
    at = reply_positions(query_lengths, args.response_length, sequence.shape[1])
    last = query_lengths + response_mask.sum(1) - 1
    return Rollout(
        sequence, sequence_mask, responses, response_mask, has_stop, at, last, sample_logprobs
    )


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so one `accelerator.prepare` (DDP, FSDP) wraps
    both.

    Called plainly it scores replies for PPO's loss. Called with `part`, it runs one part of the
    policy instead (``"policy"``: the causal LM, for sampling; ``"decoder"``,
    ``"output_embeddings"``: its two halves, for reply_logprobs): under FSDP every call of the
    policy must enter through this module's forward, which gathers the weights FSDP keeps at
    this level (PreparedPolicy makes those calls).
    """

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, *inputs, part: str | None = None, **options):
        """Reply log-probabilities, entropies and values, each of shape [batch, response_length],
        from (ids, mask, at, responses, temperature); or `part` of the policy on `inputs`."""
        if part == "policy":
            return self.policy(*inputs, **options)
        if part == "decoder":
            return self.policy.get_decoder()(*inputs, **options)
        if part == "output_embeddings":
            return self.policy.get_output_embeddings()(*inputs, **options)
        ids, mask, at, responses, temperature = inputs
        logprobs, entropy = reply_logprobs(self.policy, ids, at, responses, temperature)
        return logprobs, entropy, per_token_values(self.value_model, ids, mask, at)

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes of policy and value model, which FSDP (accelerate's
        transformer-layer wrapping) shards one by one."""
        backbone = self.value_model.backbone
        return sorted(
            set(getattr(self.policy, "_no_split_modules", None) or [])
            | set(getattr(backbone, "_no_split_modules", None) or [])
        )

    def tie_weights(self) -> None:
        """Tie the policy's embeddings and output layer again (accelerate calls it when FSDP
        loads the weights, which unties them)."""
        self.policy.tie_weights()


class PreparedPolicy:
    """The policy inside a prepared PolicyAndValue, as sampling (fast.sample) and scoring
    (fast.reply_logprobs) call a causal LM, every call made through the prepared module's
    forward (``part``), with no gradient; with `lora` (add_lora's handle), the adapters off:
    the frozen reference.

    For FSDP, where a pass of the policy is a collective: every call enters through the root
    module, which gathers the weights it keeps (embeddings, output layer) while each decoder
    layer gathers its own, and `all_finished` makes sampling run as many passes on every
    process.
    """

    def __init__(self, prepared, accelerator, lora=None):
        self.prepared, self.accelerator, self.lora = prepared, accelerator, lora
        self.config = accelerator.unwrap_model(prepared).policy.config

    def run(self, part: str, *inputs, **options):
        """`part` of the policy (PolicyAndValue.forward) on `inputs`, without gradient."""
        adapters = self.lora.disable_adapter() if self.lora is not None else nullcontext()
        with torch.no_grad(), adapters:
            return self.prepared(*inputs, part=part, **options)

    def __call__(self, *inputs, **options):
        return self.run("policy", *inputs, **options)

    def get_decoder(self):
        """The decoder stack, called through the prepared module."""
        return functools.partial(self.run, "decoder")

    def get_output_embeddings(self):
        """The output layer, called through the prepared module."""
        return functools.partial(self.run, "output_embeddings")

    def all_finished(self, finished: bool) -> bool:
        """Whether every process's replies are done (an all-reduce; fast.sample)."""
        flag = torch.tensor(float(not finished), device=self.accelerator.device)
        return self.accelerator.reduce(flag, "max").item() == 0


def per_token_values(value_model, ids, mask, at) -> torch.Tensor:
    """The value model's prediction before each reply token, shape [batch, response_length]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return value_model(
        input_ids=ids,
        attention_mask=scoring_mask(value_model, mask),
        position_ids=positions,
        read_at=at,
    )


def make_scorer(reward_model, score_fn):
    """score(rollout) -> raw scores [batch]: the reward model's, or a rule's on the reply tokens."""
    if score_fn is not None:
        return lambda r: score_fn(r.responses, r.response_mask).float()
    return lambda r: reward_model_scores(reward_model, r.ids, r.mask, r.last).float()
