"""Build a release directory from kept pair rows: Parquet per subset and split, plus metadata.

```
<out>/<version>/
  README.md        dataset card (YAML configs + dataset_info), rendered by hhdata.release.card
  manifest.json    hhdata.release.manifest; checksums of every data file
  CHANGELOG.md     hhdata.release.diff against the previous release
  croissant.json   hhdata.release.croissant
  lengths.png      length distribution shown in the card
  data/<subset>/<split>-00000-of-00001.parquet
```

Byte-reproducible: rows keep their input order inside each (subset, split) file, files are
written with the pinned ParquetSettings, and nothing depends on the clock. The directory
is assembled under a hidden staging name (``.<version>.partial-<pid>``) and renamed into
place only when complete, so a crash never leaves a half-built version, and an existing
version is never overwritten. A staging folder whose process is gone (a killed build) is
removed by the next build into the same folder, whatever its version; one whose process is
alive means another build of the version is running, and the new one stops with a message
naming its pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hhdata import progress as bars
from hhdata._version import __version__
from hhdata.dedup import degenerate
from hhdata.errors import ReleaseError, VersionError
from hhdata.release import card, croissant, diff
from hhdata.release.manifest import (
    MANIFEST_VERSION,
    PAIR_SCHEMA_VERSION,
    file_entry,
    flag_counts,
    length_stats,
    read_manifest,
    text_lengths,
    write_manifest,
)
from hhdata.schema import ALL, HARMLESS, HELPFUL, PAIR_SCHEMA

PLOT_NAME = "lengths.png"
DEFAULT_NAME = "hh-rlhf"


@dataclass(frozen=True)
class ParquetSettings:
    """Pinned Parquet writer settings; they go into the manifest.

    zstd 3, fixed 1,000-row groups and content-defined chunking, so a version that appends
    rows rewrites (and the Hub's Xet re-sends) little more than the new rows. Chosen by
    measurement: bench/release_build.md, "Parquet settings".
    """

    compression: str = "zstd"
    compression_level: int | None = 3
    row_group_size: int = 1_000
    data_page_size: int = 1 << 20
    write_page_index: bool = True
    use_content_defined_chunking: bool = True
    cdc_min_chunk_size: int = 256 * 1024
    cdc_max_chunk_size: int = 1024 * 1024
    cdc_norm_level: int = 0

    def write_options(self) -> dict:
        """Keyword arguments for pyarrow.parquet.write_table."""
        cdc = False
        if self.use_content_defined_chunking:
            cdc = {
                "min_chunk_size": self.cdc_min_chunk_size,
                "max_chunk_size": self.cdc_max_chunk_size,
                "norm_level": self.cdc_norm_level,
            }
        return {
            "compression": self.compression,
            "compression_level": self.compression_level,
            "row_group_size": self.row_group_size,
            "data_page_size": self.data_page_size,
            "write_page_index": self.write_page_index,
            "use_content_defined_chunking": cdc,
            "write_statistics": True,
            "version": "2.6",
        }


@dataclass(frozen=True)
class Release:
    """A built release: its directory, manifest, and the diff against the previous one."""

    path: Path
    manifest: dict
    diff: diff.ReleaseDiff | None


def data_file(subset: str, split: str) -> str:
    """Relative path of the Parquet file of one subset and split."""
    return f"data/{subset}/{split}-00000-of-00001.parquet"


@dataclass(frozen=True)
class StagedRelease:
    """A release whose data files (and plot) are written into its staging folder; the
    manifest and the documents made from it come next (finish_release)."""

    out: Path
    version: str
    staging: Path
    rows: pa.Table
    files: dict
    lengths: dict
    parquet: ParquetSettings


def write_release(
    pairs: pa.Table,
    out: str | Path,
    version: str,
    *,
    sources: list[dict],
    accounting: dict,
    settings: dict,
    leakage: dict | None = None,
    previous: str | Path | None = None,
    allow_version_mismatch: bool = False,
    parquet: ParquetSettings = ParquetSettings(),
    name: str = DEFAULT_NAME,
) -> Release:
    """Write ``<out>/<version>/`` from kept pair rows and return it.

    ``pairs`` holds canonical pair rows (extra columns such as ``cluster_id`` are dropped);
    ``sources`` lists the raw files read (path, sha256, bytes), ``accounting`` the row
    counts by fate (see hhdata.pipeline), ``settings`` the pipeline settings, ``leakage``
    the train/test prompt overlap (hhdata.dedup.configs.leakage_report's exact and near
    parts). With ``previous`` (the directory of the last version) the change is classified
    and a version number that contradicts it raises VersionError unless
    ``allow_version_mismatch``. The same as staging the data files, then finish_release.
    """
    with staged_release(pairs, out, version, previous=previous, parquet=parquet) as staged:
        return finish_release(
            staged,
            sources=sources,
            accounting=accounting,
            settings=settings,
            leakage=leakage,
            previous=previous,
            allow_version_mismatch=allow_version_mismatch,
            name=name,
        )


@contextlib.contextmanager
def staged_release(
    pairs: pa.Table,
    out: str | Path,
    version: str,
    *,
    previous: str | Path | None = None,
    parquet: ParquetSettings = ParquetSettings(),
    progress: bool | None = False,
):
    """Write the data files of ``<out>/<version>/`` into a staging folder and yield them
    (a StagedRelease); the staging folder is removed unless finish_release moved it into place.
    ``progress`` counts the files written on a bar (see write_data_files).

    The pipeline checks train/test leakage while the files are written, then hands the
    result to finish_release.
    """
    new_version_dir(out, version)
    _claim_version(Path(out), version)
    staging = Path(out) / f".{version}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        rows, files, lengths = _write_data(pairs, staging, version, previous, parquet, progress)
        yield StagedRelease(Path(out), version, staging, rows, files, lengths, parquet)
    finally:  # after finish_release the folder is renamed, and this finds nothing to remove
        shutil.rmtree(staging, ignore_errors=True)


def finish_release(
    staged: StagedRelease,
    *,
    sources: list[dict],
    accounting: dict,
    settings: dict,
    leakage: dict | None = None,
    previous: str | Path | None = None,
    allow_version_mismatch: bool = False,
    name: str = DEFAULT_NAME,
    provenance: dict | None = None,
) -> Release:
    """The manifest, diff, changelog, croissant.json and card of a staged release, then the
    folder moved to ``<out>/<version>/`` (see write_release for the arguments).
    ``provenance``: the summary of the sources' provenance sidecars
    (hhdata.release.provenance.summarise_sidecars); none or empty leaves it out."""
    metadata = {
        "sources": sources,
        "accounting": accounting,
        "settings": settings,
        "leakage": leakage,
        "name": name,
        "provenance": provenance,
    }
    manifest, change = _build(staged, metadata, previous, allow_version_mismatch)
    final = Path(staged.out) / staged.version
    _move_into_place(staged.staging, final)
    return Release(final, manifest, change)


def _claim_version(out: Path, version: str) -> None:
    """Remove staging folders of killed builds (of any version); refuse while a live one
    builds `version`.

    Any version's: a killed build of a version that is never built again would otherwise
    leave its hidden staging folder in `out` forever.
    """
    for staging in sorted(out.glob(".*.partial-*")) if out.is_dir() else []:
        pid = staging.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _alive(int(pid)):
            if staging.name.rsplit(".partial-", 1)[0] != f".{version}":
                continue  # a live build of another version
            raise VersionError(
                f"version {version} is being built by another process (pid {pid}, staging in "
                f"{staging}); wait for it to finish, or stop it and build again"
            )
        shutil.rmtree(staging, ignore_errors=True)  # its build was killed: nothing will finish it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the finished staging folder to the version's name; never over an existing one."""
    try:
        staging.rename(final)
    except OSError:
        if final.exists():
            raise VersionError(
                f"{final} already exists: another process built version {final.name} while this "
                "build ran, and versions are immutable; use that one, or build the next version"
            ) from None
        raise


def new_version_dir(out: str | Path, version: str) -> Path:
    """``<out>/<version>``, after checking the version is MAJOR.MINOR.PATCH and not built yet."""
    diff.parse_version(version)
    final = Path(out) / version
    if final.exists():
        raise VersionError(
            f"{final} already exists and versions are immutable; pick the next version "
            "number, or delete that directory if it was never published"
        )
    return final


def _write_data(pairs, staging, version, previous, parquet, progress=False):
    """The canonical rows, their data files and plot in ``staging``, and the text lengths."""
    rows = canonical_rows(pairs)
    stamp = file_metadata(version)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the plot is drawn while the files are written
        lengths = pool.submit(
            lambda: {name: text_lengths(rows, name) for name in ("prompt", "chosen", "rejected")}
        )
        plot = pool.submit(lambda: _plot(lengths.result(), staging))
        files = write_data_files(rows, staging, parquet, stamp, previous, progress=progress)
        files[PLOT_NAME] = plot.result()
    return rows, files, lengths.result()


def _build(staged, metadata, previous, allow_version_mismatch):
    """The manifest, the diff and version check, the changelog, croissant.json and the card
    of the staged data files: each later file is made from the manifest."""
    rows, files, staging, version = staged.rows, staged.files, staged.staging, staged.version
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": metadata["name"],
        "version": version,
        "schema_version": PAIR_SCHEMA_VERSION,
        "tool": {"name": "hhdata", "version": __version__, "pyarrow": pa.__version__},
        "sources": sorted(metadata["sources"], key=lambda source: source["path"]),
        "subsets": subset_families(rows),
        "configs": config_views(rows),
        "accounting": metadata["accounting"],
        "flags": flag_counts(rows),
        "lengths": length_stats(rows, staged.lengths),
        "settings": {**metadata["settings"], "parquet": dataclasses.asdict(staged.parquet)},
        "files": files,
        "previous": None,
    }
    if metadata["leakage"] is not None:
        manifest["leakage"] = metadata["leakage"]
    if metadata["provenance"]:  # only releases with new batches that carry sidecars
        manifest["provenance"] = metadata["provenance"]
    change = None
    history = ""
    if previous is not None:
        change = diff.diff_releases(previous, staging, new_manifest=manifest)
        manifest["previous"] = diff.check_version(change, allow_version_mismatch)
        history = diff.read_changelog_entries(previous)
    write_manifest(staging, manifest)
    (staging / "CHANGELOG.md").write_text(diff.changelog(manifest, change, history), "utf-8")
    croissant.write_croissant(staging, manifest)
    (staging / "README.md").write_text(card.render_card(manifest), encoding="utf-8")
    return manifest, change


