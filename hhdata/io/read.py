"""Read raw HH-RLHF JSONL(.gz) files into an Arrow table, quarantining what is broken.

``read_raw`` takes files, folders in the upstream layout ``<subset>/<split>.jsonl[.gz]``
and globs, several files at once in threads (the largest first). It streams each file
(gzip detected by its magic bytes, inflated with ISA-L; a large uncompressed file in
ranges of BLOCK_BYTES cut at newlines, side by side), finds the lines with numpy and
reads runs of plain lines (``{..."}``, as upstream writes them) with Arrow's JSON reader
against the record's shape; other lines go one by one (msgspec). Rows Arrow read but the
rules refuse (a null, bytes that are not UTF-8, found by halving the run) and every line
msgspec refuses take the slow path: ``json.loads`` and the ``jsonschema`` validator word
the exact reason. A run Arrow refuses as a whole is redone in shorter runs. Nothing
disappears without a count: ``lines == blank + accepted + sum(quarantined.values())``.

Limits: a line longer than MAX_LINE_BYTES (4 MiB; the longest real record is about 16 KB)
is quarantined as ``line_too_long`` without being held in memory. A gzip stream that ends
early keeps the records before the cut and quarantines the cut line as ``truncated_file``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from hhdata import progress as bars
from hhdata import quarantine as q
from hhdata._arrow import ARROW_POOL
from hhdata.errors import SchemaError, SourceError
from hhdata.io import MAX_LINE_BYTES
from hhdata.io.lines import RAW_HEAD, Block, blocks, byte_ranges, path_text, too_long
from hhdata.io.validate import explain_raw_line, validate_raw_table
from hhdata.schema import PAIR_SCHEMA, RAW_SCHEMA, SPLITS, family_of

__all__ = ["MAX_LINE_BYTES", "ReadReport", "ReadResult", "read_pairs", "read_raw"]

BLOCK_BYTES = 16 * 2**20  # an uncompressed file larger than this is read in ranges, in threads
SEGMENT_BYTES = 16 * 2**20  # bytes read (inflated) between two hand-overs to validate and parse
_RUN_LINES = 1024  # lines per call of Arrow's JSON reader
_RETRY_LINES = 32  # a run with a bad line is redone in runs this long, then line by line


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    chosen: str
    rejected: str


_DECODER = msgspec.json.Decoder(_Record)


@dataclass
class ReadReport:
    """What a read saw: every line is blank, accepted or quarantined (with a reason)."""

    files: list[str] = field(default_factory=list)
    lines: int = 0
    blank: int = 0
    accepted: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def reconciles(self) -> bool:
        """True when lines == blank + accepted + quarantined."""
        return self.lines == self.blank + self.accepted + sum(self.quarantined.values())


@dataclass
class ReadResult:
    """The accepted records (RAW_SCHEMA), the quarantine (QUARANTINE_SCHEMA), the counts."""

    table: pa.Table
    quarantine: pa.Table
    report: ReadReport
    sources: pa.Table | None = None  # read_pairs: the file and line of each row of table


def read_raw(
    paths: str | Path | Iterable[str | Path],
    *,
    subset: str | None = None,
    split: str | None = None,
    family: str | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    progress: bool | None = False,
    require_source: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> ReadResult:
    """Read raw JSONL(.gz) records from files, upstream-layout folders or globs.

    subset and split come from a path ``<subset>/<split>.jsonl[.gz]``; arguments, when
    given, override the path. family is needed only for a subset hhdata does not know, and
    must agree with a known subset's. progress=None shows a bar when stderr is a terminal
    outside CI (hhdata.progress).
    With ``require_source=False`` a file whose subset, split or family neither its path nor
    the arguments tell is read as is, with nulls there and a notice (validation needs no
    split; a build does). An uncompressed file over block_bytes is read in ranges of
    about that size, cut at newlines, in threads; the result is the same for any size.

    >>> result = read_raw(bundled_sample_path())
    >>> result.report.accepted, result.table.column_names[:2]
    (2312, ['file', 'line'])
    """
    return _read(
        paths,
        _Options(subset, split, family, max_line_bytes, progress, require_source, block_bytes),
        pairs=False,
    )


def read_pairs(
    paths: str | Path | Iterable[str | Path],
    *,
    subset: str | None = None,
    split: str | None = None,
    family: str | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    progress: bool | None = False,
    require_source: bool = True,
    block_bytes: int = BLOCK_BYTES,
    columns: Iterable[str] | None = None,
) -> ReadResult:
    """read_raw, then hhdata.pairs.build_pairs: a ReadResult whose table holds pair rows and
    whose ``sources`` holds the file and line each row came from.

    Each file's pairs are built by the thread that read it, as soon as it is read, so one
    file's parsing overlaps the next file's reading. The quarantine holds the bad lines and
    the pairs whose prompt cannot be determined, by file and line; the report's counts
    still reconcile (accepted = pair rows). The arguments are read_raw's, and columns:
    keep only these columns of the pair rows (None: all of hhdata.schema.PAIR_SCHEMA).
    Without "id" the pair ids (a sha256 per row, a third of the parse) are not computed;
    without the text columns each range's texts are freed as soon as it is parsed, so
    memory stays at a few ranges: ``hhdata validate`` keeps only "flags".

    >>> result = read_pairs(bundled_sample_path())
    >>> result.report.accepted, result.sources.num_rows, result.report.reconciles()
    (2312, 2312, True)
    """
    if columns is not None:
        columns = list(columns)
        unknown = [name for name in columns if name not in PAIR_SCHEMA.names]
        if unknown:
            raise SchemaError(
                f"read_pairs: no pair column {unknown}; choose columns from {PAIR_SCHEMA.names}"
            )
    return _read(
        paths,
        _Options(subset, split, family, max_line_bytes, progress, require_source, block_bytes),
        pairs=True,
        columns=columns,
    )


@dataclass(frozen=True)
class _Options:
    """The arguments read_raw and read_pairs share."""

    subset: str | None
    split: str | None
    family: str | None
    max_line_bytes: int
    progress: bool | None
    require_source: bool
    block_bytes: int


class _Part(NamedTuple):
    """What the thread that read one range of a file returns; lines are numbered from 1
    in the range until _join shifts them."""

    table: pa.Table
    bad: pa.Table
    kept: pa.Table | None  # read_pairs: file and line of each pair row
    report: ReadReport
    crlf: int


def _read(paths, options: _Options, *, pairs: bool, columns: list[str] | None = None):
    """read_raw, or read_pairs when ``pairs``."""
    skipped: list[Path] = []
    files = resolve_paths(paths, skipped)
    sources = [
        _source_of(path, options.subset, options.split, options.family, options.require_source)
        for path in files
    ]
    report = ReadReport(files=[str(path) for path in files])
    report.notices += [
        f"{path_text(path)}: red-team attempts, not preference pairs: skipped (check them "
        f"with `hhdata redteam {path_text(path)}`)"
        for path in skipped
    ]
    for path, source in zip(files, sources):
        unknown = [
            name for name, value in zip(("subset", "split", "family"), source) if value is None
        ]
        if unknown:
            report.notices.append(
                f"{path_text(path)}: no {' or '.join(unknown)} in its path or the arguments; "
                "validated as is (only a build needs them: put the file at "
                "<subset>/<split>.jsonl[.gz], or pass --subset, --split and --family)"
            )
    sizes = [path.stat().st_size for path in files]
    # (file, start, stop): a large uncompressed file in ranges cut at newlines, the rest whole
    tasks = [
        (index, start, stop)
        for index, path in enumerate(files)
        for start, stop in byte_ranges(path, options.block_bytes)
    ]
    if pairs:
        from hhdata.pairs.build import build_pairs

    def read_one(task: tuple[int, int, int | None], advance) -> _Part:
        index, start, stop = task
        part = ReadReport()
        pieces: list[tuple[pa.Table, pa.Table, pa.Table | None]] = []

        def segment(table: pa.Table) -> None:
            """Validate (and parse) the next segment of the range as soon as it is read."""
            table, invalid = validate_raw_table(table)
            if not pairs:
                pieces.append((table, invalid, None))
                return
            # this thread is one of the pool's, so the batches are built one after the other
            rows, unsplit = build_pairs(
                table, workers=1, pair_ids=columns is None or "id" in columns
            )
            if columns is not None:
                rows = rows.select(columns)
            kept = table.select(["file", "line"])
            if unsplit.num_rows:
                kept = kept.filter(pc.invert(pc.is_in(kept["line"], unsplit["line"])))
            pieces.append((rows, q.concat([invalid, unsplit]), kept))

        bad, crlf = _read_file(
            files[index],
            sources[index],
            options.max_line_bytes,
            part,
            advance,
            segment,
            start,
            stop,
        )
        table = pa.concat_tables([piece[0] for piece in pieces])
        bad = q.concat([bad, *(piece[1] for piece in pieces)]).sort_by("line")
        kept = None if not pairs else pa.concat_tables([piece[2] for piece in pieces])
        return _Part(table, bad, kept, part, crlf)

    # ranges in parallel threads: inflating, Arrow's JSON reader and numpy release the GIL.
    # The largest start first, so the threads finish together; results keep file order.
    def size_of(task: tuple[int, int, int | None]) -> int:
        index, start, stop = task
        return (sizes[index] if stop is None else stop) - start

    workers = max(1, min(len(tasks), os.cpu_count() or 1, 8))
    with (
        bars.stage("read", total=sum(sizes), unit="B", show=options.progress) as advance,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        futures = {
            task: pool.submit(read_one, task, advance)
            for task in sorted(tasks, key=lambda task: -size_of(task))
        }
        parts = [futures[task].result() for task in tasks]
    tables, quarantines, lines = [], [], []
    for index, path in enumerate(files):
        table, bad, kept = _join(
            [part for task, part in zip(tasks, parts) if task[0] == index], report, path
        )
        tables.append(table)
        quarantines.append(bad)
        lines.append(kept)
    quarantine = q.concat(quarantines)
    report.accepted = sum(table.num_rows for table in tables)
    report.quarantined = q.reason_counts(quarantine)
    if not pairs:
        return ReadResult(pa.concat_tables([RAW_SCHEMA.empty_table(), *tables]), quarantine, report)
    empty = PAIR_SCHEMA.empty_table()
    return ReadResult(
        pa.concat_tables([empty if columns is None else empty.select(columns), *tables]),
        quarantine,
        report,
        pa.concat_tables([RAW_SCHEMA.empty_table().select(["file", "line"]), *lines]),
    )


def _join(parts: list[_Part], report: ReadReport, path: Path):
    """One file's table, quarantine and kept lines from its ranges, in order: each range's
    line numbers shifted by the lines of the ranges before it. Adds the counts to report."""
    tables, quarantines, kept = [], [], []
    before = crlf = 0
    for part in parts:
        tables.append(_shift_lines(part.table, before))
        quarantines.append(_shift_lines(part.bad, before))
        kept.append(None if part.kept is None else _shift_lines(part.kept, before))
        before += part.report.lines
        report.lines += part.report.lines
        report.blank += part.report.blank
        report.notices += part.report.notices
        crlf += part.crlf
    if crlf:
        report.notices.append(f"{path_text(path)}: {crlf} lines end with CRLF (\\r\\n); read as LF")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    lines = None if kept[0] is None else pa.concat_tables(kept)
    return table, q.concat(quarantines), lines


def _shift_lines(table: pa.Table, lines_before: int) -> pa.Table:
    """The table with lines_before added to its line column (if it has one)."""
    if not lines_before or "line" not in table.column_names:
        return table
    at = table.column_names.index("line")
    shifted = pc.add(table["line"], pa.scalar(lines_before, table.schema.field(at).type))
    return table.set_column(at, table.schema.field(at), shifted)


def bundled_sample_path() -> Path:
    """The bundled real sample: harmless-base/test.jsonl.gz (MIT, Anthropic)."""
    return Path(__file__).parent.parent / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


REDTEAM_STEM = "red_team_attempts"  # upstream's red-team file: attempts, not preference pairs


def is_redteam_file(path: Path) -> bool:
    """True for upstream's red-team attempts file (red_team_attempts.jsonl[.gz]), read by
    hhdata.redteam."""
    return path.name.split(".")[0] == REDTEAM_STEM


def resolve_paths(
    paths: str | Path | Iterable[str | Path], skipped: list[Path] | None = None
) -> list[Path]:
    """Expand files, folders (every *.jsonl and *.jsonl.gz below) and globs, in order.

    Red-team attempts found in a folder or by a glob (a clone of the upstream repo holds
    red-team-attempts/red_team_attempts.jsonl.gz) are not pairs: they are left out and
    appended to ``skipped``; one named on its own is refused with a pointer to hhdata.redteam.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    skipped = [] if skipped is None else skipped
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
            skipped += [p for p in found if is_redteam_file(p)]
            found = [p for p in found if not is_redteam_file(p)]
            if not found:
                raise SourceError(f"{path} holds no *.jsonl or *.jsonl.gz file; point at the files")
            files += found
        elif path.is_file():
            if is_redteam_file(path):
                raise SourceError(
                    f"{path_text(path)} holds red-team attempts, not preference pairs: read and "
                    "check it "
                    f"with `hhdata redteam {path_text(path)}` (hhdata.redteam.read_redteam)"
                )
            files.append(path)
        elif any(char in str(given) for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(given), recursive=True))
            if not matches:
                raise SourceError(f"no file matches {given}; check the pattern")
            skipped += [m for m in matches if m.is_file() and is_redteam_file(m)]
            files += [m for m in matches if m.is_file() and not is_redteam_file(m)]
        else:
            raise SourceError(f"{path} does not exist; check the path")
    return files


