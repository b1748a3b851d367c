"""Deduplicate pair rows: degenerate pairs, exact duplicates, near duplicates, one drop log.

Three stages run in this order over a table of canonical pair rows
(hhdata.schema.PAIR_SCHEMA), each seeing only what the previous one kept:

1. **Degenerate pairs** (hhdata.dedup.degenerate): dropped or flagged, per reason.
2. **Exact duplicates**: two rows are the same pair when their prompt turns (role and
   content, in order) and their two final replies are equal after normalisation (Unicode
   NFC, lower case, whitespace runs collapsed to one space and trimmed; each switchable).
   By default the replies may come in either order (a pair with chosen and rejected
   swapped is the same comparison).
3. **Near duplicates** (hhdata.dedup.minhash): rows whose whole pairs (or prompts) have word-
   shingle Jaccard similarity at or above the threshold and, by default, as many prompt
   turns. Rows are visited in survivor order; a row similar to an already kept row is
   dropped with that row's id as kept_id.

Which copy survives is a setting: ``first`` (input order), ``train_first`` (a train copy
beats a test copy, so a duplicate never leaks a training pair into test; then input order)
or ``subset_order`` (subsets ranked by ``subset_order``, then input order).

Every input row ends up in exactly one of ``kept`` and ``drops``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata import memory
from hhdata import progress as bars
from hhdata._arrow import (
    code_points,
    splitmix64,
    string_buffers,
    text_hashes,
    utf8_chars_at,
)
from hhdata.dedup import degenerate, minhash, spill
from hhdata.errors import HhDataError, SchemaError
from hhdata.schema import DROPS_SCHEMA, FILTERED, PAIR_SCHEMA, REMOVED

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
SURVIVORS = ("first", "train_first", "subset_order")


class DedupSettingsError(HhDataError, ValueError):
    """A DedupSettings value is out of range or unknown."""


@dataclass(frozen=True)
class DedupSettings:
    """Everything that decides what deduplicate drops; JSON-serialisable for the manifest.

    Defaults were chosen by measurement on the 170k-pair synthetic corpus (docs/dedup.md).
    """

    unicode_nfc: bool = True
    """exact: compare texts in Unicode NFC form"""
    lowercase: bool = True
    """exact: compare texts lower-cased"""
    collapse_whitespace: bool = True
    """exact: collapse every whitespace run to one space and trim the ends"""
    reply_order_matters: bool = False
    """exact: False counts the same prompt with the two replies swapped as a duplicate"""
    survivor: str = "train_first"
    """which copy is kept: 'first', 'train_first' or 'subset_order'"""
    subset_order: tuple[str, ...] = ()
    """for survivor='subset_order': subsets, most preferred first; others rank last"""
    near: bool = True
    """run near-duplicate detection at all"""
    near_scope: str = "pair"
    """'prompt': shingle the prompt's turns; 'pair': the prompt and both replies"""
    near_action: str = "drop"
    """'drop': drop near duplicates of a kept row; 'cluster': keep them, sharing a cluster_id"""
    shingle_size: int = 5
    """words per shingle"""
    num_perm: int = 128
    """signature length: MinHash permutations, or one-permutation-hashing bins"""
    sketch: str = "oph"
    """'oph': one-permutation hashing, densified (one hash per shingle; docs/dedup.md);
    'minhash': num_perm independent permutations (num_perm hashes per shingle)"""
    bands: int = 32
    """LSH bands; bands x rows must not exceed num_perm"""
    rows: int = 4
    """MinHash values per band"""
    threshold: float = 0.7
    """Jaccard similarity at or above which two rows are near duplicates"""
    same_turn_count: bool = True
    """near duplicates must have as many prompt turns: a conversation taken further is a
    different comparison, even when most of its words are shared"""
    verify: str = "exact"
    """'exact': confirm candidates with the exact Jaccard; 'estimate': the MinHash estimate"""
    seed: int = 1
    """seed of the MinHash permutations"""
    degenerate: dict = field(default_factory=lambda: dict(degenerate.DEFAULT_POLICY))
    """per degenerate reason: 'drop' or 'flag'"""

    def __post_init__(self) -> None:
        # a partial policy means "these reasons differ from the defaults": store it whole
        object.__setattr__(self, "degenerate", {**degenerate.DEFAULT_POLICY, **self.degenerate})
        object.__setattr__(self, "subset_order", tuple(self.subset_order))
        problems = []
        if self.survivor not in SURVIVORS:
            problems.append(f"survivor={self.survivor!r} is not one of {list(SURVIVORS)}")
        if self.near_scope not in ("prompt", "pair"):
            problems.append(f"near_scope={self.near_scope!r} must be 'prompt' or 'pair'")
        if self.near_action not in ("drop", "cluster"):
            problems.append(f"near_action={self.near_action!r} must be 'drop' or 'cluster'")
        if self.verify not in ("exact", "estimate"):
            problems.append(f"verify={self.verify!r} must be 'exact' or 'estimate'")
        if self.sketch not in ("oph", "minhash"):
            problems.append(f"sketch={self.sketch!r} must be 'oph' or 'minhash'")
        if self.bands * self.rows > self.num_perm:
            problems.append(
                f"bands x rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}"
            )
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must be in (0, 1]")
        try:
            degenerate.check_policy(self.degenerate)
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise DedupSettingsError("bad dedup settings: " + "; ".join(problems))

    def to_json(self) -> dict:
        """The settings as a plain dict (what the release manifest records)."""
        settings = dataclasses.asdict(self)
        settings["subset_order"] = list(self.subset_order)
        settings["degenerate"] = dict(self.degenerate)
        return settings

    @classmethod
    def from_json(cls, settings: dict) -> DedupSettings:
        """Settings from a dict written by to_json (unknown keys are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise DedupSettingsError(
                f"unknown dedup settings {unknown}; the settings are {sorted(known)}"
            )
        values = dict(settings)
        if "subset_order" in values:
            values["subset_order"] = tuple(values["subset_order"])
        return cls(**values)


@dataclass(frozen=True)
class RowSketch:
    """Per row of a table, the sketch of one of its texts, each distinct sketch held once:
    row r's is text ``of_row[r]`` of ``distinct`` (rows share prompts). ``take`` gives the
    rows' own minhash.Sketch; ``rows`` narrows the rows without copying any sketch."""

    distinct: minhash.Sketch
    of_row: np.ndarray  # int64, (rows,)

    def __len__(self) -> int:
        return len(self.of_row)

    def take(self, rows: np.ndarray) -> minhash.Sketch:
        """The sketch of the given rows, in that order."""
        return self.distinct.take(self.of_row[np.asarray(rows, dtype=np.int64)])

    def rows(self, rows: np.ndarray) -> RowSketch:
        """The given rows only, in that order."""
        return RowSketch(self.distinct, self.of_row[np.asarray(rows, dtype=np.int64)])


