"""training.fast: each speed path agrees with its plain reference path (to 1e-5).

Packed vs naive batches and micro-batched vs whole-batch loss are checked in
tests/test_reward_model.py (test_prefix_sharing_equals_two_sequences_in_loss_and_gradients,
test_micro_batches_by_length_give_the_batch_gradient); the sampler and reply-only logits here.
"""

from __future__ import annotations

import pytest
import torch

from training import models
from training.common import load_pairs
from training.fast import reply_logprobs, reply_logprobs_reference, sample, sample_reference
from training.rollout import left_pad, reply_positions, right_pad, truncate_at_stop


@pytest.fixture(scope="module")
def policy_and_queries():
    rows = load_pairs(None)[0]["test"][:200]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows], vocab_size=512)
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=5).eval()
    lengths = [3, 11, 7, 16, 5]  # left padding differs per row
    queries = [tokenizer(row["chosen_text"])["input_ids"][:n] for row, n in zip(rows, lengths)]
    assert sorted(map(len, queries)) == sorted(lengths)
    ids, mask = left_pad(queries, tokenizer.pad_token_id)
    return policy, ids, mask


def third_token_of_the_first_reply(policy, ids, mask, seed: int) -> int:
    """As stop token: the first reply then stops at its third token, the others later or never
    (a random tiny model spreads its samples over the whole vocabulary)."""
    tokens, _ = sample(policy, ids, mask, 10, 0.7, -1, torch.Generator().manual_seed(seed))
    return int(tokens[0, 2])


def test_the_kv_cache_sampler_draws_what_plain_step_by_step_sampling_draws(policy_and_queries):
    policy, ids, mask = policy_and_queries
    stop = third_token_of_the_first_reply(policy, ids, mask, seed=3)
    fast = sample(policy, ids, mask, 10, 0.7, stop, torch.Generator().manual_seed(3))
    plain = sample_reference(policy, ids, mask, 10, 0.7, stop, torch.Generator().manual_seed(3))
    assert torch.equal(fast[0], plain[0])
    response_mask, has_stop = truncate_at_stop(fast[0], stop)
    assert has_stop.any() and len(set(response_mask.sum(1).tolist())) > 1  # stops are exercised
    torch.testing.assert_close(fast[1], plain[1], atol=1e-5, rtol=0)


def test_reply_only_logits_equal_full_sequence_logits(policy_and_queries):
    policy, ids, mask = policy_and_queries
    responses, _ = sample(policy, ids, mask, 8, 1.0, -1, torch.Generator().manual_seed(4))
    response_mask, _ = truncate_at_stop(responses, -1)
    sequence, _, query_lengths = right_pad(ids, mask, responses, response_mask)
    at = reply_positions(query_lengths, responses.shape[1], sequence.shape[1])
    with torch.no_grad():
        fast = reply_logprobs(policy, sequence, at, responses, 0.7)
        plain = reply_logprobs_reference(policy, sequence, at, responses, 0.7)
    for got, expected in zip(fast, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class InStepWithOthers:
    """The policy as a sharded one looks to fast.sample: `all_finished` says the other
    processes still sample until this one has run `passes` forward passes."""

    def __init__(self, policy, passes: int):
        self.policy, self.passes, self.calls = policy, passes, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.policy(**inputs)

    def all_finished(self, finished: bool) -> bool:
        return finished and self.calls >= self.passes


def test_a_process_done_first_runs_on_without_drawing_until_all_are_done(policy_and_queries):
    """Under FSDP every pass is a collective: a process whose replies are done keeps running
    passes until the others are, and its replies, log-probs and generator are what they are
    alone (it draws nothing more)."""
    policy, ids, mask = policy_and_queries
    ids, mask = ids[:1], mask[:1]
    stop = third_token_of_the_first_reply(policy, ids, mask, seed=3)
    alone, synced = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    counted = InStepWithOthers(policy, passes=1)
    expected = sample(counted, ids, mask, 10, 0.7, stop, alone)
    assert counted.calls == 3  # the prompt, then after the first two tokens: stopped at the third
    in_step = InStepWithOthers(policy, passes=6)
    got = sample(in_step, ids, mask, 10, 0.7, stop, synced)
    assert in_step.calls == 6
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(synced.get_state(), alone.get_state())
