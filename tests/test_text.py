"""training.text: the tokens around a conversation, computed once per tokenizer (TextFormat),
give exactly the ids that computing them for every row gave."""

from __future__ import annotations

import pytest

from training import models
from training.common import load_pairs
from training.text import (
    compute_text_format,
    encode_example,
    encode_pair,
    render,
    reward_text,
    text_format,
    truncate_pair,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def rows():
    return load_pairs(None)[0]["test"][:40]


def tiny_tokenizer(rows, chatml: bool):
    """The tiny tokenizer (HH chat template), or made ChatML as SmolLM2's (`<|im_end|>` ends
    turns: the template writes the end-of-turn token, so replies are cut before it)."""
    texts = [t for r in rows for t in (r["chosen_text"], r["rejected_text"])]
    tokenizer = models.train_tiny_tokenizer(texts, vocab_size=512)
    if chatml:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}
        )
        tokenizer.bos_token, tokenizer.eos_token = "<|im_start|>", "<|im_end|>"
        tokenizer.chat_template = CHATML
    return tokenizer


def encode_pair_from_scratch(tokenizer, row, max_length, chat):
    """encode_pair as it was before TextFormat: the format computed again for every reply."""
    replies = []
    for reply in (row["chosen"], row["rejected"]):
        prompt_text, reply_text = render(tokenizer, row["prompt"], reply, chat)
        end_token = compute_text_format(tokenizer, chat).template_end_token
        if end_token is not None:
            reply_text = reply_text[: reply_text.rfind(end_token)]
        replies.append(tokenizer(reply_text, add_special_tokens=False)["input_ids"])
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    form = compute_text_format(tokenizer, chat)
    start = [] if form.start_id is None or prompt[:1] == [form.start_id] else [form.start_id]
    return truncate_pair(start, prompt, replies, form.end_id, max_length)


@pytest.mark.parametrize("kind", ["plain", "hh-template", "chatml"])
def test_cached_format_gives_the_ids_of_computing_it_for_every_row(kind, rows):
    tokenizer = tiny_tokenizer(rows, chatml=kind == "chatml")
    chat = kind != "plain"
    assert text_format(tokenizer, chat) is text_format(tokenizer, chat)  # computed once
    assert text_format(tokenizer, chat) == compute_text_format(tokenizer, chat)
    for row in rows:
        for max_length in (32, 1024):
            expected = encode_pair_from_scratch(tokenizer, row, max_length, chat)
            assert encode_pair(tokenizer, row, max_length, chat) == expected
    if kind == "chatml":  # the template's end token closes replies, and what follows is cut
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert text_format(tokenizer, chat).template_end == end
        example = encode_example(tokenizer, rows[0], 1024, chat)
        assert (
            example["input_ids"][-1] == end
            and example["input_ids"].count(end) == len(rows[0]["prompt"]) + 1
        )  # one per prompt turn, one closing the reply (no newline after it)
        assert reward_text(tokenizer, rows[0]["prompt"], rows[0]["chosen"], chat).endswith(
            "<|im_end|>"
        )


def test_a_tokenizer_changed_in_place_is_prepared_again(rows):
    tokenizer = tiny_tokenizer(rows, chatml=False)
    assert text_format(tokenizer, True).end_id == tokenizer.eos_token_id  # "</s>"
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text_format(tokenizer, True).end_id == im_end
    assert text_format(tokenizer, False).end_id == tokenizer.eos_token_id  # plain text: no template
