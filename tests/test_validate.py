"""The JSON Schemas are the source of truth; the vectorised checks agree with jsonschema."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from hhdata.errors import SchemaError
from hhdata.io.read import read_raw
from hhdata.io.validate import (
    PAIR_ROW,
    RAW_RECORD,
    arrow_schema,
    load_schema,
    pair_table_problems,
    validate_pair_table,
    validate_raw_table,
    validator,
)
from hhdata.pairs import build_pairs
from hhdata.pairs.transcript import FLAGS
from hhdata.schema import PAIR_SCHEMA

SCHEMAS = Path(__file__).parent.parent / "schemas"


@pytest.mark.parametrize("name", [RAW_RECORD, PAIR_ROW])
def test_schemas_are_valid_2020_12_and_reachable_from_the_top_level(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert json.loads((SCHEMAS / f"{name}.schema.json").read_text()) == schema


def test_the_arrow_pair_schema_follows_from_the_json_schema():
    assert arrow_schema(PAIR_ROW) == PAIR_SCHEMA


def test_the_flag_enum_is_the_transcript_flags():
    assert load_schema(PAIR_ROW)["properties"]["flags"]["items"]["enum"] == list(FLAGS)


@pytest.fixture(scope="module")
def sample_pairs(sample_path) -> pa.Table:
    return build_pairs(read_raw(sample_path).table)[0]


def test_every_real_pair_row_matches_the_schema_by_both_routes(sample_pairs):
    assert pair_table_problems(sample_pairs) == []
    check = validator(PAIR_ROW)
    assert all(check.is_valid(row) for row in sample_pairs.slice(0, 300).to_pylist())


def _replace(table: pa.Table, row: int, column: str, value) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    return table.set_column(
        table.schema.get_field_index(column),
        column,
        pa.array(values, table.schema.field(column).type),
    )


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("id", "XYZ", "id: 'XYZ' does not match '^[0-9a-f]{20}$'"),
        ("family", "other", "family: 'other' is not one of ['helpful', 'harmless']"),
        ("split", "dev", "split: 'dev' is not one of ['train', 'test']"),
        ("prompt", [], "prompt: [] should be non-empty"),
        (
            "chosen",
            [{"role": "system", "content": "x"}],
            "chosen/0/role: 'system' is not one of ['user', 'assistant']",
        ),
        (
            "rejected",
            [{"role": "assistant", "content": "a"}] * 2,
            "rejected: [{'role': 'assistant', 'content': 'a'}, {'role': 'assistant', 'content': "
            "'a'}] is too long",
        ),
        ("flags", ["made_up"], "flags/0: 'made_up' is not one of " + str(list(FLAGS))),
        (
            "flags",
            ["empty_chosen", "empty_chosen"],
            "flags: ['empty_chosen', 'empty_chosen'] has non-unique elements",
        ),
        ("subset", None, "subset: None is not of type 'string'"),
    ],
)
def test_a_broken_pair_row_is_found_and_jsonschema_words_it(sample_pairs, column, value, message):
    table = _replace(sample_pairs.slice(0, 50), 7, column, value)
    row_id = table["id"][7].as_py()
    assert pair_table_problems(table) == [(row_id, message)]
    with pytest.raises(SchemaError, match="1 pair rows break schemas/pair_row.schema.json"):
        validate_pair_table(table)


def test_a_table_missing_a_column_is_refused(sample_pairs):
    with pytest.raises(SchemaError) as raised:
        pair_table_problems(sample_pairs.drop_columns(["flags"]))
    assert str(raised.value) == (
        "the pair table lacks the columns ['flags']; build it with hhdata.pairs.build_pairs, "
        "which writes every column of the pair row"
    )


def test_raw_validation_flags_exactly_the_rows_jsonschema_rejects():
    records = [("a", "b"), ("", "b"), ("a", ""), ("same", "same"), ("é", "e")]
    table = pa.table(
        {
            "file": ["f"] * 5,
            "line": list(range(1, 6)),
            "chosen": [c for c, _ in records],
            "rejected": [r for _, r in records],
        }
    )
    good, quarantine = validate_raw_table(table)
    assert good["line"].to_pylist() == [1, 5]
    assert list(zip(quarantine["line"].to_pylist(), quarantine["reason"].to_pylist())) == [
        (2, "empty_string"),
        (3, "empty_string"),
        (4, "chosen_equals_rejected"),
    ]
    check = validator(RAW_RECORD)
    assert [check.is_valid({"chosen": c, "rejected": r}) for c, r in records] == [
        True,
        False,
        False,
        True,
        True,
    ]
