"""Rows strict chat templates accept (hhdata.pairs.roles): checked by rendering with a real
strict template."""

from __future__ import annotations

import jinja2
import pytest

import hhdata
from hhdata.pairs.roles import (
    accepts_strict_template,
    keep_strict_rows,
    strict_counts,
    strict_role_reasons,
)
from training.models import train_tiny_tokenizer

# Llama-2-chat's template in shape: it raises as soon as the roles stop alternating from the user.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The bundled split's pairs with two Assistant turns in a row inside the prompt.
NOT_ALTERNATING = {667, 763, 1319, 1849}
EMPTY_REPLY = {86, 516, 925, 1103}


@pytest.fixture(scope="module")
def sample():
    return hhdata.load(split="test")


@pytest.fixture(scope="module")
def tokenizer(sample):
    tokenizer = train_tiny_tokenizer(sample["chosen_text"][:200], vocab_size=300)
    tokenizer.chat_template = STRICT_TEMPLATE
    return tokenizer


def render_errors(tokenizer, rows) -> dict[int, str]:
    """Row index -> the template's error, for every conversation that does not render."""
    errors = {}
    for index, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            try:
                tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            except jinja2.TemplateError as error:
                errors[index] = str(error)
    return errors


def test_the_strict_template_refuses_exactly_the_four_non_alternating_rows(sample, tokenizer):
    errors = render_errors(tokenizer, sample)
    assert set(errors) == NOT_ALTERNATING
    assert all("Conversation roles must alternate" in message for message in errors.values())


def test_strict_roles_keeps_only_rows_that_render_and_counts_the_rest(sample, tokenizer):
    strict = hhdata.load(split="test", strict_roles=True)
    assert strict.num_rows == 2312 - 8
    assert render_errors(tokenizer, strict) == {}
    assert all(
        turn["content"].strip()
        for side in ("chosen", "rejected")
        for row in strict[side]
        for turn in row
    )
    left_out = set(sample["id"]) - set(strict["id"])
    assert left_out == {sample[i]["id"] for i in NOT_ALTERNATING | EMPTY_REPLY}
    assert strict_counts(sample.data.table) == {"roles_not_alternating": 4, "empty_reply": 4}
    reasons = strict_role_reasons(sample.data.table)
    assert {i for i, r in enumerate(reasons) if r == "roles_not_alternating"} == NOT_ALTERNATING
    assert {i for i, r in enumerate(reasons) if r == "empty_reply"} == EMPTY_REPLY


def test_the_plain_datasets_predicate_agrees_with_the_vectorised_check(sample):
    kept = sample.filter(accepts_strict_template)
    assert kept["id"] == keep_strict_rows(sample.data.table)["id"].to_pylist()
    sliced = sample.data.table.slice(700, 1200)  # offsets of a slice do not start at 0
    assert strict_role_reasons(sliced) == strict_role_reasons(sample.data.table)[700:1900]


def test_strict_roles_applies_to_every_split_of_a_dataset_dict():
    loaded = hhdata.load(strict_roles=True)
    assert list(loaded) == ["test"] and loaded["test"].num_rows == 2304


@pytest.mark.parametrize(
    "roles, ok",
    [
        (["user", "assistant"], True),
        (["user", "assistant", "user", "assistant"], True),
        (["assistant", "user", "assistant"], False),  # starts with the assistant
        (["user", "user", "assistant"], False),
        (["user", "assistant", "assistant"], False),
        (["assistant"], False),  # no prompt
    ],
)
def test_role_orders(roles, ok):
    import pyarrow as pa

    from hhdata.schema import PAIR_SCHEMA

    turns = [{"role": role, "content": "x"} for role in roles]
    row = {"prompt": turns[:-1], "chosen": turns[-1:], "rejected": turns[-1:]}
    assert accepts_strict_template(row) is ok
    table = pa.Table.from_pylist([row], schema=pa.schema([PAIR_SCHEMA.field(n) for n in row]))
    assert (strict_role_reasons(table) == [None]) is ok


def test_keep_strict_sees_the_rows_of_a_selected_dataset(sample):
    from hhdata.pairs.roles import keep_strict

    picked = sample.select([667, 0, 763, 1, 86])  # an indices mapping over the full table
    assert keep_strict(picked)["id"] == [sample[0]["id"], sample[1]["id"]]
