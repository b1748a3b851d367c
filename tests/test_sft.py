"""SFT: the loss covers the assistant's words only, and it goes down."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from training import models
from training.common import UsageError, load_pairs, prompt_key
from training.sft import Args, collate, held_out_split, main, rank_batch
from training.text import IGNORE_INDEX, encode_example, encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def rows():
    return load_pairs(None)[0]["test"]


@pytest.fixture(scope="module")
def tokenizer(rows):
    return models.train_tiny_tokenizer([row["chosen_text"] for row in rows[:400]], vocab_size=512)


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_turns(rows, tokenizer):
    multi_turn = [row for row in rows if any(turn["role"] == "assistant" for turn in row["prompt"])]
    assert multi_turn, "the bundled sample has multi-turn conversations"
    for row in multi_turn[:20]:
        example = encode_example(tokenizer, row, max_length=10_000, chat=False)
        assert len(example["input_ids"]) == len(example["labels"])
        words = [turn["content"] for turn in row["prompt"] if turn["role"] == "assistant"]
        expected = "".join(words) + " " + row["chosen"][0]["content"] + tokenizer.eos_token
        # every labelled token is the assistant's; byte-level BPE may merge a word's leading space
        # into it
        assert labelled_text(tokenizer, example).replace(" ", "") == expected.replace(" ", "")
        for turn in row["prompt"]:
            if turn["role"] == "user" and len(turn["content"]) > 20:
                assert turn["content"] not in labelled_text(tokenizer, example)
        labelled = [i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX]
        assert all(example["labels"][i] == example["input_ids"][i] for i in labelled)
        assert example["labels"][-1] == tokenizer.eos_token_id


def test_prompt_ids_are_the_start_of_the_example(rows, tokenizer):
    row = rows[0]
    prompt_ids, prompt_labels = encode_prompt(tokenizer, row["prompt"], chat=False)
    example = encode_example(tokenizer, row, max_length=10_000, chat=False)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids, skip_special_tokens=True).endswith("\n\nAssistant:")


def test_long_examples_keep_their_end(rows, tokenizer):
    row = max(rows[:200], key=lambda r: len(r["chosen_text"]))
    example = encode_example(tokenizer, row, max_length=32, chat=False)
    assert len(example["input_ids"]) == 32
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_collate_masks_padding():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_sft_loss_goes_down_and_the_run_is_saved(tmp_path, rows, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    args = Args(
        model="tiny",
        tokenizer=str(tmp_path / "tok"),
        output_dir=str(tmp_path / "sft"),
        learning_rate=3e-3,
        batch_size=8,
        max_steps=40,
        max_length=96,
        eval_rows=32,
    )
    metrics = main(args)
    losses = metrics["train_loss"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5
    saved = tmp_path / "sft"
    assert (
        json.loads((saved / "metrics.json").read_text())["eval_loss_after"]
        == metrics["eval_loss_after"]
    )
    assert json.loads((saved / "args.json").read_text())["args"]["max_steps"] == 40
    loaded = models.load_causal_lm(str(saved), models.load_tokenizer(str(saved)))
    assert loaded.config.vocab_size == len(tokenizer)
    assert (saved / "model.safetensors").is_file()


# ---- splits: train on `train`, never on a held-out prompt ----------------------------------


def write_pairs(path, rows, splits):
    """A .parquet of pair rows, row i relabelled to split splits[i % len(splits)]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [{**row, "split": splits[i % len(splits)]} for i, row in enumerate(rows)]
        ),
        path,
    )
    return str(path)


def tiny_args(tmp_path, tokenizer, **changes) -> Args:
    tokenizer.save_pretrained(tmp_path / "tok")
    settings = dict(
        model="tiny",
        tokenizer=str(tmp_path / "tok"),
        output_dir=str(tmp_path / "sft"),
        batch_size=4,
        max_steps=2,
        max_length=48,
        eval_rows=4,
    )
    return Args(**{**settings, **changes})


def test_a_release_without_a_test_split_trains_on_train(tmp_path, rows, tokenizer):
    data = write_pairs(tmp_path / "train-only.parquet", rows[:24], ["train"])
    metrics = main(tiny_args(tmp_path, tokenizer, data=data))
    assert metrics["split"] == "train"
    assert json.loads((tmp_path / "sft" / "args.json").read_text())["split"] == "train"