@dataclass(frozen=True)
class DedupResult:
    """Kept rows (with cluster_id), the drop log, a JSON report, and the settings used.

    ``prompt_sketch`` (when near duplicates were looked for, and the table was smaller than
    NearStream.bounded_rows) holds the MinHash sketch of each kept row's prompt, row for
    row (a RowSketch), so configs.leakage_report need not make it again.
    """

    kept: pa.Table
    drops: pa.Table
    report: dict
    settings: DedupSettings
    prompt_sketch: RowSketch | None = None


@dataclass(frozen=True)
class NearStream:
    """How the near stage bounds its memory on large tables (hhdata.dedup.spill). None of
    these changes a result: only where the intermediate data lives."""

    min_rows: int = 250_000
    """tables with fewer rows keep every sketch in memory; larger ones stream"""
    batch_rows: int = 65_536
    """rows shingled and signed at a time"""
    pairs_per_partition: int = 1 << 23
    """candidate pairs (counted once per band) per partition, verified one at a time"""
    shared_shingles: int = 1 << 26
    """the texts of every partition's candidates have their sorted shingle sets made once,
    shared by the partitions, when they hold at most this many shingles (8 bytes each,
    and about four times that while they are sorted); else per partition"""
    bounded_rows: int = 1_000_000
    """tables with this many rows or more trade speed for a lower peak: the shingle sets
    are made per partition, malloc hands the large arrays it frees back to the system
    (hhdata.memory.map_large_blocks), no prompt sketch is kept for the leakage check
    (which then signs the distinct prompts itself), and hhdata.pipeline checks train/test
    leakage after the data files are written, not beside the writer (side by side the two
    set the peak at 10x HH size: 10.15 GB at 1.7M dense pairs, bench/scale.md)"""
    temp_dir: str | None = None
    """where the sketches and candidates are spilled (default: the system's temp folder,
    TMPDIR): about 1.8 KB a row for the sketches plus 8 bytes a candidate pair per band
    (about 4-5 GB at 1.7M dense benchmark pairs), removed at the end"""


def normalized(texts: pa.Array, settings: DedupSettings) -> pa.Array:
    """Texts as the exact-duplicate stage compares them (hhdata.dedup.degenerate.normalize).

    >>> normalized(pa.array(["  Hello\\n\\nWORLD "]), DedupSettings()).to_pylist()
    ['hello world']
    """
    return degenerate.normalize(
        texts,
        nfc=settings.unicode_nfc,
        lowercase=settings.lowercase,
        whitespace=settings.collapse_whitespace,
    )


def survivor_order(pairs: pa.Table, settings: DedupSettings) -> np.ndarray:
    """Row indices, most preferred survivor first."""
    position = np.arange(pairs.num_rows)
    if settings.survivor == "first":
        return position
    if settings.survivor == "train_first":
        rank = pc.not_equal(pairs["split"], "train").to_numpy(zero_copy_only=False)
    else:
        ranks = {subset: r for r, subset in enumerate(settings.subset_order)}
        rank = np.array(
            [ranks.get(s, len(ranks)) for s in pairs["subset"].to_pylist()], dtype=np.int64
        )
    return np.lexsort((position, rank))


def _sequence_hashes(codes: np.ndarray, offsets: np.ndarray, multiplier: int) -> np.ndarray:
    """A 64-bit polynomial hash of each row's sequence of codes (rows cut by offsets)."""
    lengths = np.diff(offsets)
    position = np.arange(len(codes)) - np.repeat(offsets[:-1], lengths)
    powers = np.ones(max(int(lengths.max(initial=0)), 1), dtype=np.uint64)
    sums = np.zeros(len(lengths), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, len(powers)):
            powers[i] = powers[i - 1] * np.uint64(multiplier)
        terms = splitmix64(codes.astype(np.uint64) + np.uint64(1)) * powers[position]
        nonempty = lengths > 0
        if nonempty.any():
            sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return splitmix64(sums ^ lengths.astype(np.uint64))


# multipliers of the two prompt hashes, and what a user turn's text hash is xor-ed with
_PROMPT_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)
_USER_MARK = np.uint64(0xD6E8FEB86659FD93)


