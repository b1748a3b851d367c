"""PPO: the math against plain reference loops, learning on a known-answer reward, resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hhdata.errors import HhDataError
from training import models
from training.ppo import (
    AdaptiveKLController,
    Args,
    compute_gae,
    main,
    masked_whiten,
    policy_loss,
    value_loss,
)
from training.reward_model import RewardModel, save_reward_model
from training.rollout import right_pad, truncate_at_stop

# ---- the math against plain loops over Python floats ---------------------------------------


def gae_loop(rewards, values, gamma, lam):
    """GAE written straight from Schulman et al. 2016, eq. 16, one reply at a time."""
    advantages = []
    for r, v in zip(rewards, values):
        steps = len(r)
        row = []
        for t in range(steps):
            total = 0.0
            for k in range(t, steps):
                next_value = v[k + 1] if k + 1 < steps else 0.0
                delta = r[k] + gamma * next_value - v[k]
                total += (gamma * lam) ** (k - t) * delta
            row.append(total)
        advantages.append(row)
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_the_plain_sum(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, gamma, lam)
    expected = torch.tensor(
        gae_loop(rewards.tolist(), values.tolist(), gamma, lam), dtype=torch.float64
    )
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = compute_gae(rewards, values, 1.0, 1.0)
    assert returns.tolist() == [[2.0, 2.0, 2.0]]
    assert advantages.tolist() == [[1.5, 1.0, 0.5]]


def test_policy_loss_matches_a_loop():
    generator = torch.Generator().manual_seed(1)
    new = torch.randn(4, 5, generator=generator, dtype=torch.float64) * 0.3
    old = torch.randn(4, 5, generator=generator, dtype=torch.float64) * 0.3
    advantages = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=generator) > 0.3
    loss, clipfrac, approx_kl = policy_loss(new, old, advantages, mask.double(), 0.2)
    losses, clipped_count, kls = [], 0, []
    for i in range(4):
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(new[i, t] - old[i, t])
            a = float(advantages[i, t])
            plain, clipped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            losses.append(max(plain, clipped))
            clipped_count += clipped > plain
            kls.append(ratio - 1 - math.log(ratio))
    assert loss.item() == pytest.approx(sum(losses) / len(losses))
    assert clipfrac.item() == pytest.approx(clipped_count / len(losses))
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls))
    assert 0 < clipped_count < len(losses)  # the example exercises both branches


def test_value_loss_matches_a_loop():
    generator = torch.Generator().manual_seed(2)
    new = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    old = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    returns = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=generator) > 0.2
    loss, clipfrac = value_loss(new, old, returns, mask.double(), 0.2)
    terms, clipped_count = [], 0
    for i in range(3):
        for t in range(6):
            if mask[i, t]:
                v, v_old, g = float(new[i, t]), float(old[i, t]), float(returns[i, t])
                v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
                terms.append(0.5 * max((v - g) ** 2, (v_clipped - g) ** 2))
                clipped_count += (v_clipped - g) ** 2 > (v - g) ** 2
    assert loss.item() == pytest.approx(sum(terms) / len(terms))
    assert clipfrac.item() == pytest.approx(clipped_count / len(terms))


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    beta = 0.1
    for kl in [12.0, 7.0, 6.0, 3.0, 0.0, 100.0]:
        controller.update(kl, n_steps=500)
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + error * 500 / 10000
        assert controller.value == pytest.approx(beta)
    rising = AdaptiveKLController(0.1, 6.0, 100)
    rising.update(20.0, 10)
    falling = AdaptiveKLController(0.1, 6.0, 100)
    falling.update(1.0, 10)
    assert falling.value < 0.1 < rising.value


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    assert whitened[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0)


def test_truncation_at_the_stop_token_and_right_padding():
    stop = 9
    responses = torch.tensor([[5, 9, 6, 9], [4, 4, 4, 4]])
    mask, has_stop = truncate_at_stop(responses, stop)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert has_stop.tolist() == [True, False]
    queries = torch.tensor([[0, 0, 7], [8, 8, 8]])  # left-padded with 0
    query_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    ids, ids_mask, lengths = right_pad(queries, query_mask, responses, mask)
    assert ids[0, :3].tolist() == [7, 5, 9] and ids_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert ids[1].tolist() == [8, 8, 8, 4, 4, 4, 4] and ids_mask[1].tolist() == [1] * 7
    assert lengths.tolist() == [1, 3]


# ---- runs on the tiny model ----------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny random policy (standing in for an SFT run) and an untrained reward model on its
    vocabulary."""
    from training.common import load_pairs

    root = tmp_path_factory.mktemp("runs")
    rows = load_pairs(None)[0]["test"][:300]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows], vocab_size=512)
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=3)
    policy.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    reward = RewardModel(models.load_backbone(models.TINY, tokenizer, seed=4))
    save_reward_model(
        reward,
        tokenizer,
        root / "rm" / "model",
        {"max_length": 128, "chat_template": False, "base_model": "tiny"},
    )
    write_run_settings(root / "rm", seed=4)
    return root