# where the subset, split and family of a file outside the upstream layout are given
_HOW_TO_PASS = "(in Python split= and subset=; --split and --subset for hhdata stats and show)"


def _source_of(
    path: Path,
    subset: str | None,
    split: str | None,
    family: str | None,
    require_source: bool = True,
):
    """(subset, split, family) of a file: the arguments, else the upstream layout.

    Without ``require_source`` what neither tells stays None (validation does not need it)
    and a contradiction is still refused.
    """
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    from_layout = stem in SPLITS
    split = split or (stem if from_layout else None)
    subset = subset or (path.parent.name if from_layout else None)
    shown = path_text(path)
    if split is not None and split not in SPLITS:
        raise SourceError(f"split {split!r} for {shown} is not one of {list(SPLITS)}")
    if require_source and split is None:
        raise SourceError(
            f"cannot tell the split of {shown}: its name is not train.jsonl[.gz] or "
            f"test.jsonl[.gz]; put it at <subset>/<split>.jsonl.gz or pass the split {_HOW_TO_PASS}"
        )
    if require_source and subset is None:
        raise SourceError(f"cannot tell the subset of {shown}; pass the subset {_HOW_TO_PASS}")
    if subset is None:
        return None, split, family
    try:
        return subset, split, family_of(subset, family)
    except ValueError as error:
        if not require_source and family is None:
            return subset, split, None  # a new batch: its family matters only for a build
        raise SourceError(
            f"{shown}: {error} (in Python family= and subset=, on the command line "
            "--family and --subset)"
        ) from None