def exact_keys(pairs: pa.Table, settings: DedupSettings, workers: int | None = None) -> np.ndarray:
    """One int64 label per row; equal labels are exact duplicates under the settings.

    A row is its prompt turns (role and normalised content, in order) and its two
    normalised replies. Each text is identified by two independent 64-bit hashes of its
    normalised form (hhdata._arrow.text_hashes), a prompt by two 64-bit polynomial hashes of
    its turns' (a false match needs both hashes to collide: about n**2 / 2**129 for n
    texts or rows). The turn contents and each side's replies are hashed in up to
    ``workers`` threads (default 2); only the texts whose normal form is not simply their
    ASCII lower case are normalised (see _normalized_hashes).
    """
    if pairs.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    prompt = degenerate.one_array(pairs["prompt"])
    turns = prompt.values
    texts = [pc.struct_field(turns, "content")] + [
        _reply_texts(degenerate.one_array(pairs[side])) for side in ("chosen", "rejected")
    ]
    # the three text columns in parallel threads (Arrow, numpy and polars release the GIL)
    with ThreadPoolExecutor(max_workers=max(1, min(workers or 2, os.cpu_count() or 1))) as pool:
        turn_hashes, chosen, rejected = pool.map(
            lambda text: _normalized_hashes(text, settings), texts
        )
    is_user = pc.equal(pc.struct_field(turns, "role"), "user").to_numpy(zero_copy_only=False)
    role = np.where(is_user, _USER_MARK, np.uint64(0))
    offsets = prompt.offsets.to_numpy().astype(np.int64)
    prompt_hashes = [
        _sequence_hashes(hashes ^ role, offsets, multiplier)
        for hashes, multiplier in zip(turn_hashes, _PROMPT_MULTIPLIERS)
    ]
    first, second = chosen, rejected
    if not settings.reply_order_matters:  # the smaller reply first, by (hash, hash)
        swap = (chosen[0] > rejected[0]) | ((chosen[0] == rejected[0]) & (chosen[1] > rejected[1]))
        first = tuple(np.where(swap, r, c) for c, r in zip(chosen, rejected))
        second = tuple(np.where(swap, c, r) for c, r in zip(chosen, rejected))
    return _row_labels([*prompt_hashes, *first, *second])


def _reply_texts(replies: pa.Array) -> pa.Array:
    """Each row's final reply as one text: its turns' contents joined by newlines (a reply
    of one turn, the usual case, is its content, taken without a copy)."""
    offsets = replies.offsets.to_numpy()
    single = replies.null_count == 0 and np.array_equal(offsets, np.arange(len(offsets)))
    if single:
        return pc.struct_field(replies.values, "content")
    return degenerate.joined_contents(replies, "\n")


def _row_labels(columns: list[np.ndarray]) -> np.ndarray:
    """A label per row, equal for rows equal in every (64-bit integer) column.

    Rows are grouped by one 64-bit hash of their columns and each group is checked column
    by column; should two different rows share a hash, the rows are labelled by one lexsort
    of the columns instead (_lexsorted_labels), so the labels are exact either way.
    """
    columns = [np.asarray(column).view(np.uint64) for column in columns]
    combined = np.zeros(len(columns[0]), dtype=np.uint64)
    for column in columns:
        combined = splitmix64(combined ^ column, in_place=True)
    _, first, label = np.unique(combined, return_index=True, return_inverse=True)
    representative = first[label]
    if all(np.array_equal(column[representative], column) for column in columns):
        return label.astype(np.int64)
    return _lexsorted_labels(columns)


def _lexsorted_labels(columns: list[np.ndarray]) -> np.ndarray:
    """The rank of each row among the distinct rows of the columns, in lexicographic order
    (np.unique(axis=0)'s inverse, by one lexsort of integer columns)."""
    order = np.lexsort(columns[::-1])
    new_row = np.zeros(len(order), dtype=bool)
    new_row[0] = True
    for column in columns:
        ordered = column[order]
        new_row[1:] |= ordered[1:] != ordered[:-1]
    label = np.empty(len(order), dtype=np.int64)
    label[order] = np.cumsum(new_row) - 1
    return label


# texts sampled to decide whether hashing only the distinct texts pays
_REPEAT_SAMPLE = 20_000


def _normalized_hashes(texts: pa.Array, settings: DedupSettings) -> tuple[np.ndarray, ...]:
    """text_hashes of each text's normal form (``normalized``), without normalising most
    texts: equal hashes, equal normal forms.

    Where a sample of the texts shows repeats (comparisons that share turns and replies),
    the distinct texts are found first (Arrow's dictionary) and only they are hashed.
    """
    sample = texts.slice(0, _REPEAT_SAMPLE)
    if texts.null_count or len(sample.unique()) > 0.8 * len(sample):
        return _hashes_of_forms(texts, settings)
    raw = texts.dictionary_encode()
    indices = raw.indices.to_numpy(zero_copy_only=False)
    return tuple(hashes[indices] for hashes in _hashes_of_forms(raw.dictionary, settings))


# bytes of text handled at a time by _hashes_of_forms: small enough to stay in cache
# through the passes over it, and for its temporaries to be reused rather than paged in
_CHUNK_BYTES = 1 << 22


def _hashes_of_forms(texts: pa.Array, settings: DedupSettings) -> tuple[np.ndarray, ...]:
    """text_hashes of the normal forms: of the ASCII lower case (or the text itself, without
    lowercase) where that is the normal form, of ``normalized`` where it may not be."""
    import polars as pl  # a dependency of hhdata; imported here, so `hhdata --help` starts fast

    offsets, _ = string_buffers(texts)
    cuts = np.unique(
        np.r_[
            np.searchsorted(offsets, np.arange(offsets[0], offsets[-1], _CHUNK_BYTES)), len(texts)
        ]
    )
    hashes = tuple(np.empty(len(texts), dtype=np.uint64) for _ in range(2))
    needs = np.zeros(len(texts), dtype=bool)
    for low, high in zip(cuts[:-1], cuts[1:]):
        part = texts.slice(low, high - low)
        simple = pl.Series(pc.ascii_lower(part) if settings.lowercase else part)
        for whole, found in zip(hashes, text_hashes(simple)):
            whole[low:high] = found
        needs[low:high] = _needs_normalizing(part, settings)
        if settings.collapse_whitespace:  # two spaces in a row (a SIMD search in polars)
            needs[low:high] |= simple.str.contains("  ", literal=True).fill_null(False).to_numpy()
    rows = np.flatnonzero(needs)
    if len(rows):
        for whole, fixed in zip(
            hashes, text_hashes(normalized(texts.take(pa.array(rows)), settings))
        ):
            whole[rows] = fixed
    return hashes


