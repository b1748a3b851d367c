"""Validation against the JSON Schemas in hhdata/schemas/, vectorised over Arrow tables.

The schemas are the source of truth. ``row_problems`` compiles the keywords the schemas
use (type, required, const, minLength, pattern, enum, minimum, maximum, minItems, maxItems,
items, uniqueItems) into pyarrow.compute predicates over a whole table at once; only the
rows that fail are then handed to the ``jsonschema`` library, which words the exact message.
The Arrow schema of
the pair row follows from its JSON Schema too (``arrow_schema``), and a test checks that
it equals hhdata.schema.PAIR_SCHEMA.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata import quarantine as q
from hhdata.errors import SchemaError

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

RAW_RECORD = "raw_record"
PAIR_ROW = "pair_row"

# jsonschema keyword of the first error -> quarantine reason code
_REASON_OF_KEYWORD = {
    "required": q.MISSING_KEY,
    "additionalProperties": q.EXTRA_KEY,
    "type": q.WRONG_TYPE,
    "minLength": q.EMPTY_STRING,
}
_FIX_OF_REASON = {
    q.MISSING_KEY: "each line needs both 'chosen' and 'rejected'",
    q.EXTRA_KEY: "remove the other keys or convert the file to the HH-RLHF format first",
    q.WRONG_TYPE: "both values must be JSON strings",
    q.NULL_VALUE: "both values must be JSON strings, not null",
    q.EMPTY_STRING: "both transcripts must hold text",
}


@cache
def load_schema(name: str) -> dict:
    """A JSON Schema shipped in hhdata/schemas/, by name ('raw_record' or 'pair_row')."""
    text = resources.files("hhdata").joinpath(f"schemas/{name}.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def validator(name: str) -> Draft202012Validator:
    """The jsonschema validator of a shipped schema (checked to be a valid 2020-12 schema).

    Imported on first use: only failing rows need it, and a clean read should not pay for
    importing it (a tenth of a second).
    """
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def explain_raw_record(record: object) -> tuple[str, str] | None:
    """Reason code and message for a decoded raw record that breaks the rules, else None.

    >>> explain_raw_record({"chosen": "a"})  # doctest: +NORMALIZE_WHITESPACE
    ('missing_key',
     "'rejected' is a required property; each line needs both 'chosen' and 'rejected'")
    """
    if not isinstance(record, dict):
        return q.NOT_AN_OBJECT, (
            f"the line is a JSON {_json_type(record)}, not an object; each line must be "
            '{"chosen": "...", "rejected": "..."}'
        )
    errors = sorted(validator(RAW_RECORD).iter_errors(record), key=lambda e: list(e.path))
    if errors:
        error = errors[0]
        reason = _REASON_OF_KEYWORD.get(error.validator, q.SCHEMA_VIOLATION)
        if reason == q.WRONG_TYPE and error.instance is None:
            reason = q.NULL_VALUE
        where = f"at '{error.path[0]}': " if error.path else ""
        fix = _FIX_OF_REASON.get(reason, "see schemas/raw_record.schema.json")
        return reason, f"{where}{_short(error)}; {fix}"
    if record["chosen"] == record["rejected"]:
        return q.CHOSEN_EQUALS_REJECTED, (
            "chosen and rejected are the same text, so the record states no preference; "
            "fix the rejected transcript or drop the line"
        )
    return None


def explain_raw_line(line: bytes) -> tuple[tuple[str, str] | None, dict | None]:
    """The slow path for one line: ((reason, message), None), or (None, record) if fine.

    >>> explain_raw_line(b'{"chosen": "a"')[0][0]
    'invalid_json'
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return (
            q.INVALID_UTF8,
            (
                f"byte {error.start} of the line ({line[error.start : error.start + 1]!r}) is not "
                "valid UTF-8; re-encode the file as UTF-8"
            ),
        ), None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return (q.INVALID_JSON, f"{error.msg}: column {error.colno}; fix or remove the line"), None
    except RecursionError:
        # json.loads recurses once per level; a record is two strings, never this deep
        return (
            q.INVALID_JSON,
            (
                "the JSON is nested too deeply to decode (over Python's recursion limit); a "
                'record is {"chosen": "...", "rejected": "..."}: fix or remove the line'
            ),
        ), None
    problem = explain_raw_record(record)
    if problem:
        return problem, None
    for key in ("chosen", "rejected"):
        try:
            record[key].encode("utf-8")
        except UnicodeEncodeError:
            return (
                q.INVALID_UTF8,
                (
                    f"'{key}' escapes a lone surrogate (\\ud800-\\udfff), which is not valid "
                    "Unicode; fix the escape sequence"
                ),
            ), None
    return None, record


