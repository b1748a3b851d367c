"""The whole flow, raw files to a release directory, in a few readable lines.

```
read_raw  ->  build_pairs  ->  deduplicate  ->  leakage_report  ->  write_release
   │ quarantine     │ quarantine     │ drops (removed / filtered, by reason)
```

Configs (all, helpful, harmless, one per subset) are views over the per-subset files that
write_release lays out; no stage copies rows into them.

Every row that leaves the flow leaves with a reason, and the counts must reconcile:
``read = kept + quarantined + removed + filtered`` (each by reason). run_pipeline checks
that and raises ReleaseError when it does not hold, so a release can never hide rows.
Synthetic subsets (``synth-*``) are refused unless asked for by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from hhdata import memory
from hhdata import progress as bars
from hhdata.dedup import configs, degenerate
from hhdata.dedup import run as dedup
from hhdata.errors import ReleaseError
from hhdata.io import read
from hhdata.io.lines import path_text
from hhdata.release import provenance as sidecars
from hhdata.release import write as release
from hhdata.release.manifest import file_digest, read_manifest
from hhdata.schema import FATES, FILTERED, REMOVED, SUBSET_FAMILIES, is_synthetic

HUB_PREFIX = "hf://"
# deduplicate's default: the near stage streams on large tables
_NEAR_STREAM = dedup.NearStream()


@dataclass(frozen=True)
class PipelineResult:
    """The kept pair rows, everything that left with its reason, and the accounting.

    ``leakage`` (the train/test prompt overlap, or None when not checked) is computed in a
    background thread that run_pipeline starts; reading it waits for that thread, and
    release_from reads it only after the data files are written, so the check and the
    writing overlap. On a large run (``stream.bounded_rows`` rows or more: a million
    by default) the check is not started: it runs when ``leakage`` is first read,
    after the files are written, so the two never hold their memory at the same time
    (bench/scale.md, 10x HH size).
    """

    pairs: pa.Table
    quarantine: pa.Table
    drops: pa.Table
    accounting: dict
    sources: list[dict]
    settings: dict
    dedup_report: dict
    pending_leakage: Future | AfterWriting | None = field(default=None, repr=False)
    provenance: dict = field(default_factory=dict)  # hhdata.release.provenance's summary

    @property
    def leakage(self) -> dict | None:
        return None if self.pending_leakage is None else self.pending_leakage.result()


def run_pipeline(
    sources: str | Path | Iterable[str | Path],
    *,
    dedup_settings: dedup.DedupSettings | None = None,
    include_synthetic: Iterable[str] = (),
    check_leakage: bool = True,
    progress: bool | None = False,
    subset: str | None = None,
    split: str | None = None,
    family: str | None = None,
    stream: dedup.NearStream | None = _NEAR_STREAM,
) -> PipelineResult:
    """Read, parse and deduplicate raw files; returns kept rows and the full accounting.

    ``sources`` are files, folders in the upstream layout ``<subset>/<split>.jsonl[.gz]``,
    or globs (or ``hf://ORG/NAME`` for the upstream layout on the Hub). With
    ``check_leakage`` the kept rows' prompts shared by train and test (exact and near) are
    counted (hhdata.dedup.configs.leakage_report) for the manifest and the card. Raises
    ReleaseError when a synthetic subset is read without being named in
    ``include_synthetic``, or when the counts do not reconcile. Allocator settings are the
    caller's: build_release and ``hhdata build`` run it inside hhdata.memory.large_run().
    ``progress`` draws a bar per stage on stderr (reading, exact dedup, near stages); None
    draws them on a terminal outside CI (hhdata.progress), as ``hhdata build`` does.
    ``subset``, ``split`` and ``family`` are hhdata.io.read.read_raw's: for files outside
    the upstream layout. ``stream`` is deduplicate's; on a table of
    ``stream.bounded_rows`` rows or more the leakage check waits until it is
    asked for (see PipelineResult).
    """
    dedup_settings = dedup_settings or dedup.DedupSettings()
    sources = resolve_sources(sources)
    # a sidecar that does not match its data file stops the build before the work
    provenance = sidecars.summarise_sidecars(read.resolve_paths(sources), subset, split)
    # each file is read and parsed by one thread (read_pairs); its quarantine holds the bad
    # lines and the pairs whose prompt cannot be found
    raw = read.read_pairs(sources, subset=subset, split=split, family=family, progress=progress)
    _refuse_synthetic(raw.table, raw.quarantine, set(include_synthetic))
    quarantine, report = raw.quarantine, raw.report
    # the read result (and with it the chunked table) is let go before the copy is made
    columns, schema = raw.table.columns, raw.table.schema
    del raw
    table = one_chunk(columns, schema)
    large = stream is not None and table.num_rows >= stream.bounded_rows
    deduplicated = dedup.deduplicate(table, dedup_settings, progress=progress, stream=stream)
    del table  # only the kept rows go on: the input table is freed before the files are written
    # the kept rows are slices of the input table (dedup.kept_rows): made one array per
    # column here, each input column freed as soon as its kept rows are copied
    columns, schema = deduplicated.kept.columns, deduplicated.kept.schema
    deduplicated = dataclasses.replace(deduplicated, kept=None)
    kept = one_chunk(columns, schema)
    accounting = reconcile(report, quarantine, deduplicated.drops, kept.num_rows)
    leakage = None
    if check_leakage:
        check = (_leakage, kept, dedup_settings, deduplicated.prompt_sketch)
        leakage = AfterWriting(*check) if large else _BACKGROUND.submit(*check)
    return PipelineResult(
        pairs=kept,
        quarantine=quarantine,
        drops=deduplicated.drops,
        accounting=accounting,
        sources=describe_sources(report.files, sources),
        settings={
            "dedup": _jsonable(deduplicated.settings),
            "include_synthetic": sorted(include_synthetic),
        },
        dedup_report=deduplicated.report,
        pending_leakage=leakage,
        provenance=provenance,
    )


def one_chunk(columns: list, schema: pa.Schema) -> pa.Table:
    """A table of one array per column, as deduplicate wants it, made column by column.

    ``columns`` (a table's chunked columns, which nothing else should hold) is emptied as
    it goes, so each chunked column is freed as soon as its copy is made: the peak is the
    table and one column, not the table twice. A column that already is one array is not
    copied. The same makes the kept rows (slices of the pair table) one array per column,
    freeing each of the pair table's columns once its kept rows are copied.
    """
    arrays = []
    while columns:
        arrays.append(degenerate.one_array(columns.pop(0)))
    return pa.table(arrays, schema=schema)


# one thread for the leakage checks of pipeline runs (see PipelineResult)
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hhdata-leakage")


class AfterWriting:
    """A leakage check made when its result is first asked for (``result()``, as of a
    Future): release_from asks after the data files are written."""

    def __init__(self, check, *arguments) -> None:
        self._check, self._arguments = check, arguments
        self._result: dict | None = None

    def done(self) -> bool:
        """Whether the check has run."""
        return self._check is None

    def result(self) -> dict:
        """The check's result, made now the first time."""
        if self._check is not None:
            memory.give_back()  # what malloc kept of the writing, before the check's peak
            self._result = self._check(*self._arguments)
            self._check, self._arguments = None, ()
        return self._result


def _leakage(kept: pa.Table, settings: dedup.DedupSettings, sketch) -> dict:
    report = configs.leakage_report(kept, settings, examples=0, sketch=sketch)
    return {kind: report[kind] for kind in ("exact", "near")}


def build_release(
    sources: str | Path | Iterable[str | Path],
    *,
    version: str,
    out: str | Path,
    previous: str | Path | None = None,
    allow_version_mismatch: bool = False,
    include_synthetic: Iterable[str] = (),
    dedup_settings: dedup.DedupSettings | None = None,
    check_leakage: bool = True,
    parquet: release.ParquetSettings = release.ParquetSettings(),
    progress: bool | None = False,
    name: str = release.DEFAULT_NAME,
) -> release.Release:
    """Raw files to ``<out>/<version>/``: the whole pipeline, then the release directory.

    ``name`` is best the Hub repo id the release will be published under (``org/name``):
    the card's usage code and croissant.json's ``url`` then point at it.

    >>> sample = [read.bundled_sample_path()]
    >>> built = build_release(sample, version="1.0.0", out="out")  # doctest: +SKIP
    >>> built.path, list(built.manifest["configs"])  # doctest: +SKIP
    (PosixPath('out/1.0.0'), ['all', 'harmless', 'harmless-base'])
    """
    check_targets(out, version, previous)
    with memory.large_run():
        result = run_pipeline(
            sources,
            dedup_settings=dedup_settings,
            include_synthetic=include_synthetic,
            check_leakage=check_leakage,
            progress=progress,
        )
        return release_from(
            result,
            version=version,
            out=out,
            previous=previous,
            allow_version_mismatch=allow_version_mismatch,
            parquet=parquet,
            name=name,
            progress=progress,
        )


def check_targets(out: str | Path, version: str, previous: str | Path | None) -> None:
    """Fail before any work when the version exists, ``previous`` is not a release, or the
    output folder's path is not UTF-8 (Arrow's Parquet writer cannot open such a path)."""
    _utf8_path(out, "--out")
    release.new_version_dir(out, version)
    if previous is not None:
        read_manifest(previous)


def release_from(
    result: PipelineResult,
    *,
    version: str,
    out: str | Path,
    previous: str | Path | None = None,
    allow_version_mismatch: bool = False,
    parquet: release.ParquetSettings = release.ParquetSettings(),
    name: str = release.DEFAULT_NAME,
    progress: bool | None = False,
) -> release.Release:
    """Write the release directory of a pipeline run (see hhdata.release.write_release).

    Raises ReleaseError when the run kept no row (see nothing_kept). ``progress`` draws a
    bar for writing the Parquet files and one for the leakage check (see run_pipeline).
    """
    empty = nothing_kept(result)
    if empty:
        raise ReleaseError(empty)
    # the leakage check started in run_pipeline runs while the data files are written; its
    # result goes to the manifest as data
    with release.staged_release(
        result.pairs, out, version, previous=previous, parquet=parquet, progress=progress
    ) as staged:
        return release.finish_release(
            staged,
            sources=result.sources,
            accounting=result.accounting,
            settings=result.settings,
            leakage=_wait_for_leakage(result, progress),
            previous=previous,
            allow_version_mismatch=allow_version_mismatch,
            name=name,
            provenance=result.provenance,
        )


def _wait_for_leakage(result: PipelineResult, progress: bool | None) -> dict | None:
    """The leakage check's result, behind a bar that fills when it is done: the check runs
    in the background thread while the files are written, so its bar opens only now."""
    if result.pending_leakage is None:
        return None
    with bars.stage("leakage check", total=1, unit="steps", show=progress) as advance:
        leakage = result.leakage
        advance(1)
    return leakage


def nothing_kept(result: PipelineResult) -> str | None:
    """Why a run that kept no row cannot be released (None when it kept some): a release
    of zero rows would load as empty data everywhere it is used."""
    accounting = result.accounting
    if accounting["kept"]:
        return None
    if not accounting["read"]:
        files = f"{len(result.sources)} file" + ("s" if len(result.sources) != 1 else "")
        return (
            f"the sources hold no record ({files} read, all empty or blank); no release is "
            "written: check that the right files were given"
        )
    left = [f"{reason} {count}" for fate in FATES for reason, count in accounting[fate].items()]
    return (
        f"all {accounting['read']} records read left the flow ({', '.join(left)}), so no "
        "row is left to release; no release is written: fix the records (hhdata validate "
        "shows them, --quarantine FILE saves them) and build again"
    )


def _utf8_path(path: str | Path, flag: str) -> None:
    """Raise ReleaseError when a path holds bytes that are not UTF-8 (lone surrogates)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ReleaseError(
            f"the {flag} folder {path_text(path)} has bytes in its path that are not UTF-8, "
            "where a release cannot be written; choose a folder whose path is UTF-8"
        ) from None


def write_drops(drops: pa.Table, path: str | Path) -> int:
    """Write the drop log (id, reason, kept_id, subset, split, similarity) as JSON Lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in drops.to_pylist():
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return drops.num_rows


def resolve_sources(sources: str | Path | Iterable[str | Path]) -> list[str | Path]:
    """Sources as local paths: ``hf://ORG/NAME[@REVISION]`` is fetched from the Hub first.

    The upstream layout is downloaded with hhdata.hub.fetch_upstream, which checks every
    file against the checksums recorded in UPSTREAM_MANIFEST.md.
    """
    given = [sources] if isinstance(sources, (str, Path)) else list(sources)
    resolved = []
    for source in given:
        if isinstance(source, str) and source.startswith(HUB_PREFIX):
            from hhdata.hub.load import fetch_upstream

            repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
            # preference subsets only: red-team attempts are not pairs (their own schema)
            upstream = fetch_upstream(repo_id, sorted(SUBSET_FAMILIES), revision=revision or "main")
            resolved.append(upstream.folder)
        else:
            resolved.append(source)
    return resolved


def reconcile(report: read.ReadReport, quarantine: pa.Table, drops: pa.Table, kept: int) -> dict:
    """The accounting of a run; raises ReleaseError unless read = kept + everything that left."""
    records = report.lines - report.blank
    left_by_fate = {REMOVED: Counter(), FILTERED: Counter()}
    for fate, reason in zip(drops["fate"].to_pylist(), drops["reason"].to_pylist(), strict=True):
        left_by_fate[fate][reason] += 1
    removed, filtered = left_by_fate[REMOVED], left_by_fate[FILTERED]
    quarantined = Counter(quarantine["reason"].to_pylist())
    accounting = {
        "read": records,
        "kept": kept,
        "quarantined": dict(sorted(quarantined.items())),
        "removed": dict(sorted(removed.items())),
        "filtered": dict(sorted(filtered.items())),
    }
    left = sum(quarantined.values()) + sum(removed.values()) + sum(filtered.values())
    if records != kept + left:
        raise ReleaseError(
            f"counts do not reconcile: read {records} records but kept {kept} + quarantined "
            f"{sum(quarantined.values())} + removed {sum(removed.values())} + filtered "
            f"{sum(filtered.values())} = {kept + left}; a stage lost or invented rows "
            "(this is a bug in hhdata: please report it with the input files)"
        )
    return accounting


def _refuse_synthetic(table: pa.Table, quarantine: pa.Table, allowed: set[str]) -> None:
    found = set(table["subset"].unique().to_pylist())
    if "subset" in quarantine.column_names:
        found |= set(quarantine["subset"].drop_null().unique().to_pylist())
    refused = sorted(s for s in found if s and is_synthetic(s) and s not in allowed)
    if refused:
        names = " ".join(f"--include-synthetic {name}" for name in refused)
        raise ReleaseError(
            f"the sources hold synthetic subsets {refused}, which never enter a release of "
            f"real data by accident; remove them from the sources, or ask for them by name: {names}"
        )


def describe_sources(files: list[str], given) -> list[dict]:
    """Path (relative to the folder given, so manifests agree across machines), sha256, bytes."""
    roots = [Path(g) for g in ([given] if isinstance(given, (str, Path)) else given)]
    described = []
    for name in files:
        path = Path(name)
        digest, size = file_digest(path)
        described.append({"path": _relative(path, roots), "sha256": digest, "bytes": size})
    return described


def _relative(path: Path, roots: list[Path]) -> str:
    for root in roots:
        if root.is_dir():
            try:
                # absolute, not resolved: Hub snapshots are symlinks into a blob store
                return path_text(
                    Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
                )
            except ValueError:
                continue
    return path_text(f"{path.parent.name}/{path.name}" if path.parent.name else path.name)


def _jsonable(settings) -> dict:
    """Settings as plain JSON values (tuples become lists), as they will read back."""
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    return json.loads(json.dumps(settings))