def write_run_settings(run_dir, seed: int) -> None:
    """The settings.json a reward-model run writes, as far as PPO reads it: which pairs it trained
    on."""
    from training.common import load_pairs

    args = {
        "data": None,
        "version": None,
        "eval_fraction": 0.2,
        "train_config": "all",
        "max_train_pairs": None,
        "seed": seed,
    }
    (run_dir / "settings.json").write_text(
        json.dumps({"args": args, "provenance": load_pairs(None)[1]})
    )


def even_token_share(responses, response_mask):
    """Known answer: the share of the reply's tokens whose id is even."""
    even = (responses % 2 == 0) & response_mask
    return even.sum(1).float() / response_mask.sum(1).float()


SMALL = dict(
    total_episodes=256,
    batch_size=32,
    num_mini_batches=2,
    num_ppo_epochs=4,
    learning_rate=1e-2,
    query_length=24,
    response_length=6,
    temperature=1.0,
    missing_stop_penalty=0.0,
    normalize_reward=False,
    kl_coef=0.02,
    eval_prompts=16,
    num_samples_shown=2,
)


def test_ppo_learns_a_known_answer_reward_with_bounded_kl(tiny_runs, tmp_path):
    args = Args(policy=str(tiny_runs / "sft"), output_dir=str(tmp_path / "ppo"), **SMALL)
    metrics = main(args, score_fn=even_token_share)
    history = metrics["history"]
    first, last = history[0], history[-1]
    # the noise of one batch's mean: a share of 6 tokens has std <= 0.5 / sqrt(6) per reply
    noise = 0.5 / math.sqrt(args.response_length) / math.sqrt(args.batch_size)
    assert first["score"] == pytest.approx(0.5, abs=5 * noise)  # the random policy starts at chance
    final = (history[-1]["score"] + history[-2]["score"]) / 2
    assert final - first["score"] > 4 * noise, [h["score"] for h in history]
    assert metrics["evaluation"]["win_rate"] > 0.65
    assert (
        0 < last["kl"] < 12.0
    )  # moved away from the reference (bounded: see the KL ablation below)
    for name in ("entropy", "reply_length", "pg_clipfrac", "vf_clipfrac", "value_loss", "sqrt_kl"):
        assert all(math.isfinite(h[name]) for h in history)
    saved = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert saved["history"] == history
    assert saved["reward_vs_sqrt_kl"]["slope"] > 0  # more reward was bought with more KL
    for name in (
        "training.png",
        "reward_vs_sqrt_kl.png",
        "settings.json",
        "policy/model.safetensors",
        "policy/README.md",
    ):
        assert (tmp_path / "ppo" / name).is_file(), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_runs, tmp_path_factory) -> Args:
    """The run of three updates, a checkpoint after each, that the interrupted and resumed runs
    below must end as; its settings (output_dir: its folder)."""
    settings = dict(SMALL, total_episodes=48, batch_size=16, eval_prompts=8, save_every=1)
    folder = tmp_path_factory.mktemp("uninterrupted")
    whole = Args(policy=str(tiny_runs / "sft"), output_dir=str(folder / "whole"), **settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' one_torch_thread, which starts after this fixture
    try:
        main(whole, score_fn=even_token_share)
    finally:
        torch.set_num_threads(threads)
    return whole


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """Stopped after two updates (a checkpoint only at the stop: save_every is 4), then resumed:
    the weights, training history and evaluation of the uninterrupted run, which saved and
    scored the held-out prompts after every update (so that does not change training either)."""
    whole = Path(uninterrupted.output_dir)
    halves = dataclasses.replace(
        uninterrupted, output_dir=str(tmp_path / "halves"), save_every=4, stop_after=2
    )
    assert main(halves, score_fn=even_token_share)["stopped_after"] == 2
    assert not (tmp_path / "halves" / "policy").exists()
    assert [c.name for c in (tmp_path / "halves" / "checkpoints").iterdir()] == ["step-0000002"]
    main(dataclasses.replace(halves, stop_after=0, resume=True), score_fn=even_token_share)
    for name in ("policy/model.safetensors", "value.safetensors"):
        a, b = load_file(whole / name), load_file(tmp_path / "halves" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)

    def drop_time(history):
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in history
        ]

    whole_metrics = json.loads((whole / "metrics.json").read_text())
    halves_metrics = json.loads((tmp_path / "halves" / "metrics.json").read_text())
    assert drop_time(whole_metrics["history"]) == drop_time(halves_metrics["history"])
    assert whole_metrics["evaluation"] == halves_metrics["evaluation"]


