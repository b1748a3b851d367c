"""Build canonical pair rows (hhdata.schema.PAIR_SCHEMA) from a raw table, vectorised.

hhdata.transcript.split_pair is the reference; this module applies the same rules to a
whole Arrow table with pyarrow.compute and agrees with it on every record (tested on the
real split and with Hypothesis). The fast path, for a pair whose texts agree up to the
first Assistant tag after each text's last Human tag:

1. split each text at its last ``"\\n\\nHuman:"`` and the part after it at its first
   ``"\\n\\nAssistant:"``; if both texts give the same two prompt pieces, the prompt ends
   there. (The shared prefix then holds that prompt and no later Human tag, so the
   reference's shared-prefix rule finds the same end.)
2. parse the prompt's turns with two ``split_pattern`` passes, at the Human separator
   and then at the Assistant separator, and read each turn's role from its position.
3. flags from vectorised string tests; the two regex flags with a lookbehind are
   pre-filtered in Arrow and confirmed with Python's ``re`` on the few candidates.

Every other row (no shared prompt piece, or a prompt that does not start with a
separator) goes through ``split_pair`` itself, so the result is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata import quarantine as q
from hhdata import transcript as t
from hhdata.errors import PairError, SchemaError
from hhdata.schema import PAIR_SCHEMA, TURN, TURNS, pair_id

_PYTHON_SPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_ALL_SPACE_RE = "^[" + "".join(f"\\x{{{ord(c):04x}}}" for c in _PYTHON_SPACE) + "]*$"
_BATCH_ROWS = 4096
_RAW_COLUMNS = ("subset", "split", "family", "chosen", "rejected")


def build_pairs(raw: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Pair rows for every raw record whose prompt can be determined, and a quarantine.

    raw has the columns of hhdata.read.RAW_SCHEMA (file and line are used for the
    quarantine when present). Rows keep their input order.

    >>> from hhdata.read import read_raw, bundled_sample_path
    >>> pairs, bad = build_pairs(read_raw(bundled_sample_path()).table)
    >>> pairs.num_rows, bad.num_rows, pairs.schema == PAIR_SCHEMA
    (2312, 0, True)
    """
    missing = [name for name in _RAW_COLUMNS if name not in raw.column_names]
    if missing:
        raise SchemaError(f"the raw table lacks the columns {missing}; read it with hhdata.read.read_raw")
    # batches of rows small enough to stay in the CPU cache, in parallel threads
    # (pyarrow.compute and numpy release the GIL)
    batches = [raw.slice(start, _BATCH_ROWS) for start in range(0, raw.num_rows, _BATCH_ROWS)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(batches), os.cpu_count() or 1, 8))) as pool:
        results = list(pool.map(_build_batch, batches))
    return (
        pa.concat_tables([PAIR_SCHEMA.empty_table(), *(pairs for pairs, _ in results)]),
        q.concat([bad for _, bad in results]),
    )


def _build_batch(raw: pa.Table) -> tuple[pa.Table, pa.Table]:
    """build_pairs on one batch of rows."""
    original = raw
    chosen = raw["chosen"].combine_chunks()
    rejected = raw["rejected"].combine_chunks()
    if chosen.null_count or rejected.null_count:
        raise SchemaError("the raw table has null transcripts; read it with hhdata.read.read_raw")
    fast, prompt_text, reply_c, reply_r = _split_fast(chosen, rejected)
    prompt, parsed = _parse_prompts(prompt_text)
    fast &= parsed
    index = np.flatnonzero(fast)
    if len(index) < len(fast):
        take = pa.array(index)
        raw, chosen, rejected = raw.take(take), chosen.take(take), rejected.take(take)
        prompt, reply_c, reply_r = prompt.take(take), reply_c.take(take), reply_r.take(take)
    fast_table = pa.table(
        {
            "id": _ids(chosen, rejected),
            "subset": raw["subset"],
            "family": raw["family"],
            "split": raw["split"],
            "prompt": prompt,
            "chosen": _one_reply(reply_c),
            "rejected": _one_reply(reply_r),
            "chosen_text": chosen,
            "rejected_text": rejected,
            "flags": _flags(prompt, reply_c, reply_r),
        },
        schema=PAIR_SCHEMA,
    )
    if len(index) == len(fast):
        return fast_table, q.quarantine_table([])
    slow_rows, slow_index, bad = _split_slow(original, np.flatnonzero(~fast))
    slow_table = pa.Table.from_pylist(slow_rows, PAIR_SCHEMA)
    order = np.argsort(np.concatenate([index, slow_index]), kind="stable")
    pairs = pa.concat_tables([fast_table, slow_table]).take(pa.array(order))
    return pairs, q.quarantine_table(bad)


