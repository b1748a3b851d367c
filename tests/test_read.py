"""read_raw survives every kind of bad input, reports it with file:line, and counts reconcile."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.cli import main
from hhdata.errors import SourceError
from hhdata.io.read import MAX_LINE_BYTES, RAW_SCHEMA, read_raw


def record(n: int) -> dict:
    return {
        "chosen": f"\n\nHuman: q{n}\n\nAssistant: yes {n}",
        "rejected": f"\n\nHuman: q{n}\n\nAssistant: no {n}",
    }


def good(n: int) -> bytes:
    return json.dumps(record(n)).encode()


HUGE = json.dumps({"chosen": "x" * (MAX_LINE_BYTES + 10), "rejected": "y"}).encode()

TOO_DEEP = (
    "the JSON is nested too deeply to decode (over Python's recursion limit); a record is "
    '{"chosen": "...", "rejected": "..."}: fix or remove the line'
)

# (case, bad line, reason, exact message)
BAD_LINES = [
    (
        "invalid json",
        b'{"chosen": "x", ',
        "invalid_json",
        "Expecting property name enclosed in double quotes: column 17; fix or remove the line",
    ),
    (
        "invalid utf-8",
        b'{"chosen": "caf\xe9", "rejected": "b"}',
        "invalid_utf8",
        "byte 15 of the line (b'\\xe9') is not valid UTF-8; re-encode the file as UTF-8",
    ),
    (
        "lone surrogate",
        b'{"chosen": "\\ud800", "rejected": "b"}',
        "invalid_utf8",
        "'chosen' escapes a lone surrogate (\\ud800-\\udfff), which is not valid Unicode; fix the "
        "escape sequence",
    ),
    (
        "array",
        b'["a", "b"]',
        "not_an_object",
        'the line is a JSON array, not an object; each line must be {"chosen": "...", "rejected": '
        '"..."}',
    ),
    (
        "string",
        b'"text"',
        "not_an_object",
        'the line is a JSON string, not an object; each line must be {"chosen": "...", '
        '"rejected": "..."}',
    ),
    (
        "missing key",
        json.dumps({"chosen": "a"}).encode(),
        "missing_key",
        "'rejected' is a required property; each line needs both 'chosen' and 'rejected'",
    ),
    (
        "extra key",
        json.dumps({**record(9), "score": 1}).encode(),
        "extra_key",
        "Additional properties are not allowed ('score' was unexpected); remove the other keys or "
        "convert the file to the HH-RLHF format first",
    ),
    (
        "wrong type",
        b'{"chosen": 5, "rejected": "b"}',
        "wrong_type",
        "at 'chosen': 5 is not of type 'string'; both values must be JSON strings",
    ),
    (
        "long value",
        json.dumps({"chosen": ["x" * 100], "rejected": "b"}).encode(),
        "wrong_type",
        f"at 'chosen': ['{'x' * 58}... (104 characters) is not of type 'string'; both values must "
        "be JSON strings",
    ),
    (
        "null",
        b'{"chosen": "a", "rejected": null}',
        "null_value",
        "at 'rejected': None is not of type 'string'; both values must be JSON strings, not null",
    ),
    (
        "empty string",
        b'{"chosen": "", "rejected": "b"}',
        "empty_string",
        "at 'chosen': '' should be non-empty; both transcripts must hold text",
    ),
    (
        "chosen == rejected",
        json.dumps({"chosen": "same", "rejected": "same"}).encode(),
        "chosen_equals_rejected",
        "chosen and rejected are the same text, so the record states no preference; fix the "
        "rejected transcript or drop the line",
    ),
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "invalid_json", TOO_DEEP),
    (
        "a value nested 1,000 deep",
        b'{"chosen": ' + b"[" * 1000 + b"]" * 1000 + b', "rejected": "b"}',
        "invalid_json",
        TOO_DEEP,
    ),
    (
        "huge line",
        HUGE,
        "line_too_long",
        f"the line is {len(HUGE)} bytes, over the limit of {MAX_LINE_BYTES} bytes "
        "(hhdata.io.read.MAX_LINE_BYTES); split the record or pass a larger max_line_bytes",
    ),
]


@pytest.fixture
def layout(tmp_path):
    folder = tmp_path / "harmless-base"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("case", "bad", "reason", "message"), BAD_LINES, ids=[c[0] for c in BAD_LINES]
)
@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "gz"])
def test_a_bad_line_is_quarantined_and_the_good_lines_are_read(
    layout, capsys, case, bad, reason, message, compress
):
    data = b"\n".join([good(1), good(2), bad, good(3)]) + b"\n"
    path = layout / ("train.jsonl.gz" if compress else "train.jsonl")
    path.write_bytes(gzip.compress(data) if compress else data)

    result = read_raw(path)

    assert result.table["line"].to_pylist() == [1, 2, 4]
    assert result.table["chosen"].to_pylist() == [record(n)["chosen"] for n in (1, 2, 3)]
    assert result.table.schema == RAW_SCHEMA
    [row] = result.quarantine.to_pylist()
    assert (row["file"], row["line"], row["reason"], row["message"]) == (
        str(path),
        3,
        reason,
        message,
    )
    if reason != "line_too_long":
        assert row["raw"] == bad or json.loads(row["raw"]) == json.loads(bad)
    report = result.report
    assert (report.lines, report.blank, report.accepted, report.quarantined) == (
        4,
        0,
        3,
        {reason: 1},
    )
    assert report.reconciles()

    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"  {reason}: 1\n    {path}:3: {message}\n" in out
    assert "read 1 file: 4 lines (0 blank), 4 records = 3 accepted + 1 quarantined" in out


def test_a_truncated_gzip_keeps_the_records_before_the_cut(layout):
    whole = gzip.compress(b"".join(good(n) + b"\n" for n in range(400)))
    path = layout / "test.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])

    result = read_raw(path)

    kept = result.report.accepted
    assert 0 < kept < 400
    assert result.table["chosen"].to_pylist() == [record(n)["chosen"] for n in range(kept)]
    [row] = result.quarantine.to_pylist()
    assert (row["line"], row["reason"]) == (kept + 1, "truncated_file")
    assert row["message"] == (
        f"{path} is truncated: its gzip stream ends after line {kept} (the last complete line); "
        f"the {kept} lines before the cut were read; re-download or re-compress the file"
    )
    assert good(kept).startswith(row["raw"])
    assert result.report.reconciles()


def test_a_corrupt_gzip_is_reported_and_counts_reconcile(layout):
    whole = bytearray(gzip.compress(b"".join(good(n) + b"\n" for n in range(400))))
    whole[len(whole) // 2 : len(whole) // 2 + 40] = bytes(40)
    path = layout / "test.jsonl.gz"
    path.write_bytes(bytes(whole))

    result = read_raw(path)

    assert "corrupt_file" in result.report.quarantined
    assert result.report.reconciles()


def test_concatenated_gzip_members_and_empty_files_are_read(layout):
    (layout / "train.jsonl.gz").write_bytes(
        gzip.compress(good(1) + b"\n" + good(2) + b"\n") + gzip.compress(good(3))
    )
    (layout / "test.jsonl").write_bytes(b"")
    result = read_raw(layout)
    assert result.table["chosen"].to_pylist() == [record(n)["chosen"] for n in (1, 2, 3)]
    assert (result.report.lines, result.quarantine.num_rows) == (3, 0)


def test_bom_crlf_and_blank_lines_are_read_and_noted(layout):
    path = layout / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good(1) + b"\r\n\r\n" + good(2) + b"\r\n  \n" + good(3))

    result = read_raw(path)

    assert result.table["line"].to_pylist() == [1, 3, 5]
    assert result.quarantine.num_rows == 0
    assert (result.report.lines, result.report.blank, result.report.accepted) == (5, 2, 3)
    assert result.report.notices == [
        f"{path}: starts with a UTF-8 byte order mark; ignored",
        f"{path}: 3 lines end with CRLF (\\r\\n); read as LF",
    ]


def test_a_huge_line_without_newline_at_the_end_of_a_file(layout):
    path = layout / "train.jsonl"
    path.write_bytes(good(1) + b"\n" + b"x" * 3000)
    result = read_raw(path, max_line_bytes=1000)
    [row] = result.quarantine.to_pylist()
    assert (row["line"], row["reason"], len(row["raw"])) == (
        2,
        "line_too_long",
        1024,
    )  # the first KiB is kept
    assert "the line is 3000 bytes, over the limit of 1000 bytes" in row["message"]


def test_folders_globs_and_the_upstream_layout(tmp_path):
    for subset, split in (("helpful-base", "train"), ("harmless-base", "test")):
        (tmp_path / subset).mkdir()
        (tmp_path / subset / f"{split}.jsonl.gz").write_bytes(
            gzip.compress(good(1) + b"\n" + good(2))
        )
    by_folder = read_raw(tmp_path)
    assert by_folder.table.select(["subset", "split", "family"]).to_pylist()[::2] == [
        {"subset": "harmless-base", "split": "test", "family": "harmless"},
        {"subset": "helpful-base", "split": "train", "family": "helpful"},
    ]
    by_glob = read_raw(str(tmp_path / "*" / "train.jsonl.gz"))
    assert by_glob.report.files == [str(tmp_path / "helpful-base" / "train.jsonl.gz")]


def test_arguments_name_the_subset_and_split_of_other_paths(tmp_path):
    path = tmp_path / "batch-7.jsonl"
    path.write_bytes(good(1))
    with pytest.raises(SourceError) as raised:
        read_raw(path)
    assert str(raised.value) == (
        f"cannot tell the split of {path}: its name is not train.jsonl[.gz] or test.jsonl[.gz]; "
        "put it at <subset>/<split>.jsonl.gz or pass the split (in Python split= and subset=; "
        "--split and "
        "--subset for hhdata stats and show)"
    )
    with pytest.raises(
        SourceError, match=r"pass the subset \(in Python split= and subset=; --split and --subset"
    ):
        read_raw(path, split="train")
    with pytest.raises(SourceError, match="declare its family"):
        read_raw(path, subset="batch-7", split="train")
    table = read_raw(path, subset="batch-7", split="train", family="helpful").table
    assert table.select(["subset", "split", "family"]).to_pylist() == [
        {"subset": "batch-7", "split": "train", "family": "helpful"}
    ]
    # a new subset named after its family needs no declaration (best-of-N writes such names)
    for subset, family in (("helpful-best-of-4", "helpful"), ("harmless-redteam-2", "harmless")):
        table = read_raw(path, subset=subset, split="train").table
        assert table.column("family").to_pylist() == [family]
    with pytest.raises(SourceError, match="is helpful, not harmless"):
        read_raw(path, subset="helpful-best-of-4", split="train", family="harmless")


def test_a_declared_family_must_agree_with_a_known_subset(sample_path, tmp_path):
    with pytest.raises(SourceError, match="subset 'harmless-base' is harmless, not helpful"):
        read_raw(sample_path, family="helpful")
    path = tmp_path / "batch.jsonl"
    path.write_bytes(good(1))
    with pytest.raises(SourceError, match="subset 'helpful-online' is helpful, not harmless"):
        read_raw(path, subset="helpful-online", split="train", family="harmless")
    assert read_raw(sample_path, family="harmless").table["family"].unique().to_pylist() == [
        "harmless"
    ]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("nowhere.jsonl", "{tmp}/nowhere.jsonl does not exist; check the path"),
        ("*.nothing", "no file matches {tmp}/*.nothing; check the pattern"),
        ("empty", "{tmp}/empty holds no *.jsonl or *.jsonl.gz file; point at the files"),
    ],
)
def test_paths_that_hold_nothing_are_usage_errors(tmp_path, given, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError) as raised:
        read_raw(tmp_path / given if given != "*.nothing" else f"{tmp_path}/{given}")
    assert str(raised.value) == message.format(tmp=tmp_path)


def test_the_bundled_sample_reads_whole(sample_path):
    result = read_raw(sample_path)
    assert (result.report.lines, result.report.accepted, result.quarantine.num_rows) == (
        2312,
        2312,
        0,
    )


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reference_verdicts(data: bytes) -> dict[int, object]:
    """Line number -> (chosen, rejected) or reason, the plain way: json.loads per line."""
    from hhdata.io.validate import explain_raw_record

    verdicts = {}
    for number, line in enumerate(data.split(b"\n"), start=1):
        if number == data.count(b"\n") + 1 and not line:
            break  # the empty piece after a final newline is not a line
        line = line.removesuffix(b"\r")
        if not line.strip(b" \t\r"):
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            verdicts[number] = "invalid_utf8"
            continue
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to decode
            verdicts[number] = "invalid_json"
            continue
        problem = explain_raw_record(record)
        if problem is None and not all(is_unicode(value) for value in record.values()):
            problem = ("invalid_utf8", "a lone surrogate")
        verdicts[number] = problem[0] if problem else (record["chosen"], record["rejected"])
    return verdicts


_LINES = st.one_of(
    st.builds(lambda n: good(n), st.integers(0, 50)),
    st.sampled_from([bad for _, bad, reason, _ in BAD_LINES if reason != "line_too_long"]),
    st.sampled_from(
        [
            b"",
            b"  ",
            b"{}",
            b"{ }",
            b"null",
            b"{" + good(1)[1:] + b" ",
            good(2) + good(3),
            b'{"chosen":"a","chosen":"b","rejected":"c"}',
        ]
    ),
    st.builds(lambda n, cut: good(n)[:cut], st.integers(0, 5), st.integers(1, 40)),
    st.builds(
        lambda n, at, byte: good(n)[:at] + bytes([byte]) + good(n)[at:],
        st.integers(0, 5),
        st.integers(0, 60),
        st.integers(0, 255),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINES, min_size=1, max_size=300), st.booleans())
def test_bulk_reading_agrees_with_json_loads_line_by_line(tmp_path_factory, lines, crlf):
    data = (b"\r\n" if crlf else b"\n").join(lines) + b"\n"
    path = tmp_path_factory.mktemp("hyp") / "harmless-base" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(data)

    result = read_raw(path)

    expected = reference_verdicts(data)
    got = {row["line"]: row["reason"] for row in result.quarantine.to_pylist()}
    got |= {row["line"]: (row["chosen"], row["rejected"]) for row in result.table.to_pylist()}
    assert got == expected
    assert result.report.reconciles()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_LINES, min_size=1, max_size=60),
    st.sampled_from([1, 3, 16, 200]),
    st.booleans(),
    st.booleans(),
)
def test_lines_cut_between_inflated_chunks_read_the_same(
    tmp_path_factory, lines, read_size, compress, bom
):
    """Tiny chunks put line ends, CRLF pairs and the BOM across chunk boundaries."""
    from unittest import mock

    data = (b"\xef\xbb\xbf" if bom else b"") + b"\r\n".join(lines) + b"\r\n"
    path = tmp_path_factory.mktemp("chunks") / "harmless-base" / "train.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(data) if compress else data)

    with mock.patch("hhdata.io.lines.READ_SIZE", read_size):
        result = read_raw(path)

    expected = reference_verdicts(data.removeprefix(b"\xef\xbb\xbf"))
    got = {row["line"]: row["reason"] for row in result.quarantine.to_pylist()}
    got |= {row["line"]: (row["chosen"], row["rejected"]) for row in result.table.to_pylist()}
    assert got == expected
    assert result.report.reconciles()


def test_a_folder_named_with_a_byte_that_is_not_utf8(tmp_path, capsys):
    """A parent folder named b"\\xff" reads, validates and builds; names show it as \\xff."""
    folder = os.fsencode(tmp_path) + b"/batch\xff"
    os.mkdir(folder)
    os.mkdir(folder + b"/harmless-base")
    with open(folder + b"/harmless-base/test.jsonl", "wb") as out:
        out.write(b"\xef\xbb\xbf" + good(1) + b"\n" + b'{"chosen": 5, "rejected": "b"}\n')
    root = os.fsdecode(folder)
    shown = f"{tmp_path}/batch\\xff/harmless-base/test.jsonl"

    result = read_raw(root)

    assert result.table["file"].to_pylist() == [shown]
    assert result.quarantine.select(["file", "line"]).to_pylist() == [{"file": shown, "line": 2}]
    assert main(["validate", root]) == 1
    out = capsys.readouterr().out
    assert f"    {shown}:2: at 'chosen': 5 is not of type 'string'" in out
    assert f"note: {shown}: starts with a UTF-8 byte order mark; ignored" in out
    assert main(["build", root, "--version", "1.0.0", "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "1.0.0" / "manifest.json").read_text())
    assert [source["path"] for source in manifest["sources"]] == ["harmless-base/test.jsonl"]
    # a release cannot be written below such a folder (Arrow's Parquet writer refuses the path)
    assert main(["build", root, "--version", "1.0.0", "--out", os.path.join(root, "out")]) == 2
    assert capsys.readouterr().err == (
        f"hhdata build: error: the --out folder {tmp_path}/batch\\xff/out has bytes in its path "
        "that are not UTF-8, where a release cannot be written; choose a folder whose path is "
        "UTF-8\n"
    )