def test_resume_refuses_changed_settings(tiny_runs, tmp_path):
    args = Args(
        policy=str(tiny_runs / "sft"),
        output_dir=str(tmp_path / "run"),
        stop_after=1,
        **dict(SMALL, total_episodes=64),
    )
    main(args, score_fn=even_token_share)
    with pytest.raises(HhDataError, match=r"changed settings \['learning_rate'\]"):
        main(dataclasses.replace(args, resume=True, learning_rate=1.0), score_fn=even_token_share)
    with pytest.raises(HhDataError, match="pass --resume"):
        main(args, score_fn=even_token_share)


def test_runs_against_a_reward_model_with_value_model_from_it(tiny_runs, tmp_path):
    settings = dict(
        SMALL,
        total_episodes=32,
        batch_size=16,
        eval_prompts=8,
        normalize_reward=True,
        reward_norm_samples=16,
        missing_stop_penalty=1.0,
    )
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tiny_runs / "rm"),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    metrics = main(args)
    assert metrics["reward_std"] > 0 and len(metrics["history"]) == 2
    evaluation = metrics["evaluation"]
    assert set(evaluation["by_family"]) == {"harmless"} and evaluation["prompts"] == 8
    assert len(evaluation["samples"]) == 2
    value = load_file(tmp_path / "ppo" / "value.safetensors")
    reward = load_file(
        tiny_runs / "rm" / "model" / "model.safetensors"
    )  # a standard sequence classifier
    assert (
        value["score.weight"].shape == reward["score.weight"].shape
    )  # the value head is the reward head, trained on
    card = (tmp_path / "ppo" / "policy" / "README.md").read_text()
    assert "win rate" in card and str(tiny_runs / "rm") in card


def test_refuses_a_reward_model_with_another_vocabulary(tiny_runs, tmp_path):
    other = models.train_tiny_tokenizer([f"word{i} other{i}" for i in range(200)], vocab_size=300)
    reward = RewardModel(models.load_backbone(models.TINY, other, seed=0))
    save_reward_model(
        reward,
        other,
        tmp_path / "rm" / "model",
        {"max_length": 64, "chat_template": False, "base_model": "tiny"},
    )
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tmp_path / "rm"),
        output_dir=str(tmp_path / "ppo"),
    )
    with pytest.raises(
        HhDataError, match="tokenize differently; train the SFT policy with --tokenizer"
    ):
        main(args)


