"""build_pairs (vectorised) agrees with the reference split_pair on every record."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.errors import PairError
from hhdata.io.read import read_raw
from hhdata.pairs import build_pairs
from hhdata.pairs.transcript import split_pair
from hhdata.schema import PAIR_SCHEMA, pair_id


def raw_table(pairs: list[tuple[str, str]]) -> pa.Table:
    rows = len(pairs)
    return pa.table(
        {
            "file": ["mem.jsonl"] * rows,
            "line": list(range(1, rows + 1)),
            "subset": ["helpful-base"] * rows,
            "split": ["train"] * rows,
            "family": ["helpful"] * rows,
            "chosen": [chosen for chosen, _ in pairs],
            "rejected": [rejected for _, rejected in pairs],
        }
    )


def assert_agrees_with_reference(pairs: list[tuple[str, str]]) -> None:
    table, quarantine = build_pairs(raw_table(pairs))
    assert table.schema == PAIR_SCHEMA
    rows = iter(table.to_pylist())
    bad = iter(quarantine.to_pylist())
    for line, (chosen, rejected) in enumerate(pairs, start=1):
        try:
            expected = split_pair(chosen, rejected)
        except PairError as error:
            row = next(bad)
            assert (row["line"], row["reason"], row["message"]) == (line, error.reason, str(error))
            continue
        row = next(rows)
        assert (row["chosen_text"], row["rejected_text"]) == (chosen, rejected)
        assert row["prompt"] == expected.prompt
        assert row["chosen"] == expected.chosen
        assert row["rejected"] == expected.rejected
        assert row["flags"] == expected.flags
        assert row["id"] == pair_id(chosen, rejected)
    assert next(rows, None) is None and next(bad, None) is None


def test_agrees_with_split_pair_on_every_real_pair(sample_records):
    assert_agrees_with_reference([(r["chosen"], r["rejected"]) for r in sample_records])


def test_real_sample_rows_carry_subset_family_split(sample_path):
    pairs, quarantine = build_pairs(read_raw(sample_path).table)
    assert quarantine.num_rows == 0 and pairs.num_rows == 2312
    assert set(pairs["subset"].to_pylist()) == {"harmless-base"}
    assert set(pairs["family"].to_pylist()) == {"harmless"}
    assert set(pairs["split"].to_pylist()) == {"test"}
    assert len(set(pairs["id"].to_pylist())) == 2312


def test_slow_path_rows_keep_their_place_between_fast_rows():
    good = ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: y")
    reply_with_human = (
        "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: c",
        "\n\nHuman: a\n\nAssistant: y",
    )
    sentinel = ("\n\nHuman: a\x1e\n\nAssistant: x", "\n\nHuman: a\x1e\n\nAssistant: y")
    mismatch = ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x")
    assert_agrees_with_reference([good, reply_with_human, sentinel, mismatch, good])
    pairs, quarantine = build_pairs(raw_table([good, sentinel, mismatch, good]))
    assert pairs["chosen_text"].to_pylist() == [good[0], sentinel[0], good[0]]
    assert quarantine["line"].to_pylist() == [3]


def test_read_pairs_equals_read_raw_then_build_pairs_with_each_rows_source(tmp_path):
    """read_pairs builds each file's pairs in the thread that read it: the same rows, the
    same verdict per line, and the file and line of every pair row."""
    import json

    from hhdata.io.read import read_pairs

    good = ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: y")
    mismatch = ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x")
    for name, lines in {
        "helpful-base": [good, mismatch, None, good],
        "harmless-base": [mismatch, good, good],
    }.items():
        (tmp_path / name).mkdir()
        text = "".join(
            "{oops\n"
            if pair is None
            else json.dumps({"chosen": pair[0], "rejected": pair[1]}) + "\n"
            for pair in lines
        )
        (tmp_path / name / "train.jsonl").write_text(text)
    raw = read_raw(tmp_path)
    pairs, unsplit = build_pairs(raw.table)
    result = read_pairs(tmp_path)
    assert result.table.equals(pairs)
    assert result.report.accepted == 4 and result.report.reconciles()
    assert result.report.quarantined == {"invalid_json": 1, "prompt_mismatch": 2}
    verdicts = {(r["file"], r["line"], r["reason"]) for r in result.quarantine.to_pylist()}
    assert verdicts == {
        (r["file"], r["line"], r["reason"])
        for r in raw.quarantine.to_pylist() + unsplit.to_pylist()
    }
    base, harm = (
        str(tmp_path / "helpful-base" / "train.jsonl"),
        str(tmp_path / "harmless-base" / "train.jsonl"),
    )
    assert result.sources.to_pylist() == [
        {"file": harm, "line": 2},
        {"file": harm, "line": 3},
        {"file": base, "line": 1},
        {"file": base, "line": 4},
    ]


def test_empty_table_gives_empty_results():
    pairs, quarantine = build_pairs(raw_table([]))
    assert pairs.num_rows == 0 and quarantine.num_rows == 0 and pairs.schema == PAIR_SCHEMA


_PIECES = st.sampled_from(
    [
        "\n\nHuman: ",
        "\n\nAssistant: ",
        "\n\nHuman:",
        "\n\nAssistant:",
        "Human:",
        "Assistant: ",
        " ",
        "\n",
        "\n\n",
        "hi",
        "ok",
        "é",
        "\x1e",
        "\u3000",
        "\x1c",
        "\t",
    ]
)
_TEXT = st.lists(_PIECES, max_size=10).map("".join)


@st.composite
def hh_pairs(draw):
    """A shared prompt (sometimes broken) and two replies (sometimes holding tags)."""
    prompt = draw(
        st.lists(st.tuples(st.sampled_from(["\n\nHuman: ", "\n\nAssistant: "]), _TEXT), max_size=4)
    )
    text = (
        "".join(tag + content for tag, content in prompt)
        + draw(st.sampled_from(["\n\nHuman: ", ""]))
        + draw(_TEXT)
    )
    text += draw(st.sampled_from(["\n\nAssistant:", "\n\nAssistant: ", ""]))
    chosen = text + draw(_TEXT)
    rejected = (draw(_TEXT) if draw(st.booleans()) and draw(st.booleans()) else text) + draw(_TEXT)
    return chosen, rejected


@settings(max_examples=200, deadline=None)
@given(st.lists(hh_pairs(), min_size=1, max_size=8))
def test_agrees_with_split_pair_on_generated_pairs(pairs):
    assert_agrees_with_reference(pairs)


def test_pair_id_of_a_fixed_pair_never_changes():
    """A golden value: a new hash would make every row of every release look added and removed."""
    chosen = "\n\nHuman: What is two plus two?\n\nAssistant: Four."
    rejected = "\n\nHuman: What is two plus two?\n\nAssistant: Five."
    assert pair_id(chosen, rejected) == "afd374029eb98bc71d37"
