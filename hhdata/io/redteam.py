"""Red-team attempts: whole transcripts with scores, in their own schema and config.

Anthropic's ``red-team-attempts`` (Ganguli et al. 2022) are not preference pairs: each
record is one conversation in which a crowdworker tried to make the assistant misbehave,
with a self-rating and preference-model harmlessness scores. They are read into
REDTEAM_SCHEMA rows, checked against ``schemas/redteam_row.schema.json``, and live in the
config ``red-team-attempts`` only; hhdata.dedup.configs refuses to mix them into pair configs.

Upstream ships ``red_team_attempts.jsonl.gz`` as ONE gzipped JSON array of 38,961 records
(despite the name) with the keys transcript, min_harmlessness_score_transcript,
num_params, model_type, rating, task_description, task_descripton_harmlessness_score (sic),
red_team_member_id, is_upworker and tags (often null); JSON Lines is read too. The
misspelt key is stored under its correct spelling; the member id, an integer upstream, is
kept as a string so that other collections may use string ids. A record that breaks the
row schema is quarantined with its record number, and the others are read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa

from hhdata import quarantine as q
from hhdata.errors import SchemaError, SourceError, TranscriptError
from hhdata.io.lines import path_text
from hhdata.io.validate import drop_rows, row_problems
from hhdata.pairs.transcript import parse_transcript
from hhdata.schema import RED_TEAM_SUBSET, REDTEAM_SCHEMA

CONFIG = RED_TEAM_SUBSET
_UPSTREAM_TYPO = {"task_descripton_harmlessness_score": "task_description_harmlessness_score"}
# jsonschema keyword of a record's first error -> quarantine reason code
_REASON_OF_KEYWORD = {
    "required": q.MISSING_KEY,
    "additionalProperties": q.EXTRA_KEY,
    "type": q.WRONG_TYPE,
}


@dataclass
class RedTeamResult:
    """The red-team rows read (REDTEAM_SCHEMA), the records quarantined (QUARANTINE_SCHEMA,
    ``line`` holding the 1-based record number), and how many records the file held."""

    table: pa.Table
    quarantine: pa.Table
    records: int

    def reconciles(self) -> bool:
        """True when records == rows + quarantined."""
        return self.records == self.table.num_rows + self.quarantine.num_rows


@lru_cache(maxsize=1)
def row_validator() -> jsonschema.Draft202012Validator:
    """The JSON Schema validator of one red-team row (schemas/redteam_row.schema.json)."""
    text = resources.files("hhdata").joinpath("schemas", "redteam_row.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def transcript_id(text: str) -> str:
    """Stable id of a red-team transcript: 20 hex digits of sha256 of its text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _text(path: Path) -> str:
    """The whole file as text, inflated when it is gzip."""
    try:
        with path.open("rb") as file:
            gzipped = file.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as source:
            return source.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise SourceError(f"{path_text(path)}: cannot read it as UTF-8 JSON ({error})") from None


def _records(path: Path) -> list[tuple[object, str | None]]:
    """(record, None) per record, or (None, message) for a JSON Lines line that is not JSON.

    A JSON array is one document: when it is not valid JSON no record can be told apart,
    so that raises SchemaError naming the line and column.
    """
    text = _text(path)
    if text.lstrip().startswith("["):
        try:
            return [(record, None) for record in json.loads(text)]
        except json.JSONDecodeError as error:
            raise SchemaError(
                f"{path_text(path)}: line {error.lineno} column {error.colno}: the JSON array is "
                f"not valid JSON ({error.msg}); re-download or fix the file"
            ) from None
        except RecursionError:
            raise SchemaError(
                f"{path_text(path)}: the JSON array is nested too deeply to "
                "decode; re-download or fix the file"
            ) from None
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append((json.loads(line), None))
            except json.JSONDecodeError as error:
                records.append((line, f"{error.msg}: column {error.colno}; fix or remove the line"))
            except RecursionError:
                records.append(
                    (line, "the JSON is nested too deeply to decode; fix or remove the line")
                )
    return records


def to_row(record: dict) -> dict:
    """One upstream record as a red-team row (not yet validated).

    Raises TranscriptError when the transcript is not in the Human/Assistant format.
    """
    row = {_UPSTREAM_TYPO.get(key, key): value for key, value in record.items()}
    text = row.get("transcript")
    if isinstance(text, str):
        row["transcript_text"] = text
        row["transcript"] = parse_transcript(text)
        row["id"] = transcript_id(text)
    member = row.get("red_team_member_id")
    if isinstance(member, int) and not isinstance(member, bool):
        row["red_team_member_id"] = str(member)
    row["subset"] = RED_TEAM_SUBSET
    return row