def test_batch_sizes_must_divide():
    with pytest.raises(HhDataError, match="16 is not divisible by 3"):
        main(Args(batch_size=16, num_mini_batches=3, total_episodes=32))


def test_evaluation_reports_each_family(tiny_runs, tmp_path, two_family_rows):
    """Harmless prompts from the bundled sample and helpful ones from hhdata.synth, in one
    parquet (tests/conftest.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hhdata.schema import PAIR_SCHEMA

    rows = two_family_rows(80)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), tmp_path / "pairs.parquet")
    settings = dict(SMALL, total_episodes=16, batch_size=16, eval_prompts=40)
    args = Args(
        policy=str(tiny_runs / "sft"),
        data=str(tmp_path / "pairs.parquet"),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    evaluation = main(args, score_fn=even_token_share)["evaluation"]
    by_family = evaluation["by_family"]
    assert set(by_family) == {"helpful", "harmless"}
    assert (
        by_family["helpful"]["prompts"] + by_family["harmless"]["prompts"]
        == evaluation["prompts"]
        == 40
    )
    assert min(part["prompts"] for part in by_family.values()) > 5


# ---- tests that fail when the algorithm is broken ------------------------------------------


def tiny_queries(tokenizer, lengths):
    """Real bundled prompts cut (keeping the start token) to different lengths."""
    from training.common import load_pairs
    from training.rollout import fit_query
    from training.text import encode_prompt

    rows = load_pairs(None)[0]["test"][: len(lengths)]
    return [
        fit_query(encode_prompt(tokenizer, row["prompt"], False)[0], n, 1)
        for row, n in zip(rows, lengths)
    ]


def frequent_token(policy, queries, settings, generator_seed):
    """A token the tiny policy samples often: used as the stop token, replies end at different
    lengths."""
    from training.rollout import rollout

    batch = rollout(
        policy, queries, settings, 0, -1, torch.Generator().manual_seed(generator_seed), "cpu"
    )
    return int(batch.responses.flatten().mode().values)


def test_padded_batch_logprobs_equal_per_row_forward_passes(tiny_runs):
    """Reply log-probs of the right-padded batch, and of the sampler, equal a forward pass over each
    unpadded sequence at temperature 0.7; the reward model's score is read at the stop token."""
    import torch.nn.functional as F

    from training.fast import reply_logprobs
    from training.reward_model import load_reward_model
    from training.rollout import reward_model_scores, rollout

    tokenizer = models.load_tokenizer(str(tiny_runs / "sft"))
    policy = models.load_causal_lm(str(tiny_runs / "sft"), tokenizer).eval()
    settings = dataclasses.replace(Args(), response_length=12, temperature=0.7)
    queries = tiny_queries(tokenizer, [5, 17, 30, 9, 23, 12])
    assert (
        len({len(q) for q in queries}) == 6
    )  # queries of different lengths: left padding differs per row
    stop = frequent_token(policy, queries, settings, 11)
    batch = rollout(
        policy,
        queries,
        settings,
        tokenizer.pad_token_id,
        stop,
        torch.Generator().manual_seed(11),
        "cpu",
    )
    lengths = batch.response_mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and batch.has_stop.any(), (
        lengths
    )  # replies of different lengths, some stopped
    with torch.no_grad():
        padded, _ = reply_logprobs(
            policy, batch.ids, batch.at, batch.responses, settings.temperature
        )
        reward_model, _, _ = load_reward_model(tiny_runs / "rm")
        read = reward_model_scores(reward_model, batch.ids, batch.mask, batch.last)
        for row, (query, n) in enumerate(zip(queries, lengths)):
            reply = batch.responses[row, :n].tolist()
            sequence = torch.tensor([query + reply])
            logits = (
                policy(input_ids=sequence).logits[0, len(query) - 1 : len(query) + n - 1]
                / settings.temperature
            )
            expected = (
                F.log_softmax(logits.float(), -1).gather(1, torch.tensor(reply)[:, None]).squeeze(1)
            )
            torch.testing.assert_close(padded[row, :n], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                batch.sample_logprobs[row, :n], expected, atol=1e-5, rtol=1e-5
            )
            if batch.has_stop[row]:
                assert (
                    batch.ids[row, batch.last[row]] == stop == reply[-1]
                )  # the reward is read at the stop token
            alone = reward_model(
                input_ids=sequence,
                attention_mask=None,
                position_ids=torch.arange(sequence.shape[1])[None],
                read_at=torch.tensor([[sequence.shape[1] - 1]]),
            )[0, 0]
            torch.testing.assert_close(read[row], alone, atol=1e-5, rtol=1e-5)


