"""Build canonical pair rows (hhdata.schema.PAIR_SCHEMA) from a raw table, vectorised.

hhdata.pairs.transcript.split_pair is the reference; this module applies the same rules to a
whole Arrow table at once and agrees with it on every record (tested on the real split
and with Hypothesis). Rather than splitting and searching the texts again for each rule,
it finds every speaker tag once (``_find_tags``: each ``Human:`` and ``Assistant:`` of a
column, with its row, and whether a blank line comes before it and a space after it) and
reads all of the rules off that one list of positions:

1. the prompt ends at the first ``"\n\nAssistant:"`` after the chosen text's last
   ``"\n\nHuman:"``; the pair takes the fast path when the rejected text starts with the
   same bytes and has no later Human tag (the shared-prefix rule then gives that end);
2. the prompt's turns lie between its separators (turn tags followed by a space), the
   replies after its end: all of them cut from the texts' own bytes by offsets;
3. flags: a tag without a blank line before it marks a row as a candidate for a speaker
   tag inside a turn, confirmed with the reference's regex on the few such rows; a reply
   is a candidate for "empty" only when its first byte is a space or not ASCII.

Every other row (no Human tag, prompts that differ, a prompt that does not start with a
separator) goes through ``split_pair`` itself, so the result is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata import quarantine as q
from hhdata._arrow import ARROW_POOL
from hhdata.errors import PairError, SchemaError
from hhdata.pairs import transcript as t
from hhdata.schema import PAIR_SCHEMA, TURN, TURNS, pair_id

_BATCH_ROWS = 4096
_RAW_COLUMNS = ("subset", "split", "family", "chosen", "rejected")
# first bytes of a reply that may be all whitespace (Python's str.isspace): ASCII spaces and
# every multi-byte character; any other first byte means the reply is not empty
_MAYBE_SPACE = np.zeros(256, dtype=bool)
_MAYBE_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_MAYBE_SPACE[128:] = True
_WORDS = {True: b"Human", False: b"Assistant"}  # key: is the user's tag
_FINAL_TAG_BYTES = len(t.ASSISTANT_TAG) - 2  # "Assistant:" after the blank line


def build_pairs(
    raw: pa.Table, workers: int | None = None, *, pair_ids: bool = True
) -> tuple[pa.Table, pa.Table]:
    """Pair rows for every raw record whose prompt can be determined, and a quarantine.

    raw has the columns of hhdata.io.read.RAW_SCHEMA (file and line are used for the
    quarantine when present). Rows keep their input order. Batches of rows are built in
    ``workers`` threads (default: one per CPU, at most 8). pair_ids=False leaves the id
    column null: a validation needs the verdicts and flags, not the ids (sha256 per row).

    >>> from hhdata.io.read import read_raw, bundled_sample_path
    >>> pairs, bad = build_pairs(read_raw(bundled_sample_path()).table)
    >>> pairs.num_rows, bad.num_rows, pairs.schema == PAIR_SCHEMA
    (2312, 0, True)
    """
    missing = [name for name in _RAW_COLUMNS if name not in raw.column_names]
    if missing:
        raise SchemaError(
            f"the raw table lacks the columns {missing}; read it with hhdata.io.read.read_raw"
        )
    # batches of rows small enough to stay in the CPU cache, in parallel threads
    # (pyarrow.compute and numpy release the GIL); workers=1 builds them in this thread
    batches = [raw.slice(start, _BATCH_ROWS) for start in range(0, raw.num_rows, _BATCH_ROWS)]
    workers = max(1, min(len(batches), workers or os.cpu_count() or 1, 8))
    if workers == 1:
        results = [_build_batch(batch, pair_ids) for batch in batches]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_build_batch, batches, [pair_ids] * len(batches)))
    return (
        pa.concat_tables([PAIR_SCHEMA.empty_table(), *(pairs for pairs, _ in results)]),
        q.concat([bad for _, bad in results]),
    )


def _build_batch(raw: pa.Table, pair_ids: bool = True) -> tuple[pa.Table, pa.Table]:
    """build_pairs on one batch of rows."""
    chosen, rejected = _one_buffer(raw["chosen"]), _one_buffer(raw["rejected"])
    if chosen.null_count or rejected.null_count:
        raise SchemaError(
            "the raw table has null transcripts; read it with hhdata.io.read.read_raw"
        )
    c, r = _Texts.of(chosen), _Texts.of(rejected)
    c_tags, r_tags = _find_tags(c), _find_tags(r)
    split = _split_fast(c, r, c_tags, r_tags)
    turns, roles, turn_row = _prompt_turns(c, c_tags, split)  # drops rows from split.fast
    index = np.flatnonzero(split.fast)
    reply_c = _take(_cut(c, split.reply_c), 2 * index + 1)
    reply_r = _take(_cut(r, split.reply_r), 2 * index + 1)
    turn_counts = np.bincount(turn_row, minlength=len(c.starts))[index]
    prompt_offsets = np.zeros(len(index) + 1, dtype=np.int32)
    np.cumsum(turn_counts, out=prompt_offsets[1:])
    role = pc.if_else(pa.array(roles), t.USER, t.ASSISTANT)
    prompt = pa.ListArray.from_arrays(
        pa.array(prompt_offsets),
        pa.StructArray.from_arrays([role, turns], fields=list(TURN)),
        type=TURNS,
    )
    all_fast = len(index) == len(split.fast)
    # the original texts are the raw table's own buffers; the one-buffer copies above are
    # scratch, freed with the batch (and their memory reused by the next one)
    fast_raw = raw if all_fast else _take(raw, index)
    if not pair_ids:
        ids = pa.nulls(len(index), pa.string())
    elif all_fast:
        ids = _ids(chosen, rejected)
    else:
        ids = _take(_ids(chosen, rejected), index)
    flags = _flags(c, r, c_tags, r_tags, split, index, prompt, roles, turn_row, (reply_c, reply_r))
    fast_table = pa.table(
        {
            "id": ids,
            "subset": fast_raw["subset"],
            "family": fast_raw["family"],
            "split": fast_raw["split"],
            "prompt": prompt,
            "chosen": _one_reply(reply_c),
            "rejected": _one_reply(reply_r),
            "chosen_text": fast_raw["chosen"],
            "rejected_text": fast_raw["rejected"],
            "flags": flags,
        },
        schema=PAIR_SCHEMA,
    )
    if all_fast:
        return fast_table, q.quarantine_table([])
    slow_rows, slow_index, bad = _split_slow(raw, np.flatnonzero(~split.fast), pair_ids)
    slow_table = pa.Table.from_pylist(slow_rows, PAIR_SCHEMA)
    order = np.argsort(np.concatenate([index, slow_index]), kind="stable")
    pairs = pa.concat_tables([fast_table, slow_table]).take(pa.array(order))
    return pairs, q.quarantine_table(bad)


def _one_buffer(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array (combine_chunks, but from ARROW_POOL, which it ignores)."""
    return (
        pa.concat_arrays(column.chunks, memory_pool=ARROW_POOL)
        if column.num_chunks
        else pa.array([], column.type)
    )


