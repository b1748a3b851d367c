"""Read raw HH-RLHF JSONL(.gz) files into an Arrow table, quarantining what is broken.

``read_raw`` takes files, folders in the upstream layout ``<subset>/<split>.jsonl[.gz]``
and globs. It streams each file (gzip detected by its magic bytes), decodes every line
with msgspec against the record's shape, and sends any line that fails to the slow path:
``json.loads`` and the ``jsonschema`` validator word the exact reason. Nothing disappears
without a count: ``lines == blank + accepted + sum(quarantined.values())`` for every read.

Limits: a line longer than MAX_LINE_BYTES (4 MiB; the longest real record is about 16 KB)
is quarantined as ``line_too_long`` without being held in memory. A gzip stream that ends
early keeps the records before the cut and quarantines the cut line as ``truncated_file``.
"""

from __future__ import annotations

import glob
import json
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import msgspec
import pyarrow as pa
from tqdm import tqdm

from hhdata import quarantine as q
from hhdata.errors import SourceError
from hhdata.schema import SPLITS, family_of
from hhdata.validate import explain_raw_record, validate_raw_table

MAX_LINE_BYTES = 4 * 2**20
_READ_SIZE = 1 << 20
_BATCH_ROWS = 65_536
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
_RAW_HEAD = 1024  # bytes of an over-long line kept in the quarantine

RAW_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("subset", pa.string()),
        ("split", pa.string()),
        ("family", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
    ]
)


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


def read_raw(
    paths: str | Path | Iterable[str | Path],
    *,
    subset: str | None = None,
    split: str | None = None,
    family: str | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    progress: bool | None = False,
) -> ReadResult:
    """Read raw JSONL(.gz) records from files, upstream-layout folders or globs.

    subset and split come from a path ``<subset>/<split>.jsonl[.gz]``; arguments, when
    given, override the path. family is needed only for a subset hhdata does not know.
    progress=None shows a bar when stderr is a terminal.

    >>> result = read_raw(bundled_sample_path())
    >>> result.report.accepted, result.table.column_names[:2]
    (2312, ['file', 'line'])
    """
    files = resolve_paths(paths)
    sources = [_source_of(path, subset, split, family) for path in files]
    report = ReadReport(files=[str(path) for path in files])
    tables, quarantines = [], []
    show = sys.stderr.isatty() if progress is None else progress
    total = sum(path.stat().st_size for path in files)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not show, desc="read") as bar:
        for path, source in zip(files, sources):
            table, bad = _read_file(path, source, max_line_bytes, report, bar.update)
            table, invalid = validate_raw_table(table)
            tables.append(table)
            quarantines.append(q.concat([bad, invalid]).sort_by("line"))
    quarantine = q.concat(quarantines)
    report.accepted = sum(table.num_rows for table in tables)
    report.quarantined = q.reason_counts(quarantine)
    return ReadResult(pa.concat_tables([RAW_SCHEMA.empty_table(), *tables]), quarantine, report)