def _needs_normalizing(texts: pa.Array, settings: DedupSettings) -> np.ndarray:
    """Which texts ``normalized`` may change beyond ASCII lower case, but for two spaces in a
    row (True may be too many: a text flagged is normalised in full; one left out must be
    exactly its simple form).

    Found in the UTF-8 bytes: with whitespace collapsed, a control byte below 0x0E (tab,
    newline, vertical tab, form feed and carriage return among them) or a space at either
    end; and a character the settings' NFC, lower case or whitespace rules touch
    (_changed_code_points).
    """
    offsets, data = string_buffers(texts)
    start, stop = int(offsets[0]), int(offsets[-1])
    data, offsets = data[start:stop], offsets - start
    found = np.zeros(len(texts), dtype=bool)
    positions = []  # byte positions that put their text among those to normalise
    if settings.unicode_nfc or settings.lowercase or settings.collapse_whitespace:
        # lead bytes of the characters from U+0080 on (continuation bytes are below 0xC0)
        lead = np.flatnonzero(data >= 0xC2)
        chars = utf8_chars_at(data, lead)
        distinct = np.unique(chars)
        changed = _changed_code_points(code_points(distinct), settings)
        positions.append(lead[changed[np.searchsorted(distinct, chars)]])
    if settings.collapse_whitespace:
        positions.append(np.flatnonzero(data < 0x0E))
        nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
        for edge in (data[offsets[nonempty]], data[offsets[nonempty + 1] - 1]):
            found[nonempty[(edge == 0x20) | (edge < 0x0E)]] = True
    for position in positions:
        found[np.searchsorted(offsets, position, side="right") - 1] = True
    return found


def _changed_code_points(points: np.ndarray, settings: DedupSettings) -> np.ndarray:
    """Which of these code points (all from U+0080 on) ``normalized`` may change or treat as
    whitespace: those hhdata.dedup.degenerate.nfc_may_change flags (with NFC), those Arrow's
    lower case changes (with lowercase) and the no-break space (with whitespace)."""
    chars = pa.array([chr(point) for point in points.tolist()], pa.string())
    changed = np.zeros(len(points), dtype=bool)
    if settings.unicode_nfc:
        changed |= degenerate.nfc_may_change(chars)
    if settings.lowercase:
        changed |= ~pc.equal(pc.utf8_lower(chars), chars).to_numpy(zero_copy_only=False)
    if settings.collapse_whitespace:
        changed |= points == 0xA0
    return changed


def near_texts(pairs: pa.Table, scope: str) -> pa.Array:
    """What near-duplicate detection shingles: the prompt turns' contents joined by spaces,
    then (scope 'pair') both final replies."""
    parts = [degenerate.joined_contents(degenerate.one_array(pairs["prompt"]), " ")]
    if scope == "pair":
        parts += [
            degenerate.joined_contents(degenerate.one_array(pairs[side]), " ")
            for side in ("chosen", "rejected")
        ]
    return pc.binary_join_element_wise(*parts, " ") if len(parts) > 1 else parts[0]


def sketches(pairs: pa.Table, settings: DedupSettings) -> tuple[minhash.Sketch, minhash.Sketch]:
    """Per row, the MinHash sketch of its near_texts (the settings' scope) and of its prompt.

    One tokenisation and one pass of signatures serve both. A pair's text is its prompt,
    chosen and rejected joined by spaces, so its words are the three parts' words in a row,
    and when the prompt has at least k words the pair's first shingles are the prompt's
    own. Only the rest (shingles that start in the prompt's last k - 1 words or later) is
    shingled and signed again; the pair's signature is the element-wise minimum of both.
    """
    k = settings.shingle_size
    # the three sides in parallel threads: Arrow's kernels and numpy release the GIL
    with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
        prompt_tokens, *replies = pool.map(
            lambda side: minhash.word_tokens(
                degenerate.joined_contents(degenerate.one_array(pairs[side]), " ")
            ),
            ("prompt", "chosen", "rejected"),
        )

        def prompt_part():
            shingles = minhash.token_shingles(*prompt_tokens, k)
            raw = _raw_signatures(shingles, settings)
            return shingles, raw, _finished(raw, settings)

        def rest_part():
            prompt_words = np.diff(prompt_tokens[1])
            reply_words = np.diff(replies[0][1]) + np.diff(replies[1][1])
            # a prompt shorter than k words is one shingle of its own, not one of the pair's
            whole = prompt_words >= k
            carried = np.where(whole, np.where(reply_words > 0, k - 1, 0), prompt_words)
            rest = minhash.token_shingles(
                *minhash.concat_tokens([minhash.last_tokens(*prompt_tokens, carried), *replies]), k
            )
            return rest, whole, _raw_signatures(rest, settings)

        # the prompt's signatures and the rest's shingles and signatures, side by side
        rest_future = pool.submit(rest_part) if settings.near_scope == "pair" else None
        prompt_shingles, prompt_raw, prompt_signatures = prompt_part()
        prompt = minhash.Sketch(prompt_shingles, prompt_signatures)
        if rest_future is None:
            return prompt, prompt
        rest, whole, signatures = rest_future.result()
    signatures[whole] = np.minimum(signatures[whole], prompt_raw[whole])
    return minhash.Sketch(
        rest, _finished(signatures, settings), prefix=prompt_shingles, prefix_rows=whole
    ), prompt


def signatures_of(shingles: minhash.Shingles, settings: DedupSettings) -> np.ndarray:
    """The signatures settings.sketch asks for."""
    return _finished(_raw_signatures(shingles, settings), settings)


def _raw_signatures(shingles: minhash.Shingles, settings: DedupSettings) -> np.ndarray:
    """Signatures whose element-wise minimum is the signature of the union of shingle sets:
    MinHash's, or one-permutation hashing's before its empty bins are filled."""
    if settings.sketch == "oph":
        return minhash.oph_bins(shingles, settings.num_perm, settings.seed)
    return minhash.signatures(shingles, settings.num_perm, settings.seed)


def _finished(raw: np.ndarray, settings: DedupSettings) -> np.ndarray:
    return minhash.densify(raw, settings.seed) if settings.sketch == "oph" else raw