class _Texts(NamedTuple):
    """A string column's UTF-8 bytes and row bounds: row i is data[starts[i]:ends[i]]."""

    array: pa.Array
    data: np.ndarray  # shape: [bytes], uint8
    starts: np.ndarray  # shape: [rows], int64
    ends: np.ndarray  # shape: [rows], int64

    @classmethod
    def of(cls, array: pa.Array) -> _Texts:
        array = array.cast(pa.string())
        offsets = np.frombuffer(array.buffers()[1], np.int32)[
            array.offset : array.offset + len(array) + 1
        ]
        offsets = offsets.astype(np.int64)
        data = np.frombuffer(array.buffers()[2] or b"", np.uint8)
        return cls(array, data, offsets[:-1], offsets[1:])


class _Tags(NamedTuple):
    """Every ``Human:`` and ``Assistant:`` of a column, in order of position."""

    start: np.ndarray  # where the word starts in _Texts.data
    row: np.ndarray
    user: np.ndarray  # the word is Human (else Assistant)
    blank_before: np.ndarray  # "\n\n" just before: a turn tag
    space_after: np.ndarray  # " " just after the colon: a turn separator, with blank_before


def _find_tags(texts: _Texts) -> _Tags:
    """All speaker tags of a column: every colon, kept where the word before it is a tag.

    One numpy comparison over the bytes finds the colons; the letters before each are then
    compared as one 4- or 8-byte number, read through an overlapping view of the bytes.
    """
    data, starts, ends = texts.data, texts.starts, texts.ends
    low, high = (int(starts[0]), int(ends[-1])) if len(starts) else (0, 0)
    colon = np.flatnonzero(data[low:high] == ord(":")) + low
    user = _word_before(data, colon, low, b"Human")
    tag = user | _word_before(data, colon, low, b"Assistant")
    colon, user = colon[tag], user[tag]
    start = colon - np.where(user, len(_WORDS[True]), len(_WORDS[False]))
    row = np.searchsorted(starts, start, side="right") - 1  # the last row starting at or before
    inside = colon < ends[row]  # the word and its colon lie in one row
    start, row, user, colon = start[inside], row[inside], user[inside], colon[inside]
    row_start, row_end = starts[row], ends[row]
    blank_before = (
        (start - 2 >= row_start)
        & (_byte_at(data, start - 1) == 10)
        & (_byte_at(data, start - 2) == 10)
    )
    space_after = (colon + 1 < row_end) & (_byte_at(data, colon + 1) == 32)
    return _Tags(start, row, user, blank_before, space_after)


