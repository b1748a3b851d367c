"""The quarantine: records that left the flow, each with where it came from and why.

Every stage that rejects a record (reading, validation, pair building) appends a row of
QUARANTINE_SCHEMA instead of dropping it silently: the source file, the 1-based line, a
reason code from REASONS, a message that names the fix, and the raw bytes of the line
where they are known. ``write_jsonl`` saves the quarantine for a person to look at.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from hhdata.errors import SourceError
from hhdata.schema import QUARANTINE_SCHEMA

# Reasons found while reading a line.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
LINE_TOO_LONG = "line_too_long"
TRUNCATED_FILE = "truncated_file"
CORRUPT_FILE = "corrupt_file"
# Reasons found by the raw-record JSON Schema (and the one rule it cannot express).
MISSING_KEY = "missing_key"
EXTRA_KEY = "extra_key"
WRONG_TYPE = "wrong_type"
NULL_VALUE = "null_value"
EMPTY_STRING = "empty_string"
SCHEMA_VIOLATION = "schema_violation"
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
# Reasons found by hhdata.pairs.transcript: the pair's prompt cannot be determined.
BAD_TRANSCRIPT_START = "bad_transcript_start"
NO_HUMAN_TURN = "no_human_turn"
PROMPT_MISMATCH = "prompt_mismatch"

REASONS = (
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    LINE_TOO_LONG,
    TRUNCATED_FILE,
    CORRUPT_FILE,
    MISSING_KEY,
    EXTRA_KEY,
    WRONG_TYPE,
    NULL_VALUE,
    EMPTY_STRING,
    SCHEMA_VIOLATION,
    CHOSEN_EQUALS_REJECTED,
    NO_HUMAN_TURN,
    PROMPT_MISMATCH,
    BAD_TRANSCRIPT_START,
)


class Problem(NamedTuple):
    """Why one record is quarantined: a reason code, a message naming the fix, raw bytes."""

    reason: str
    message: str
    raw: bytes | None


def quarantine_table(rows: list[tuple[str, int, str, str, bytes | None]]) -> pa.Table:
    """A quarantine table from (file, line, reason, message, raw) tuples.

    >>> quarantine_table([("a.jsonl", 3, "invalid_json", "bad", b"{")]).num_rows
    1
    """
    columns = list(zip(*rows)) if rows else [[] for _ in QUARANTINE_SCHEMA]
    return pa.table(
        [pa.array(column, field.type) for column, field in zip(columns, QUARANTINE_SCHEMA)],
        schema=QUARANTINE_SCHEMA,
    )


def concat(tables: list[pa.Table]) -> pa.Table:
    """Several quarantine tables as one, in order."""
    return pa.concat_tables([quarantine_table([]), *tables])


def reason_counts(quarantine: pa.Table) -> dict[str, int]:
    """Quarantined records per reason code, most frequent first."""
    return dict(Counter(quarantine.column("reason").to_pylist()).most_common())


def write_jsonl(quarantine: pa.Table, path: str | Path) -> int:
    """Write the quarantine as JSON Lines, one bad record per line; returns the count.

    Each line holds file, line, reason and message, and the raw bytes of the record: as
    ``raw`` (text) when they are valid UTF-8, else as ``raw_base64``.
    """
    path = Path(path)
    try:
        with path.open("w", encoding="utf-8") as out:
            for row in quarantine.to_pylist():
                raw = row.pop("raw")
                if raw is not None:
                    try:
                        row["raw"] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        row["raw_base64"] = base64.b64encode(raw).decode("ascii")
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as error:
        raise SourceError(
            f"cannot write the quarantine to {path}: {error.strerror}; "
            "pass a --quarantine path in a folder you can write to"
        ) from None
    return quarantine.num_rows