def _read_file(path, source, max_line_bytes, report, advance, segment, start=0, stop=None):
    """Read a file (or a range of it): its accepted records go to segment(table), in line
    order, about every SEGMENT_BYTES read (so a whole gzip file's texts need not be held
    at once); returns its quarantine and how many of its lines end with CRLF."""
    rows = _Rows(path_text(path), source)
    crlf = read = 0
    for item in blocks(path, max_line_bytes, report.notices, advance, start, stop):
        if isinstance(item, Block):
            crlf += _read_block(item, rows, max_line_bytes)
            read += len(item.buffer)
            if read >= SEGMENT_BYTES:
                segment(rows.table())
                read = 0
        else:
            number, problem = item
            rows.quarantine(number, problem)
    segment(rows.table())
    report.lines += rows.lines
    report.blank += rows.blank
    return q.quarantine_table(rows.bad), crlf


class _Rows:
    """Accepted records of one file, in line order: Arrow chunks and single decoded lines."""

    def __init__(self, name: str, source: tuple[str, str, str]):
        self.name, self.source = name, source
        self.numbers: list[np.ndarray] = []
        self.chunks: dict[str, list[pa.Array]] = {"chosen": [], "rejected": []}
        self.single: dict[str, list] = {"line": [], "chosen": [], "rejected": []}
        self.bad: list[tuple] = []
        self.lines = self.blank = 0

    def add_table(self, lines: np.ndarray, records: pa.Table) -> None:
        self._flush()
        self.lines += len(lines)
        self.numbers.append(lines)
        for key, chunks in self.chunks.items():
            chunks += records[key].chunks

    def add_line(self, number: int, line: bytes) -> None:
        """A line the bulk reader did not take: blank, bad, or fine by the slow path."""
        self.lines += 1
        if not line.strip(b" \t\r"):
            self.blank += 1
            return
        try:
            record = _DECODER.decode(line)
            chosen, rejected = record.chosen, record.rejected
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            problem, record = explain_raw_line(line)
            if problem:
                self.bad.append((self.name, number, *problem, line))
                return
            chosen, rejected = record["chosen"], record["rejected"]
        for key, value in zip(self.single, (number, chosen, rejected)):
            self.single[key].append(value)

    def quarantine(self, number: int, problem: q.Problem) -> None:
        self.lines += 1
        self.bad.append((self.name, number, *problem))

    def table(self) -> pa.Table:
        """The records added since the last call: text columns chunked as read (no copy),
        the rest constant."""
        self._flush()
        lines = np.concatenate([np.zeros(0, np.int64), *self.numbers])
        self.numbers = []
        text = [pa.chunked_array(self.chunks[key], pa.string()) for key in ("chosen", "rejected")]
        self.chunks = {"chosen": [], "rejected": []}
        constant = [
            pa.repeat(pa.scalar(value, pa.string()), len(lines), memory_pool=ARROW_POOL)
            for value in (self.name, *self.source)
        ]
        return pa.Table.from_arrays(
            [constant[0], pa.array(lines), *constant[1:], *text], schema=RAW_SCHEMA
        )

    def _flush(self) -> None:
        if self.single["line"]:
            self.numbers.append(np.array(self.single["line"], np.int64))
            for key in self.chunks:
                self.chunks[key].append(pa.array(self.single[key], pa.string()))
            for column in self.single.values():
                column.clear()