def _word_before(data: np.ndarray, colon: np.ndarray, low: int, word: bytes) -> np.ndarray:
    """Mask of the colons right after word: its first letter, then the rest (4 or 8 bytes)
    as one little-endian number."""
    rest = word[1:]
    size = {4: "<u4", 8: "<u8"}[len(rest)]
    if len(data) <= len(word) or not len(colon):
        return np.zeros(len(colon), dtype=bool)
    # shape: [positions]; element i is the number made of data[i : i + len(rest)]
    numbers = np.ndarray((len(data) - len(rest) + 1,), size, data, 0, (1,))
    room = colon - low >= len(word)
    at = np.where(room, colon, len(word))
    found = (numbers[at - len(rest)] == np.frombuffer(rest, size)[0]) & (
        data[at - len(word)] == word[0]
    )
    return found & room


class _Split(NamedTuple):
    """Where each pair splits; positions are offsets into the texts' data buffers."""

    fast: np.ndarray  # rows the fast path splits (the rest go through split_pair)
    final: np.ndarray  # the prompt's final "Assistant" word in the chosen text, -1 if none
    reply_c: np.ndarray  # first byte of the chosen reply
    reply_r: np.ndarray  # first byte of the rejected reply


def _split_fast(c: _Texts, r: _Texts, c_tags: _Tags, r_tags: _Tags) -> _Split:
    """The prompt end of every pair by the shared-prefix rule, where it is clear-cut."""
    rows = len(c.starts)
    last_human = _last_of_row(c_tags, c_tags.user & c_tags.blank_before, rows)
    after = ~c_tags.user & c_tags.blank_before & (c_tags.start > last_human[c_tags.row])
    final = _first_of_row(c_tags, after & (last_human[c_tags.row] >= 0), rows)
    fast = final >= 0
    length = np.where(fast, final + _FINAL_TAG_BYTES - c.starts, 0)  # prompt bytes, tag included
    # the rejected text holds the same prompt bytes and no Human tag after them (the last
    # Human tag in the same place): then the common prefix ends the prompt in the same place
    r_last_human = _last_of_row(r_tags, r_tags.user & r_tags.blank_before, rows)
    fast &= (r.ends - r.starts >= length) & (r_last_human - r.starts == last_human - c.starts)
    length = np.where(fast, length, 0)
    same = pc.equal(_cut(c, c.starts + length), _cut(r, r.starts + length)).to_numpy(
        zero_copy_only=False
    )
    fast &= same[0::2]
    length = np.where(fast, length, 0)
    reply_c, reply_r = c.starts + length, r.starts + length
    # the reply is what follows the tag, less the one space after it (transcript._reply)
    reply_c += fast & (reply_c < c.ends) & (_byte_at(c.data, reply_c) == 32)
    reply_r += fast & (reply_r < r.ends) & (_byte_at(r.data, reply_r) == 32)
    return _Split(fast, np.where(fast, final, -1), reply_c, reply_r)