def test_reward_is_placed_at_the_last_real_token():
    from training.ppo import per_token_rewards

    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    kl = torch.arange(12, dtype=torch.float32).view(3, 4) / 10
    scores = torch.tensor([5.0, 7.0, 11.0])
    rewards = per_token_rewards(scores, kl * mask, 0.5, mask.float())
    for row in range(3):
        n = int(mask[row].sum())
        for t in range(4):
            expected = (-0.5 * float(kl[row, t]) if t < n else 0.0) + (
                float(scores[row]) if t == n - 1 else 0.0
            )
            assert rewards[row, t].item() == pytest.approx(expected), (row, t)


def test_first_minibatch_ratio_is_one_and_scoring_reproduces_sampling(tiny_runs, tmp_path):
    """At temperature 0.7 on queries of different lengths: before the first optimiser step of each
    update the probability ratio is 1 and the approximate KL 0, and the scored log-probs are those
    the sampler drew from."""
    settings = dict(
        SMALL, total_episodes=32, batch_size=16, temperature=0.7, query_length=64, eval_prompts=8
    )
    args = Args(policy=str(tiny_runs / "sft"), output_dir=str(tmp_path / "ppo"), **settings)
    history = main(args, score_fn=even_token_share)["history"]
    for record in history:
        assert record["sampling_logprob_error"] < 1e-4, record
        assert record["first_minibatch_ratio_error"] < 1e-4, record
        assert abs(record["first_minibatch_approx_kl"]) < 1e-7, record
    assert history[-1]["kl"] > 0  # the first update did move the policy


def test_kl_penalty_keeps_the_policy_closer_to_the_reference(tiny_runs, tmp_path):
    """KL ablation: same seed and data, a fixed KL coefficient of 1.0 ends nearer the reference
    than 0."""
    ends = {}
    for coef in (0.0, 1.0):
        settings = dict(SMALL, total_episodes=128, kl_coef=coef, adaptive_kl=False, eval_prompts=16)
        args = Args(
            policy=str(tiny_runs / "sft"), output_dir=str(tmp_path / f"kl{coef}"), **settings
        )
        metrics = main(args, score_fn=even_token_share)
        ends[coef] = (metrics["history"][-1]["kl"], metrics["held_out"][-1]["kl"])
    # a penalty that does nothing gives both runs the same numbers: strictly lower on the last
    # (noisy, 32-reply) training batch, and less than half on the held-out prompts
    assert ends[1.0][0] < ends[0.0][0], ends
    assert ends[1.0][1] < ends[0.0][1] / 2, ends


def test_value_model_starts_as_the_reward_model(tiny_runs, tmp_path):
    """With a learning rate of 0 nothing trains: the saved value model must be the reward model,
    tensor by tensor."""
    from training.reward_model import load_reward_model

    settings = dict(SMALL, total_episodes=16, batch_size=16, learning_rate=0.0, eval_prompts=8)
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tiny_runs / "rm"),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    main(args)
    value = load_file(tmp_path / "ppo" / "value.safetensors")
    reward = load_reward_model(tiny_runs / "rm")[0].state_dict()
    assert value.keys() == reward.keys()
    for key in reward:
        assert torch.equal(value[key], reward[key]), key


