"""The reward-model trainer: prefix sharing is exact, it learns, and resume changes nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from hhdata.errors import HhDataError
from hhdata.schema import PAIR_SCHEMA, pair_id
from hhdata.transcript import render_transcript
from training import models
from training.common import sha256_file
from training.reward_model import (
    Args,
    RewardModel,
    accumulate_pair_loss,
    encode_pair,
    length_groups,
    load_reward_model,
    main,
    naive_batch,
    packed_batch,
    pair_length,
    pair_rewards,
    preference_loss,
    reliability,
    render,
    score,
    summarize,
)

WORDS = "the a cat dog tree house river blue green quick slow happy sad run jump sing read".split()
MARKER = "certainly"


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HHDATA_CACHE", str(tmp_path / "hhdata"))


def synthetic_rows(count: int, seed: int) -> list[dict]:
    """Easy preference: the chosen reply always carries the marker word, the rejected never."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        prompt = [{"role": "user", "content": words(rng.randint(4, 30))}]
        if rng.random() < 0.3:
            prompt += [{"role": "assistant", "content": words(5)}, {"role": "user", "content": words(6)}]
        reply = words(rng.randint(3, 12)).split()
        chosen = " ".join(reply[: len(reply) // 2] + [MARKER] + reply[len(reply) // 2 :])
        rejected = words(rng.randint(3, 12))
        subset = "synth-helpful-base" if index % 2 else "synth-harmless-base"
        chosen_text = render_transcript(prompt + [{"role": "assistant", "content": chosen}])
        rejected_text = render_transcript(prompt + [{"role": "assistant", "content": rejected}])
        rows.append(
            {
                "id": pair_id(chosen_text, rejected_text),
                "subset": subset,
                "family": subset.split("-")[1],
                "split": "test" if index % 5 == 0 else "train",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "chosen_text": chosen_text,
                "rejected_text": rejected_text,
                "flags": [],
            }
        )
    return rows


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic_rows(500, seed=0), schema=PAIR_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory):
    """The same pairs as a real release (raw JSONL -> hhdata pipeline -> release 1.0.0)."""
    from hhdata.pipeline import build_release

    raw = tmp_path_factory.mktemp("raw")
    for row in synthetic_rows(500, seed=0):
        path = raw / row["subset"] / f"{row['split']}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps({"chosen": row["chosen_text"], "rejected": row["rejected_text"]}) + "\n")
    out = tmp_path_factory.mktemp("releases")
    subsets = ["synth-helpful-base", "synth-harmless-base"]
    return build_release(raw, version="1.0.0", out=out, include_synthetic=subsets).path


def tiny_reward_model(rows, seed=0):
    texts = [t for r in rows for t in (r["chosen_text"], r["rejected_text"])]
    tokenizer = models.load_tokenizer(models.TINY, texts=texts)
    return RewardModel(models.load_backbone(models.TINY, tokenizer, seed=seed)), tokenizer


def loss_and_grads(model, pairs, pad_id, share_prefix):
    model.zero_grad()
    chosen, rejected = pair_rewards(model, pairs, pad_id, share_prefix, "cpu")
    loss = preference_loss(chosen, rejected)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return chosen.detach(), rejected.detach(), loss.detach(), grads


def test_prefix_sharing_equals_two_sequences_in_loss_and_gradients():
    rows = synthetic_rows(12, seed=1)
    model, tokenizer = tiny_reward_model(rows)
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    assert len({len(p) + len(c) + len(r) for p, c, r in pairs}) > 1  # padding is exercised
    packed = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=True)
    naive = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=False)
    for shared, separate in zip(packed[:3], naive[:3]):
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    assert packed[2] > 0.1  # a real loss, not a degenerate zero
    for name, grad in naive[3].items():
        assert grad.abs().sum() > 0 or "embed" in name, name
        torch.testing.assert_close(packed[3][name], grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_micro_batches_by_length_give_the_batch_gradient(share_prefix):
    """Cut into length-sorted micro-batches, the accumulated loss, rewards and gradient are
    those of the whole padded batch (micro_batch_cost)."""
    rows = synthetic_rows(12, seed=2)
    model, tokenizer = tiny_reward_model(rows)
    pairs = [encode_pair(tokenizer, row, 64, chat=False) for row in rows]
    whole = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix)
    lengths = [pair_length(pair, share_prefix) for pair in pairs]
    groups = length_groups(lengths, cost=8)
    assert 1 < len(groups) < len(pairs)  # a real cut, not one group and not singletons
    assert sorted(i for group in groups for i in group) == list(range(len(pairs)))
    assert [max(lengths[i] for i in g) for g in groups] == sorted(max(lengths[i] for i in g) for g in groups)
    model.zero_grad()
    chosen, rejected, loss = accumulate_pair_loss(model, pairs, tokenizer.pad_token_id, share_prefix, "cpu", cost=8)
    for got, expected in zip((chosen, rejected, loss), whole[:3]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[3][name], atol=1e-5, rtol=0, msg=name)