def _byte_at(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """data[at], with positions out of range clipped (callers mask those rows out)."""
    if not len(data):
        return np.zeros(len(at), dtype=np.uint8)
    return data[np.clip(at, 0, len(data) - 1)]


def _last_of_row(tags: _Tags, mask: np.ndarray, rows: int) -> np.ndarray:
    """Start of the last masked tag of each row, -1 where there is none."""
    start, row = tags.start[mask], tags.row[mask]
    last = np.append(row[1:] != row[:-1], True) if len(row) else np.zeros(0, dtype=bool)
    found = np.full(rows, -1, dtype=np.int64)
    found[row[last]] = start[last]
    return found


def _first_of_row(tags: _Tags, mask: np.ndarray, rows: int) -> np.ndarray:
    """Start of the first masked tag of each row, -1 where there is none."""
    start, row = tags.start[mask], tags.row[mask]
    first = np.insert(row[1:] != row[:-1], 0, True) if len(row) else np.zeros(0, dtype=bool)
    found = np.full(rows, -1, dtype=np.int64)
    found[row[first]] = start[first]
    return found


def _cut(texts: _Texts, cuts: np.ndarray, ends: np.ndarray | None = None) -> pa.Array:
    """Each row cut in two at cuts, as one zero-copy string array: [head 0, tail 0, head 1,
    tail 1, ...]. With ends, the pieces are [cuts[i], ends[i]) and the gaps between them."""
    bounds = np.empty(2 * len(cuts) + 1, dtype=np.int32)
    if ends is None:
        bounds[0:-1:2], bounds[1::2] = texts.starts, cuts
        bounds[-1] = texts.ends[-1] if len(cuts) else 0
    else:
        bounds[0:-1:2], bounds[1::2] = cuts, ends
        bounds = bounds[:-1]
    if len(bounds) < 2:
        return pa.array([], pa.string())
    data = texts.array.buffers()[2] or pa.py_buffer(b"")
    return pa.Array.from_buffers(pa.string(), len(bounds) - 1, [None, pa.py_buffer(bounds), data])


def _prompt_turns(
    c: _Texts, c_tags: _Tags, split: _Split
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Contents, roles and rows of the prompt turns of the fast rows, in order.

    The prompt's separators are its turn tags with a space after, and its final tag (the
    reference parses the prompt text plus one space). A prompt that does not start with a
    separator leaves the fast path (``split.fast`` is updated), as split_pair quarantines it.
    """
    final = split.final[c_tags.row]
    separator = (
        c_tags.blank_before
        & (c_tags.space_after | (c_tags.start == final))
        & (c_tags.start <= final)
    )
    start, row, user = c_tags.start[separator], c_tags.row[separator], c_tags.user[separator]
    first = np.insert(row[1:] != row[:-1], 0, True) if len(row) else np.zeros(0, dtype=bool)
    split.fast[row[first][start[first] - 2 != c.starts[row[first]]]] = False
    keep = split.fast[row]
    start, row, user = start[keep], row[keep], user[keep]
    # a turn runs from after its separator to the next one; the final separator opens none
    opens = np.append(row[1:] == row[:-1], False) if len(row) else np.zeros(0, dtype=bool)
    content_start = start + np.where(user, len(_WORDS[True]), len(_WORDS[False])) + 2
    content_end = np.append(start[1:] - 2, 0)
    contents = _cut(c, content_start[opens], content_end[opens])
    return _take(contents, np.arange(0, len(contents), 2)), user[opens], row[opens]


def _take(values: pa.Array | pa.Table, index: np.ndarray) -> pa.Array | pa.Table:
    """values.take(index), allocated from hhdata._arrow.ARROW_POOL."""
    return pc.take(values, pa.array(index, pa.int64()), memory_pool=ARROW_POOL)


def _one_reply(reply: pa.Array) -> pa.Array:
    """Each reply as a one-turn assistant list."""
    role = pa.repeat(pa.scalar(t.ASSISTANT, pa.string()), len(reply), memory_pool=ARROW_POOL)
    structs = pa.StructArray.from_arrays([role, reply.cast(pa.string())], fields=list(TURN))
    return pa.ListArray.from_arrays(
        pa.array(np.arange(len(reply) + 1, dtype=np.int32)), structs, type=TURNS
    )


def _flags(
    c: _Texts,
    r: _Texts,
    c_tags: _Tags,
    r_tags: _Tags,
    split: _Split,
    index: np.ndarray,
    prompt: pa.Array,
    turn_user: np.ndarray,
    turn_row: np.ndarray,
    replies: tuple[pa.Array, pa.Array],
) -> pa.Array:
    """The flags of the fast rows (hhdata.pairs.transcript.pair_flags), in the order of FLAGS.

    Tag positions settle most rows at once; the reference's own tests run only on the few
    candidates (a tag without a blank line before it, a reply that starts with a space or
    a multi-byte character), so Unicode whitespace and word boundaries stay exact.
    """
    found = {flag: np.zeros(len(split.fast), dtype=bool) for flag in t.FLAGS}  # by batch row
    position = np.full(len(split.fast), -1)
    position[index] = np.arange(len(index))
    sides = (
        (c, c_tags, split.reply_c, replies[0], t.EMPTY_CHOSEN, t.TAG_IN_CHOSEN),
        (r, r_tags, split.reply_r, replies[1], t.EMPTY_REJECTED, t.TAG_IN_REJECTED),
    )
    for texts, tags, reply_start, reply, empty, inline in sides:
        begins = reply_start[tags.row]
        separator = ~tags.user & tags.blank_before & tags.space_after & (tags.start - 2 >= begins)
        found[t.CONSECUTIVE_ASSISTANT][tags.row[separator]] = True
        maybe_inline = tags.row[~tags.blank_before & (tags.start >= begins)]
        _confirm(
            found[inline], maybe_inline, position, reply, lambda text: t.INLINE_TAG_RE.search(text)
        )
        maybe_empty = np.flatnonzero(
            (reply_start >= texts.ends) | _MAYBE_SPACE[_byte_at(texts.data, reply_start)]
        )
        _confirm(found[empty], maybe_empty, position, reply, lambda text: not text.strip())
    final = split.final[c_tags.row]
    maybe_in_prompt = c_tags.row[~c_tags.blank_before & (c_tags.start < final)]
    _confirm(
        found[t.TAG_IN_PROMPT],
        maybe_in_prompt,
        position,
        prompt,
        lambda turns: any(t.INLINE_TAG_RE.search(turn["content"]) for turn in turns),
    )
    repeat = (turn_user[1:] == turn_user[:-1]) & (turn_row[1:] == turn_row[:-1])
    found[t.CONSECUTIVE_USER][turn_row[1:][repeat & turn_user[1:]]] = True
    found[t.CONSECUTIVE_ASSISTANT][turn_row[1:][repeat & ~turn_user[1:]]] = True
    matrix = np.stack([found[flag][index] for flag in t.FLAGS], axis=1)  # shape: [rows, flags]
    names = np.tile(np.arange(len(t.FLAGS)), len(index))[matrix.ravel()]
    offsets = np.zeros(len(index) + 1, dtype=np.int32)
    np.cumsum(matrix.sum(axis=1), out=offsets[1:])
    values = pa.array(np.array(t.FLAGS, dtype=object)[names], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(pa.string()))


def _confirm(
    flag: np.ndarray, rows: np.ndarray, position: np.ndarray, values: pa.Array, test
) -> None:
    """Set flag[row] for the candidate rows of the fast path whose value passes test."""
    rows = np.unique(rows)
    rows = rows[position[rows] >= 0]
    for row, value in zip(rows, values.take(pa.array(position[rows])).to_pylist()):
        flag[row] = bool(test(value))


def _ids(chosen: pa.Array, rejected: pa.Array) -> pa.Array:
    """hhdata.schema.pair_id of every row: one sha256 call per row over chosen, NUL, rejected
    joined by Arrow (hashlib releases the GIL for inputs of 2 KiB or more, about a fifth of
    the rows), the 20 hex digits written by numpy."""
    joined = pc.binary_join_element_wise(chosen, rejected, "\x00", memory_pool=ARROW_POOL).cast(
        pa.string()
    )
    bounds = np.frombuffer(joined.buffers()[1], np.int32)[
        joined.offset : joined.offset + len(joined) + 1
    ].tolist()
    data = memoryview(joined.buffers()[2] or b"")
    sha256 = hashlib.sha256
    digests = b"".join(
        [sha256(data[start:stop]).digest() for start, stop in zip(bounds, bounds[1:])]
    )
    head = np.frombuffer(digests, np.uint8).reshape(len(joined), 32)[:, :10]
    hexed = np.empty((len(joined), 20), np.uint8)
    hexed[:, 0::2], hexed[:, 1::2] = _HEX[head >> 4], _HEX[head & 15]
    offsets = np.arange(0, 20 * len(joined) + 1, 20, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(joined), [None, pa.py_buffer(offsets), pa.py_buffer(hexed)]
    )


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _split_slow(raw: pa.Table, index: np.ndarray, pair_ids: bool = True):
    """The reference split_pair on the rows the fast path left: rows, their index, quarantine."""
    rows, kept, bad = [], [], []
    if len(index) == 0:
        return rows, np.array(kept, dtype=np.int64), bad
    columns = [name for name in (*_RAW_COLUMNS, "file", "line") if name in raw.column_names]
    records = raw.select(columns).take(pa.array(index)).to_pylist()
    for position, record in zip(index, records):
        try:
            pair = t.split_pair(record["chosen"], record["rejected"])
        except PairError as error:
            raw_json = json.dumps(
                {"chosen": record["chosen"], "rejected": record["rejected"]}, ensure_ascii=False
            )
            bad.append(
                (
                    record.get("file"),
                    record.get("line"),
                    error.reason,
                    str(error),
                    raw_json.encode("utf-8", "surrogatepass"),
                )
            )
            continue
        kept.append(position)
        rows.append(
            {
                "id": pair_id(record["chosen"], record["rejected"]) if pair_ids else None,
                "subset": record["subset"],
                "family": record["family"],
                "split": record["split"],
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "chosen_text": record["chosen"],
                "rejected_text": record["rejected"],
                "flags": pair.flags,
            }
        )
    return rows, np.array(kept, dtype=np.int64), bad