def _short(error) -> str:
    """jsonschema's message, with a long offending value cut to its first 60 characters."""
    shown = repr(error.instance)
    if len(shown) > 80 and error.message.startswith(shown):
        cut = f"{shown[:60]}... ({len(shown):,} characters)"
        return cut + error.message[len(shown) :]
    return error.message


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def validate_raw_table(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split a raw table (hhdata.io.read columns) into valid records and a quarantine.

    Vectorised over the table; jsonschema words the message for the failing rows only.
    The one rule JSON Schema cannot express, chosen != rejected, is checked here too.
    """
    bad = row_problems(table, load_schema(RAW_RECORD))
    bad |= pc.equal(table["chosen"], table["rejected"]).to_numpy(zero_copy_only=False)
    if not bad.any():
        return table, q.quarantine_table([])
    rows = []
    for index in np.flatnonzero(bad):
        record = {
            "chosen": table["chosen"][index].as_py(),
            "rejected": table["rejected"][index].as_py(),
        }
        reason, message = explain_raw_record(record)
        raw = json.dumps(record, ensure_ascii=False).encode("utf-8")
        rows.append(
            (table["file"][index].as_py(), table["line"][index].as_py(), reason, message, raw)
        )
    return drop_rows(table, np.flatnonzero(bad)), q.quarantine_table(rows)


def drop_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """The table less a few rows, as zero-copy slices between them (filter would copy)."""
    edges = np.concatenate([[-1], rows, [table.num_rows]])
    pieces = [table.slice(a + 1, b - a - 1) for a, b in zip(edges[:-1], edges[1:]) if b - a > 1]
    return pa.concat_tables([table.schema.empty_table(), *pieces])


def pair_table_problems(table: pa.Table) -> list[tuple[str, str]]:
    """(row id, jsonschema message) for every pair row that breaks pair_row.schema.json."""
    schema = load_schema(PAIR_ROW)
    missing = set(schema["required"]) - set(table.column_names)
    if missing:
        raise SchemaError(
            f"the pair table lacks the columns {sorted(missing)}; build it with "
            "hhdata.pairs.build_pairs, which writes every column of the pair row"
        )
    problems = []
    for index in np.flatnonzero(row_problems(table, schema)):
        row = table.slice(index, 1).to_pylist()[0]
        for error in validator(PAIR_ROW).iter_errors(row):
            where = "/".join(map(str, error.absolute_path)) or "row"
            problems.append((str(row.get("id")), f"{where}: {_short(error)}"))
    return problems


def validate_pair_table(table: pa.Table) -> pa.Table:
    """Return the table if every row matches pair_row.schema.json, else raise SchemaError."""
    problems = pair_table_problems(table)
    if problems:
        shown = "; ".join(f"row {row_id}: {message}" for row_id, message in problems[:5])
        raise SchemaError(
            f"{len(problems)} pair rows break schemas/pair_row.schema.json ({shown}); "
            "rebuild them with hhdata.pairs.build_pairs instead of editing rows by hand"
        )
    return table


def row_problems(table: pa.Table, schema: dict) -> np.ndarray:
    """Boolean mask of the rows that break an object schema, computed column by column."""
    bad = np.zeros(table.num_rows, dtype=bool)
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in table.column_names:
            return ~bad  # every row lacks the key
    # additionalProperties is a per-record rule: the raw table's provenance columns (file,
    # line, subset, split) are not record keys, and read_raw already quarantined extra keys
    for name, rule in properties.items():
        if name in table.column_names:
            column = table[name]
            if not pa.types.is_string(column.type):  # nested columns are checked as one array
                column = column.combine_chunks()
            bad |= _value_problems(column, _resolve(schema, rule), schema)
    return bad


def _resolve(root: dict, rule: dict) -> dict:
    """Merge a local ``$ref`` (``#/$defs/...``) into the rule that holds it."""
    if "$ref" not in rule:
        return rule
    target = root
    for part in rule["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(root, target), **{k: v for k, v in rule.items() if k != "$ref"}}


def _value_problems(values: pa.Array, rule: dict, root: dict) -> np.ndarray:
    """Mask of the values of one column that break one property rule."""
    kinds = rule.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    bad = nulls.copy()
    nullable = "null" in kinds  # ``"type": ["array", "null"]``: null is a value, not a problem
    if nullable:
        kinds.remove("null")
    kind = kinds[0] if len(kinds) == 1 else None
    if kind in ("number", "integer"):
        if "minimum" in rule:
            bad |= _fill(pc.less(values, rule["minimum"]))
        if "maximum" in rule:
            bad |= _fill(pc.greater(values, rule["maximum"]))
    elif kind == "string":
        if "const" in rule:
            bad |= _fill(pc.not_equal(values, pa.scalar(rule["const"], values.type)))
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            raise SchemaError(f"column of type {values.type} where the schema says string")
        if "minLength" in rule:
            bad |= _too_short(values, rule["minLength"])
        if "pattern" in rule:
            bad |= _fill(pc.invert(pc.match_substring_regex(values, rule["pattern"])))
        if "enum" in rule:
            bad |= _fill(pc.invert(pc.is_in(values, pa.array(rule["enum"], values.type))))
    elif kind == "array":
        lengths = pc.list_value_length(values)
        if "minItems" in rule:
            bad |= _fill(pc.less(lengths, rule["minItems"]))
        if "maxItems" in rule:
            bad |= _fill(pc.greater(lengths, rule["maxItems"]))
        items = _resolve(root, rule.get("items", {}))
        flat = pc.list_flatten(values)
        parents = pc.list_parent_indices(values).to_numpy()
        if items.get("type") == "object":
            item_bad = np.zeros(len(flat), dtype=bool)
            for name, sub in items.get("properties", {}).items():
                item_bad |= _value_problems(flat.field(name), _resolve(root, sub), root)
        else:
            item_bad = _value_problems(flat, items, root)
        np.logical_or.at(bad, parents[item_bad], True)
        if rule.get("uniqueItems"):
            pairs = pa.table({"row": parents, "value": flat})
            counts = pairs.group_by(["row", "value"]).aggregate([("value", "count")])
            repeated = pc.greater(counts["value_count"], 1)
            bad[counts.filter(repeated)["row"].to_numpy()] = True
    if nullable:
        bad &= ~nulls
    return bad


def _too_short(values: pa.Array, least: int) -> np.ndarray:
    """Mask of strings under ``least`` code points; counts code points only where the byte
    length (1 to 4 bytes a code point) leaves it open."""
    size = pc.binary_length(values).to_numpy(zero_copy_only=False)
    short = size < least
    open_rows = np.flatnonzero(~short & (size < 4 * least))
    if len(open_rows):
        counted = pc.utf8_length(values.take(pa.array(open_rows))).to_numpy(zero_copy_only=False)
        short[open_rows[counted < least]] = True
    return short


def _fill(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean compute result as numpy, nulls counted as failures."""
    return pc.fill_null(mask, True).to_numpy(zero_copy_only=False)


_ARROW_OF_JSON = {"string": pa.string(), "integer": pa.int64(), "boolean": pa.bool_()}


def arrow_schema(name: str = PAIR_ROW) -> pa.Schema:
    """The Arrow schema that follows from a shipped JSON Schema, columns in property order."""
    root = load_schema(name)
    return pa.schema([(key, _arrow_type(root, rule)) for key, rule in root["properties"].items()])


def _arrow_type(root: dict, rule: dict) -> pa.DataType:
    rule = _resolve(root, rule)
    if rule["type"] == "array":
        return pa.list_(_arrow_type(root, rule["items"]))
    if rule["type"] == "object":
        return pa.struct([(k, _arrow_type(root, v)) for k, v in rule["properties"].items()])
    return _ARROW_OF_JSON[rule["type"]]
