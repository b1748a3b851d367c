"""The validate, stats and show verbs: output, exit codes, quarantine file, docs."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pytest

from hhdata.cli import data, main

DOCS = Path(__file__).parent.parent / "docs" / "reading.md"


def write(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def pair(prompt_c: str, prompt_r: str) -> bytes:
    return json.dumps(
        {"chosen": f"{prompt_c}\n\nAssistant: yes", "rejected": f"{prompt_r}\n\nAssistant: no"}
    ).encode()


def test_every_verb_is_documented():
    parser = argparse.ArgumentParser()
    data.register(parser.add_subparsers())
    verbs = parser._subparsers._group_actions[0].choices
    assert sorted(verbs) == ["show", "stats", "validate"]
    text = DOCS.read_text()
    for verb, sub in verbs.items():
        assert f"`hhdata {verb}" in text, f"hhdata {verb} is not documented in {DOCS.name}"
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in text, f"{option} of hhdata {verb} is not documented"


def test_validate_the_bundled_sample_exits_0_and_reports_flags(sample_path, capsys):
    assert main(["validate", str(sample_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == (
        "read 1 file: 2,312 lines (0 blank), 2,312 records = 2,312 accepted + 0 quarantined\n"
        "flags (reported, not failures): empty_chosen 4, tag_in_chosen 24, tag_in_rejected 18, "
        "tag_in_prompt 24, consecutive_assistant 9\n"
        "ok: every record was accepted\n"
    )
    assert captured.err == ""  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    ("chosen_prompt", "rejected_prompt", "reason", "message"),
    [
        (
            "\n\nHuman: a",
            "\n\nHuman: b",
            "prompt_mismatch",
            "chosen and rejected disagree before the final '\\n\\nAssistant:' tag (they differ "
            "from character 9 on)",
        ),
        (
            "\n\nAssistant: a",
            "\n\nAssistant: a",
            "no_human_turn",
            "chosen and rejected share no '\\n\\nHuman:' turn, so there is no prompt",
        ),
        (
            "Hi\n\nHuman: a",
            "Hi\n\nHuman: a",
            "bad_transcript_start",
            "transcript does not start with '\\n\\nHuman: ' or '\\n\\nAssistant: ' (it starts "
            "with 'Hi\\n\\nHuman: a\\n\\nAssistant: '); "
            "HH-RLHF transcripts begin with a blank line and a speaker tag",
        ),
    ],
)
def test_a_pair_without_a_prompt_exits_1_with_file_line_and_reason(
    tmp_path, capsys, chosen_prompt, rejected_prompt, reason, message
):
    path = write(
        tmp_path / "helpful-base" / "train.jsonl",
        [pair("\n\nHuman: q", "\n\nHuman: q"), pair(chosen_prompt, rejected_prompt)],
    )
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert out == (
        "read 1 file: 2 lines (0 blank), 2 records = 1 accepted + 1 quarantined\n"
        "quarantined per reason:\n"
        f"  {reason}: 1\n"
        f"    {path}:2: {message}\n"
        "FAILED: some records were quarantined (use --quarantine FILE to save them)\n"
    )


def test_quarantine_file_holds_each_bad_record(tmp_path, capsys):
    path = write(
        tmp_path / "harmless-base" / "test.jsonl",
        [b"{oops", b'{"chosen": "\xff", "rejected": "x"}', pair("\n\nHuman: q", "\n\nHuman: q")],
    )
    out_file = tmp_path / "bad.jsonl"
    assert main(["validate", str(path), "--quarantine", str(out_file), "--examples", "0"]) == 1
    assert "wrote 2 quarantined records to " + str(out_file) in capsys.readouterr().out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [(1, "invalid_json"), (2, "invalid_utf8")]
    assert rows[0]["raw"] == "{oops"
    assert base64.b64decode(rows[1]["raw_base64"]) == b'{"chosen": "\xff", "rejected": "x"}'


def test_usage_and_io_errors_exit_2_with_the_fix(tmp_path, capsys, sample_path):
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert (
        capsys.readouterr().err
        == f"hhdata validate: error: {tmp_path}/missing.jsonl does not exist; check the path\n"
    )
    target = tmp_path / "no-such-dir" / "q.jsonl"
    assert main(["validate", str(sample_path), "--quarantine", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"hhdata validate: error: cannot write the quarantine to {target}: No such file or "
        "directory; "
        "pass a --quarantine path in a folder you can write to\n"
    )
    odd = write(tmp_path / "batch.jsonl", [pair("\n\nHuman: q", "\n\nHuman: q")])
    assert main(["stats", str(odd), "--split", "train", "--subset", "batch-3"]) == 2
    assert capsys.readouterr().err == (
        f"hhdata stats: error: {odd}: subset 'batch-3' is not one of ['harmless-base', "
        "'harmless-online', 'helpful-base', 'helpful-online', 'helpful-rejection-sampled']; "
        "declare its family ('helpful' or 'harmless') for a new batch, or name it helpful-* "
        "or harmless-* (in Python family= and subset=, on the command line --family and "
        "--subset)\n"
    )
    assert (
        main(["stats", str(odd), "--split", "train", "--subset", "batch-3", "--family", "helpful"])
        == 0
    )


def test_validate_takes_any_file_as_is_and_says_what_it_did_not_know(tmp_path, capsys):
    path = write(
        tmp_path / "my_batch.jsonl",
        [pair("\n\nHuman: q", "\n\nHuman: q"), b'{"chosen": 1, "rejected": "b"}'],
    )
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out == (
        "read 1 file: 2 lines (0 blank), 2 records = 1 accepted + 1 quarantined\n"
        "quarantined per reason:\n"
        "  wrong_type: 1\n"
        f"    {path}:2: at 'chosen': 1 is not of type 'string'; both values must be JSON strings\n"
        f"note: {path}: no subset or split or family in its path or the arguments; validated as is "
        "(only a build needs them: put the file at <subset>/<split>.jsonl[.gz], or pass --subset, "
        "--split and --family)\n"
        "FAILED: some records were quarantined (use --quarantine FILE to save them)\n"
    )
    path.write_bytes(pair("\n\nHuman: q", "\n\nHuman: q") + b"\n")
    assert main(["validate", str(path), "--subset", "harmless-base"]) == 0
    assert f"note: {path}: no split in its path" in capsys.readouterr().out
    # the flags still name the source when given: no notice then
    assert (
        main(
            [
                "validate",
                str(path),
                "--subset",
                "batch-7",
                "--split",
                "train",
                "--family",
                "helpful",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == (
        "read 1 file: 1 line (0 blank), 1 record = 1 accepted + 0 quarantined\n"
        "ok: every record was accepted\n"
    )


def test_a_declared_family_that_contradicts_the_subset_exits_2(sample_path, capsys):
    assert main(["validate", str(sample_path), "--family", "helpful"]) == 2
    assert capsys.readouterr().err == (
        f"hhdata validate: error: {sample_path}: subset 'harmless-base' is harmless, not helpful; "
        "drop the declared family, or name the batch as a new subset if it really is a different "
        "one (in Python family= and subset=, on the command line --family and --subset)\n"
    )
    assert main(["validate", str(sample_path), "--family", "harmless"]) == 0


def test_stats_of_the_bundled_sample(capsys):
    assert main(["stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["harmless-base", "all"]
    assert lines[1].split() == ["rows", "2,312", "2,312"]
    assert "flag tag_in_chosen 24 24" in [" ".join(line.split()) for line in lines]


def test_validate_prints_the_statistics_only_when_asked(sample_path, capsys):
    assert main(["validate", str(sample_path)]) == 0
    plain = capsys.readouterr().out
    assert main(["stats", str(sample_path)]) == 0
    stats = capsys.readouterr().out

    assert main(["validate", str(sample_path), "--stats"]) == 0
    assert capsys.readouterr().out == plain + stats
    assert "prompt chars mean" not in plain


def test_show_prints_pairs_readably(tmp_path, capsys):
    path = write(
        tmp_path / "helpful-base" / "test.jsonl",
        [
            json.dumps(
                {
                    "chosen": f"\n\nHuman: question {n}\n\nAssistant: yes",
                    "rejected": f"\n\nHuman: question {n}\n\nAssistant: no",
                }
            ).encode()
            for n in range(5)
        ],
    )
    assert main(["show", str(path), "-n", "2", "--skip", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== pair ") == 2
    assert "=== pair 2 of 5 | helpful-base/test | id " in out
    assert "  user:\n    question 1\n  CHOSEN:\n    yes\n  REJECTED:\n    no\n" in out
    assert main(["show", "-n", "1"]) == 0
    assert "=== pair 1 of 2,312 | harmless-base/test" in capsys.readouterr().out


def test_validate_counts_reconcile_over_many_kinds_of_trouble(tmp_path, capsys):
    """lines = blank + records and records = accepted + quarantined, as printed, over blank
    lines, bad JSON, a pair without a prompt and a gzip cut short, across three files."""
    import gzip
    import re

    good = [pair(f"\n\nHuman: q{n}", f"\n\nHuman: q{n}") for n in range(50)]
    write(tmp_path / "harmless-base" / "train.jsonl", good[:20] + [b"", b"{oops", b"  "])
    write(
        tmp_path / "helpful-base" / "test.jsonl",
        good[20:30] + [pair("\n\nHuman: a", "\n\nHuman: b")],
    )
    whole = gzip.compress(b"\n".join(good[30:]) + b"\n")
    (tmp_path / "helpful-online").mkdir()
    (tmp_path / "helpful-online" / "train.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    saved = tmp_path / "bad.jsonl"

    assert main(["validate", str(tmp_path), "--quarantine", str(saved)]) == 1
    out = capsys.readouterr().out
    numbers = re.match(
        r"read 3 files: ([\d,]+) lines \(([\d,]+) blank\), ([\d,]+) records = "
        r"([\d,]+) accepted \+ ([\d,]+) quarantined\n",
        out,
    )
    lines, blank, records, accepted, quarantined = (
        int(n.replace(",", "")) for n in numbers.groups()
    )
    assert lines == blank + records and records == accepted + quarantined and blank == 2
    assert quarantined == len(saved.read_text().splitlines()) >= 3  # oops, prompt_mismatch, the cut
    assert f"wrote {quarantined} quarantined records" in out
