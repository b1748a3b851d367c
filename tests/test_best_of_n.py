"""Best-of-N: the shared-prompt sampler against repeated queries, the reward-vs-N curve and
its KL column, and the written comparisons read back by hhdata's own reader."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import pytest
import torch

from hhdata.io.read import read_pairs
from hhdata.pairs.transcript import render_transcript
from training import models
from training.best_of_n import Args, best_of_n_kl, main, n_values, round_trips
from training.common import UsageError, load_pairs
from training.fast import sample
from training.reward_model import RewardModel, save_reward_model
from training.rollout import fit_query, left_pad
from training.text import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny random policy (standing in for an SFT run) and a reward model on its vocabulary,
    with the settings.json that says which prompts the reward model trained on."""
    root = tmp_path_factory.mktemp("runs")
    rows = load_pairs(None)[0]["test"][:300]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows], vocab_size=512)
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=3)
    policy.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    reward = RewardModel(models.load_backbone(models.TINY, tokenizer, seed=4))
    saved = {"max_length": 128, "chat_template": False, "base_model": "tiny"}
    save_reward_model(reward, tokenizer, root / "rm" / "model", saved)
    args = {"data": None, "eval_fraction": 0.2, "train_config": "all", "max_train_pairs": None}
    (root / "rm" / "settings.json").write_text(
        json.dumps({"args": args, "provenance": load_pairs(None)[1]})
    )
    return root


def test_shared_prompt_sampling_equals_sampling_repeated_queries(tiny_runs):
    """One prompt pass whose cache is repeated N times samples what N copies of the prompt
    would: the same tokens and log-probabilities from the same generator."""
    tokenizer = models.load_tokenizer(str(tiny_runs / "sft"))
    model = models.load_causal_lm(str(tiny_runs / "sft"), tokenizer).eval()
    rows = load_pairs(None)[0]["test"][:3]
    queries = [
        fit_query(encode_prompt(tokenizer, row["prompt"], False)[0], n, 1)
        for row, n in zip(rows, (9, 30, 17))
    ]
    ids, mask = left_pad(queries, tokenizer.pad_token_id)
    stop = tokenizer.eos_token_id
    shared, shared_logprobs = sample(
        model, ids, mask, 10, 1.0, stop, torch.Generator().manual_seed(0), copies=5
    )
    repeated, repeated_logprobs = sample(
        model,
        ids.repeat_interleave(5, 0),
        mask.repeat_interleave(5, 0),
        10,
        1.0,
        stop,
        torch.Generator().manual_seed(0),
    )
    assert shared.shape == (15, 10)
    assert torch.equal(shared, repeated)
    torch.testing.assert_close(shared_logprobs, repeated_logprobs, atol=1e-5, rtol=0)
    assert len({tuple(row) for row in shared[:5].tolist()}) > 1  # the copies differ


@pytest.fixture(scope="module")
def report(tiny_runs, tmp_path_factory):
    """One best-of-8 run on 12 held-out prompts, with a PPO run's held-out points beside it."""
    out = tmp_path_factory.mktemp("best-of-n")
    ppo = out / "ppo"
    ppo.mkdir()
    held_out = [{"kl": 0.0, "score": 0.1}, {"kl": 1.5, "score": 0.4}]
    (ppo / "metrics.json").write_text(json.dumps({"held_out": held_out}))
    (ppo / "settings.json").write_text(
        json.dumps({"args": {"reward_model": str(tiny_runs / "rm")}})
    )
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tiny_runs / "rm"),
        n="1,2,4,8",
        prompts=12,
        query_length=48,
        response_length=8,
        batch_size=4,
        ppo_run=str(ppo),
        output_dir=str(out / "run"),
    )
    return main(args), out / "run", args


def test_the_command_samples_the_same_with_and_without_sharing_the_prompt(report, tmp_path):
    """--no-share-prompt (N copies of each prompt, the plain path) gives the same replies and
    rewards as the shared prompt pass."""
    result, _, args = report
    plain = main(dataclasses.replace(args, share_prompt=False, output_dir=str(tmp_path)))
    assert plain["replies"] == result["replies"]
    torch.testing.assert_close(torch.tensor(plain["rewards"]), torch.tensor(result["rewards"]))


def test_best_reward_is_monotone_in_n_and_the_kl_column_is_the_formula(report):
    result, folder, _ = report
    curve = result["curve"]
    assert [point["n"] for point in curve] == [1, 2, 4, 8]
    rewards = torch.tensor(result["rewards"])  # shape: [prompts, 8]
    assert rewards.shape == (12, 8)
    means = [point["reward"]["mean"] for point in curve]
    assert all(a <= b for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0]  # eight random replies beat one
    for point in curve:  # nested samples: best of n is the best of the first n of the eight
        best = rewards[:, : point["n"]].max(1).values.mean().item()
        assert point["reward"]["mean"] == pytest.approx(best, abs=1e-6)
        assert point["kl"] == pytest.approx(math.log(point["n"]) - (point["n"] - 1) / point["n"])
        assert point["by_family"]["harmless"]["n"] == 12
    assert result["ppo"]["same_reward_model"] is True
    assert [p["kl"] for p in result["ppo"]["points"]] == [0.0, 1.5]
    table = (folder / "best_of_n.md").read_text()
    assert f"| 4 | {best_of_n_kl(4):.3f} | {means[2]:.3f} ±" in table
    assert (folder / "reward_vs_kl.png").stat().st_size > 0