def bundled_sample_path() -> Path:
    """The bundled real sample: harmless-base/test.jsonl.gz (MIT, Anthropic)."""
    return Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def resolve_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files, folders (every *.jsonl and *.jsonl.gz below) and globs, in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
            if not found:
                raise SourceError(f"{path} holds no *.jsonl or *.jsonl.gz file; point at the files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(char in str(given) for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(given), recursive=True))
            if not matches:
                raise SourceError(f"no file matches {given}; check the pattern")
            files += [m for m in matches if m.is_file()]
        else:
            raise SourceError(f"{path} does not exist; check the path")
    return files


def _source_of(path: Path, subset: str | None, split: str | None, family: str | None):
    """(subset, split, family) of a file: the arguments, else the upstream layout."""
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    from_layout = stem in SPLITS
    split = split or (stem if from_layout else None)
    subset = subset or (path.parent.name if from_layout else None)
    if split is None:
        raise SourceError(
            f"cannot tell the split of {path}: its name is not train.jsonl[.gz] or "
            "test.jsonl[.gz]; put it at <subset>/<split>.jsonl.gz or pass the split"
        )
    if split not in SPLITS:
        raise SourceError(f"split {split!r} for {path} is not one of {list(SPLITS)}")
    if subset is None:
        raise SourceError(f"cannot tell the subset of {path}; pass the subset")
    try:
        return subset, split, family_of(subset, family)
    except ValueError as error:
        raise SourceError(
            f"{path}: {error}: pass family= or a known subset= (on the command line "
            "--family or --subset)"
        ) from None


def _read_file(path, source, max_line_bytes, report, advance):
    """One file's accepted records as a table, and its quarantine."""
    name = str(path)
    columns = {"line": [], "chosen": [], "rejected": []}
    batches, bad = [], []
    blank = crlf = 0
    for number, line in _lines(path, max_line_bytes, report, advance):
        report.lines += 1
        if isinstance(line, q.Problem):
            bad.append((name, number, line.reason, line.message, line.raw))
            continue
        if line.endswith(b"\r"):
            crlf += 1
            line = line[:-1]
        if not line.strip(b" \t\r"):
            blank += 1
            continue
        try:
            record = _DECODER.decode(line)
            chosen, rejected = record.chosen, record.rejected
        except (msgspec.DecodeError, msgspec.ValidationError):
            problem, record = _explain_line(line)
            if problem:
                bad.append((name, number, *problem, line))
                continue
            chosen, rejected = record["chosen"], record["rejected"]
        columns["line"].append(number)
        columns["chosen"].append(chosen)
        columns["rejected"].append(rejected)
        if len(columns["line"]) == _BATCH_ROWS:
            batches.append(_batch(name, source, columns))
    batches.append(_batch(name, source, columns))
    report.blank += blank
    if crlf:
        report.notices.append(f"{name}: {crlf} lines end with CRLF (\\r\\n); read as LF")
    return pa.Table.from_batches(batches, RAW_SCHEMA), q.quarantine_table(bad)


def _batch(name, source, columns) -> pa.RecordBatch:
    rows = len(columns["line"])
    subset, split, family = source
    batch = pa.record_batch(
        [
            pa.array([name] * rows, pa.string()),
            pa.array(columns["line"], pa.int64()),
            pa.array([subset] * rows, pa.string()),
            pa.array([split] * rows, pa.string()),
            pa.array([family] * rows, pa.string()),
            pa.array(columns["chosen"], pa.string()),
            pa.array(columns["rejected"], pa.string()),
        ],
        schema=RAW_SCHEMA,
    )
    for column in columns.values():
        column.clear()
    return batch


def _explain_line(line: bytes) -> tuple[tuple[str, str] | None, dict | None]:
    """The slow path for a line msgspec refused: (reason, message), or the record if fine."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return (q.INVALID_UTF8, (
            f"byte {error.start} of the line ({line[error.start:error.start + 1]!r}) is not "
            "valid UTF-8; re-encode the file as UTF-8"
        )), None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return (q.INVALID_JSON, f"{error.msg} at column {error.colno}; fix or remove the line"), None
    problem = explain_raw_record(record)
    if problem:
        return problem, None
    for key in ("chosen", "rejected"):
        try:
            record[key].encode("utf-8")
        except UnicodeEncodeError:
            return (q.INVALID_UTF8, (
                f"'{key}' escapes a lone surrogate (\\ud800-\\udfff), which is not valid "
                "Unicode; fix the escape sequence"
            )), None
    return None, record


def _lines(path: Path, max_line_bytes: int, report: ReadReport, advance) -> Iterator:
    """(1-based line number, bytes without the newline, or a q.Problem) for every line."""
    number = 0
    pending = b""
    skipping = 0  # bytes of an over-long line seen so far, 0 when not in one
    first = True
    chunks = _Chunks(path, advance)
    for chunk in chunks:
        if first:
            first = False
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
                report.notices.append(f"{path}: starts with a UTF-8 byte order mark; ignored")
        pieces = chunk.split(b"\n")
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if skipping:
                skipping += len(piece)
                if not last:
                    number += 1
                    yield number, _too_long(pending, skipping, max_line_bytes)
                    skipping, pending = 0, b""
                continue
            if last:
                pending += piece
                if len(pending) > max_line_bytes:
                    skipping, pending = len(pending), pending[:_RAW_HEAD]
                continue
            line = pending + piece if pending else piece
            pending = b""
            number += 1
            if len(line) > max_line_bytes:
                yield number, _too_long(line[:_RAW_HEAD], len(line), max_line_bytes)
            else:
                yield number, line
    if skipping:
        number += 1
        yield number, _too_long(pending, skipping, max_line_bytes)
    elif chunks.failure is None and pending:
        number += 1
        yield number, pending
    if chunks.failure is not None:
        reason, what = chunks.failure
        yield number + 1, q.Problem(reason, (
            f"{path} is {what} after line {number} (the last complete line); the "
            f"{number} lines before the cut were read; re-download or re-compress the file"
        ), pending[:_RAW_HEAD] if not skipping else b"")


def _too_long(head: bytes, size: int, limit: int) -> q.Problem:
    return q.Problem(q.LINE_TOO_LONG, (
        f"the line is {size} bytes, over the limit of {limit} bytes (hhdata.read."
        "MAX_LINE_BYTES); split the record or pass a larger max_line_bytes"
    ), head[:_RAW_HEAD])


class _Chunks:
    """The decompressed bytes of a file in chunks; ``failure`` tells a cut gzip stream."""

    def __init__(self, path: Path, advance):
        self.path, self.advance = path, advance
        self.failure: tuple[str, str] | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            with self.path.open("rb") as file:
                head = file.read(2)
                file.seek(0)
                if head == _GZIP_MAGIC:
                    yield from self._gunzip(file)
                else:
                    while block := file.read(_READ_SIZE * 4):
                        self.advance(len(block))
                        yield block
        except OSError as error:
            raise SourceError(f"cannot read {self.path}: {error.strerror or error}") from None

    def _gunzip(self, file) -> Iterator[bytes]:
        stream = zlib.decompressobj(wbits=31)
        while block := file.read(_READ_SIZE):
            self.advance(len(block))
            data = block
            while data:
                try:
                    out = stream.decompress(data, _READ_SIZE * 8)
                except zlib.error as error:
                    self.failure = (q.CORRUPT_FILE, f"a corrupt gzip stream ({error})")
                    return
                if out:
                    yield out
                if stream.unconsumed_tail:
                    data = stream.unconsumed_tail
                elif stream.eof and stream.unused_data.strip(b"\x00"):
                    data, stream = stream.unused_data, zlib.decompressobj(wbits=31)
                else:
                    data = b""
        rest = stream.flush()
        if rest:
            yield rest
        if not stream.eof:
            self.failure = (q.TRUNCATED_FILE, "truncated: its gzip stream ends")


def read_pairs(paths: str | Path | Iterable[str | Path], **read_args) -> ReadResult:
    """read_raw, then hhdata.pairs.build_pairs: a ReadResult whose table holds pair rows.

    The quarantine holds the bad lines and the pairs whose prompt cannot be determined;
    the report's counts still reconcile (accepted = pair rows).
    """
    from hhdata.pairs import build_pairs

    result = read_raw(paths, **read_args)
    pairs, unsplit = build_pairs(result.table)
    quarantine = q.concat([result.quarantine, unsplit])
    report = result.report
    report.accepted = pairs.num_rows
    report.quarantined = q.reason_counts(quarantine)
    return ReadResult(pairs, quarantine, report)
