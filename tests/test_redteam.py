"""hhdata.io.redteam: the real upstream shape, its own schema and config, bad records
quarantined by number, never mixed with pairs."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow.parquet as pq
import pytest

from hhdata.cli import main
from hhdata.dedup import configs
from hhdata.errors import SchemaError, TranscriptError
from hhdata.io import redteam
from hhdata.pairs.transcript import render_transcript

# the keys of upstream red_team_attempts.jsonl.gz, in its order, misspelling included
UPSTREAM_KEYS = [
    "transcript",
    "min_harmlessness_score_transcript",
    "num_params",
    "model_type",
    "rating",
    "task_description",
    "task_descripton_harmlessness_score",
    "red_team_member_id",
    "is_upworker",
    "tags",
]


def upstream_records(count: int, seed: int = 0) -> list[dict]:
    """Records in exactly upstream's shape: float scores and ratings (0.0-4.0), the model
    size as a string, an integer member id, a boolean is_upworker, and tags mostly null."""
    rng = random.Random(seed)
    records = []
    for n in range(count):
        turns = "".join(
            f"\n\nHuman: question {n}.{t}?\n\nAssistant: answer {n}.{t}."
            for t in range(rng.randint(1, 4))
        )
        records.append(
            {
                "transcript": turns,
                "min_harmlessness_score_transcript": rng.uniform(-4, 2),
                "num_params": rng.choice(["2.7B", "13B", "52B"]),
                "model_type": rng.choice(
                    ["plain lm", "context distillation", "rejection sampling", "rlhf"]
                ),
                "rating": float(rng.randint(0, 4)),
                "task_description": f"Tried to get the assistant to do thing {n}",
                "task_descripton_harmlessness_score": rng.uniform(-3, 3),
                "red_team_member_id": rng.randint(0, 300),
                "is_upworker": rng.random() < 0.5,
                "tags": None if n % 4 else ["violence", "crime"][: 1 + n % 2],
            }
        )
    assert all(list(record) == UPSTREAM_KEYS for record in records)
    return records


def write_array(path, records, indent=None):
    """As upstream ships it: one gzipped JSON array, despite the .jsonl.gz name."""
    path.write_bytes(gzip.compress(json.dumps(records, indent=indent).encode(), mtime=0))
    return path


def write_lines(path, lines):
    path.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode(), mtime=0))
    return path


@pytest.mark.parametrize("indent", [None, 2])
def test_the_upstream_shape_reads_whole(tmp_path, indent):
    records = upstream_records(60)
    result = redteam.read_redteam(
        write_array(tmp_path / "red_team_attempts.jsonl.gz", records, indent)
    )

    assert (result.records, result.table.num_rows, result.quarantine.num_rows) == (60, 60, 0)
    assert result.table.schema == redteam.REDTEAM_SCHEMA and result.reconciles()
    rows = result.table.to_pylist()
    for record, row in zip(records, rows):
        assert (
            row["transcript_text"] == record["transcript"] == render_transcript(row["transcript"])
        )
        assert row["red_team_member_id"] == str(record["red_team_member_id"])
        assert row["is_upworker"] is record["is_upworker"]
        assert row["tags"] == record["tags"]
        assert (
            row["task_description_harmlessness_score"]
            == record["task_descripton_harmlessness_score"]
        )
        assert (row["rating"], row["num_params"], row["model_type"]) == (
            record["rating"],
            record["num_params"],
            record["model_type"],
        )
        assert row["subset"] == "red-team-attempts" and row["id"] == redteam.transcript_id(
            record["transcript"]
        )
    assert all(not list(redteam.row_validator().iter_errors(row)) for row in rows)
    ratings = {}
    for record in records:
        ratings[str(record["rating"])] = ratings.get(str(record["rating"]), 0) + 1
    assert redteam.summary(result.table)["rating"] == dict(sorted(ratings.items()))


def test_json_lines_and_string_member_ids_read_too(tmp_path):
    records = upstream_records(3)
    records[1]["red_team_member_id"] = "a3f9"
    result = redteam.read_redteam(
        write_lines(tmp_path / "red.jsonl.gz", [json.dumps(r) for r in records])
    )
    assert result.table["red_team_member_id"].to_pylist() == [
        str(records[0]["red_team_member_id"]),
        "a3f9",
        str(records[2]["red_team_member_id"]),
    ]


BAD_RECORDS = [
    ({"rating": 9.0}, "schema_violation", "rating: 9.0 is greater than the maximum of 4"),
    (
        {"red_team_member_id": True},
        "wrong_type",
        "red_team_member_id: True is not of type 'string'",
    ),
    ({"is_upworker": None}, "null_value", "is_upworker: None is not of type 'boolean'"),
    (
        {"surprise": 1},
        "extra_key",
        "(the record): Additional properties are not allowed ('surprise' was unexpected)",
    ),
    (
        {"transcript": "no tags here"},
        "bad_transcript_start",
        "transcript: transcript does not start with",
    ),
    # the record's own key is named, not the id hhdata derives from it
    ({"transcript": 5}, "wrong_type", "transcript: 5 is not a string"),
    ({"transcript": None}, "null_value", "transcript: None is not a string"),
]


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    BAD_RECORDS,
    ids=[f"{r[1]}-{i}" for i, r in enumerate(BAD_RECORDS)],
)
def test_a_bad_record_is_quarantined_by_number_and_the_rest_are_read(
    tmp_path, capsys, change, reason, message
):
    records = upstream_records(5)
    records[2] = {**records[2], **change}
    path = write_array(tmp_path / "red_team_attempts.jsonl.gz", records)

    result = redteam.read_redteam(path)

    assert result.table["transcript_text"].to_pylist() == [
        records[i]["transcript"] for i in (0, 1, 3, 4)
    ]
    [row] = result.quarantine.to_pylist()
    assert (row["file"], row["line"], row["reason"]) == (str(path), 3, reason)
    assert row["message"].startswith(f"record 3: {message}")
    assert json.loads(row["raw"]) == records[2]
    assert result.reconciles()

    out = tmp_path / "red.parquet"
    assert main(["redteam", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"quarantined {path}: {reason}: record 3: {message}" in printed
    assert "5 records: 4 read, 1 quarantined" in printed
    assert pq.read_table(out).num_rows == 4


def test_a_record_without_its_transcript_names_the_transcript_not_the_derived_id():
    record = upstream_records(1)[0]
    del record["transcript"]
    assert redteam._check(record)[0] == (
        "missing_key",
        "(the record): 'transcript' is a required property; fix the record to follow "
        "hhdata/schemas/redteam_row.schema.json",
    )


def test_a_missing_key_a_non_object_and_a_bad_json_line(tmp_path):
    records = upstream_records(3)
    del records[0]["is_upworker"]
    lines = [
        json.dumps(records[0]),
        "[1, 2]",
        '{"transcript": ',
        "[" * 5000 + "]" * 5000,
        json.dumps(records[1]),
    ]
    result = redteam.read_redteam(write_lines(tmp_path / "red.jsonl.gz", lines))
    assert [(r["line"], r["reason"]) for r in result.quarantine.to_pylist()] == [
        (1, "missing_key"),
        (2, "not_an_object"),
        (3, "invalid_json"),
        (4, "invalid_json"),
    ]
    assert result.table.num_rows == 1 and result.reconciles()


def test_a_broken_json_array_names_where(tmp_path):
    path = tmp_path / "red.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(upstream_records(2), indent=1).encode()[:-20]))
    with pytest.raises(
        SchemaError, match=r"red.jsonl.gz: line \d+ column \d+: the JSON array is not valid JSON"
    ):
        redteam.read_redteam(path)


def test_pairs_are_refused_in_both_directions(tmp_path):
    pair = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    with pytest.raises(SchemaError, match="record 1 is a preference pair"):
        redteam.read_redteam(write_lines(tmp_path / "pairs.jsonl.gz", [json.dumps(pair)]))
    table = redteam.read_redteam(write_array(tmp_path / "red.jsonl.gz", upstream_records(1))).table
    with pytest.raises(configs.ConfigError, match="not preference pairs"):
        configs.config_names(["helpful-base", *table["subset"].to_pylist()])
    with pytest.raises(SchemaError, match="this table holds preference pairs"):
        redteam.check_redteam_table(table.append_column("chosen", table["transcript_text"]))


def test_a_clone_of_the_upstream_repo_validates_and_builds_without_its_red_team_file(
    tmp_path, capsys
):
    """The upstream layout holds red-team-attempts/red_team_attempts.jsonl.gz beside the pair
    subsets: validate and build read the pairs and leave the attempts to `hhdata redteam`."""
    clone = tmp_path / "hh-rlhf"
    red = clone / "red-team-attempts" / "red_team_attempts.jsonl.gz"
    red.parent.mkdir(parents=True)
    write_array(red, upstream_records(5))
    pairs = [
        json.dumps(
            {
                "chosen": f"\n\nHuman: q{n}\n\nAssistant: yes",
                "rejected": f"\n\nHuman: q{n}\n\nAssistant: no",
            }
        )
        for n in range(3)
    ]
    (clone / "harmless-base").mkdir()
    write_lines(clone / "harmless-base" / "test.jsonl.gz", pairs)

    assert main(["validate", str(clone)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("read 1 file: 3 lines (0 blank), 3 records = 3 accepted + 0 quarantined")
    assert (
        f"note: {red}: red-team attempts, not preference pairs: skipped (check them with "
        f"`hhdata redteam {red}`)" in out
    )
    assert main(["build", str(clone), "--version", "1.0.0", "--out", str(tmp_path / "out")]) == 0
    assert (
        json.loads((tmp_path / "out" / "1.0.0" / "manifest.json").read_text())["accounting"]["read"]
        == 3
    )
    capsys.readouterr()
    assert main(["validate", str(red)]) == 2  # named on its own: pointed at the reader that fits
    assert capsys.readouterr().err == (
        f"hhdata validate: error: {red} holds red-team attempts, not preference pairs: read "
        f"and check it with `hhdata redteam {red}` (hhdata.redteam.read_redteam)\n"
    )
    assert main(["redteam", str(red)]) == 0


MUTATIONS = [
    {"rating": -1.0},
    {"rating": 4},
    {"rating": True},
    {"num_params": ""},
    {"model_type": None},
    {"tags": []},
    {"tags": ["a", 1]},
    {"tags": "violence"},
    {"red_team_member_id": ""},
    {"red_team_member_id": 3.5},
    {"red_team_member_id": -2},
    {"is_upworker": 0},
    {"min_harmlessness_score_transcript": "1.0"},
    {"task_description": ""},
    {"transcript": "\n\nHuman: only a question"},
    {"transcript": 5},
]


def test_the_quick_and_vectorised_checks_agree_with_jsonschema(tmp_path):
    """Each mutated record is kept exactly when jsonschema accepts its row."""
    base = upstream_records(1)[0]
    records = [{**base, **change} for change in MUTATIONS]
    result = redteam.read_redteam(write_array(tmp_path / "red.jsonl.gz", records))
    quarantined = set(result.quarantine["line"].to_pylist())
    for number, record in enumerate(records, start=1):
        try:
            valid = not list(redteam.row_validator().iter_errors(redteam.to_row(record)))
        except TranscriptError:  # a transcript that cannot be parsed
            valid = False
        assert (number not in quarantined) == valid, (number, MUTATIONS[number - 1])
    assert result.reconciles() and 0 < len(quarantined) < len(records)
