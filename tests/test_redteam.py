"""hhdata.redteam: its own schema and config, both upstream file shapes, never mixed with pairs."""

from __future__ import annotations

import gzip
import json

import pytest

from hhdata import configs, redteam
from hhdata.errors import SchemaError
from hhdata.transcript import render_transcript

RECORD = {
    "transcript": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
    "min_harmlessness_score_transcript": 0.42,
    "num_params": "52B",
    "model_type": "rlhf",
    "rating": 0.0,
    "task_description": "Tried to get lock picking advice",
    "task_descripton_harmlessness_score": 1.5,
    "red_team_member_id": 7,
    "is_upsampled": False,
    "tags": None,
}


def write(path, records, shape):
    if shape == "array":
        text = json.dumps(records)
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write(text)
    return path


@pytest.mark.parametrize("shape", ["array", "lines"])
def test_reads_both_upstream_shapes(tmp_path, shape):
    second = {**RECORD, "transcript": RECORD["transcript"] + "\n\nHuman: Please?", "rating": 3,
              "tags": ["lock picking"]}
    table = redteam.read_redteam(write(tmp_path / "red.jsonl.gz", [RECORD, second], shape))
    assert table.schema == redteam.REDTEAM_SCHEMA and table.num_rows == 2
    row = table.to_pylist()[1]
    assert row["subset"] == "red-team-attempts" and row["rating"] == 3.0 and row["tags"] == ["lock picking"]
    assert render_transcript(row["transcript"]) == row["transcript_text"] == second["transcript"]
    assert table["task_description_harmlessness_score"].to_pylist() == [1.5, 1.5]
    assert redteam.summary(table) == {"config": "red-team-attempts", "rows": 2,
                                      "rating": {"0.0": 1, "3.0": 1}, "model_type": {"rlhf": 2}}
    assert all(not list(redteam.row_validator().iter_errors(r)) for r in table.to_pylist())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rating": 9}, r"record 2: rating: 9 is greater than the maximum of 4; fix the record"),
        ({"red_team_member_id": "seven"}, r"record 2: red_team_member_id: 'seven' is not of type 'integer'"),
        ({"surprise": 1}, r"record 2: \(the record\): Additional properties are not allowed"),
        ({"transcript": "no tags here"}, r"record 2: transcript: transcript does not start with"),
    ],
)
def test_bad_records_are_named_with_the_fix(tmp_path, change, message):
    path = write(tmp_path / "red.jsonl.gz", [RECORD, {**RECORD, **change}], "lines")
    with pytest.raises(SchemaError, match=message):
        redteam.read_redteam(path)


def test_pairs_are_refused_in_both_directions(tmp_path):
    pair = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    with pytest.raises(SchemaError, match="record 1 is a preference pair"):
        redteam.read_redteam(write(tmp_path / "pairs.jsonl.gz", [pair], "lines"))
    table = redteam.read_redteam(write(tmp_path / "red.jsonl.gz", [RECORD], "lines"))
    with pytest.raises(configs.ConfigError, match="not preference pairs"):
        configs.config_names(["helpful-base", *table["subset"].to_pylist()])
    with pytest.raises(SchemaError, match="this table holds preference pairs"):
        redteam.check_redteam_table(table.append_column("chosen", table["transcript_text"]))
