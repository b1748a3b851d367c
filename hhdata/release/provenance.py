"""Provenance sidecars: where each row of a new batch came from, summarised for the manifest.

Beside a raw data file ``<subset>/<split>.jsonl.gz`` may sit ``<subset>/<split>.provenance.json``:
a JSON list with one object per record (non-blank line) of that file, in the same order,
written by whoever made the batch (``hhdata feedback export``, ``training.online``). A build
refuses a sidecar whose length differs from its data file's record count (the two no longer
describe each other), and summarises each one for the manifest's ``provenance`` key::

    {"<subset>/<split>": {"rows": N, "sha256": <of the sidecar file>,
                          "fields": {FIELD: {VALUE_AS_STRING: COUNT}},
                          "other_fields": [FIELD, ...]}}

Fields whose values are all scalars (str, int, float, bool, null) with at most MAX_VALUES
distinct values are counted; any other field (nested, or too many values, such as times)
is only named in ``other_fields``. Several sidecars of one subset and split (batches from
several folders) are summed into one entry whose ``sha256`` is that of their own sha256s,
one per line in read order, and whose ``sidecars`` lists each one's rows and sha256.
Nothing but these counts reaches the release: the sidecar files stay with the raw data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

from hhdata.errors import ReleaseError
from hhdata.io.lines import path_text
from hhdata.release.manifest import file_digest

SIDECAR_SUFFIX = ".provenance.json"
MAX_VALUES = 20  # more distinct values than this are ids or times: named, not counted
_GZIP_MAGIC = b"\x1f\x8b"


def sidecar_path(data_file: str | Path) -> Path:
    """The sidecar beside a raw data file: ``train.jsonl.gz`` -> ``train.provenance.json``.

    >>> sidecar_path("helpful-online/train.jsonl.gz").as_posix()
    'helpful-online/train.provenance.json'
    """
    path = Path(data_file)
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return path.with_name(stem + SIDECAR_SUFFIX)


def summarise_sidecars(
    data_files: list[Path], subset: str | None = None, split: str | None = None
) -> dict[str, dict]:
    """The manifest's ``provenance`` summary of the sidecars beside ``data_files`` ({} when
    none has one), keyed ``<subset>/<split>`` (from the path, or the arguments when given).

    Raises ReleaseError when a sidecar is not a JSON list of objects, or when its length
    differs from its data file's record count.
    """
    entries: dict[str, list[tuple[str, list[dict]]]] = {}
    for data_file in data_files:
        sidecar = sidecar_path(data_file)
        if not sidecar.is_file():
            continue
        rows = _read_sidecar(sidecar)
        records = count_records(data_file)
        if len(rows) != records:
            raise ReleaseError(
                f"{path_text(sidecar)} has {len(rows)} entries but {path_text(data_file)} has "
                f"{records} records (non-blank lines); a sidecar holds one entry per record, "
                "in order: write it again with the data file (or remove it if it is stale)"
            )
        key = f"{subset or Path(data_file).parent.name}/{split or sidecar.name.split('.')[0]}"
        entries.setdefault(key, []).append((file_digest(sidecar)[0], rows))
    return {key: _summary(parts) for key, parts in sorted(entries.items())}


def count_records(data_file: str | Path) -> int:
    """Non-blank lines of a raw JSONL(.gz) file, bad ones included (as hhdata.io.read
    counts records: a line of only spaces, tabs and a CR is blank)."""
    with open(data_file, "rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    with opener(data_file, "rb") as handle:
        return sum(1 for line in handle if line.strip(b" \t\r\n"))


def _read_sidecar(path: Path) -> list[dict]:
    """The entries of a sidecar; ReleaseError naming the file when it is not a list of objects."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f"line {error.lineno}: " if isinstance(error, json.JSONDecodeError) else ""
        raise ReleaseError(
            f"{path_text(path)}: {where}not valid UTF-8 JSON ({error}); a provenance sidecar "
            "is a JSON list with one object per record of its data file"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ReleaseError(
            f"{path_text(path)}: not a JSON list of objects; a provenance sidecar is a JSON "
            "list with one object per record of its data file"
        )
    return rows


def _summary(parts: list[tuple[str, list[dict]]]) -> dict:
    """One manifest entry from the (sha256, entries) of the sidecars of one subset and split."""
    rows = [row for _, part in parts for row in part]
    values: dict[str, Counter] = {}
    nested: set[str] = set()
    for row in rows:
        for field, value in row.items():
            if value is None or isinstance(value, (str, int, float, bool)):
                values.setdefault(field, Counter())[_as_string(value)] += 1
            else:
                nested.add(field)
    fields = {
        field: dict(sorted(counts.items()))
        for field, counts in sorted(values.items())
        if field not in nested and len(counts) <= MAX_VALUES
    }
    if len(parts) == 1:
        sha256 = parts[0][0]
    else:  # several sidecars: a digest of their digests, and each one listed
        sha256 = hashlib.sha256("".join(f"{digest}\n" for digest, _ in parts).encode()).hexdigest()
    summary = {"rows": len(rows), "sha256": sha256, "fields": fields}
    summary["other_fields"] = sorted((set(values) | nested) - set(fields))
    if len(parts) > 1:
        summary["sidecars"] = [{"rows": len(part), "sha256": digest} for digest, part in parts]
    return summary


def _as_string(value) -> str:
    """A scalar as the manifest's key: JSON's spelling for true, false and null.

    >>> [_as_string(v) for v in ("a", 3, 0.5, True, None)]
    ['a', '3', '0.5', 'true', 'null']
    """
    return value if isinstance(value, str) else json.dumps(value)