def test_written_comparisons_validate_and_parse_back_byte_exactly(report):
    result, folder, _ = report
    [data] = result["data"]  # the bundled sample's prompts are all harmless: one subset
    assert data["subset"] == "harmless-best-of-8" and data["family"] == "harmless"
    path = folder / "data" / "harmless-best-of-8" / "train.jsonl.gz"
    assert data["path"] == str(path)
    records = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    sidecar = json.loads((path.parent / "train.provenance.json").read_text())
    assert len(records) == len(sidecar) == data["comparisons"] > 0
    assert data["comparisons"] + sum(result["skipped"].values()) == result["prompts"]
    read = read_pairs(path, family="harmless")  # what `hhdata validate` runs
    assert read.quarantine.num_rows == 0
    rows = read.table.to_pylist()
    assert [r["chosen_text"] for r in rows] == [r["chosen"] for r in records]
    assert [r["rejected_text"] for r in rows] == [r["rejected"] for r in records]
    rewards = torch.tensor(result["rewards"])
    sources = {row["id"]: row for row in load_pairs(None)[0]["test"]}
    for row, provenance in zip(rows, sidecar):
        assert row["subset"] == "harmless-best-of-8" and row["family"] == "harmless"
        assert row["prompt"] == sources[provenance["prompt_source_id"]]["prompt"]
        assert render_transcript(row["prompt"] + row["chosen"]) == row["chosen_text"]
        assert provenance["chosen_reward"] > provenance["rejected_reward"]
        assert provenance["method"] == "best-of-8" and provenance["rejected"] == "worst"
    for provenance in sidecar:  # the best against the worst of the usable replies
        prompt = result["prompt_ids"].index(provenance["prompt_source_id"])
        replies, scores = result["replies"][prompt], rewards[prompt].tolist()
        usable = [
            k
            for k, text in enumerate(replies)
            if round_trips(sources[provenance["prompt_source_id"]]["prompt"], text)
        ]
        assert provenance["chosen_sample"] == max(usable, key=scores.__getitem__)
        assert provenance["rejected_sample"] == min(usable, key=scores.__getitem__)
        assert provenance["chosen_reward"] == pytest.approx(
            scores[provenance["chosen_sample"]], abs=1e-6
        )


@pytest.mark.parametrize(
    "reply,ok",
    [
        ("Sure, here you go.", True),
        (" leading space kept", True),
        ("", False),
        ("   ", False),
        ("hi\n\nHuman: and another turn", False),
    ],
)
def test_only_replies_that_round_trip_become_data(reply, ok):
    prompt = [{"role": "user", "content": "Hi"}]
    assert round_trips(prompt, reply) is ok


def test_n_must_be_positive_integers():
    assert n_values("8, 1,2") == [1, 2, 8]
    for bad in ("0,2", "a", ""):
        with pytest.raises(UsageError, match="--n"):
            n_values(bad)


def test_each_family_gets_its_own_subset(tiny_runs, tmp_path, two_family_rows):
    """Helpful and harmless prompts give two subsets (a subset has one family), each read back
    with nothing quarantined; naming one subset for both is refused before any sampling."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hhdata.schema import PAIR_SCHEMA

    pairs = pa.Table.from_pylist(two_family_rows(40), schema=PAIR_SCHEMA)  # tests/conftest.py
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    args = Args(
        policy=str(tiny_runs / "sft"),
        reward_model=str(tiny_runs / "rm"),
        data=str(tmp_path / "pairs.parquet"),
        n="1,4",
        prompts=12,
        query_length=48,
        response_length=6,
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(UsageError, match=r"--subset mine: the prompts hold families"):
        main(dataclasses.replace(args, subset="mine"))
    assert not (tmp_path / "run").exists()
    result = main(args)
    parts = {part["family"]: part for part in result["data"]}
    assert sorted(parts) == ["harmless", "helpful"]
    for family, part in parts.items():
        assert part["subset"] == f"{family}-best-of-4" and part["comparisons"] > 0
        read = read_pairs(part["path"], family=family)
        assert read.quarantine.num_rows == 0 and read.table.num_rows == part["comparisons"]
        assert set(read.table.column("family").to_pylist()) == {family}
    assert set(result["curve"][0]["by_family"]) == {"harmless", "helpful"}


def test_precision_bf16_samples_and_scores_under_bf16_autocast(report, tmp_path):
    """--precision bf16: the recorded rewards are the reward model's bf16-autocast scores of the
    replies (not its fp32 ones, which they stay close to), and the settings say bf16."""
    from training.ppo_eval import make_judge

    _, _, args = report
    args = dataclasses.replace(args, n="1,4", prompts=4, ppo_run=None, precision="bf16")
    result = main(dataclasses.replace(args, output_dir=str(tmp_path)))
    assert result["settings"]["args"]["precision"] == "bf16"
    rows = {row["id"]: row for row in load_pairs(None)[0]["test"]}
    rows = [rows[i] for i in result["prompt_ids"] for _ in range(4)]
    texts = [text for replies in result["replies"] for text in replies]
    judge = make_judge(args.reward_model, 16)
    recorded = torch.tensor(result["rewards"]).flatten()
    with models.cpu_autocast("bf16"):
        torch.testing.assert_close(judge(rows, texts), recorded)
    fp32 = judge(rows, texts)
    assert not torch.equal(fp32, recorded)
    torch.testing.assert_close(fp32, recorded, atol=0.1, rtol=0.05)
