"""A large uncompressed file read in ranges (threads) gives exactly what one range gives."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.errors import SchemaError
from hhdata.io.lines import byte_ranges
from hhdata.io.read import read_pairs, read_raw

WHOLE = 1 << 30  # a block size no test file reaches: the file is one range


def pair(n: int, reply: str = "yes") -> bytes:
    return json.dumps(
        {
            "chosen": f"\n\nHuman: q{n}\n\nAssistant: {reply} {n}",
            "rejected": f"\n\nHuman: q{n}\n\nAssistant: no {n}",
        }
    ).encode()


def mismatch(n: int) -> bytes:
    """A well-formed record whose prompt cannot be determined (pair-level quarantine)."""
    return json.dumps(
        {
            "chosen": f"\n\nHuman: a{n}\n\nAssistant: x",
            "rejected": f"\n\nHuman: b{n}\n\nAssistant: y",
        }
    ).encode()


# good pairs, flagged pairs, bad lines of every stage, blank lines, and a line of 600 bytes
LINES = [
    pair(1),
    b'{"chosen": "x", ',  # invalid JSON
    pair(2, "Human: inline tag"),  # flag tag_in_chosen
    b"",
    b'{"chosen": "a"}',  # missing key
    mismatch(3),
    pair(4, "long " * 110),  # longer than the small blocks below
    b'{"chosen": "caf\xe9", "rejected": "b"}',  # invalid UTF-8
    b"   ",
    pair(5),
    json.dumps({"chosen": "same", "rejected": "same"}).encode(),
    pair(6),
]


def outcome(result):
    """Everything a read returns, as plain values: rows, their lines, quarantine, counts."""
    report = result.report
    return (
        result.table.to_pylist(),
        None if result.sources is None else result.sources.to_pylist(),
        result.quarantine.to_pylist(),
        (report.lines, report.blank, report.accepted, report.quarantined, report.notices),
    )


def write(tmp_path, data: bytes):
    path = tmp_path / "harmless-base" / "train.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("block_bytes", [1, 40, 64, 300, 1000])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize(
    "last_newline", [True, False], ids=["ends-with-newline", "no-last-newline"]
)
@pytest.mark.parametrize("reader", [read_pairs, read_raw])
def test_ranges_give_the_same_rows_lines_and_quarantine(
    tmp_path, block_bytes, newline, last_newline, reader
):
    data = newline.join(LINES) + (newline if last_newline else b"")
    path = write(tmp_path, data)
    assert len(byte_ranges(path, block_bytes)) > 1  # the file is really cut

    whole = outcome(reader(path, block_bytes=WHOLE))
    cut = outcome(reader(path, block_bytes=block_bytes))

    assert cut == whole
    rows, _, quarantine, counts = whole
    assert [(r["line"], r["reason"]) for r in quarantine] == sorted(
        [(2, "invalid_json"), (5, "missing_key"), (8, "invalid_utf8")]
        + [(11, "chosen_equals_rejected")]
        + ([(6, "prompt_mismatch")] if reader is read_pairs else [])
    )
    assert counts[:3] == (12, 2, 5 if reader is read_pairs else 6)


def test_bad_lines_right_at_the_cuts_keep_their_line_numbers(tmp_path):
    """A cut falls just after each newline: every line starts a range of its own."""
    lines = [b"{bad", pair(1), b"{bad", b"{bad", pair(2), b"{bad"]
    path = write(tmp_path, b"\n".join(lines))  # the last bad line has no newline

    assert [start for start, _ in byte_ranges(path, 1)] == [
        sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))
    ]
    result = read_pairs(path, block_bytes=1)

    assert [(r["line"], r["reason"]) for r in result.quarantine.to_pylist()] == [
        (1, "invalid_json"),
        (3, "invalid_json"),
        (4, "invalid_json"),
        (6, "invalid_json"),
    ]
    assert result.sources["line"].to_pylist() == [2, 5]
    assert outcome(result) == outcome(read_pairs(path, block_bytes=WHOLE))


def test_a_line_over_the_limit_in_a_later_range_is_quarantined_at_its_line(tmp_path):
    lines = [pair(1), pair(2), b'{"chosen": "' + b"x" * 500 + b'", "rejected": "y"}', pair(3)]
    path = write(tmp_path, b"\n".join(lines) + b"\n")

    cut = read_pairs(path, block_bytes=100, max_line_bytes=200)

    assert [(r["line"], r["reason"]) for r in cut.quarantine.to_pylist()] == [(3, "line_too_long")]
    assert outcome(cut) == outcome(read_pairs(path, block_bytes=WHOLE, max_line_bytes=200))


def test_a_byte_order_mark_is_dropped_only_at_the_start_of_the_file(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + pair(1) + b"\n" + pair(2) + b"\n")

    cut = read_pairs(path, block_bytes=10)

    assert cut.report.accepted == 2
    assert outcome(cut) == outcome(read_pairs(path, block_bytes=WHOLE))


def test_gzip_and_small_files_are_one_range(tmp_path, sample_path):
    assert byte_ranges(sample_path, 1) == [(0, None)]  # a deflate stream cannot be cut
    path = write(tmp_path, pair(1) + b"\n")
    assert byte_ranges(path, 1 << 20) == [(0, None)]


def test_fewer_columns_give_the_same_values_and_quarantine(tmp_path):
    """hhdata validate keeps only the flags (no ids, no texts): the rest of the read agrees."""
    path = write(tmp_path, b"\n".join(LINES) + b"\n")

    full = read_pairs(path, block_bytes=100)
    for columns in (["flags"], ["subset", "prompt", "flags"], ["id", "chosen_text"]):
        lean = read_pairs(path, block_bytes=100, columns=columns)
        assert lean.table.column_names == columns
        assert lean.table.equals(full.table.select(columns))
        assert lean.quarantine.equals(full.quarantine)
        assert lean.sources.equals(full.sources)
        assert outcome(lean)[3] == outcome(full)[3]


@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "gz"])
def test_segments_handed_over_while_reading_change_nothing(tmp_path, compress):
    """A range (or a whole gzip file) is validated and parsed in segments as it is read."""
    from unittest import mock

    data = b"\r\n".join(LINES * 5)  # no newline at the end
    path = write(tmp_path, gzip.compress(data) if compress else data)
    whole = outcome(read_pairs(path, block_bytes=WHOLE))

    with mock.patch("hhdata.io.lines.READ_SIZE", 64), mock.patch("hhdata.io.read.SEGMENT_BYTES", 1):
        assert outcome(read_pairs(path, block_bytes=WHOLE)) == whole
        assert outcome(read_pairs(path, block_bytes=500)) == whole


def test_an_unknown_column_is_refused_with_the_choices(sample_path):
    with pytest.raises(SchemaError, match=r"no pair column \['text'\]; choose columns from"):
        read_pairs(sample_path, columns=["flags", "text"])


_LINE = st.one_of(
    st.integers(0, 50).map(pair),
    st.integers(0, 50).map(mismatch),
    st.sampled_from([b"", b" ", b"{bad", b'{"chosen": "a"}', b'["x"]', b'{"chosen": "\xff"}']),
    st.builds(lambda n, size: pair(n, "w" * size), st.integers(0, 9), st.integers(50, 400)),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_LINE, min_size=1, max_size=40),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.integers(1, 600),
)
def test_any_cut_of_any_file_reads_the_same(tmp_path_factory, lines, newline, last, block_bytes):
    data = newline.join(lines) + (newline if last else b"")
    path = write(tmp_path_factory.mktemp("blocks"), data)

    assert outcome(read_pairs(path, block_bytes=block_bytes)) == outcome(
        read_pairs(path, block_bytes=WHOLE)
    )