def test_length_groups_cut_where_padding_costs_more_than_a_pass():
    assert length_groups([500, 20, 30, 480], cost=64) == [[1, 2], [3, 0]]
    assert length_groups([500, 20, 30, 480], cost=-1) == [[1, 2, 3, 0]]
    assert length_groups([100, 100, 100], cost=0) == [[0, 1, 2]]  # nothing to save
    assert length_groups([5, 400], cost=10_000) == [[0, 1]]  # a pass costs more than the padding


def test_packed_sequence_positions_and_mask():
    batch = packed_batch([([1, 2], [3], [4, 5]), ([6], [7, 8], [9])], pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 1, 0]
    assert batch["read_at"].tolist() == [[2, 4], [2, 3]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[3].tolist() == [True, True, False, True, False]  # rejected skips chosen
    assert allowed[2].tolist() == [True, True, True, False, False]
    assert (batch["attention_mask"][1, 0, 4] == 0).tolist() == [False] * 4 + [True]  # pad


def test_prefix_sharing_is_not_exact_for_an_encoder_so_it_is_refused(tmp_path, synthetic_file):
    rows = synthetic_rows(6, seed=2)
    tokenizer = models.load_tokenizer(models.MINILM)
    model = RewardModel(models.load_backbone(models.MINILM, tokenizer)).eval()
    assert models.is_encoder(model.backbone.config)
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    with torch.no_grad():
        shared = model(**packed_batch(pairs, tokenizer.pad_token_id))
        separate = pair_rewards(model, pairs, tokenizer.pad_token_id, False, "cpu")
    # the prompt attends to its reply in an encoder, so one shared prompt cannot serve both
    assert (shared[:, 0] - separate[0]).abs().max() > 1e-2
    with pytest.raises(HhDataError, match="bidirectional encoder.*--prefix-sharing off"):
        pair_rewards(model, pairs, tokenizer.pad_token_id, True, "cpu")
    with pytest.raises(HhDataError, match="bidirectional encoder"):
        main(Args(data=str(synthetic_file), model=models.MINILM, prefix_sharing="on", run_dir=str(tmp_path / "run"), max_steps=1))


def test_transcript_rendering_and_truncation_keep_reply_ends():
    rows = synthetic_rows(3, seed=3)
    prompt_text, reply_text = render(None, rows[0]["prompt"], rows[0]["chosen"], chat=False)
    assert prompt_text + reply_text == rows[0]["chosen_text"]
    _, tokenizer = tiny_reward_model(rows)
    prompt, chosen, rejected = encode_pair(tokenizer, rows[0], 12, chat=False)
    assert len(prompt) + max(len(chosen), len(rejected)) <= 12
    assert prompt[0] == tokenizer.bos_token_id
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id


def test_calibration_metrics_by_hand():
    margins = torch.tensor([4.0, 4.0, -4.0, 0.2])
    stats = summarize(margins, bins=5)
    assert stats["accuracy"] == 0.75
    assert stats["mean_margin"] == pytest.approx(1.05)
    ece, table = reliability(margins, bins=5)
    top = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).item()
    low = torch.sigmoid(torch.tensor(0.2, dtype=torch.float64)).item()
    assert [row["pairs"] for row in table] == [1, 3]
    assert table[1]["accuracy"] == pytest.approx(2 / 3)
    assert ece == pytest.approx(0.25 * abs(1 - low) + 0.75 * abs(2 / 3 - top))