# ---- end-of-turn token, query truncation, splits and honest evaluation ----------------------


def chatml_tokenizer():
    """The tiny tokenizer with a ChatML template (as SmolLM2's): turns end in <|im_end|> and a
    newline."""
    tokenizer = models.train_tiny_tokenizer(
        [f"user says {i} assistant answers {i}" for i in range(200)], vocab_size=300
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
        "endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def test_end_of_turn_token_is_im_end_with_a_chat_template_and_eos_without():
    from training.text import end_of_turn_id

    tokenizer = chatml_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id
    assert end_of_turn_id(tokenizer, chat=True) == im_end
    assert end_of_turn_id(tokenizer, chat=False) == tokenizer.eos_token_id


def test_queries_keep_the_start_token_and_fit_the_reward_models_max_length(tiny_runs, tmp_path):
    from training.rollout import fit_query, query_limit
    from training.text import encode_prompt

    tokenizer = models.load_tokenizer(str(tiny_runs / "sft"))
    row = next(r for r in load_rows() if len(encode_prompt(tokenizer, r["prompt"], False)[0]) > 60)
    ids = encode_prompt(tokenizer, row["prompt"], False)[0]
    limit = query_limit(Args(query_length=64, response_length=16), reward_max_length=40, start=1)
    assert limit == 24
    cut = fit_query(ids, limit, start=1)
    assert cut[0] == tokenizer.bos_token_id and cut[1:] == ids[-23:]
    with pytest.raises(
        HhDataError,
        match="--response-length 40 leaves no room for a prompt within the reward model's "
        "max length 40",
    ):
        query_limit(Args(query_length=64, response_length=40), reward_max_length=40, start=1)
    # a whole run reads the reward model's max length from its saved settings
    other = tmp_path / "rm40"
    reward = RewardModel(models.load_backbone(models.TINY, tokenizer, seed=4))
    save_reward_model(
        reward,
        tokenizer,
        other / "model",
        {"max_length": 40, "chat_template": False, "base_model": "tiny"},
    )
    settings = dict(
        SMALL, total_episodes=16, batch_size=16, query_length=64, response_length=16, eval_prompts=8
    )
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(other),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    main(args)
    saved = json.loads((tmp_path / "ppo" / "settings.json").read_text())
    assert saved["query_limit"] == 24 and saved["stop_token"] == tokenizer.eos_token


def load_rows():
    from training.common import load_pairs

    return load_pairs(None)[0]["test"]


def test_split_defaults_to_train_and_held_out_prompts_are_never_trained_on():
    from training.common import choose_split, prompt_key
    from training.ppo_eval import split_prompts

    rows = load_rows()
    splits = {"train": rows[:1500], "test": rows[1500:]}
    assert choose_split(splits, None, "data") == "train"
    assert choose_split({"test": rows}, None, "data") == "test"
    with pytest.raises(HhDataError, match=r"no split 'train' \(it has \['test'\]\); pass --split"):
        choose_split({"test": rows}, "train", "data")
    with pytest.raises(HhDataError, match="no `train` split"):
        choose_split({"a": rows[:5], "b": rows[5:9]}, None, "data")
    train, held_out = split_prompts(splits, "train", set(), 64, seed=1)
    assert all(
        row["split"] == "test" or row in splits["test"] for row in held_out
    )  # the other split first
    assert len({prompt_key(r) for r in held_out}) == 64
    assert not {prompt_key(r) for r in held_out} & {prompt_key(r) for r in train}


def test_held_out_prompts_exclude_the_reward_models_training_prompts(tiny_runs):
    """On the bundled sample (one split) the reward model holds out pairs by id: PPO's held-out
    prompts come only from those; before, ~80% of them were reward-model training prompts."""
    from training.common import load_pairs, prompt_key
    from training.ppo_eval import reward_model_training_prompts, split_prompts
    from training.reward_model import split_held_out

    splits, provenance = load_pairs(None)
    trained = reward_model_training_prompts(tiny_runs / "rm", splits, provenance)
    assert trained == {prompt_key(r) for r in split_held_out(splits, 0.2)[0]}
    train, held_out = split_prompts(splits, "test", trained, 64, seed=1)
    assert len(held_out) == 64 and not {prompt_key(r) for r in held_out} & trained
    assert not {prompt_key(r) for r in held_out} & {prompt_key(r) for r in train}


def test_a_judge_reward_model_reports_beside_the_proxy(tiny_runs, tmp_path):
    tokenizer = models.load_tokenizer(str(tiny_runs / "sft"))
    judge = tmp_path / "judge"
    save_reward_model(
        RewardModel(models.load_backbone(models.TINY, tokenizer, seed=9)),
        tokenizer,
        judge / "model",
        {"max_length": 128, "chat_template": False, "base_model": "tiny"},
    )
    write_run_settings(judge, seed=9)
    settings = dict(SMALL, total_episodes=32, batch_size=16, eval_prompts=12, save_every=1)
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tiny_runs / "rm"),
        judge=str(judge),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    metrics = main(args)
    evaluation = metrics["evaluation"]
    for name in ("proxy", "judge"):
        assert evaluation[name]["prompts"] == 12 and set(evaluation[name]["by_family"]) == {
            "harmless"
        }
    assert (
        evaluation["judge"]["policy_score"] != evaluation["proxy"]["policy_score"]
    )  # another model judged
    assert [p["update"] for p in metrics["held_out"]] == [0, 1, 2]
    assert metrics["held_out"][0]["kl"] == pytest.approx(
        0.0, abs=1e-6
    )  # update 0 is the reference itself
    assert all("judge_score" in p for p in metrics["held_out"])
    assert set(metrics["held_out_reward_vs_sqrt_kl"]) == {"score", "judge_score"}
    saved = json.loads((tmp_path / "ppo" / "settings.json").read_text())
    assert saved["held_out_excludes_training_prompts_of"] == [str(tiny_runs / "rm"), str(judge)]
    card = (tmp_path / "ppo" / "policy" / "README.md").read_text()
    assert "judge (never optimised)" in card and str(judge) in card
    with pytest.raises(HhDataError, match="is the reward model PPO optimises"):
        main(
            dataclasses.replace(
                args, judge=str(tiny_runs / "rm"), output_dir=str(tmp_path / "again")
            )
        )


