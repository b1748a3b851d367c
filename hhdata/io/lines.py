"""The lines of a raw JSONL(.gz) file, in blocks, streamed without holding the file.

``blocks`` inflates a file (gzip found by its magic bytes, ISA-L, concatenated members and
zero padding allowed) in chunks of a few MB and yields each chunk's complete lines as one
Block (the chunk and the line bounds, found with numpy), never copying a chunk: the line
cut between two chunks is a block of its own. A line over the limit is not held in
memory (its first RAW_HEAD bytes are kept for the quarantine); a gzip stream that ends
early, or is corrupt, ends the blocks with the cut line's quarantine entry.

``byte_ranges`` cuts a large uncompressed file at newlines into ranges that threads read
side by side; ``blocks`` of a range numbers its lines from 1, and the reader adds the
lines of the ranges before it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hhdata import quarantine as q
from hhdata.errors import SourceError

try:  # ISA-L inflates gzip about twice as fast as zlib, with the same interface
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency, zlib the fallback
    _inflate = zlib

READ_SIZE = 1 << 20  # bytes of gzip read at once; inflated chunks are up to 8x this
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
RAW_HEAD = 1024  # bytes of an over-long line kept in the quarantine


class Block(NamedTuple):
    """Complete lines in a buffer: line i is buffer[starts[i]:ends[i]], numbered first + i."""

    buffer: bytes
    starts: np.ndarray
    ends: np.ndarray
    first: int


def path_text(path: str | Path) -> str:
    r"""A path as valid UTF-8 text, for tables and messages: bytes of its name that are not
    UTF-8 (Python holds them as lone surrogates) are written as ``\xNN``.

    Arrow strings, JSON and a UTF-8 terminal all refuse lone surrogates, so a folder named
    with such a byte would otherwise crash the first print or table; the path itself is
    still opened as given.

    >>> path_text(os.fsdecode(b"data\xff/test.jsonl"))
    'data\\xff/test.jsonl'
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def byte_ranges(path: Path, block_bytes: int) -> list[tuple[int, int | None]]:
    """(start, stop) ranges of a file, each about block_bytes long and cut just after a
    newline, so every line lies in one range; stop None is the end of the file.

    A gzip file is one range (a deflate stream cannot be entered in the middle), and so
    is a file no larger than block_bytes. A cut that would fall inside the previous
    range's line (a line longer than a block) moves on to the line's end.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            if size <= block_bytes or file.read(2) == _GZIP_MAGIC:
                return [(0, None)]
            cuts = [0]
            for target in range(block_bytes, size, block_bytes):
                if target <= cuts[-1]:
                    continue
                cut = _next_line_start(file, target - 1)
                if cut is None:
                    break
                if cut < size and cut > cuts[-1]:
                    cuts.append(cut)
    except OSError as error:
        raise SourceError(f"cannot read {path_text(path)}: {error.strerror or error}") from None
    return list(zip(cuts, [*cuts[1:], None]))


def _next_line_start(file, at: int) -> int | None:
    """The offset just after the first newline at or after ``at``, None if there is none."""
    file.seek(at)
    while piece := file.read(1 << 16):
        newline = piece.find(b"\n")
        if newline >= 0:
            return at + newline + 1
        at += len(piece)
    return None


def blocks(
    path: Path,
    max_line_bytes: int,
    notices: list[str],
    advance,
    start: int = 0,
    stop: int | None = None,
) -> Iterator:
    """Block of complete lines, or (line number, q.Problem) for an over-long or cut line.

    advance(n) is told the bytes read from disk; notices get what is odd but fine. With
    start and stop (from byte_ranges) only that range of an uncompressed file is read, its
    lines numbered from 1.
    """
    shown = path_text(path)
    number = 0
    pending = b""
    skipping = 0  # bytes of an over-long line seen so far, 0 when not in one
    chunks = Chunks(path, advance, start, stop)
    for index, chunk in enumerate(chunks):
        if index == 0 and start == 0 and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
            notices.append(f"{shown}: starts with a UTF-8 byte order mark; ignored")
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                skipping += len(chunk)
                continue
            number += 1
            yield number, too_long(pending, skipping + newline, max_line_bytes)
            skipping, pending, chunk = 0, b"", chunk[newline + 1 :]
        start = 0  # where the chunk's own lines begin
        if pending:
            newline = chunk.find(b"\n")
            if newline < 0:
                pending += chunk
            else:
                # the line cut between two chunks is a block of its own, so the chunk itself
                # is never copied (a fresh multi-MB buffer costs its page faults each time)
                line = pending + chunk[: newline + 1]
                yield Block(line, np.array([0]), np.array([len(line) - 1]), number + 1)
                number += 1
                pending, start = b"", newline + 1
        if not pending:
            last = chunk.rfind(b"\n", start)
            if last >= 0:
                view = np.frombuffer(chunk, np.uint8, count=last + 1 - start, offset=start)
                ends = np.flatnonzero(view == 10) + start
                starts = np.concatenate([[start], ends[:-1] + 1])
                yield Block(chunk, starts, ends, number + 1)
                number += len(ends)
            pending = chunk[last + 1 :] if last >= 0 else chunk[start:]
        if len(pending) > max_line_bytes:
            skipping, pending = len(pending), pending[:RAW_HEAD]
    if skipping:
        number += 1
        yield number, too_long(pending, skipping, max_line_bytes)
    elif chunks.failure is None and pending:
        yield Block(pending + b"\n", np.array([0]), np.array([len(pending)]), number + 1)
        number += 1
    if chunks.failure is not None:
        reason, what = chunks.failure
        yield (
            number + 1,
            q.Problem(
                reason,
                (
                    f"{shown} is {what} after line {number} (the last complete line); the "
                    f"{number} lines before the cut were read; re-download or re-compress the file"
                ),
                pending[:RAW_HEAD] if not skipping else b"",
            ),
        )


def too_long(head: bytes, size: int, limit: int) -> q.Problem:
    """The quarantine entry of a line over the limit, with its first RAW_HEAD bytes."""
    return q.Problem(
        q.LINE_TOO_LONG,
        (
            f"the line is {size} bytes, over the limit of {limit} bytes (hhdata.io.read."
            "MAX_LINE_BYTES); split the record or pass a larger max_line_bytes"
        ),
        head[:RAW_HEAD],
    )


class Chunks:
    """The decompressed bytes of a file in chunks; ``failure`` tells a cut gzip stream."""

    def __init__(self, path: Path, advance, start: int = 0, stop: int | None = None):
        self.path, self.advance = path, advance
        self.start, self.stop = start, stop
        self.failure: tuple[str, str] | None = None

    def __iter__(self) -> Iterator[bytes]:
        """The chunks; the first one holds at least the length of a byte order mark."""
        head = b""
        for chunk in self._chunks():
            if head is not None:
                head += chunk
                if len(head) < len(_BOM):
                    continue
                chunk, head = head, None
            yield chunk
        if head:
            yield head

    def _chunks(self) -> Iterator[bytes]:
        try:
            with self.path.open("rb") as file:
                head = file.read(2)
                file.seek(self.start)
                if head == _GZIP_MAGIC and self.start == 0:
                    yield from self._gunzip(file)
                    return
                left = float("inf") if self.stop is None else self.stop - self.start
                while left > 0 and (block := file.read(int(min(READ_SIZE * 4, left)))):
                    left -= len(block)
                    self.advance(len(block))
                    yield block
        except OSError as error:
            raise SourceError(
                f"cannot read {path_text(self.path)}: {error.strerror or error}"
            ) from None

    def _gunzip(self, file) -> Iterator[bytes]:
        stream = _inflate.decompressobj(wbits=31)
        while block := file.read(READ_SIZE):
            self.advance(len(block))
            data = block
            while data:
                try:
                    out = stream.decompress(data, READ_SIZE * 8)
                except (zlib.error, _inflate.error) as error:
                    self.failure = (q.CORRUPT_FILE, f"a corrupt gzip stream ({error})")
                    return
                if out:
                    yield out
                if stream.unconsumed_tail:
                    data = stream.unconsumed_tail
                elif stream.eof and stream.unused_data.strip(b"\x00"):
                    data, stream = stream.unused_data, _inflate.decompressobj(wbits=31)
                else:
                    data = b""
        rest = stream.flush()
        if rest:
            yield rest
        if not stream.eof:
            self.failure = (q.TRUNCATED_FILE, "truncated: its gzip stream ends")
