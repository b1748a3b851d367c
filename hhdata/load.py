"""One-line load: ``hhdata.load()`` and its dispatch by source.

- ``load()`` : the bundled real sample (harmless-base test), offline. The first call reads
  and parses it and caches the pair table as an Arrow file keyed by the sample's sha256 and
  the hhdata version; later calls memory-map that file (well under a second).
- ``load("path/to/release/1.0.0")`` : a local release (a folder with manifest.json), read by
  hhdata.release.load.load_release; ``load("path/to/releases", version="1.0.0")`` too.
- ``load("org/name", version="1.0.0")`` : a release on the Hub, by hhdata.hub.load_from_hub.
- ``load("raw/folder")`` or a raw file or glob : read and parsed on the spot (not cached).

The release and Hub loaders are imported only when asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from hhdata.errors import LoadError, SourceError
from hhdata.schema import ALL, HARMLESS, HELPFUL, PAIR_SCHEMA

if TYPE_CHECKING:  # datasets is imported on first use: `import hhdata` stays fast
    import datasets

CACHE_ENV = "HHDATA_CACHE"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load(
    source: str | os.PathLike | None = None,
    config: str | None = None,
    split: str | None = None,
    version: str | None = None,
    *,
    force_download: bool = False,
    strict_roles: bool = False,
) -> datasets.DatasetDict | datasets.Dataset:
    """Load HH-RLHF pair rows: a DatasetDict of splits, or one Dataset when split is given.

    config is ``all`` (default), ``helpful``, ``harmless`` or a subset name. With
    ``strict_roles=True`` only rows that strict chat templates (Llama-2, Mistral) accept are
    kept: alternating user/assistant turns and non-empty replies (hhdata.pairs.roles;
    ``hhdata.pairs.roles.strict_counts`` says what is left out and why). ``force_download`` (Hub
    repos only) fetches every file again instead of using the cache.

    >>> ds = load()
    >>> ds["test"].num_rows, ds["test"][0]["subset"]
    (2312, 'harmless-base')
    >>> load(strict_roles=True)["test"].num_rows
    2304
    """
    if strict_roles:
        from hhdata.pairs.roles import keep_strict

        return keep_strict(load(source, config, split, version, force_download=force_download))
    if source is None:
        if version is not None:
            raise LoadError(
                f"version={version!r} names a release, but no source was given; the bundled "
                "sample has no versions (pass a release folder or a Hub repo id)"
            )
        return _select({"test": bundled_table()}, config, split, "the bundled sample")
    path = Path(source)
    if version is not None and (path / version / "manifest.json").is_file():
        path = path / version
    if (path / "manifest.json").is_file():
        from hhdata.release.load import load_release

        if version is not None:
            _check_version(path, version)
        return load_release(path, config, split)
    if path.exists() or any(char in str(source) for char in "*?["):
        if version is not None:
            raise LoadError(_no_such_version(path, version))
        if _versions_in(path):
            raise LoadError(
                f"{path} is a folder of releases, not one release; pass version=, one of "
                f"{', '.join(_versions_in(path))} (or the folder of one version)"
            )
        return _select(_raw_tables(source), config, split, str(source))
    if _REPO_ID.fullmatch(str(source)):
        from hhdata.hub import load_from_hub

        return load_from_hub(str(source), config, split, version, force_download=force_download)
    raise SourceError(
        f"{source} is neither a local path nor a Hub repo id ('org/name'); check the spelling"
    )


def _check_version(release_dir: Path, version: str) -> None:
    """Refuse version= that differs from the release a version folder holds (never load
    another one)."""
    from hhdata.release.manifest import read_manifest

    held = read_manifest(release_dir)["version"]
    if held != version:
        raise LoadError(
            f"{release_dir} holds release {held}, not {version}; pass the folder that holds the "
            "version folders, or drop version="
        )


def _no_such_version(path: Path, version: str) -> str:
    """Why version= fails for a local path: which versions the folder holds, or that it is
    raw data."""
    versions = _versions_in(path)
    if versions:
        return (
            f"{path} has no release {version} (no {path / version}/manifest.json); versions there: "
            f"{', '.join(versions)}"
        )
    return f"{path} is raw data, not a folder of releases; drop version={version!r}"


def _versions_in(path: Path) -> list[str]:
    """The release versions a local folder holds (subfolders with a manifest.json), oldest first."""
    return (
        sorted(
            (child.name for child in path.iterdir() if (child / "manifest.json").is_file()),
            key=_version_key,
        )
        if path.is_dir()
        else []
    )


def _version_key(name: str) -> tuple:
    parts = name.split(".")
    return (0, tuple(map(int, parts)), "") if all(p.isdigit() for p in parts) else (1, (), name)


def cache_dir() -> Path:
    """Where load() keeps parsed tables: $HHDATA_CACHE, else ~/.cache/hhdata."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hhdata")


def bundled_table() -> pa.Table:
    """The bundled sample's pair table, from the cache (memory-mapped) or built once."""
    from hhdata._version import __version__
    from hhdata.io.read import bundled_sample_path

    sample = bundled_sample_path()
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"sample-{__version__}-{digest}" / "test.arrow"
    if not cached.is_file():
        table = _build(sample)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, PAIR_SCHEMA) as out:
                out.write_table(table)
            os.replace(partial, cached)
        except OSError as error:
            raise SourceError(
                f"cannot write the load cache at {cached.parent}: {error.strerror}; "
                f"set {CACHE_ENV} to a folder you can write to"
            ) from None
        return table
    # the table's buffers point into the map, which stays open as long as they live
    return pa.ipc.open_stream(pa.memory_map(str(cached))).read_all()


def _build(*paths) -> pa.Table:
    from hhdata.io.read import read_raw
    from hhdata.pairs.build import build_pairs

    pairs, _ = build_pairs(read_raw(list(paths)).table)
    return pairs


def _raw_tables(source) -> dict[str, pa.Table]:
    pairs = _build(source)
    return {
        name: pairs.filter(pc.equal(pairs["split"], name))
        for name in pc.unique(pairs["split"]).to_pylist()
    }


def _select(tables: dict[str, pa.Table], config, split, where: str):
    """Filter by config and pick a split; errors name what the source holds."""
    import datasets

    config = config or ALL
    if config != ALL:
        column = "family" if config in (HELPFUL, HARMLESS) else "subset"
        subsets = sorted(
            {s for table in tables.values() for s in pc.unique(table["subset"]).to_pylist()}
        )
        tables = {
            name: table.filter(pc.equal(table[column], config)) for name, table in tables.items()
        }
        if not any(table.num_rows for table in tables.values()):
            raise LoadError(
                f"config {config!r} selects no rows of {where}, which holds the subsets "
                f"{subsets}; pass 'all', 'helpful', 'harmless' or one of those subsets"
            )
    if split is not None:
        if split not in tables:
            raise LoadError(f"{where} has no split {split!r}; it has {sorted(tables)}")
        return _dataset(tables[split], split)
    return datasets.DatasetDict({name: _dataset(table, name) for name, table in tables.items()})


def _dataset(table: pa.Table, split: str) -> datasets.Dataset:
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table), split=datasets.NamedSplit(split))
