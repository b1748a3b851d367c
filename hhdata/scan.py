"""``hhdata.scan``: a polars LazyFrame over a release's Parquet files, for analysis.

Nothing is read until ``collect()``: polars pushes filters (``pl.col("family") ==
"helpful"``) and column choices down into the Parquet scan, so it reads only the row groups
and columns a query needs. Rows come in the canonical pair schema (hhdata.schema).

- a local release (``releases/1.0.0``, or ``releases`` with ``version="1.0.0"``) is scanned
  in place; each file's size is checked against manifest.json (reading every byte for its
  sha256 would defeat the laziness: ``hhdata.load`` and ``hhdata.release.load.verify_files``
  check checksums);
- a Hub repo (``org/name``) is resolved to the tag ``v<version>`` (default: the latest) and
  the config's files are downloaded with huggingface_hub (cached, honouring HF_ENDPOINT) and
  checked against the manifest's sha256 before they are scanned. polars' own ``hf://``
  paths always go to huggingface.co (polars 2.1 ignores HF_ENDPOINT), so they are not used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from hhdata.errors import IntegrityError, LoadError, SourceError

if TYPE_CHECKING:
    import polars as pl

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MANIFEST_NAME = "manifest.json"


def scan(
    source: str | os.PathLike,
    config: str | None = None,
    *,
    version: str | None = None,
    split: str | None = None,
) -> pl.LazyFrame:
    """A LazyFrame over one config of a release (all splits, or ``split``).

    >>> import polars as pl
    >>> lazy = scan("releases", "helpful", version="1.0.0")  # doctest: +SKIP
    >>> lazy.group_by("split").agg(pl.len()).collect()  # doctest: +SKIP
    """
    import polars as pl

    from hhdata.release.manifest import read_manifest

    folder, downloaded = _release_folder(source, config, version)
    manifest = read_manifest(folder)
    if version is not None and manifest["version"] != version.removeprefix("v"):
        raise LoadError(
            f"{folder} holds release {manifest['version']}, not {version}; pass the folder "
            "that holds the version folders, or drop version="
        )
    files = _files(manifest, config, split)
    for relative in files:
        _check(folder, relative, manifest, full=downloaded)
    return pl.scan_parquet([str(folder / relative) for relative in files])


def _release_folder(source, config, version) -> tuple[Path, bool]:
    """The local folder of the release, and whether it was just downloaded from the Hub."""
    path = Path(source)
    if version is not None and (path / version.removeprefix("v") / MANIFEST_NAME).is_file():
        return path / version.removeprefix("v"), False
    if (path / MANIFEST_NAME).is_file():
        return path, False
    if path.exists():
        versions = sorted(
            (p.parent.name for p in path.glob(f"*/{MANIFEST_NAME}")),
            key=lambda v: [int(part) if part.isdigit() else -1 for part in v.split(".")],
        )
        raise LoadError(
            f"{source} is not a release (no manifest.json)"
            + (
                f" and holds no version {version}; it holds {', '.join(versions)}"
                if versions and version
                else "; pass the folder of one version, or the releases folder with version="
            )
        )
    if _REPO_ID.fullmatch(str(source)):
        return _download(str(source), config, version), True
    raise SourceError(
        f"{source} is neither a local release nor a Hub repo id ('org/name'); check the spelling"
    )


def _download(repo_id: str, config: str | None, version: str | None) -> Path:
    """The tag's snapshot folder, holding manifest.json and the config's data files."""
    from hhdata.hub.load import download_release

    return download_release(repo_id, version, config)


def _files(manifest: dict, config: str | None, split: str | None) -> list[str]:
    from hhdata.release.load import config_files

    splits = config_files(manifest, config)
    if split is None:
        return [relative for files in splits.values() for relative in files]
    if split not in splits:
        raise LoadError(
            f"config {config or 'all'!r} of release {manifest['version']} has no split {split!r}; "
            f"choose one of {', '.join(splits)}"
        )
    return splits[split]


def _check(folder: Path, relative: str, manifest: dict, *, full: bool) -> None:
    """Size (always) and sha256 (when ``full``) of one data file against the manifest."""
    from hhdata.release.manifest import file_digest

    path = folder / relative
    expected = manifest["files"][relative]
    if not path.is_file():
        raise IntegrityError(
            f"{path}: missing, but manifest.json lists it; re-download or rebuild the release"
        )
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise IntegrityError(
            f"{path}: {size} bytes, manifest.json says {expected['bytes']}; re-download or rebuild "
            "the release"
        )
    if full and file_digest(path)[0] != expected["sha256"]:
        raise IntegrityError(
            f"{path}: sha256 does not match manifest.json; the file was modified after the "
            "release was built: re-download or rebuild it"
        )