def _split_fast(chosen: pa.Array, rejected: pa.Array):
    """Mask of rows the fast path can split, their prompt text (+ " "), and both replies."""
    pieces = []
    for text in (chosen, rejected):
        before, after = _two_pieces(pc.split_pattern(text, t.HUMAN_TAG, max_splits=1, reverse=True))
        human, reply = _two_pieces(pc.split_pattern(after, t.ASSISTANT_TAG, max_splits=1))
        pieces.append((before, human, reply))
    (before_c, human_c, reply_c), (before_r, human_r, reply_r) = pieces
    # null where a text lacks a tag, so `same` is null (not fast) there
    same = pc.and_(pc.equal(before_c, before_r), pc.equal(human_c, human_r))
    fast = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    # before + "\n\nHuman:" + human + "\n\nAssistant: " (the last argument is the joiner)
    prompt_text = pc.binary_join_element_wise(
        pc.binary_join_element_wise(before_c, human_c, t.HUMAN_TAG), t.SEPARATORS[t.ASSISTANT], ""
    )
    return fast, prompt_text, _strip_space(reply_c), _strip_space(reply_r)


def _two_pieces(lists: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Elements 0 and 1 of lists of one or two strings; both null where there is one."""
    offsets = lists.offsets.to_numpy()
    two = np.diff(offsets) == 2
    first = pa.array(offsets[:-1].astype(np.int64), mask=~two)
    return lists.values.take(first), lists.values.take(pc.add(first, 1))


def _strip_space(reply: pa.Array) -> pa.Array:
    """The reply less the one space after its tag (hhdata.transcript._reply)."""
    return pc.if_else(pc.starts_with(reply, " "), pc.utf8_slice_codeunits(reply, 1), reply)


def _parse_prompts(prompt_text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Prompt turns (list<struct<role, content>>) and a mask of the texts that parsed.

    Split at every ``"\n\nHuman: "``, then each piece at every ``"\n\nAssistant: "``: the
    first content of a piece after a Human separator is a user turn, every other content
    an assistant turn (the two separators cannot overlap, so this is the reference's
    regex split). Each prompt text ends with ``"\n\nAssistant: "``, whose empty turn is
    dropped as split_pair drops it; a text that does not start with a separator did not
    parse (the slow path raises bad_transcript_start for it).
    """
    rows = len(prompt_text)
    by_human = pc.split_pattern(pc.fill_null(prompt_text, ""), t.SEPARATORS[t.USER])
    by_assistant = pc.split_pattern(by_human.values, t.SEPARATORS[t.ASSISTANT])
    row_offsets = by_human.offsets.to_numpy()  # row -> its pieces
    piece_offsets = by_assistant.offsets.to_numpy()  # piece -> its contents
    contents = by_assistant.values
    piece_of = np.repeat(np.arange(len(piece_offsets) - 1), np.diff(piece_offsets))
    row_of = np.repeat(np.arange(rows), np.diff(row_offsets))[piece_of]
    is_user = np.zeros(len(contents), dtype=bool)
    is_user[piece_offsets[:-1]] = True  # first content of each piece (split never gives none)
    is_user[piece_offsets[row_offsets[:-1]]] = False  # ...but the text before the first Human tag
    preamble = piece_offsets[row_offsets[:-1]]  # shape: [rows]
    final = piece_offsets[row_offsets[1:]] - 1  # the empty turn after the last separator
    parsed = (pc.utf8_length(contents.take(pa.array(preamble))).to_numpy(zero_copy_only=False) == 0)
    parsed &= final > preamble
    keep = parsed[row_of]
    keep[preamble] = False
    keep[final] = False
    new_offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(row_of[keep], minlength=rows), out=new_offsets[1:])
    kept = pa.array(np.flatnonzero(keep))
    role = pc.if_else(pa.array(is_user[keep]), t.USER, t.ASSISTANT)
    structs = pa.StructArray.from_arrays([role, contents.take(kept)], fields=list(TURN))
    return pa.ListArray.from_arrays(pa.array(new_offsets), structs, type=TURNS), parsed


