"""Load a local release directory as ``datasets`` objects, after checking every byte.

Each data file is read once into memory, its sha256 and size compared with manifest.json,
and only then parsed, so what is loaded is exactly what was checked. A tampered, truncated
or missing file raises IntegrityError naming the file and the fix. The row counts the
manifest records (per file, and per config and split) are checked against the Parquet
footers, which no checksum covers (the manifest cannot hold its own checksum).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from hhdata.errors import IntegrityError, ReleaseError
from hhdata.release.manifest import read_manifest
from hhdata.schema import PAIR_SCHEMA

FEATURES = datasets.Features.from_arrow_schema(PAIR_SCHEMA)


def read_verified(root: str | Path, relative: str, manifest: dict) -> bytes:
    """The bytes of one release file, after checking its size and sha256 against the manifest."""
    path = Path(root) / relative
    expected = manifest["files"].get(relative)
    if expected is None:
        raise IntegrityError(
            f"{path}: not listed in manifest.json, so it cannot be checked; "
            "the release was altered after it was built: rebuild or re-download it"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(
            f"{path}: missing, but manifest.json lists it ({expected['bytes']} bytes); "
            "re-download or rebuild the release"
        ) from None
    if len(data) != expected["bytes"]:
        raise IntegrityError(
            f"{path}: {len(data)} bytes, manifest.json says {expected['bytes']} "
            f"({'truncated' if len(data) < expected['bytes'] else 'grown'}); "
            "re-download or rebuild the release"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected["sha256"]:
        raise IntegrityError(
            f"{path}: sha256 {actual} does not match manifest.json ({expected['sha256']}); "
            "the file was modified after the release was built: re-download or rebuild it"
        )
    return data


def verify_files(root: str | Path, manifest: dict | None = None) -> dict:
    """Check every file listed in the manifest, and every row count; returns the manifest.

    Raises IntegrityError.
    """
    manifest = read_manifest(root) if manifest is None else manifest
    rows = {}
    for relative in manifest["files"]:
        data = read_verified(root, relative, manifest)
        if "rows" in manifest["files"][relative]:
            rows[relative] = check_file_rows(
                Path(root) / relative, data, manifest["files"][relative]
            )
    for config in manifest["configs"]:
        check_config_rows(root, manifest, config, rows)
    return manifest


def check_file_rows(path: Path, data: bytes, entry: dict, where: str = "") -> int:
    """The rows in a Parquet file's footer, after checking them against its manifest entry."""
    actual = pq.read_metadata(pa.BufferReader(data)).num_rows
    if actual != entry["rows"]:
        raise IntegrityError(
            f"{path}{where}: manifest.json records {entry['rows']} rows, the file's Parquet "
            "metadata "
            f"holds {actual}; the manifest was edited after the build: re-download or rebuild the "
            "release"
        )
    return actual


def check_config_rows(
    root, manifest: dict, config: str, rows: dict[str, int], only: str | None = None
) -> None:
    """Each split's row count in the manifest against the footers of its files (``rows``)."""
    for split, view in manifest["configs"][config]["splits"].items():
        if only is not None and split != only:
            continue
        actual = sum(rows[f] for f in view["files"] if f in rows)
        if all(f in rows for f in view["files"]) and actual != view["rows"]:
            raise IntegrityError(
                f"{Path(root) / 'manifest.json'}: config {config!r} split {split!r} records "
                f"{view['rows']} rows, its Parquet files ({', '.join(view['files'])}) hold "
                f"{actual}; "
                "the manifest was edited after the build: re-download or rebuild the release"
            )


def config_files(manifest: dict, config: str | None) -> dict[str, list[str]]:
    """split -> data files of a config (the default config when ``config`` is None)."""
    configs = manifest["configs"]
    if config is None:
        config = next(name for name, view in configs.items() if view["default"])
    if config not in configs:
        raise ReleaseError(
            f"release {manifest['version']} has no config {config!r}; "
            f"choose one of {', '.join(configs)}"
        )
    return {split: view["files"] for split, view in configs[config]["splits"].items()}


def load_release(
    path: str | Path, config: str | None = None, split: str | None = None
) -> datasets.DatasetDict | datasets.Dataset:
    """Load a local release: a DatasetDict of its splits, or one Dataset when ``split`` is given.

    ``config`` is ``all`` (default), ``helpful``, ``harmless`` or a subset name. Every file
    the config reads is verified against manifest.json first.

    >>> ds = load_release("out/1.0.0", "harmless", split="test")  # doctest: +SKIP
    >>> ds.features["prompt"]  # doctest: +SKIP
    List({'role': Value('string'), 'content': Value('string')})
    """
    manifest = read_manifest(path)
    config = config or next(name for name, view in manifest["configs"].items() if view["default"])
    splits = config_files(manifest, config)
    if split is not None:
        if split not in splits:
            raise ReleaseError(
                f"config {config or 'all'!r} of release {manifest['version']} has no split "
                f"{split!r}; choose one of {', '.join(splits)}"
            )
        splits = {split: splits[split]}
    loaded = {}
    for name, files in splits.items():
        tables, rows = [], {}
        for relative in files:
            data = read_verified(path, relative, manifest)
            where = f" (config {config!r}, split {name!r})"
            rows[relative] = check_file_rows(
                Path(path) / relative, data, manifest["files"][relative], where
            )
            tables.append(pq.read_table(pa.BufferReader(data)))
        check_config_rows(path, manifest, config, rows, only=name)
        table = pa.concat_tables(tables).select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
        info = datasets.DatasetInfo(
            description=f"{manifest['name']} {manifest['version']}",
            features=FEATURES,
            version=manifest["version"],
        )
        loaded[name] = datasets.Dataset(
            InMemoryTable(table), info=info, split=datasets.NamedSplit(name)
        )
    if split is not None:
        return loaded[split]
    return datasets.DatasetDict(loaded)