def test_tiny_model_learns_the_marker_per_family_from_a_release(tmp_path, synthetic_release):
    run_dir = tmp_path / "run"
    args = Args(data=str(synthetic_release), run_dir=str(run_dir), max_length=64, batch_size=16, epochs=2, learning_rate=3e-3, save_every=1000)
    metrics = main(args)
    assert metrics["overall"]["accuracy"] > 0.9, metrics["overall"]
    assert set(metrics["by_family"]) == {"helpful", "harmless"}
    assert set(metrics["by_subset"]) == {"synth-helpful-base", "synth-harmless-base"}
    assert metrics["overall"]["mean_margin"] > 1
    log = [json.loads(line) for line in (run_dir / "checkpoints/step-0000050/train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    for name in ("metrics.json", "settings.json", "reliability.png", "margins.png", "loss.png", "model/README.md", "model/model.safetensors", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir())
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["share_prefix"] is True and settings["train_pairs"] == 400
    assert settings["provenance"]["version"] == "1.0.0"
    assert settings["provenance"]["manifest_sha256"] == sha256_file(synthetic_release / "manifest.json")
    assert "| family helpful |" in (run_dir / "model/README.md").read_text()

    model, tokenizer, saved = load_reward_model(run_dir)
    rows = [r for r in synthetic_rows(500, seed=0) if r["split"] == "test"][:20]
    chosen = score(model, tokenizer, saved, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score(model, tokenizer, saved, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean() > 0.9


def test_train_config_filters_training_but_evaluation_covers_every_family(tmp_path, synthetic_file):
    args = Args(data=str(synthetic_file), run_dir=str(tmp_path / "run"), train_config="helpful", max_length=48, max_steps=2, batch_size=8, max_eval_pairs=30)
    metrics = main(args)
    settings = json.loads((tmp_path / "run/settings.json").read_text())
    assert settings["train_pairs"] == 200
    assert settings["provenance"]["sha256"] == sha256_file(synthetic_file)
    assert set(metrics["by_family"]) == {"helpful", "harmless"}
    with pytest.raises(HhDataError, match="already holds a run"):
        main(args)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, synthetic_file):
    base = Args(data=str(synthetic_file), max_length=48, batch_size=8, max_steps=6, save_every=2, max_eval_pairs=40, learning_rate=3e-3)
    whole = main(replace(base, run_dir=str(tmp_path / "whole")))
    assert main(replace(base, run_dir=str(tmp_path / "cut"), stop_after=3)) == {"stopped_after": 3}
    assert not (tmp_path / "cut/metrics.json").exists()
    with pytest.raises(HhDataError, match="changed settings"):
        main(replace(base, run_dir=str(tmp_path / "cut"), resume=True, seed=2))
    resumed = main(replace(base, run_dir=str(tmp_path / "cut"), resume=True))
    for key in ("overall", "by_family", "by_subset"):
        assert resumed[key] == whole[key]
    final_whole = load_file(tmp_path / "whole/checkpoints/step-0000006/model.safetensors")
    final_cut = load_file(tmp_path / "cut/checkpoints/step-0000006/model.safetensors")
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_cut[name]), name
    assert (tmp_path / "whole/checkpoints/step-0000006/train_log.jsonl").read_text().count("\n") == 6
    losses = lambda run: [json.loads(l)["loss"] for l in (tmp_path / run / "checkpoints/step-0000006/train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("whole") == losses("cut")


def test_help_lists_every_setting_with_its_docstring():
    result = subprocess.run([sys.executable, "-m", "training.reward_model", "--help"], capture_output=True, text=True, check=True)
    assert "--prefix-sharing {auto,on,off}" in result.stdout
    assert "pairs per optimizer step, over all processes" in result.stdout
    assert "--no-chat-template" in result.stdout