def _one_reply(reply: pa.Array) -> pa.Array:
    """Each reply as a one-turn assistant list."""
    role = pa.array(np.full(len(reply), t.ASSISTANT, dtype=object), pa.string())
    structs = pa.StructArray.from_arrays([role, reply.cast(pa.string())], fields=list(TURN))
    return pa.ListArray.from_arrays(pa.array(np.arange(len(reply) + 1, dtype=np.int32)), structs, type=TURNS)


def _flags(prompt: pa.Array, reply_c: pa.Array, reply_r: pa.Array) -> pa.Array:
    """The flags of every row (hhdata.transcript.pair_flags), in the order of FLAGS."""
    rows = len(prompt)
    found = {flag: np.zeros(rows, dtype=bool) for flag in t.FLAGS}
    for reply, empty, inline in ((reply_c, t.EMPTY_CHOSEN, t.TAG_IN_CHOSEN), (reply_r, t.EMPTY_REJECTED, t.TAG_IN_REJECTED)):
        found[empty] |= _mask(pc.match_substring_regex(reply, _ALL_SPACE_RE))
        found[t.CONSECUTIVE_ASSISTANT] |= _mask(pc.match_substring(reply, t.SEPARATORS[t.ASSISTANT]))
        found[inline] |= _inline_tags(reply)
    turns = pc.list_flatten(prompt)
    parents = pc.list_parent_indices(prompt).to_numpy()
    np.logical_or.at(found[t.TAG_IN_PROMPT], parents[_inline_tags(turns.field("content"))], True)
    is_user = _mask(pc.equal(turns.field("role"), t.USER))
    repeat = (is_user[1:] == is_user[:-1]) & (parents[1:] == parents[:-1])
    np.logical_or.at(found[t.CONSECUTIVE_USER], parents[1:][repeat & is_user[1:]], True)
    np.logical_or.at(found[t.CONSECUTIVE_ASSISTANT], parents[1:][repeat & ~is_user[1:]], True)
    matrix = np.stack([found[flag] for flag in t.FLAGS], axis=1)  # shape: [rows, flags]
    names = np.tile(np.arange(len(t.FLAGS)), rows)[matrix.ravel()]
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(matrix.sum(axis=1), out=offsets[1:])
    values = pa.array(np.array(t.FLAGS, dtype=object)[names], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(pa.string()))


def _inline_tags(texts: pa.Array) -> np.ndarray:
    """Mask of texts with a speaker tag that is not a turn separator (transcript rule)."""
    candidates = np.flatnonzero(_mask(pc.match_substring_regex(texts, "Human:|Assistant:")))
    found = np.zeros(len(texts), dtype=bool)
    for index, text in zip(candidates, texts.take(pa.array(candidates)).to_pylist()):
        found[index] = t._INLINE_TAG_RE.search(text) is not None
    return found


def _mask(result: pa.Array) -> np.ndarray:
    return pc.fill_null(result, False).to_numpy(zero_copy_only=False)


def _ids(chosen: pa.Array, rejected: pa.Array) -> pa.Array:
    """hhdata.schema.pair_id of every row, hashing the UTF-8 bytes in place."""
    views = []
    for array in (chosen, rejected):
        array = array.cast(pa.string())
        offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset: array.offset + len(array) + 1]
        views.append((offsets.tolist(), memoryview(array.buffers()[2] or b"")))
    (off_c, data_c), (off_r, data_r) = views
    ids = []
    for i in range(len(chosen)):
        digest = hashlib.sha256(data_c[off_c[i]: off_c[i + 1]])
        digest.update(b"\x00")
        digest.update(data_r[off_r[i]: off_r[i + 1]])
        ids.append(digest.hexdigest()[:20])
    return pa.array(ids, pa.string())


def _split_slow(raw: pa.Table, index: np.ndarray):
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
            raw_json = json.dumps({"chosen": record["chosen"], "rejected": record["rejected"]}, ensure_ascii=False)
            bad.append((record.get("file"), record.get("line"), error.reason, str(error), raw_json.encode("utf-8", "surrogatepass")))
            continue
        kept.append(position)
        rows.append(
            {
                "id": pair_id(record["chosen"], record["rejected"]),
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