# ---- command line, checkpoints ----------------------------------------------------------------


def test_command_line_usage_error_is_one_line_and_exit_2():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "training.ppo", "--batch-size", "16", "--num-mini-batches", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch-size / --num-mini-batches: 16 is not divisible by 3; pick sizes that "
        "divide exactly"
    )


def test_resume_after_a_kill_while_saving_a_checkpoint(uninterrupted, tmp_path):
    """A kill can leave the new checkpoint half written (`step-N.partial`) or complete beside the
    previous one; resume takes the latest complete one and ends as the uninterrupted run does.
    Both kills happen to one run stopped after update 2, restored from a copy in between."""
    import shutil

    expected = load_file(Path(uninterrupted.output_dir) / "policy" / "model.safetensors")
    folder = tmp_path / "run"
    run = dataclasses.replace(uninterrupted, output_dir=str(folder), stop_after=1)
    main(run, score_fn=even_token_share)
    checkpoints = folder / "checkpoints"
    after_one = tmp_path / "after-one"
    shutil.copytree(checkpoints / "step-0000001", after_one)
    main(dataclasses.replace(run, stop_after=2, resume=True), score_fn=even_token_share)
    after_two = tmp_path / "after-two"
    shutil.copytree(folder, after_two)  # the run as update 2's checkpoint left it

    # killed after renaming the new checkpoint into place, before deleting the previous one
    shutil.copytree(after_one, checkpoints / "step-0000001")
    main(dataclasses.replace(run, stop_after=0, resume=True), score_fn=even_token_share)
    result = load_file(folder / "policy" / "model.safetensors")
    assert all(torch.equal(expected[k], result[k]) for k in expected)
    assert [c.name for c in checkpoints.iterdir()] == ["step-0000003"]

    # killed while writing the next checkpoint: a half-written folder beside the complete one
    shutil.rmtree(folder)
    shutil.copytree(after_two, folder)
    assert [c.name for c in checkpoints.iterdir()] == ["step-0000002"]
    partial = checkpoints / "step-0000003.partial"
    partial.mkdir()
    shutil.copy(partial.with_name("step-0000002") / "policy.safetensors", partial)
    main(dataclasses.replace(run, stop_after=0, resume=True), score_fn=even_token_share)
    result = load_file(folder / "policy" / "model.safetensors")
    assert all(torch.equal(expected[k], result[k]) for k in expected)


