"""SFT: the loss covers the assistant's words only, and it goes down."""

from __future__ import annotations

import json

import pytest
import torch

from training import models
from training.common import load_pairs
from training.sft import IGNORE_INDEX, Args, collate, encode_example, encode_prompt, main


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
        # every labelled token is the assistant's; byte-level BPE may merge a word's leading space into it
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
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_sft_loss_goes_down_and_the_run_is_saved(tmp_path, rows, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    args = Args(
        model="tiny", tokenizer=str(tmp_path / "tok"), output_dir=str(tmp_path / "sft"),
        learning_rate=3e-3, batch_size=8, max_steps=40, max_length=96, eval_rows=32,
    )
    metrics = main(args)
    losses = metrics["train_loss"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5
    saved = tmp_path / "sft"
    assert json.loads((saved / "metrics.json").read_text())["eval_loss_after"] == metrics["eval_loss_after"]
    assert json.loads((saved / "args.json").read_text())["args"]["max_steps"] == 40
    loaded = models.load_causal_lm(str(saved), models.load_tokenizer(str(saved)))
    assert loaded.config.vocab_size == len(tokenizer)
    assert (saved / "model.safetensors").is_file()
