"""manifest.json: what a release holds, where it came from, and the checksum of every file.

The manifest is the single source the card, the croissant metadata, the changelog and the
loader read from. It is validated against ``schemas/manifest.schema.json`` when written and
when read, and it is written deterministically (no timestamps, fixed key order) so that
the same inputs and settings give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata.errors import ReleaseError, SchemaError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Version of the canonical pair row (hhdata.schema.PAIR_SCHEMA); bump it when a column
# is added, removed or changes meaning, so loaders can tell releases apart.
PAIR_SCHEMA_VERSION = "1.0"
_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size in bytes of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_entry(root: Path, relative: str, table: pa.Table | None = None) -> dict:
    """The manifest entry of one file: sha256, bytes, and for data files rows and Arrow size."""
    sha256, size = file_digest(root / relative)
    entry = {"sha256": sha256, "bytes": size}
    if table is not None:
        entry["rows"] = table.num_rows
        entry["memory_bytes"] = table.nbytes
    return entry


@cache
def manifest_schema() -> dict:
    """The JSON Schema (2020-12) every manifest.json follows."""
    text = resources.files("hhdata").joinpath("schemas/manifest.schema.json").read_text("utf-8")
    return json.loads(text)


def validate_manifest(manifest: dict, where: str = MANIFEST_NAME) -> None:
    """Raise SchemaError naming the first offending field when the manifest breaks its schema."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise SchemaError(
            f"{where}: field {field}: {error.message}; rebuild the release with "
            "`hhdata build` instead of editing the manifest by hand"
        )


def dumps_manifest(manifest: dict) -> str:
    """Serialise a manifest deterministically (keys in insertion order, 2-space indent)."""
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def write_manifest(release_dir: Path, manifest: dict) -> Path:
    """Validate and write ``manifest.json`` into a release directory; returns its path."""
    validate_manifest(manifest, str(Path(release_dir) / MANIFEST_NAME))
    path = Path(release_dir) / MANIFEST_NAME
    path.write_text(dumps_manifest(manifest), encoding="utf-8")
    return path


def read_manifest(release_dir: str | Path) -> dict:
    """Read and validate the manifest of a release directory.

    Raises ReleaseError when the directory holds no manifest.json (not a release) and
    SchemaError when the manifest does not follow its schema.
    """
    path = Path(release_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReleaseError(
            f"{path}: no manifest.json, so {release_dir} is not a release directory; "
            "pass the folder of one version (e.g. out/1.0.0) built by `hhdata build`"
        ) from None
    except json.JSONDecodeError as error:
        raise SchemaError(
            f"{path}: line {error.lineno}: not valid JSON ({error.msg}); rebuild the release"
        ) from None
    validate_manifest(manifest, str(path))
    return manifest


def length_stats(
    table: pa.Table, turn_lengths: dict[str, np.ndarray] | None = None
) -> dict[str, dict[str, float]]:
    """Character lengths of the prompt (all turns), the two replies and the transcripts.
    ``turn_lengths``: text_lengths of prompt, chosen and rejected when already computed.

    >>> sorted(length_stats(pa.table({"chosen_text": ["ab"], "rejected_text": ["a"],
    ...     "prompt": [[{"role": "user", "content": "x"}]],
    ...     "chosen": [[{"role": "assistant", "content": "y"}]],
    ...     "rejected": [[{"role": "assistant", "content": ""}]]})))
    ['chosen', 'chosen_text', 'prompt', 'prompt_turns', 'rejected', 'rejected_text']
    """
    columns = dict(
        turn_lengths
        or {name: text_lengths(table, name) for name in ("prompt", "chosen", "rejected")}
    )
    columns["chosen_text"] = pc.utf8_length(table["chosen_text"]).to_numpy()
    columns["rejected_text"] = pc.utf8_length(table["rejected_text"]).to_numpy()
    columns["prompt_turns"] = pc.list_value_length(table["prompt"]).to_numpy()
    return {name: _summary(values) for name, values in columns.items()}


def text_lengths(table: pa.Table, turns_column: str) -> np.ndarray:
    """Total characters of the turn contents of each row of a list<struct<role,content>> column
    (chunk by chunk: no copy of the column)."""
    column = table[turns_column]
    parts = []
    for turns in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        flat = pc.utf8_length(pc.struct_field(turns.flatten(), "content")).to_numpy(
            zero_copy_only=False
        )
        offsets = turns.offsets.to_numpy() - turns.offsets[0].as_py()
        sums = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
        parts.append(sums[offsets[1:]] - sums[offsets[:-1]])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="lower")
    return {
        "mean": round(float(np.mean(values)), 1),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(np.max(values)),
    }


def flag_counts(table: pa.Table) -> dict[str, int]:
    """How many rows carry each flag, flags in alphabetical order."""
    flat = pc.list_flatten(table["flags"])
    if len(flat) == 0:
        return {}
    counts = pc.value_counts(flat).to_pylist()
    return {item["values"]: item["counts"] for item in sorted(counts, key=lambda c: c["values"])}
