"""hhdata.dedup.degenerate: each reason code on a pair built to have it, and the policy."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.dedup import DedupSettings, deduplicate, degenerate
from hhdata.schema import PAIR_SCHEMA, pair_id

PROMPT = [{"role": "user", "content": "How do I bake bread?"}]
PROMPT_TEXT = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def row(
    prompt=PROMPT,
    chosen="Mix flour, water, yeast and salt.",
    rejected="No idea.",
    chosen_text=None,
    rejected_text=None,
) -> dict:
    prefix = (
        "".join(
            f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in prompt
        )
        + "\n\nAssistant:"
    )
    chosen_text = prefix + " " + chosen if chosen_text is None else chosen_text
    rejected_text = prefix + " " + rejected if rejected_text is None else rejected_text
    return {
        "id": pair_id(chosen_text, rejected_text),
        "subset": "helpful-base",
        "family": "helpful",
        "split": "train",
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_text": chosen_text,
        "rejected_text": rejected_text,
        "flags": [],
    }


CASES = {
    "regular": (row(), []),
    "identical_replies": (
        row(chosen="Sure, here  you go.", rejected="sure, here you go. "),
        ["identical_replies"],
    ),
    "empty_chosen": (row(chosen=" "), ["empty_reply"]),
    "empty_rejected": (row(rejected="", rejected_text=PROMPT_TEXT), ["empty_reply"]),
    "both_empty": (row(chosen="", rejected=""), ["identical_replies", "empty_reply"]),
    "prompt_disagrees": (
        row(rejected_text="\n\nHuman: How do I bake cake?\n\nAssistant: No idea."),
        ["prompt_disagrees"],
    ),
    "reply_disagrees": (
        row(chosen_text=PROMPT_TEXT + " Something else entirely."),
        ["prompt_disagrees"],
    ),
    "two_users": (
        row(prompt=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]),
        ["non_alternating"],
    ),
    "starts_with_assistant": (
        row(prompt=[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Bread?"}]),
        ["non_alternating"],
    ),
    "ends_with_assistant": (
        row(prompt=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
        ["non_alternating"],
    ),
    "second_turn_in_reply": (row(chosen="Yes.\n\nAssistant: Also this."), ["non_alternating"]),
}


def table_of(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_reason_is_found(name):
    pair, expected = CASES[name]
    masks = degenerate.find_degenerate(table_of([pair]))
    assert [reason for reason, mask in masks.items() if mask[0]] == expected


def test_each_reason_is_found_when_replies_repeat():
    # every reply repeats, so each distinct reply is normalised once (normalized_forms)
    names = sorted(CASES) * 5
    masks = degenerate.find_degenerate(table_of([CASES[name][0] for name in names]))
    for i, name in enumerate(names):
        assert [reason for reason, mask in masks.items() if mask[i]] == CASES[name][1], name


def test_policy_drops_or_flags_per_reason():
    rows = [
        CASES[name][0] for name in ("regular", "identical_replies", "empty_chosen", "two_users")
    ]
    result = deduplicate(table_of(rows), DedupSettings(near=False))
    assert result.drops.select(["reason", "kept_id"]).to_pylist() == [
        {"reason": "identical_replies", "kept_id": None}
    ]
    flags = dict(zip(result.kept["id"].to_pylist(), result.kept["flags"].to_pylist()))
    assert flags == {
        rows[0]["id"]: [],
        rows[2]["id"]: ["empty_reply"],
        rows[3]["id"]: ["non_alternating"],
    }

    strict = DedupSettings(
        near=False, degenerate={"empty_reply": "drop", "identical_replies": "flag"}
    )
    result = deduplicate(table_of(rows), strict)
    assert result.drops["reason"].to_pylist() == ["empty_reply"]
    assert result.report["degenerate_found"]["identical_replies"] == 1


def test_a_row_with_two_dropping_reasons_is_logged_once_under_the_first():
    result = deduplicate(
        table_of([CASES["both_empty"][0]]), DedupSettings(degenerate={"empty_reply": "drop"})
    )
    assert result.drops["reason"].to_pylist() == ["identical_replies"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Hello\n\nWORLD ", "hello world"),
        ("a\tb\r\nc\x0bd\x0ce\u00a0f", "a b c d e f"),
        ("Cafe\u0301", "café"),
        ("\u212b", "\u00e5"),  # the Angstrom sign becomes å under NFC, then lower case
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert degenerate.normalize(pa.array([text])).to_pylist() == [expected]


def test_normalize_switches_are_independent():
    texts = pa.array(["Cafe\u0301  X"])
    assert degenerate.normalize(texts, nfc=False, lowercase=False).to_pylist() == ["Cafe\u0301 X"]
    assert degenerate.normalize(texts, whitespace=False).to_pylist() == ["café  x"]


ALPHABET = (
    "aB \t\n\r\x0b\x0c\u00a0eE\u0301\u0308\u00e9\u00c5\u212b\u2126\u1100\u1161\u11a8\uac00\u2019x"
)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.text(alphabet=ALPHABET, max_size=12), min_size=1, max_size=8))
def test_normalize_agrees_with_plain_python(texts):
    expected = [
        " ".join(
            w
            for w in re.split("[ \t\n\r\x0b\x0c\u00a0]+", unicodedata.normalize("NFC", t).lower())
            if w
        )
        for t in texts
    ]
    assert degenerate.normalize(pa.array(texts)).to_pylist() == expected