def test_train_is_the_default_where_the_release_has_it(tmp_path, rows, tokenizer):
    data = write_pairs(tmp_path / "both.parquet", rows[:48], ["train", "test"])
    metrics = main(tiny_args(tmp_path, tokenizer, data=data))
    assert metrics["split"] == "train"
    assert metrics["train_rows"] + metrics["eval_rows"] == 24  # only the train half


def test_a_missing_split_is_a_usage_error(tmp_path, rows, tokenizer):
    data = write_pairs(tmp_path / "train-only.parquet", rows[:24], ["train"])
    with pytest.raises(UsageError, match=r"no split 'test' \(it has \['train'\]\); pass --split"):
        main(tiny_args(tmp_path, tokenizer, data=data, split="test"))


def test_held_out_prompts_are_never_trained_on(rows):
    # real collections compare several replies to one prompt: three rows per prompt here
    repeated = [{**row, "id": f"{row['id']}-{copy}"} for row in rows[:100] for copy in range(3)]
    train, held_out = held_out_split(repeated, eval_rows=30, seed=1)
    assert len(held_out) == 30
    assert not {prompt_key(row) for row in train} & {prompt_key(row) for row in held_out}
    assert len(train) + len(held_out) < len(
        repeated
    )  # the held-out prompts' other rows left training


def test_rank_batches_are_disjoint_and_cover_each_epoch():
    for world in (1, 2, 4):
        for epoch in range(2):
            seen = [
                i
                for step in range(epoch * 5, epoch * 5 + 5)
                for rank in range(world)
                for i in rank_batch(step, 22, 4, seed=3, rank=rank, world=world)
            ]
            assert len(seen) == len(set(seen)) == 20  # 5 batches of 4; the tail of 2 waits


# two processes each train on their own half of every batch: tests/test_distributed.py


# ---- resume and TensorBoard -------------------------------------------------------------------


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, rows, tokenizer):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.parquet", rows[:60], ["train"])
    settings = dict(data=data, max_steps=6, save_every=2, learning_rate=3e-3)
    whole = main(tiny_args(tmp_path, tokenizer, output_dir=str(tmp_path / "whole"), **settings))
    broken = tiny_args(
        tmp_path, tokenizer, output_dir=str(tmp_path / "broken"), stop_after=3, **settings
    )
    assert main(broken) == {"stopped_after": 3}
    assert [c.name for c in (tmp_path / "broken" / "checkpoints").iterdir()] == ["step-0000003"]
    with pytest.raises(UsageError, match="already holds a run; pass --resume"):
        main(dataclasses.replace(broken, stop_after=0))
    with pytest.raises(UsageError, match=r"changed settings \['learning_rate'\]"):
        main(dataclasses.replace(broken, stop_after=0, resume=True, learning_rate=1e-3))
    resumed = main(dataclasses.replace(broken, stop_after=0, resume=True))
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["eval_loss_after"] == whole["eval_loss_after"]
    expected, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "broken" / "model.safetensors"),
    )
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [c.name for c in (tmp_path / "broken" / "checkpoints").iterdir()] == ["step-0000006"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "broken" / "tensorboard")).Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [event.step for event in events.Scalars("eval/loss")] == [0, 6]


@pytest.mark.parametrize("kind", ["plain", "hh-template", "chatml"])
def test_sft_examples_are_the_reward_models_tokens_closed_by_the_end_of_turn_token(
    rows, tokenizer, kind
):
    """SFT teaches the policy the end token PPO stops at and the reward model reads at.

    With the tiny tokenizer's HH chat template (which writes no end token) SFT once left the
    reply unclosed, so the policy never learned to stop; with ChatML it trained on the newline
    after `<|im_end|>`, which the reward model never sees.
    """
    from tests.test_reward_model import chatml_tokenizer
    from training.text import encode_pair, end_of_turn_id

    chat = kind != "plain"
    if kind == "chatml":
        tokenizer = chatml_tokenizer(rows)
    end = end_of_turn_id(tokenizer, chat)
    for row in rows[:50]:
        example = encode_example(tokenizer, row, 4096, chat)
        prompt, chosen, _ = encode_pair(tokenizer, row, 4096, chat)
        assert example["input_ids"] == prompt + chosen
        assert example["input_ids"][-1] == end and example["labels"][-1] == end