def _near_inputs(pairs: pa.Table, settings: DedupSettings):
    """What the near stage needs of every row (made in a second thread): the sketches of
    its near text and of its prompt, and the number of prompt turns."""
    of_rows, of_prompts = sketches(pairs, settings)
    turns = pc.list_value_length(degenerate.one_array(pairs["prompt"]))
    return of_rows, of_prompts, turns.to_numpy(zero_copy_only=False)


class _Stopped(Exception):
    """The streamed sketching was stopped: the run it served ended first (an error, Ctrl-C
    or SIGTERM in the main thread)."""


def _spilled_inputs(
    pairs: pa.Table,
    settings: DedupSettings,
    stream: NearStream,
    folder: Path,
    stop: threading.Event,
):
    """_near_inputs for a large table, in row batches written to ``folder``
    (hhdata.dedup.spill): every row's sketch of its near text, and its prompt turns; and
    below ``stream.bounded_rows`` rows the prompts' sketch (a RowSketch held in memory,
    one sketch per distinct prompt; else None). Raises _Stopped before the next batch once
    ``stop`` is set, so a run that ends early waits for one batch, not the whole table."""
    spilled = spill.SpilledSketch(folder, settings.bands, settings.rows, settings.num_perm)
    prompts = _DistinctPrompts(pairs) if pairs.num_rows < stream.bounded_rows else None

    def add(start: int, of_rows: minhash.Sketch, of_prompts: minhash.Sketch, turns) -> None:
        spilled.append(of_rows, turns.to_numpy(zero_copy_only=False))
        if prompts is not None:
            prompts.add(start, of_prompts)

    # each batch is written (mostly system time: the files' pages) in a thread of its own
    # while the next one is sketched; one batch waits at most
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hhdata-spill") as writer:
        writing = None
        for start in range(0, pairs.num_rows, stream.batch_rows):
            if stop.is_set():
                raise _Stopped()
            batch = pairs.slice(start, stream.batch_rows)
            sketched = sketches(batch, settings)
            turns = pc.list_value_length(degenerate.one_array(batch["prompt"]))
            if writing is not None:
                writing.result()
            writing = writer.submit(add, start, *sketched, turns)
            del sketched
        if writing is not None:
            writing.result()
    return spilled.finish(), prompts.finish() if prompts is not None else None


class _DistinctPrompts:
    """The prompts' RowSketch of a table sketched in row batches: of each batch only the
    sketches of prompts first seen there are kept (copied out of the batch's), so memory
    follows the distinct prompts (a quarter of the rows on the dense benchmark corpus)."""

    def __init__(self, pairs: pa.Table):
        # distinct prompts numbered by first appearance: the order the batches add them
        self._of_row, self._firsts = by_first_appearance(near_text_identity(pairs, "prompt"))
        self._parts: list[minhash.Sketch] = []

    def add(self, start: int, batch: minhash.Sketch) -> None:
        """The sketch of the rows from ``start`` on (a batch, in order)."""
        lo, hi = np.searchsorted(self._firsts, [start, start + len(batch)])
        new = self._firsts[lo:hi] - start
        self._parts.append(minhash.Sketch(batch.shingles_of(new), batch.signatures[new]))

    def finish(self) -> RowSketch:
        parts, self._parts = self._parts, []
        offsets = [np.zeros(1, dtype=np.int64)]
        for part in parts:
            offsets.append(offsets[-1][-1] + part.shingles.offsets[1:])
        # called after at least one batch: a streamed table has rows
        shingles = minhash.Shingles(
            np.concatenate([p.shingles.hashes for p in parts]), np.concatenate(offsets)
        )
        signatures = np.concatenate([p.signatures for p in parts])
        return RowSketch(minhash.Sketch(shingles, signatures), self._of_row)


def _spilled_similar(spilled: spill.SpilledSketch, texts, settings, stream, folder):
    """minhash.similar_in_sketch over the rows ``texts`` of a spilled sketch, partition by
    partition: the same pairs and similarities."""
    groups = spilled.turns[texts] if settings.same_turn_count else None
    paths = spill.partitioned_candidates(spilled, texts, groups, stream.pairs_per_partition, folder)
    return spill.verified_partitions(
        spilled,
        texts,
        paths,
        settings.threshold,
        settings.verify,
        _drop_rule(settings),
        stream.shared_shingles if len(spilled) < stream.bounded_rows else 0,
    )


def _drop_rule(settings: DedupSettings) -> bool:
    """Whether the near stage may leave out the pairs the drop rule never reads (drop mode:
    a pair whose first text is itself dropped decides nothing; minhash.verify_for_dropping)."""
    return settings.near_action == "drop"


# rows whose near texts are joined at a time by near_text_identity
_IDENTITY_BATCH_ROWS = 65_536


def near_text_identity(
    pairs: pa.Table, scope: str, batch_rows: int = _IDENTITY_BATCH_ROWS
) -> np.ndarray:
    """A code per row's near text (``near_texts`` of the scope): equal codes, equal texts.

    The texts are joined ``batch_rows`` rows at a time, and each is identified by two
    independent 64-bit hashes (hhdata._arrow.text_hashes; a false match needs both to
    collide: about n**2 / 2**129 for n texts), so no array of every row's joined text is
    ever made (at 10x HH size it is gigabytes: bench/scale.md).
    """
    hashes = (np.empty(pairs.num_rows, dtype=np.uint64), np.empty(pairs.num_rows, dtype=np.uint64))
    for start in range(0, pairs.num_rows, batch_rows):
        found = text_hashes(near_texts(pairs.slice(start, batch_rows), scope))
        for whole, part in zip(hashes, found):
            whole[start : start + len(part)] = part
    return _row_labels(list(hashes)) if pairs.num_rows else np.zeros(0, dtype=np.int64)