_JSON_OPTIONS = pa_json.ParseOptions(
    explicit_schema=pa.schema([("chosen", pa.string()), ("rejected", pa.string())]),
    unexpected_field_behavior="error",
)


def _read_block(block: Block, rows: _Rows, max_line_bytes: int) -> int:
    """Read a block: runs of plain lines in bulk with Arrow's JSON reader, the rest one by
    one. Returns how many lines end with CRLF."""
    data = np.frombuffer(block.buffer, np.uint8)
    starts, ends = block.starts, block.ends
    filled = ends > starts
    crlf = filled & (data[np.maximum(ends - 1, 0)] == 13)
    ends = ends - crlf
    filled = ends > starts
    plain = filled & (ends - starts <= max_line_bytes)
    # {..."}: an object whose last value is a string, as upstream writes every line. The
    # other lines (extra keys like "score": 1, a list for a reply, a cut record) would make
    # Arrow refuse the whole run, so they go line by line from the start.
    last = data[np.maximum(ends - 1, 0)], data[np.maximum(ends - 2, 0)]
    plain &= (data[np.minimum(starts, len(data) - 1)] == 123) & (last[0] == 125) & (last[1] == 34)
    # segments of equal plainness: bulk-read the plain ones, decode the others line by line
    cuts = np.flatnonzero(np.diff(plain.astype(np.int8))) + 1
    for low, high in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(plain)]])):
        if plain[low]:
            _read_run(block, starts, ends, low, high, rows)
        else:
            for index in range(low, high):
                _read_line(block, starts, ends, index, rows, max_line_bytes)
    return int(crlf.sum())