def read_redteam(path: str | Path) -> RedTeamResult:
    """Read red-team attempts (JSON array or JSON Lines, optionally gzipped).

    Every record that breaks schemas/redteam_row.schema.json, or whose transcript cannot be
    parsed, is quarantined with its record number and the reason; the rest are read.
    Raises SourceError when the file cannot be read, SchemaError when a JSON array is not
    valid JSON or the first record is a preference pair (a pair file, not red-team data).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            f"{path_text(path)}: no such file; pass the red_team_attempts.jsonl(.gz) file"
        )
    name = path_text(path)
    records = _records(path)
    first = records[0][0] if records else None
    if isinstance(first, dict) and {"chosen", "rejected"} <= set(first):
        raise SchemaError(
            f"{name}: record 1 is a preference pair (chosen/rejected), not a red-team attempt; "
            "read pair files with hhdata.io.read.read_raw: red-team attempts and pairs never mix"
        )
    rows, numbers, bad = [], [], []
    for number, (record, invalid) in enumerate(records, start=1):
        problem = (q.INVALID_JSON, invalid) if invalid is not None else None
        if problem is None:
            problem, row = _check(record)
            if problem is None:
                rows.append(row)
                numbers.append(number)
                continue
        bad.append(_quarantined(name, number, record, problem))
    table = pa.Table.from_pylist(rows, schema=REDTEAM_SCHEMA)
    # the values' ranges, lengths and patterns, vectorised; jsonschema words the failures
    failing = np.flatnonzero(row_problems(table, row_validator().schema))
    for index in failing:
        bad.append(
            _quarantined(
                name, numbers[index], records[numbers[index] - 1][0], _explain(rows[index])
            )
        )
    bad.sort(key=lambda entry: entry[1])
    return RedTeamResult(drop_rows(table, failing), q.quarantine_table(bad), len(records))


def _quarantined(name: str, number: int, record: object, problem: tuple[str, str]) -> tuple:
    """A quarantine entry for record ``number``: file, number, reason, message, raw JSON."""
    raw = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
    reason, message = problem
    return name, number, reason, f"record {number}: {message}", raw.encode("utf-8", "surrogatepass")


def _check(record: object) -> tuple[tuple[str, str] | None, dict | None]:
    """((reason, message), None) for a record whose keys or value types break the rules,
    else (None, row): what Arrow could not hold, checked one record at a time."""
    if not isinstance(record, dict):
        return (q.NOT_AN_OBJECT, "is not a JSON object; each red-team attempt is one object"), None
    text = record.get("transcript", "")
    if not isinstance(
        text, str
    ):  # the row schema holds it parsed (an array): word it as upstream has it
        return (
            (q.NULL_VALUE if text is None else q.WRONG_TYPE),
            f"transcript: {text!r} is not a string; it is the Human/Assistant text of the attempt",
        ), None
    try:
        row = to_row(record)
    except TranscriptError as error:
        return (error.reason, f"transcript: {error}"), None
    types = _top_level_types()
    if row.keys() == types.keys() and all(
        _holds(row[key], *allowed) for key, allowed in types.items()
    ):
        return None, row
    return _explain(row) or (q.SCHEMA_VIOLATION, "does not follow the row schema"), None


def _explain(row: dict) -> tuple[str, str] | None:
    """jsonschema's reason and message for a row that breaks the row schema, else None."""
    errors = sorted(
        row_validator().iter_errors(row), key=lambda e: (_about_derived(e), list(e.absolute_path))
    )
    if not errors:
        return None
    error = errors[0]
    reason = _REASON_OF_KEYWORD.get(error.validator, q.SCHEMA_VIOLATION)
    if reason == q.WRONG_TYPE and error.instance is None:
        reason = q.NULL_VALUE
    field = "/".join(str(part) for part in error.absolute_path) or "(the record)"
    return reason, (
        f"{field}: {error.message}; fix the record to follow hhdata/schemas/redteam_row.schema.json"
    )


def _about_derived(error) -> bool:
    """True when a schema error only says a key to_row derives from the transcript is missing.

    Such keys are missing because the transcript is missing or not a string; the error
    about the transcript names the record's own key, so it is the one reported.
    """
    return error.validator == "required" and any(
        error.message == f"{key!r} is a required property" for key in ("id", "transcript_text")
    )


# JSON type -> the Python types json.loads gives for it (exact: a bool is not a number)
_PYTHON_OF_JSON = {
    "string": {str},
    "number": {int, float},
    "integer": {int},
    "boolean": {bool},
    "null": {type(None)},
    "array": {list},
    "object": {dict},
}


@lru_cache(maxsize=1)
def _top_level_types() -> dict[str, tuple[frozenset | None, frozenset | None]]:
    """Each property of the row schema: the Python types its value may have, and those of
    its items when the schema types them plainly (not by ``$ref``); None where the schema
    names no type. What a row needs before Arrow can hold it."""
    return {
        key: (_python_types(rule.get("type")), _python_types(rule.get("items", {}).get("type")))
        for key, rule in row_validator().schema["properties"].items()
    }


def _python_types(kinds: str | list[str] | None) -> frozenset | None:
    if not kinds:
        return None
    return frozenset().union(
        *(_PYTHON_OF_JSON[kind] for kind in ([kinds] if isinstance(kinds, str) else kinds))
    )


def _holds(value: object, types: frozenset | None, item_types: frozenset | None) -> bool:
    """True when a value has one of the types, and so does each of its items if it is a list."""
    if types is not None and type(value) not in types:
        return False
    return (
        item_types is None or type(value) is not list or all(type(v) in item_types for v in value)
    )


def check_redteam_table(table: pa.Table) -> None:
    """Raise SchemaError unless table holds red-team rows only (never preference pairs)."""
    if "chosen" in table.column_names or "rejected" in table.column_names:
        raise SchemaError(
            "this table holds preference pairs; red-team attempts have their own schema "
            "(hhdata.io.redteam.REDTEAM_SCHEMA) and config, and are never mixed with pairs"
        )
    missing = [name for name in REDTEAM_SCHEMA.names if name not in table.column_names]
    if missing:
        raise SchemaError(
            f"not a red-team table: missing columns {missing}; read it with read_redteam"
        )


def summary(table: pa.Table) -> dict:
    """Rows, rating histogram and rows per model type of a red-team table."""
    check_redteam_table(table)
    ratings, models = {}, {}
    for rating, model in zip(table["rating"].to_pylist(), table["model_type"].to_pylist()):
        ratings[str(rating)] = ratings.get(str(rating), 0) + 1
        models[model] = models.get(model, 0) + 1
    return {
        "config": CONFIG,
        "rows": table.num_rows,
        "rating": dict(sorted(ratings.items())),
        "model_type": dict(sorted(models.items())),
    }