def by_first_appearance(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct labels numbered in order of first appearance (as a dictionary encoding
    numbers them): each row's number, and each number's first row.

    >>> by_first_appearance(np.array([7, 3, 7, 5, 3]))
    (array([0, 1, 0, 2, 1]), array([0, 1, 3]))
    """
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    by_appearance = np.argsort(first, kind="stable")
    rank = np.empty(len(first), dtype=np.int64)
    rank[by_appearance] = np.arange(len(first))
    return rank[inverse.ravel()], first[by_appearance]


def _text_identity(pairs: pa.Table, settings: DedupSettings) -> np.ndarray:
    """A code per row's near text: equal codes, equal texts."""
    return near_text_identity(pairs, settings.near_scope)


def _near_duplicates(
    rows: np.ndarray,
    settings: DedupSettings,
    inputs,
    identity: np.ndarray,
    advance: Callable[[int], None],
    stream: NearStream | None = None,
    folder: Path | None = None,
):
    """Near duplicates among ``rows`` (the exact survivors, in survivor order), numbered
    0..len(rows)-1: (dropped -> (kept, similarity)) in drop mode, the similar pairs of
    kept ones, and the prompts' RowSketch of the rows (for the leakage check; None when
    ``inputs`` were spilled to ``folder`` by _spilled_inputs without one). ``advance(1)`` after each
    of its two steps: candidates banded and verified, survivors chosen.

    Rows with the same text are similar (1.0); each distinct text is compared once.
    """
    # distinct texts numbered by first appearance among the survivors
    unique_of_row, first_row = by_first_appearance(identity[rows])
    order = np.arange(len(rows))
    if isinstance(inputs[0], spill.SpilledSketch):  # a large table, streamed
        spilled, prompts = inputs
        unique_pairs, similarity = _spilled_similar(
            spilled, rows[first_row], settings, stream, folder
        )
        prompt_sketch = prompts.rows(rows) if prompts is not None else None
    else:
        of_all, prompts_of_all, turns = inputs
        prompt_sketch = RowSketch(prompts_of_all, rows)
        # with same_turn_count, texts of different prompt lengths are never compared
        unique_pairs, similarity = minhash.similar_in_sketch(
            of_all.take(rows[first_row]),
            bands=settings.bands,
            rows=settings.rows,
            threshold=settings.threshold,
            verify=settings.verify,
            groups=turns[rows[first_row]] if settings.same_turn_count else None,
            drop_rule=_drop_rule(settings),
        )
    advance(1)
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for (u, v), sim in zip(unique_pairs.tolist(), similarity.tolist()):
        neighbours.setdefault(u, []).append((v, sim))
        neighbours.setdefault(v, []).append((u, sim))
    rows_per_unique = np.bincount(unique_of_row, minlength=len(first_row))
    kept_row_of_unique: dict[int, int] = {}
    dropped: dict[int, tuple[int, float]] = {}
    same_text: list[tuple[int, int]] = []
    touched = (rows_per_unique[unique_of_row] > 1) | np.isin(unique_of_row, list(neighbours))
    for row in order[touched[order]].tolist():
        unique = int(unique_of_row[row])
        if unique in kept_row_of_unique:
            if settings.near_action == "drop":
                dropped[row] = (kept_row_of_unique[unique], 1.0)
            else:
                same_text.append((kept_row_of_unique[unique], row))
            continue
        matches = [(sim, v) for v, sim in neighbours.get(unique, ()) if v in kept_row_of_unique]
        if matches and settings.near_action == "drop":
            sim, v = max(matches, key=lambda match: match[0])
            dropped[row] = (kept_row_of_unique[v], sim)
        else:
            kept_row_of_unique[unique] = row
    row_edges = [
        (kept_row_of_unique.get(u), kept_row_of_unique.get(v)) for u, v in unique_pairs.tolist()
    ]
    edges = same_text + [(a, b) for a, b in row_edges if a is not None and b is not None]
    advance(1)
    return dropped, edges, prompt_sketch


def deduplicate(
    pairs: pa.Table,
    settings: DedupSettings = DedupSettings(),
    progress: bool | None = False,
    stream: NearStream | None = NearStream(),
) -> DedupResult:
    """Drop degenerate pairs, exact and near duplicates; every input row is kept or logged.

    On large tables run it inside hhdata.memory.large_run(), as ``hhdata dedup`` does.
    ``progress`` draws a bar per stage on stderr (exact dedup, near: sketching, near:
    banding + verification); None draws them on a terminal outside CI (hhdata.progress).
    Tables of ``stream.min_rows`` rows or more are sketched in batches and their candidates
    verified per partition, spilled to a temporary folder (NearStream, hhdata.dedup.spill):
    the same result in bounded memory (from ``stream.bounded_rows`` rows without
    ``prompt_sketch``). ``stream=None`` keeps
    everything in memory at any size.

    Returns kept rows (PAIR_SCHEMA plus ``cluster_id``: the id of the cluster's
    representative, the row's own id for a singleton), a drop log (id, fate, reason, kept_id,
    subset, split, similarity), a report and the settings.
    """
    missing = [name for name in PAIR_SCHEMA.names if name not in pairs.column_names]
    if missing:
        raise SchemaError(
            f"deduplicate needs the canonical pair columns; missing {missing}. Build the table "
            "with hhdata.pairs.build_pairs so it follows hhdata.schema.PAIR_SCHEMA"
        )
    # one array per column, made once: every stage below reads whole columns
    pairs = pairs.select(PAIR_SCHEMA.names)
    pairs = pa.table(
        [degenerate.one_array(column) for column in pairs.columns], schema=pairs.schema
    )
    ids = pairs["id"].to_numpy(zero_copy_only=False)
    n = pairs.num_rows

    # the near stage's sketches of every row, made in a second thread while this one finds
    # degenerate pairs and exact duplicates (Arrow and numpy release the GIL); the near
    # stage then takes the rows that survive
    streaming = stream is not None and settings.near and n and n >= stream.min_rows
    pool = ThreadPoolExecutor(max_workers=1)
    stop = threading.Event()
    folder = sketching = None
    # everything from the spill folder on is inside the try: an interruption (Ctrl-C,
    # SIGTERM) at any point stops the second thread before the folder is removed
    try:
        # the second thread is started first, with nothing to do: an interruption that
        # comes while a thread starts leaves it out of the threads that shutdown joins, and
        # the thread that writes in the spill folder must be joined before it is removed
        pool.submit(int).result()
        if streaming:
            folder = tempfile.TemporaryDirectory(prefix="hhdata-near-", dir=stream.temp_dir)
            if n >= stream.bounded_rows:
                memory.map_large_blocks()  # for the rest of the large run: a lower peak
                memory.give_back()  # and what malloc keeps free of the reading
            sketching = pool.submit(
                _spilled_inputs, pairs, settings, stream, Path(folder.name), stop
            )
        elif settings.near and n:
            sketching = pool.submit(_near_inputs, pairs, settings)
        # without a near stage the second thread checks for degenerate pairs instead
        checking = (
            pool.submit(degenerate.find_degenerate, pairs) if n and not settings.near else None
        )
        return _deduplicate(
            pairs,
            settings,
            ids,
            sketching,
            checking,
            progress,
            stream,
            Path(folder.name) if folder else None,
        )
    finally:
        stop.set()  # a run that ended early waits for one batch of sketches, not all
        pool.shutdown(cancel_futures=True)
        if (
            streaming
            and sketching is not None
            and not sketching.cancelled()
            and sketching.exception() is None
        ):
            sketching.result()[0].close()
        if folder is not None:
            folder.cleanup()


# exact_keys' threads while the sketches are made in another thread (chosen by measurement:
# bench/release_build.md, "End to end")
_EXACT_WORKERS_BESIDE_SKETCHES = 1


def _deduplicate(
    pairs: pa.Table,
    settings: DedupSettings,
    ids: np.ndarray,
    sketching,
    checking,
    progress: bool | None = False,
    stream: NearStream | None = None,
    folder: Path | None = None,
) -> DedupResult:
    """deduplicate on one array per column; ``sketching`` and ``checking``: the futures of
    _near_inputs(pairs) (or _spilled_inputs into ``folder``) and of
    degenerate.find_degenerate(pairs), when started."""
    n = pairs.num_rows
    reason = np.full(n, None, dtype=object)
    fate = np.full(n, None, dtype=object)  # set with every reason: REMOVED or FILTERED
    kept_index = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    cluster = np.arange(n)

    # one bar per stage on a terminal (hhdata.progress); the stages have no inner count
    # worth the cost of reporting, so each bar fills when its stage ends
    with bars.stage("exact dedup", total=n, unit="pairs", show=progress) as advance:
        keys = exact_keys(
            pairs, settings, workers=_EXACT_WORKERS_BESIDE_SKETCHES if sketching else None
        )

        # 1. degenerate pairs
        if checking is not None:
            masks = checking.result()
        else:
            masks = (
                degenerate.find_degenerate(pairs)
                if n
                else {r: np.zeros(0, bool) for r in degenerate.REASONS}
            )
        policy = settings.degenerate
        flagged = {}
        for code in degenerate.REASONS:
            if policy[code] == degenerate.DROP:
                dropped = masks[code] & (reason == None)  # noqa: E711 (element-wise)
                reason[dropped], fate[dropped] = code, FILTERED
            else:
                flagged[code] = masks[code]
        alive = reason == None  # noqa: E711

        # 2. exact duplicates, first survivor of each key in survivor order
        order = survivor_order(pairs, settings)
        order = order[alive[order]]
        _, first_in_order, group = np.unique(keys[order], return_index=True, return_inverse=True)
        survivor_of = order[first_in_order][group]
        duplicate = survivor_of != order
        reason[order[duplicate]], fate[order[duplicate]] = EXACT_DUPLICATE, REMOVED
        kept_index[order[duplicate]] = survivor_of[duplicate]
        similarity[order[duplicate]] = 1.0
        cluster[order] = survivor_of
        advance(n)

    # 3. near duplicates among the exact survivors
    order = order[~duplicate]
    edges: list[tuple[int, int]] = []
    survivor_sketch = None
    if settings.near and len(order):
        # the texts' identity is made here while the second thread finishes the sketches
        identity = _text_identity(pairs, settings)
        # the sketches were made in the second thread since deduplicate started
        with bars.stage("near: sketching", total=n, unit="pairs", show=progress) as advance:
            inputs = sketching.result()
            advance(n)
        label = "near: banding + verification"
        with bars.stage(label, total=2, unit="steps", show=progress) as advance:
            dropped, edges, survivor_sketch = _near_duplicates(
                order, settings, inputs, identity, advance, stream, folder
            )
        del inputs
        memory.give_back()  # what malloc kept of the near stage's arrays (hhdata.memory)
        for local, (kept_local, sim) in dropped.items():
            row = order[local]
            reason[row], kept_index[row], similarity[row] = NEAR_DUPLICATE, order[kept_local], sim
            fate[row] = REMOVED
            cluster[row] = order[kept_local]
        edges = [(int(order[a]), int(order[b])) for a, b in edges]
        # an exact copy of a row dropped as a near duplicate points at what that row points at
        exact_rows = np.flatnonzero(reason == EXACT_DUPLICATE)
        via = kept_index[exact_rows]
        chained = reason[via] == NEAR_DUPLICATE
        kept_index[exact_rows[chained]] = kept_index[via[chained]]
        similarity[exact_rows[chained]] = similarity[via[chained]]
        cluster = cluster[cluster]
    if edges:  # cluster mode: kept near duplicates share their component's best survivor
        by_rank = survivor_order(pairs, settings)
        rank = np.empty(n, dtype=np.int64)
        rank[by_rank] = np.arange(n)
        ranked_edges = np.array([(rank[a], rank[b]) for a, b in edges], dtype=np.int64)
        component = minhash.connected_components(n, ranked_edges)
        root_row = by_rank[component[rank]]
        # exact copies follow their survivor into its component
        cluster = root_row[cluster]

    keep = reason == None  # noqa: E711
    prompt_sketch = None
    if survivor_sketch is not None:  # every kept row is a survivor of the exact stage
        local_of_row = np.full(n, -1, dtype=np.int64)
        local_of_row[order] = np.arange(len(order))
        prompt_sketch = survivor_sketch.rows(local_of_row[keep])
    flags = degenerate.add_flags(
        degenerate.one_array(pairs["flags"]), {c: m & keep for c, m in flagged.items()}
    )
    kept = pairs.set_column(PAIR_SCHEMA.get_field_index("flags"), "flags", flags)
    kept = kept_rows(kept, keep).append_column(
        "cluster_id", pa.array(ids[cluster][keep].tolist(), pa.string())
    )
    gone = np.flatnonzero(~keep)
    drops = pa.table(
        {
            "id": pa.array(ids[gone].tolist(), pa.string()),
            "fate": pa.array(fate[gone].tolist(), pa.string()),
            "reason": pa.array(reason[gone].tolist(), pa.string()),
            "kept_id": pa.array(
                [ids[k] if k >= 0 else None for k in kept_index[gone].tolist()], pa.string()
            ),
            "subset": pairs["subset"].take(pa.array(gone)),
            "split": pairs["split"].take(pa.array(gone)),
            "similarity": pa.array(similarity[gone], pa.float64(), from_pandas=True),
        },
        schema=DROPS_SCHEMA,
    )
    clustered = keep | np.isin(reason, [EXACT_DUPLICATE, NEAR_DUPLICATE])
    report = dedup_report(
        pairs,
        kept,
        drops,
        settings,
        {c: int(m.sum()) for c, m in masks.items()},
        ids[cluster][clustered].tolist(),
    )
    return DedupResult(
        kept=kept, drops=drops, report=report, settings=settings, prompt_sketch=prompt_sketch
    )


# kept_rows: runs of at least this many kept rows are taken without a copy (duplicates
# lie scattered: on the dense corpus a run of kept rows averages 20 rows); the rows of
# shorter runs are gathered at most _GATHER_ROWS at a time
_ZERO_COPY_RUN = 8
_GATHER_ROWS = 65_536


def kept_rows(table: pa.Table, keep: np.ndarray, min_run: int = _ZERO_COPY_RUN) -> pa.Table:
    """``table.filter(keep)``, mostly without a copy: each run of at least ``min_run`` kept
    rows is a zero-copy slice of ``table``, and the kept rows between such runs are
    gathered (``take``) a batch at a time. The rows and their order are filter's; the
    result is chunked (a chunk per run). At 10x HH size the pair table is 3.4 GB, and a
    filtered copy beside it set the peak memory (bench/scale.md): hhdata.pipeline copies
    the kept rows one column at a time instead, freeing each column of the pair table as
    it goes (pipeline.one_chunk).
    """
    keep = np.asarray(keep, dtype=bool)
    edges = np.flatnonzero(np.diff(np.r_[False, keep, False].astype(np.int8)))
    starts, stops = edges[0::2], edges[1::2]
    long = stops - starts >= min_run
    pieces: list[pa.Table] = []
    done = 0  # the rows before this are in pieces already

    def gather(until: int) -> None:
        rows = np.flatnonzero(keep[done:until]) + done
        for first in range(0, len(rows), _GATHER_ROWS):
            pieces.append(table.take(pa.array(rows[first : first + _GATHER_ROWS])))

    for start, stop in zip(starts[long].tolist(), stops[long].tolist()):
        gather(start)
        pieces.append(table.slice(start, stop - start))
        done = stop
    gather(len(keep))
    if not pieces:
        return table.slice(0, 0)
    return pa.concat_tables(pieces)


def dedup_report(
    pairs, kept, drops, settings, degenerate_found, cluster_of_rows, examples: int = 3
) -> dict:
    """Counts per reason, cluster sizes and side-by-side examples of each kind of drop.

    ``cluster_of_rows`` holds the cluster id of every row that is kept or dropped as a
    duplicate (degenerate drops belong to no cluster).
    """
    cluster_sizes = Counter(cluster_of_rows)
    histogram = Counter(cluster_sizes.values())
    shown = {
        code: drops.filter(pc.equal(drops["reason"], code)).slice(0, examples).to_pylist()
        for code in sorted(set(drops["reason"].to_pylist()))
    }
    wanted = {row[key] for rows in shown.values() for row in rows for key in ("id", "kept_id")}
    by_id = {}
    chosen = pairs.filter(
        pc.is_in(pairs["id"], pa.array(sorted(i for i in wanted if i), pa.string()))
    )
    for row in chosen.select(["id", "subset", "split", "prompt"]).to_pylist():
        by_id.setdefault(row["id"], row)
    side_by_side = {
        code: [
            {
                "dropped": _example(by_id[row["id"]]),
                "kept": _example(by_id[row["kept_id"]]) if row["kept_id"] else None,
                "similarity": None if row["similarity"] != row["similarity"] else row["similarity"],
            }
            for row in rows
        ]
        for code, rows in shown.items()
    }
    return {
        "settings": settings.to_json(),
        "input": pairs.num_rows,
        "kept": kept.num_rows,
        "dropped": drops.num_rows,
        "dropped_by_reason": dict(sorted(Counter(drops["reason"].to_pylist()).items())),
        "degenerate_found": degenerate_found,
        "clusters": len(cluster_sizes),
        "cluster_size_histogram": {str(size): count for size, count in sorted(histogram.items())},
        "examples": side_by_side,
    }


def _example(row: dict) -> dict:
    last_user = next((t["content"] for t in reversed(row["prompt"]) if t["role"] == "user"), "")
    return {
        "id": row["id"],
        "subset": row["subset"],
        "split": row["split"],
        "turns": len(row["prompt"]),
        "last_user_turn": last_user[:300],
    }


def write_report(report: dict, path) -> None:
    """Write a report as indented, key-sorted JSON."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=1, sort_keys=True, ensure_ascii=False)
        out.write("\n")
