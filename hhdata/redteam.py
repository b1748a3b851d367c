"""Red-team attempts: whole transcripts with scores, in their own schema and config.

Anthropic's ``red-team-attempts`` (Ganguli et al. 2022) are not preference pairs: each
record is one conversation in which a crowdworker tried to make the assistant misbehave,
with a self-rating and preference-model harmlessness scores. They are read into
REDTEAM_SCHEMA rows, checked against ``schemas/redteam_row.schema.json``, and live in the
config ``red-team-attempts`` only; hhdata.configs refuses to mix them into pair configs.

Upstream ships the file as one JSON array (despite its ``.jsonl.gz`` name); JSON Lines is
read too. The upstream key ``task_descripton_harmlessness_score`` (sic) is accepted and
stored under its correct spelling.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema
import pyarrow as pa

from hhdata.errors import SchemaError, SourceError, TranscriptError
from hhdata.schema import RED_TEAM_SUBSET, TURNS
from hhdata.transcript import parse_transcript

CONFIG = RED_TEAM_SUBSET
REDTEAM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("subset", pa.string()),
        ("transcript", TURNS),
        ("transcript_text", pa.string()),
        ("min_harmlessness_score_transcript", pa.float64()),
        ("num_params", pa.string()),
        ("model_type", pa.string()),
        ("rating", pa.float64()),
        ("task_description", pa.string()),
        ("task_description_harmlessness_score", pa.float64()),
        ("red_team_member_id", pa.int64()),
        ("is_upsampled", pa.bool_()),
        ("tags", pa.list_(pa.string())),
    ]
)
_UPSTREAM_TYPO = {"task_descripton_harmlessness_score": "task_description_harmlessness_score"}


@lru_cache(maxsize=1)
def row_validator() -> jsonschema.Draft202012Validator:
    """The JSON Schema validator of one red-team row (schemas/redteam_row.schema.json)."""
    text = resources.files("hhdata").joinpath("schemas", "redteam_row.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def transcript_id(text: str) -> str:
    """Stable id of a red-team transcript: 20 hex digits of sha256 of its text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _records(path: Path) -> list:
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rt", encoding="utf-8") as source:
            text = source.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read it as UTF-8 JSON ({error})") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SchemaError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SchemaError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
    return records


def to_row(record: dict) -> dict:
    """One upstream record as a red-team row (not yet validated)."""
    row = {_UPSTREAM_TYPO.get(key, key): value for key, value in record.items()}
    text = row.get("transcript")
    if isinstance(text, str):
        row["transcript_text"] = text
        row["transcript"] = parse_transcript(text)
        row["id"] = transcript_id(text)
    row["subset"] = RED_TEAM_SUBSET
    return row


def read_redteam(path: str | Path) -> pa.Table:
    """Read red-team attempts (JSON array or JSON Lines, optionally gzipped) into REDTEAM_SCHEMA.

    Raises SchemaError naming the file, the record number and what to fix when a record is
    a preference pair or breaks the row schema.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file; pass the red_team_attempts.jsonl(.gz) file")
    rows = []
    for number, record in enumerate(_records(path), start=1):
        where = f"{path}: record {number}"
        if isinstance(record, dict) and {"chosen", "rejected"} <= set(record):
            raise SchemaError(
                f"{where} is a preference pair (chosen/rejected), not a red-team attempt; read "
                "pair files with hhdata.read.read_raw: red-team attempts and pairs never mix"
            )
        if not isinstance(record, dict):
            raise SchemaError(f"{where} is not a JSON object; each red-team attempt is one object")
        try:
            row = to_row(record)
        except TranscriptError as error:
            raise SchemaError(f"{where}: transcript: {error}") from None
        problem = next(iter(sorted(row_validator().iter_errors(row), key=lambda e: list(e.path))), None)
        if problem is not None:
            field = "/".join(str(part) for part in problem.absolute_path) or "(the record)"
            raise SchemaError(
                f"{where}: {field}: {problem.message}; fix the record to follow "
                "hhdata/schemas/redteam_row.schema.json"
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=REDTEAM_SCHEMA)


def check_redteam_table(table: pa.Table) -> None:
    """Raise SchemaError unless table holds red-team rows only (never preference pairs)."""
    if "chosen" in table.column_names or "rejected" in table.column_names:
        raise SchemaError(
            "this table holds preference pairs; red-team attempts have their own schema "
            "(hhdata.redteam.REDTEAM_SCHEMA) and config, and are never mixed with pairs"
        )
    missing = [name for name in REDTEAM_SCHEMA.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"not a red-team table: missing columns {missing}; read it with read_redteam")


def summary(table: pa.Table) -> dict:
    """Rows, rating histogram and rows per model type of a red-team table."""
    check_redteam_table(table)
    ratings, models = {}, {}
    for rating, model in zip(table["rating"].to_pylist(), table["model_type"].to_pylist()):
        ratings[str(rating)] = ratings.get(str(rating), 0) + 1
        models[model] = models.get(model, 0) + 1
    return {"config": CONFIG, "rows": table.num_rows, "rating": dict(sorted(ratings.items())),
            "model_type": dict(sorted(models.items()))}