@pytest.mark.slow  # one two-process launch of three runs: ~40 s on a quiet machine
def test_two_processes_each_resume_their_own_sampling_rng(tiny_runs, tmp_path):
    """Two CPU processes (torchrun, gloo): each saves its own RNG, and a resumed run ends with the
    weights of the uninterrupted one (restoring rank 0's state on both ranks makes them sample the
    same replies after the resume, and the weights differ). The three runs (uninterrupted,
    stopped after one update, resumed) share one launch: each seeds its own generators."""
    from tests.launched import two_processes
    from training import run

    flags = dict(
        policy=tiny_runs / "sft",
        reward_model=tiny_runs / "rm",
        total_episodes=24,
        batch_size=8,
        num_mini_batches=2,
        num_ppo_epochs=2,
        learning_rate=1e-2,
        query_length=24,
        response_length=6,
        eval_prompts=4,
        reward_norm_samples=8,
        num_samples_shown=0,
        save_every=1,
    )
    common = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
    runs = [
        [f"--output-dir={tmp_path / 'whole'}"],
        [f"--output-dir={tmp_path / 'halves'}", "--stop-after=1"],
        [f"--output-dir={tmp_path / 'halves'}", "--resume"],
    ]
    command = ["tests/launched.py", "training.ppo"]
    for number, extra in enumerate(runs):
        command += ["--then"] * bool(number) + common + extra
    done = two_processes(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'run 1: {"stopped_after": 1,' in done.stdout, done.stdout
    # the resume deleted step 1's checkpoint once it saved the next: the last one holds the
    # ranks' RNG as every checkpoint does
    checkpoint = run.latest_checkpoint(tmp_path / "halves")
    ranks = [load_file(checkpoint / f"rng-rank{rank:03d}.safetensors") for rank in (0, 1)]
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])
    a = load_file(tmp_path / "whole" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "halves" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "whole" / "settings.json").read_text())["processes"] == 2


def test_a_release_with_train_and_test_trains_on_train_and_says_so(tiny_runs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hhdata.schema import PAIR_SCHEMA

    rows = [
        dict(row, split="train" if i < 200 else "test") for i, row in enumerate(load_rows()[:300])
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), tmp_path / "pairs.parquet")
    settings = dict(SMALL, total_episodes=32, batch_size=16, eval_prompts=8, num_samples_shown=8)
    args = Args(
        policy=str(tiny_runs / "sft"),
        data=str(tmp_path / "pairs.parquet"),
        output_dir=str(tmp_path / "ppo"),
        **settings,
    )
    evaluation = main(args, score_fn=even_token_share)["evaluation"]
    assert (
        "ppo: training on split 'train' (200 rows); 8 held-out prompts" in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "ppo" / "settings.json").read_text())["split"] == "train"
    test_prompts = {row["prompt"][-1]["content"] for row in rows[200:]}
    assert all(
        sample["prompt"] in test_prompts for sample in evaluation["samples"]
    )  # held out from the test split
