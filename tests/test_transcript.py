"""The reference transcript rules, on all 4,624 real transcripts and with Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.errors import PairError, TranscriptError
from hhdata.pairs.transcript import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    parse_transcript,
    prompt_end,
    render_transcript,
    split_pair,
)


def test_round_trip_is_byte_exact_on_every_real_transcript(sample_records):
    texts = [record[side] for record in sample_records for side in ("chosen", "rejected")]
    assert len(texts) == 4624
    for text in texts:
        turns = parse_transcript(text)
        assert render_transcript(turns).encode("utf-8") == text.encode("utf-8")
        assert {turn["role"] for turn in turns} <= {"user", "assistant"}


def shared_prefix_prompt(chosen: str, rejected: str) -> str:
    """The DESIGN.md rule written out character by character, independent of the module."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    prefix = chosen[:common]
    last_human = prefix.rindex(HUMAN_TAG)
    return prefix[: prefix.index(ASSISTANT_TAG, last_human) + len(ASSISTANT_TAG)]


def test_prompt_split_follows_the_shared_prefix_rule_on_every_real_pair(sample_records):
    last_tag_disagrees = 0
    for record in sample_records:
        chosen, rejected = record["chosen"], record["rejected"]
        pair = split_pair(chosen, rejected)
        prompt_text = shared_prefix_prompt(chosen, rejected)
        assert render_transcript(pair.prompt) + ASSISTANT_TAG == prompt_text
        assert prompt_text + " " + pair.chosen[0]["content"] == chosen or (
            prompt_text + pair.chosen[0]["content"] == chosen
        )
        assert chosen.endswith(pair.chosen[0]["content"]) and rejected.endswith(
            pair.rejected[0]["content"]
        )
        naive = max(chosen.rfind(ASSISTANT_TAG), rejected.rfind(ASSISTANT_TAG))
        if naive + len(ASSISTANT_TAG) != len(prompt_text):
            last_tag_disagrees += 1
    # the pairs whose reply itself holds an Assistant tag: splitting at the last tag breaks them
    assert last_tag_disagrees == 5


def test_a_reply_holding_an_assistant_tag_stays_whole():
    prompt = "\n\nHuman: Tell me a story\n\nAssistant:"
    chosen = prompt + " Once upon a time.\n\nAssistant: The end."
    rejected = prompt + " No."
    pair = split_pair(chosen, rejected)
    assert pair.prompt == [{"role": "user", "content": "Tell me a story"}]
    assert pair.chosen == [
        {"role": "assistant", "content": "Once upon a time.\n\nAssistant: The end."}
    ]
    assert pair.flags == ["consecutive_assistant"]


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nAssistant: hi", "\n\nAssistant: ho", "no_human_turn"),
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x", "prompt_mismatch"),
        (
            "\n\nHuman: a\n\nAssistant: x\n\nHuman: more",
            "\n\nHuman: a\n\nAssistant: y",
            "prompt_mismatch",
        ),
        (
            "preface\n\nHuman: a\n\nAssistant: x",
            "preface\n\nHuman: a\n\nAssistant: y",
            "bad_transcript_start",
        ),
    ],
)
def test_a_pair_without_a_determinable_prompt_raises_with_its_reason(chosen, rejected, reason):
    with pytest.raises(PairError) as raised:
        split_pair(chosen, rejected)
    assert raised.value.reason == reason


def test_parse_rejects_text_without_a_leading_separator():
    with pytest.raises(TranscriptError) as raised:
        parse_transcript("Human: hi")
    assert raised.value.reason == "bad_transcript_start"


def test_prompt_end_points_past_the_final_tag():
    text = "\n\nHuman: a\n\nAssistant: b"
    assert text[: prompt_end(text, text.replace("b", "c"))].endswith(ASSISTANT_TAG)


# transcripts built from pieces that stress the separators: tags without the space,
# tags glued to words, blank lines, the sentinel byte, non-ASCII
_PIECES = st.sampled_from(
    [
        "\n\nHuman: ",
        "\n\nAssistant: ",
        "\n\nHuman:",
        "Assistant:",
        "Human: ",
        "\n",
        "\n\n",
        " ",
        "hi",
        "ok.",
        "é",
        "\x1e",
        "\u2028",
        "",
    ]
)
_CONTENT = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=6).map("".join)
_TURNS = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": _CONTENT}),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_TURNS)
def test_render_then_parse_then_render_is_identity(turns):
    text = render_transcript(turns)
    assert render_transcript(parse_transcript(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=12).map("".join))
def test_parse_then_render_is_identity_on_any_text_that_parses(text):
    try:
        turns = parse_transcript(text)
    except TranscriptError:
        assert not text.startswith(("\n\nHuman: ", "\n\nAssistant: "))
        return
    assert render_transcript(turns) == text