def _read_run(
    block: Block, starts, ends, low: int, high: int, rows: _Rows, size: int = _RUN_LINES
) -> None:
    """Lines low..high-1 with Arrow's JSON reader, ``size`` at a time. A run it refuses, or
    reads into a different number of rows, is redone in runs of _RETRY_LINES, then line
    by line."""
    for start in range(low, high, size):
        stop = min(start + size, high)
        view = memoryview(block.buffer)[starts[start] : ends[stop - 1]]
        try:
            records = pa_json.read_json(
                pa.py_buffer(view),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=len(view) + 1),
                parse_options=_JSON_OPTIONS,
                memory_pool=ARROW_POOL,
            )
            exact = records.num_rows == stop - start
        except (pa.ArrowInvalid, UnicodeDecodeError):
            exact = False
        if not exact:
            if size > _RETRY_LINES:
                _read_run(block, starts, ends, start, stop, rows, _RETRY_LINES)
            else:
                for index in range(start, stop):
                    _read_line(block, starts, ends, index, rows, None)
            continue
        # Lines Arrow read but the rules refuse take the slow path, which words the reason:
        # a missing key or a null (jsonschema's words), and bytes that are not UTF-8 (Arrow's
        # JSON reader leaves UTF-8 inside strings unchecked). The rest of the run stays bulk.
        keep = np.ones(stop - start, dtype=bool)
        if records["chosen"].null_count or records["rejected"].null_count:
            complete = pc.and_(records["chosen"].is_valid(), records["rejected"].is_valid())
            keep &= complete.to_numpy(zero_copy_only=False)
        keep[_invalid_utf8_rows(records)] = False
        if keep.all():
            rows.add_table(np.arange(start, stop) + block.first, records)
            continue
        for index in np.flatnonzero(~keep) + start:
            _read_line(block, starts, ends, index, rows, None)
        rows.add_table(np.arange(start, stop)[keep] + block.first, records.filter(pa.array(keep)))


def _invalid_utf8_rows(records: pa.Table, first: int = 0) -> np.ndarray:
    """Rows of a table whose strings are not valid UTF-8, found by halving the table (a
    full validation is cheap next to parsing, and bad rows are rare)."""
    try:
        records.validate(full=True)
        return np.zeros(0, dtype=np.int64)
    except pa.ArrowInvalid:
        if records.num_rows == 1:
            return np.array([first])
    half = records.num_rows // 2
    return np.concatenate(
        [
            _invalid_utf8_rows(records.slice(0, half), first),
            _invalid_utf8_rows(records.slice(half), first + half),
        ]
    )


def _read_line(
    block: Block, starts, ends, index: int, rows: _Rows, max_line_bytes: int | None
) -> None:
    number = block.first + index
    line = block.buffer[starts[index] : ends[index]]
    if max_line_bytes is not None and len(line) > max_line_bytes:
        rows.quarantine(number, too_long(line[:RAW_HEAD], len(line), max_line_bytes))
    else:
        rows.add_line(number, line)