def canonical_rows(pairs: pa.Table) -> pa.Table:
    """The PAIR_SCHEMA columns of a table, in schema order.

    Raises ReleaseError when a column is missing or a pair id repeats.
    """
    missing = [column for column in PAIR_SCHEMA.names if column not in pairs.column_names]
    if missing:
        raise ReleaseError(
            f"the pair table lacks columns {missing}; build it with hhdata.pairs.build_pairs "
            "so every row follows hhdata.schema.PAIR_SCHEMA"
        )
    rows = pairs.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
    counts = pc.value_counts(rows["id"])
    repeated = pc.filter(counts, pc.greater(pc.struct_field(counts, "counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise ReleaseError(
            f"pair id {first['values']} appears {first['counts']} times ({len(repeated)} ids "
            "repeat); a release holds each pair once: deduplicate first (hhdata.dedup)"
        )
    return rows


def subset_families(rows: pa.Table) -> dict[str, str]:
    """Each subset in the table and its family, subsets in alphabetical order."""
    pairs = rows.group_by(["subset", "family"]).aggregate([]).to_pylist()
    families: dict[str, str] = {}
    for pair in sorted(pairs, key=lambda p: p["subset"]):
        if pair["subset"] in families:
            raise ReleaseError(
                f"subset {pair['subset']!r} has rows in both families; a subset belongs "
                "to one family (declare it once when reading a new batch)"
            )
        families[pair["subset"]] = pair["family"]
    return families


def file_metadata(version: str) -> dict[str, str]:
    """The key-value metadata stamped into each new Parquet file's footer.

    >>> file_metadata("1.2.0")["hhdata:release_version"]
    '1.2.0'
    """
    return {
        "hhdata:release_version": version,
        "hhdata:schema_version": PAIR_SCHEMA_VERSION,
        "hhdata:version": __version__,
    }


def write_data_files(
    rows: pa.Table,
    root: Path,
    parquet: ParquetSettings,
    stamp: dict[str, str] | None = None,
    previous: str | Path | None = None,
    progress: bool | None = False,
) -> dict[str, dict]:
    """Write one Parquet file per (subset, split), rows in input order; returns file entries.

    ``stamp`` goes into each file's key-value metadata (``pq.read_schema(path).metadata``).
    A file whose rows are the same as in the ``previous`` release keeps that release's
    stamp, so it stays byte-identical and publishing does not send it again: a file's
    ``hhdata:release_version`` is the version that first wrote those rows.

    Files are written by a thread pool (pyarrow compresses without the GIL); each file's
    bytes depend only on its rows, stamp and the settings, so the result is the same either way.
    ``progress`` counts the files written on a bar ("writing Parquet"); None draws it on a
    terminal outside CI (hhdata.progress).
    """
    earlier = _previous_files(previous)
    file_of_row, keys = _file_codes(rows)

    def write(code: int) -> tuple[str, dict]:
        subset, split = keys[code]
        members = np.flatnonzero(file_of_row == code)
        relative = data_file(subset, split)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative in earlier:  # try the earlier stamp: the same bytes if the rows are the same
            old_stamp, old_sha256 = earlier[relative]
            size = write_rows(rows, members, root / relative, old_stamp, parquet)
            entry = {**file_entry(root, relative), "rows": len(members), "memory_bytes": size}
            if entry["sha256"] == old_sha256:
                return relative, entry
        size = write_rows(rows, members, root / relative, stamp, parquet)
        return relative, {**file_entry(root, relative), "rows": len(members), "memory_bytes": size}

    with (
        bars.stage("writing Parquet", total=len(keys), unit="files", show=progress) as advance,
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
    ):

        def counted(code: int) -> tuple[str, dict]:
            written = write(code)
            advance(1)
            return written

        return dict(pool.map(counted, range(len(keys))))


def _file_codes(rows: pa.Table) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Per row, the number of its data file; the files' (subset, split), in sorted order."""
    keys = _subset_splits(rows)
    number = {key: code for code, key in enumerate(keys)}
    subset = degenerate.one_array(rows["subset"]).dictionary_encode()
    split = degenerate.one_array(rows["split"]).dictionary_encode()
    subsets, splits = subset.dictionary.to_pylist(), split.dictionary.to_pylist()
    # the (subset, split) of each pair of dictionary codes, then of each row
    table = np.full((len(subsets), max(len(splits), 1)), -1, dtype=np.int64)
    for i, name in enumerate(subsets):
        for j, part in enumerate(splits):
            table[i, j] = number.get((name, part), -1)
    codes = table[
        subset.indices.to_numpy(zero_copy_only=False), split.indices.to_numpy(zero_copy_only=False)
    ]
    return codes, keys


# row groups gathered at a time when a data file is written; a multiple of 8, so each
# batch's rows are too (the batches' validity bitmaps then add up to the whole's bytes)
_WRITE_BATCH_GROUPS = 64


def write_rows(
    rows: pa.Table, members: np.ndarray, path: Path, stamp: dict | None, parquet: ParquetSettings
) -> int:
    """Write ``rows.take(members)`` as one Parquet file, gathered a batch at a time; returns
    the rows' size in Arrow memory (the batches' ``Table.nbytes``, summed: that of the whole
    within a byte per batch and nested array, as validity bitmaps round up per batch).

    The batches are whole row groups (ParquetSettings.row_group_size), so the file's bytes
    are those of pq.write_table on the gathered rows, without a second copy of the file's
    texts in memory: at 10x HH size a file's rows are over 3 GB (bench/scale.md).
    """
    options = parquet.write_options()
    group = options.pop("row_group_size")
    batch = group * _WRITE_BATCH_GROUPS
    schema = rows.schema.with_metadata(stamp)
    size = 0
    with pq.ParquetWriter(path, schema, **options) as writer:
        for start in range(0, max(len(members), 1), batch):
            part = rows.take(pa.array(members[start : start + batch], pa.int64()))
            writer.write_table(part.replace_schema_metadata(stamp), row_group_size=group)
            size += part.nbytes
    return size


def _previous_files(previous: str | Path | None) -> dict[str, tuple[dict, str]]:
    """Data files of the previous release: relative path -> (their hhdata stamp, sha256)."""
    if previous is None:
        return {}
    files = {}
    for relative, entry in read_manifest(previous)["files"].items():
        path = Path(previous) / relative
        if relative.endswith(".parquet") and path.is_file():
            metadata = pq.read_schema(path).metadata or {}
            old = {k.decode(): v.decode() for k, v in metadata.items() if k.startswith(b"hhdata:")}
            if old:
                files[relative] = (old, entry["sha256"])
    return files


def _subset_splits(rows: pa.Table) -> list[tuple[str, str]]:
    keys = rows.group_by(["subset", "split"]).aggregate([]).to_pylist()
    return sorted((key["subset"], key["split"]) for key in keys)


def config_views(rows: pa.Table) -> dict[str, dict]:
    """Configs as views over the subset files: all (default), helpful, harmless, each subset."""
    families = subset_families(rows)
    members = {ALL: sorted(families)}
    for family in (HELPFUL, HARMLESS):
        chosen = [subset for subset, f in families.items() if f == family]
        if chosen:
            members[family] = chosen
    for subset in families:
        members[subset] = [subset]
    counts = {
        (k["subset"], k["split"]): k["id_count"]
        for k in rows.group_by(["subset", "split"]).aggregate([("id", "count")]).to_pylist()
    }
    configs = {}
    for config, subsets in members.items():
        splits = {}
        for split in sorted(
            {split for (subset, split) in counts if subset in subsets}, key=_split_order
        ):
            parts = [subset for subset in subsets if (subset, split) in counts]
            splits[split] = {
                "rows": sum(counts[(subset, split)] for subset in parts),
                "files": [data_file(subset, split) for subset in parts],
            }
        configs[config] = {"default": config == ALL, "splits": splits}
    return configs


def _split_order(split: str) -> tuple[int, str]:
    return ({"train": 0, "validation": 1, "test": 2}.get(split, 3), split)


def _plot(lengths_of: dict[str, np.ndarray], root: Path) -> dict:
    """Write the length-distribution PNG (deterministic: no software/date metadata)."""
    from matplotlib.figure import Figure  # no pyplot: safe off the main thread, no global state

    figure = Figure(figsize=(7, 3.2), dpi=100)
    axes = figure.subplots()
    bins = np.logspace(0, 5, 51)
    for column, colour in (("prompt", "#4c72b0"), ("chosen", "#55a868"), ("rejected", "#c44e52")):
        lengths = np.maximum(lengths_of[column], 1)
        axes.hist(
            lengths,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            color=colour,
            label=f"{column} (median {int(np.median(lengths)) if len(lengths) else 0})",
        )
    axes.set_xscale("log")
    axes.set_xlabel("characters")
    axes.set_ylabel("pairs")
    axes.set_title("Length distribution: prompt turns and final replies")
    axes.legend(frameon=False)
    figure.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.15)  # fixed: no layout pass
    figure.savefig(root / PLOT_NAME, format="png", metadata={"Software": None})
    return file_entry(root, PLOT_NAME)
