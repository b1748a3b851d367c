"""Near duplicates: word shingles, MinHash signatures, LSH banding, verification, clusters.

The whole corpus is processed at once, in numpy, so no Python code runs per shingle:

1. **Shingles.** Texts are lower-cased and split on whitespace (``pyarrow.compute``). Every
   distinct word gets a stable 64-bit hash (a polynomial over its UTF-8 bytes mixed by
   splitmix64, computed once per word of the vocabulary, vectorised), so a text hashes the
   same whatever corpus it sits in. A shingle
   is ``k`` consecutive words, hashed by folding the word hashes and mixing with the
   splitmix64 finaliser. A text shorter than ``k`` words is one shingle of all its words;
   an empty text has none and never matches anything.
2. **MinHash.** Permutation ``i`` is the universal hash ``(a_i * s + b_i) mod 2**64`` with
   seeded odd ``a_i``; the signature keeps the top 32 bits of each minimum. Shingles are
   processed in blocks of whole documents as a (shingles x permutations) array reduced
   with ``np.minimum.reduceat``.
3. **LSH.** The signature is cut into ``bands`` bands of ``rows`` values; documents whose
   band values are all equal in some band become candidates.
4. **Verification.** Candidates are kept only if their Jaccard similarity reaches the
   threshold: the MinHash estimate first, then (by default) the exact Jaccard of the two
   shingle sets. Texts that share a long prefix but differ later have a low Jaccard
   similarity and fail here even when a band collides.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata._arrow import splitmix64

_MASK32 = np.uint64(32)
_FOLD = np.uint64(0x9E3779B97F4A7C15)
# Shingles per block of the (permutations x shingles) array: 4 MiB at 128 permutations, so
# the multiply, add and minimum run in cache (measured against 16 MiB blocks:
# bench/release_build.md)
_BLOCK_SHINGLES = 4096
# Words per block when folding shingles: a few arrays of 512 KiB, which fit in cache.
_BLOCK_TOKENS = 65536


@dataclass(frozen=True)
class Shingles:
    """The shingle hashes of many texts: ``hashes[offsets[d]:offsets[d + 1]]`` belong to text d.

    A text's hashes are in text order and may repeat (a repeated phrase); MinHash ignores
    repeats and exact_jaccard takes the distinct ones.
    """

    hashes: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len(texts) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> np.ndarray:
        """Number of shingles of each text (repeats included)."""
        return np.diff(self.offsets)

    def take(self, texts: np.ndarray) -> Shingles:
        """The shingles of the given texts, in that order."""
        texts = np.asarray(texts, dtype=np.int64)
        if len(texts) == len(self) and (texts == np.arange(len(texts))).all():
            return self
        counts = self.counts()[texts]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        hashes = np.empty(offsets[-1], dtype=self.hashes.dtype)
        starts = self.offsets[:-1][texts]
        # gathered a chunk of texts at a time: the positions read are never all held at once
        for lo, hi in _text_chunks(len(texts), len(hashes)):
            part = counts[lo:hi]
            at = np.repeat(starts[lo:hi] - offsets[lo:hi], part)
            at += np.arange(offsets[lo], offsets[hi])
            np.take(self.hashes, at, out=hashes[offsets[lo] : offsets[hi]])
        return Shingles(hashes=hashes, offsets=offsets)


@dataclass(frozen=True)
class Sketch:
    """Shingles and signatures (MinHash or densified one-permutation hashing) of the same
    texts: signature row d is text d, and so is shingle row d, or row ``rows[d]`` once the
    sketch has been taken from a larger one (take copies only the signatures). What
    similar_pairs needs, so one pass can serve several questions (hhdata.dedup hands the
    prompts' sketch to the leakage check).

    A text's shingles may come in two parts: ``shingles`` and, where ``prefix_rows`` is
    set, its ``prefix`` shingles too (a pair's prompt); the signatures cover both. The
    parts are joined only for the few texts whose exact Jaccard is wanted.
    """

    shingles: Shingles
    signatures: np.ndarray  # uint32, (texts, num_perm)
    prefix: Shingles | None = None
    prefix_rows: np.ndarray | None = None  # bool, (rows of shingles,)
    rows: np.ndarray | None = None  # int64, (texts,): text d's shingles are row rows[d]

    def __len__(self) -> int:
        return len(self.signatures)

    def take(self, texts: np.ndarray) -> Sketch:
        """The sketch of the given texts, in that order. Only the signatures are copied;
        the shingles stay where they are, reached through ``rows``."""
        texts = np.asarray(texts, dtype=np.int64)
        return Sketch(
            self.shingles,
            self.signatures[texts],
            self.prefix,
            self.prefix_rows,
            texts if self.rows is None else self.rows[texts],
        )

    def shingles_of(self, texts: np.ndarray) -> Shingles:
        """All shingles of the given texts, in that order."""
        texts = np.asarray(texts, dtype=np.int64)
        if self.rows is not None:
            texts = self.rows[texts]
        own = self.shingles.take(texts)
        if self.prefix is None:
            return own
        prefix = self.prefix.take(texts)
        used = np.where(self.prefix_rows[texts], prefix.counts(), 0)
        hashes, offsets = concat_tokens(
            [last_tokens(prefix.hashes, prefix.offsets, used), (own.hashes, own.offsets)]
        )
        return Shingles(hashes, offsets)


def _string_hashes(strings: pa.Array) -> np.ndarray:
    """A stable 64-bit hash of each non-empty string: a polynomial over its UTF-8 bytes
    (wrapping mod 2**64), mixed with its length by splitmix64. Vectorised over all strings.
    """
    strings = strings.cast(pa.large_string())
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    # weight of byte j of a string of length n is P**(n - 1 - j): Horner's rule, all at once
    powers = np.ones(max(int(lengths.max(initial=0)), 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, len(powers)):
            powers[i] = powers[i - 1] * _FOLD
        from_end = np.repeat(offsets[1:], lengths) - 1 - np.arange(len(data))
        terms = (data.astype(np.uint64) + np.uint64(1)) * powers[from_end]
        sums = np.add.reduceat(terms, offsets[:-1]) if len(data) else np.zeros(0, np.uint64)
        return splitmix64(sums ^ (lengths.astype(np.uint64) << np.uint64(56)))


def split_whitespace(strings: pa.Array) -> pa.ListArray:
    """``pc.utf8_split_whitespace``, made safe at the end of the data.

    Arrow's kernel (pyarrow 26) decodes one character past a run of whitespace that ends a
    string. For the array's last string that character lies past its data: where those
    bytes are not valid UTF-8 the trailing whitespace stays glued to the last word
    (``"a "`` instead of ``"a", ""``), and which happens depends on whatever memory follows,
    so the same text could hash two ways. When the data may end in whitespace, a sentinel
    string is appended so the byte read is ours, and its words are cut off again.
    """
    if not (pa.types.is_string(strings.type) or pa.types.is_large_string(strings.type)):
        strings = strings.cast(pa.large_string())
    if not _may_end_in_whitespace(strings):
        return pc.utf8_split_whitespace(strings)
    padded = pc.utf8_split_whitespace(pa.concat_arrays([strings, pa.array(["x"], strings.type)]))
    offsets = padded.offsets.slice(0, len(strings) + 1)
    return pa.ListArray.from_arrays(offsets, padded.values.slice(0, offsets[-1].as_py()))


def _may_end_in_whitespace(strings: pa.Array) -> bool:
    """Whether the last byte of the strings' data could end a whitespace character: an
    ASCII control or space, or any non-ASCII byte (U+00A0, U+3000 and others)."""
    _, offsets_buffer, data_buffer = strings.buffers()
    if data_buffer is None or len(strings) == 0:
        return False
    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    if offsets[-1] == offsets[0]:
        return False
    last = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[-1] - 1]
    return bool(last <= 0x20 or last >= 0x7F)


def word_tokens(texts) -> tuple[np.ndarray, np.ndarray]:
    """Each text lower-cased and split on whitespace, every word as its stable 64-bit hash.

    Returns (tokens, offsets): ``tokens[offsets[d]:offsets[d + 1]]`` are text d's words.
    Joining texts with a space concatenates their token lists, which is what lets a pair
    and its prompt share one tokenisation (hhdata.dedup).
    """
    array = (
        texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
    )
    if isinstance(array, pa.ChunkedArray):
        array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    # lower-casing never makes or removes whitespace, so only the vocabulary is lowered
    words = split_whitespace(array.fill_null(""))
    encoded = words.values.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    # an empty text (or whitespace at an end) splits into empty words: they are dropped
    # below (" " stands in for them, as the hash wants non-empty strings), and the offsets
    # re-based
    is_empty = pc.equal(encoded.dictionary, "")
    vocabulary = _string_hashes(pc.utf8_lower(pc.if_else(is_empty, " ", encoded.dictionary)))
    empty = np.flatnonzero(is_empty.to_numpy(zero_copy_only=False))
    word_offsets = words.offsets.to_numpy().astype(np.int64)
    if len(empty):
        # few words are empty: an offset moves back by the empty words before it
        dropped = np.flatnonzero(codes == empty[0])
        return vocabulary[np.delete(codes, dropped)], word_offsets - np.searchsorted(
            dropped, word_offsets
        )
    return vocabulary[codes], word_offsets - word_offsets[0]


def concat_tokens(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per text, the token lists of several parts one after the other (all parts have as
    many texts): the tokens of the parts' texts joined by spaces."""
    counts = [np.diff(offsets) for _, offsets in parts]
    total = np.sum(counts, axis=0)
    out_offsets = np.zeros(len(total) + 1, dtype=np.int64)
    np.cumsum(total, out=out_offsets[1:])
    out = np.empty(out_offsets[-1], dtype=np.uint64)
    before = out_offsets[:-1].copy()  # where the next part of each text goes
    for (tokens, offsets), count in zip(parts, counts):
        out[np.repeat(before - offsets[:-1], count) + np.arange(len(tokens))] = tokens
        before += count
    return out, out_offsets


def last_tokens(
    tokens: np.ndarray, offsets: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each text's last ``keep[d]`` tokens (at most all of them)."""
    keep = np.minimum(keep, np.diff(offsets))
    out_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=out_offsets[1:])
    within = np.arange(out_offsets[-1]) - np.repeat(out_offsets[:-1], keep)
    return tokens[np.repeat(offsets[1:] - keep, keep) + within], out_offsets


def word_shingles(texts, k: int = 3) -> Shingles:
    """Hash the k-word shingles of each text (lower-cased, split on whitespace).

    >>> s = word_shingles(["a b c d", "a b c d", "", "x"], k=3)
    >>> s.counts().tolist()
    [2, 2, 0, 1]
    """
    if k < 1:
        raise ValueError(f"shingle size must be at least 1, not {k}")
    return token_shingles(*word_tokens(texts), k)


def token_shingles(tokens: np.ndarray, word_offsets: np.ndarray, k: int) -> Shingles:
    """The k-token shingles of each text given as word hashes (see word_tokens)."""
    counts = np.diff(word_offsets)
    n_words = len(tokens)
    # a start is kept if a whole shingle fits in its text (so not among its last k - 1
    # words), or it begins a short text; marking the few starts that go is cheaper than
    # testing every word
    keep = np.ones(n_words, dtype=bool)
    ends = word_offsets[1:]
    for j in range(1, k):
        keep[ends[counts > j] - j] = False
    # a text of c < k words is one shingle: the fold of its c words
    short = (counts > 0) & (counts < k)
    short_starts, short_counts = word_offsets[:-1][short], counts[short]
    short_values = np.zeros(len(short_starts), dtype=np.uint64)
    padded = np.concatenate([tokens, np.zeros(k - 1, dtype=np.uint64)])
    with np.errstate(over="ignore"):
        for j in range(int(short_counts.max(initial=0))):
            more = short_counts > j
            short_values[more] = short_values[more] * _FOLD + padded[short_starts[more] + j]
    shingle_counts = np.where(short, 1, np.maximum(counts - k + 1, 0))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(shingle_counts, out=offsets[1:])
    hashes = np.empty(offsets[-1], dtype=np.uint64)
    done = 0
    # in blocks that stay in cache: fold k tokens per start, keep the starts that count, mix
    with np.errstate(over="ignore"):
        for start in range(0, n_words, _BLOCK_TOKENS):
            stop = min(start + _BLOCK_TOKENS, n_words)
            folded = padded[start:stop].copy()
            for j in range(1, k):
                np.multiply(folded, _FOLD, out=folded)
                np.add(folded, padded[start + j : stop + j], out=folded)
            low, high = np.searchsorted(short_starts, [start, stop])
            folded[short_starts[low:high] - start] = short_values[low:high]
            block = splitmix64(folded[keep[start:stop]], in_place=True)
            hashes[done : done + len(block)] = block
            done += len(block)
    return Shingles(hashes=hashes, offsets=offsets)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded coefficients (a, b) of the universal hashes; every ``a`` is odd."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(shingles: Shingles, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (texts, num_perm), uint32; empty texts get all 0xFFFFFFFF.

    >>> sig = signatures(word_shingles(["a b c d e", "a b c d e"]), num_perm=8)
    >>> sig.shape, bool((sig[0] == sig[1]).all())
    ((2, 8), True)
    """
    a, b = permutations(num_perm, seed)
    n_docs = len(shingles)
    result = np.full((num_perm, n_docs), np.iinfo(np.uint64).max, dtype=np.uint64)
    offsets, hashes = shingles.offsets, shingles.hashes
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    # blocks of whole texts, each about _BLOCK_SHINGLES shingles (one big text stays whole);
    # layout (permutations, shingles) so each minimum runs over a contiguous segment
    cuts = np.searchsorted(
        offsets[nonempty], np.arange(0, offsets[-1], _BLOCK_SHINGLES), side="left"
    )
    cuts = np.unique(np.append(cuts, len(nonempty)))
    if len(nonempty) == 0:
        return np.ascontiguousarray((result >> _MASK32).astype(np.uint32).T)
    widest = int((offsets[nonempty[cuts[1:] - 1] + 1] - offsets[nonempty[cuts[:-1]]]).max())
    buffer = np.empty((num_perm, widest), dtype=np.uint64)  # one allocation, reused
    with np.errstate(over="ignore"):
        for start, stop in zip(cuts[:-1], cuts[1:]):
            docs = nonempty[start:stop]
            first, last = offsets[docs[0]], offsets[docs[-1] + 1]
            block = buffer[:, : last - first]
            np.multiply(a[:, None], hashes[None, first:last], out=block)
            np.add(block, b[:, None], out=block)
            result[:, docs] = np.minimum.reduceat(block, offsets[docs] - first, axis=1)
    return np.ascontiguousarray((result >> _MASK32).astype(np.uint32).T)


_EMPTY = np.uint32(0xFFFFFFFF)
# rows of the (texts x bins) matrix densified at a time: a few MB per array
_DENSIFY_ROWS = 8192


def oph_bins(shingles: Shingles, num_bins: int = 128, seed: int = 1) -> np.ndarray:
    """One-permutation hashing: each shingle hash, re-mixed with the seed, falls into one of
    ``num_bins`` bins by its high bits and competes there by its low bits; a text keeps the
    minimum of each bin. Shape (texts, num_bins), uint32 below 2**31, and 0xFFFFFFFF where no
    shingle fell (see densify). One pass over the shingles instead of one per permutation.

    The bins of two shingle sets' union are the element-wise minimum of theirs, which is
    what lets a pair's bins come from its prompt's and its replies' (hhdata.dedup).
    """
    n_docs = len(shingles)
    result = np.full(n_docs * num_bins, _EMPTY, dtype=np.uint32)
    if shingles.offsets[-1] == 0:
        return result.reshape(n_docs, num_bins)
    counts = shingles.counts()
    # shingle hashes are already mixed (splitmix64), so the seed needs only an xor and an
    # odd multiplier: a bijection whose high bits pick the bin and low bits the value
    salt, multiplier = splitmix64(np.array([seed, seed + 1], dtype=np.uint64))
    with np.errstate(over="ignore"):
        mixed = shingles.hashes ^ salt
        np.multiply(mixed, multiplier | np.uint64(1), out=mixed)
        values = mixed.astype(np.uint32)
        np.bitwise_and(values, np.uint32(0x7FFFFFFF), out=values)
        # bin = (high 32 bits * num_bins) >> 32, for any num_bins
        np.right_shift(mixed, _MASK32, out=mixed)
        np.multiply(mixed, np.uint64(num_bins), out=mixed)
        np.right_shift(mixed, _MASK32, out=mixed)
        key = mixed.view(np.int64)
        key += np.repeat(np.arange(n_docs, dtype=np.int64) * num_bins, counts)
    np.minimum.at(result, key, values)
    return result.reshape(n_docs, num_bins)


def densify(bins: np.ndarray, seed: int = 1) -> np.ndarray:
    """Fill the empty bins of oph_bins so every position is comparable (Shrivastava and Li
    2014, "Improved densification of one permutation hashing"): each bin position has a
    seeded direction, and an empty bin takes the value of the nearest filled bin that way
    (circularly), marked with the distance and the top bit, so a borrowed value only
    matches a value borrowed from the same distance. Two texts with the same shingles get
    the same signature; the chance two texts agree at a position stays their Jaccard
    similarity. Rows with no shingle at all stay all 0xFFFFFFFF.
    """
    n_docs, k = bins.shape
    out = bins.copy()
    right = np.random.Generator(np.random.PCG64(seed)).random(k) < 0.5
    positions = np.arange(k, dtype=np.int16)
    far = np.int16(4 * k)
    needs = np.flatnonzero((bins == _EMPTY).any(axis=1) & (bins != _EMPTY).any(axis=1))
    with np.errstate(over="ignore"):
        for start in range(0, len(needs), _DENSIFY_ROWS):
            rows = needs[start : start + _DENSIFY_ROWS]
            block = bins[rows]
            filled = block != _EMPTY
            # nearest filled position >= i; past the last one, wrap to the first (+ k)
            nxt = np.where(filled, positions, far)
            nxt = np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1]
            np.putmask(nxt, nxt == far, np.broadcast_to(nxt[:, :1] + k, nxt.shape))
            # nearest filled position <= i; before the first one, wrap to the last (- k)
            prv = np.where(filled, positions, -far)
            prv = np.maximum.accumulate(prv, axis=1)
            np.putmask(prv, prv == -far, np.broadcast_to(prv[:, -1:] - k, prv.shape))
            source = np.where(right, nxt, prv)
            distance = np.abs(source - positions).astype(np.uint32)
            source %= k
            borrowed = np.take_along_axis(block, source.astype(np.intp), axis=1)
            borrowed += distance * np.uint32(0x9E3779B1)
            borrowed &= np.uint32(0x7FFFFFFE)
            borrowed |= np.uint32(0x80000000)
            out[rows] = np.where(filled, block, borrowed)
    return out


def oph_signatures(shingles: Shingles, num_bins: int = 128, seed: int = 1) -> np.ndarray:
    """Densified one-permutation-hashing signatures, shape (texts, num_bins): a drop-in for
    signatures() at a fraction of the cost (empty texts get all 0xFFFFFFFF)."""
    return densify(oph_bins(shingles, num_bins, seed), seed)


def band_keys(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit key per text for a band: its ``rows`` values folded and mixed.

    Distinct values may collide on a key with probability about 2**-64; a collision only
    adds a candidate, which verification then rejects.
    """
    values = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.full(len(sig), band, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(rows):
            key = splitmix64(key * _FOLD + values[:, column])
    return key


def band_candidates(
    sig: np.ndarray,
    bands: int,
    rows: int,
    max_bucket: int = 64,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Candidate pairs (i, j), i < j, whose signatures agree on every row of some band.

    Only the first ``max_bucket`` members of a bucket (by index) are paired with every
    other member, so a huge bucket costs at most ``max_bucket`` pairs per member. Empty
    texts (all-max signatures) are never candidates. With ``groups`` (one label per text)
    only texts of the same group are paired: what a filter on the result would keep, but
    never held in memory. Pairs come sorted, each once.
    """
    if bands * rows > sig.shape[1]:
        raise ValueError(
            f"{bands} bands x {rows} rows need {bands * rows} permutations, "
            f"but the signatures have {sig.shape[1]}"
        )
    usable = np.flatnonzero(sig[:, 0] != np.iinfo(np.uint32).max)
    sig = sig[usable]
    group = None if groups is None else np.asarray(groups)[usable]
    # each band's pairs as packed keys i << 32 | j: de-duplicated by one sort of integers
    packed = [
        capped_bucket_pairs(band_keys(sig, band, rows), max_bucket, group) for band in range(bands)
    ]
    merged = np.concatenate(packed) if packed else np.empty(0, np.uint64)
    del packed  # the bands' arrays, before the sort
    keys = sorted_distinct(merged)
    found = np.stack([keys >> _MASK32, keys & np.uint64(0xFFFFFFFF)], axis=1).astype(np.int64)
    return usable[found].reshape(-1, 2)


def capped_bucket_pairs(keys: np.ndarray, max_bucket: int, group: np.ndarray | None) -> np.ndarray:
    """The pairs of texts with equal keys, as packed uint64 ``i << 32 | j`` (i < j): each of
    a bucket's first ``max_bucket`` members with every later member, all buckets at once."""
    order, sorted_keys = _sorted_order(keys)  # a bucket's members in index order
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    shared = ends - starts > 1
    starts, ends = starts[shared], ends[shared]
    heads = np.minimum(ends - starts, max_bucket)
    # one entry per head: its position in `order`, and how many members follow it
    head_at = np.repeat(starts, heads) + _within(heads)
    follow = np.repeat(ends, heads) - head_at - 1
    left = np.repeat(head_at, follow)
    right = left + 1 + _within(follow)
    left, right = order[left], order[right]
    if group is not None:
        same = group[left] == group[right]
        left, right = left[same], right[same]
    return (left.astype(np.uint64) << _MASK32) | right.astype(np.uint64)


def argsort_u64(values: np.ndarray) -> np.ndarray:
    """np.argsort(values, kind="stable") for uint64 values, by one sort of integers.

    numpy's argsort of 64-bit integers is several times slower than its sort (which has a
    vectorised path). So the index is packed into each value's low bits, the packed
    integers sorted, and the indices read back. Small values (such as text numbers) are
    shifted up to make room, which is exact. Large ones (hashes) lose their low bits to the
    index, which sorts by the high bits; where two different values share their high bits
    (rare for hashes: about n**2 / 2**(65 - b) pairs for n values and b index bits), their
    run is sorted again by (value, index), so the result is exactly the stable argsort.
    """
    return _sorted_order(values)[0]


def _sorted_order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argsort_u64(values) and the values in that order."""
    values = np.asarray(values, dtype=np.uint64)
    n = len(values)
    bits = max(int(n - 1).bit_length(), 1)
    if n < 2 or bits > 40:
        order = np.argsort(values, kind="stable")
        return order, values[order]
    index_mask = np.uint64((1 << bits) - 1)
    if int(values.max()).bit_length() + bits <= 64:  # room for the index below the value
        packed = values << np.uint64(bits)
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        order = (packed & index_mask).astype(np.intp)
        return order, packed >> np.uint64(bits)
    # sorted by (high bits, index), beside a sort of the values themselves: the two agree
    # unless a run of equal high bits holds different values, which the values' sort shows
    # as neighbours that differ in their low bits only (rare for hashes). Only those runs
    # are sorted again; no gather of every value in the packed order is needed.
    packed = values & ~index_mask
    packed |= np.arange(n, dtype=np.uint64)
    ordered = values.copy()
    both = (packed, ordered)
    in_threads(lambda which, _: both[which].sort(), [(0, None), (1, None)])
    mixed = _mixed_high_parts(ordered, index_mask)
    starts = np.searchsorted(packed, mixed)
    ends = np.searchsorted(packed, mixed | index_mask, side="right")
    packed &= index_mask
    order = packed.view(np.intp) if np.dtype(np.intp).itemsize == 8 else packed.astype(np.intp)
    del packed
    if len(mixed):
        _resort_runs(order, values, starts, ends)
    return order, ordered


# elements per chunk of the passes below: temporaries of 8 MB, which malloc reuses
_CHUNK = 1 << 20


def _text_chunks(texts: int, shingles: int):
    """Ranges (lo, hi) of ``texts`` texts holding about _CHUNK of their ``shingles``
    shingles each (on average)."""
    step = max(1, _CHUNK * texts // max(shingles, 1))
    for lo in range(0, texts, step):
        yield lo, min(lo + step, texts)


def _mixed_high_parts(ordered: np.ndarray, mask: np.uint64) -> np.ndarray:
    """The high parts (bits outside ``mask``) shared by two different values of the sorted
    ``ordered``: where neighbours differ in their ``mask`` bits only. Sorted, each once."""
    found = [np.empty(0, dtype=np.uint64)]
    for start in range(0, len(ordered) - 1, _CHUNK):
        part = ordered[start : start + _CHUNK + 1]
        step = part[1:] ^ part[:-1]
        found.append(part[:-1][(step != 0) & (step <= mask)] & ~mask)
    return np.unique(np.concatenate(found))


def _resort_runs(order: np.ndarray, values: np.ndarray, starts, ends) -> None:
    """argsort_u64's repair, in place: the runs ``order[starts[r]:ends[r]]`` (equal high
    bits, in index order) sorted again by (value, index)."""
    counts = ends - starts
    at = np.repeat(starts, counts) + _within(counts)
    run = np.repeat(np.arange(len(counts)), counts)
    index = order[at]
    # runs are contiguous and ordered, so sorting their positions by (run, value, index)
    # keeps every run in its place
    order[at] = index[np.lexsort((index, values[index], run))]


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted: np.unique by one sort (numpy's unique may take a
    slower hash-based path for integers). ``values`` is sorted in place."""
    values.sort()
    return _distinct_of_sorted(values)


def _distinct_of_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values of the sorted ``values``."""
    if len(values) == 0:
        return values
    first = np.empty(len(values), dtype=bool)
    first[0] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first]


def workers() -> int:
    """Threads for the near stage's loops over blocks: one per CPU this process may use, at
    most 4 (numpy's sorts, gathers, searches and counts release the GIL)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(4, len(usable) if usable else os.cpu_count() or 1))


def in_threads(work, bounds) -> None:
    """``work(lo, hi)`` for every ``(lo, hi)`` in ``bounds``, over ``workers()`` threads;
    each call must write only its own part of any shared output."""
    bounds = list(bounds)
    count = min(workers(), len(bounds))
    if count <= 1:
        for lo, hi in bounds:
            work(lo, hi)
        return
    with ThreadPoolExecutor(max_workers=count) as pool:
        for _ in pool.map(lambda bound: work(*bound), bounds):
            pass


def ahead(function, items, depth: int | None = None):
    """``function(item)`` for each item, in order, made up to ``depth`` items (default
    ``workers()``) ahead in threads: the caller handles one result while the next ones are
    being made."""
    items = iter(items)
    count = min(workers(), depth or workers())
    if count <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=count) as pool:
        pending = [pool.submit(function, item) for _, item in zip(range(count), items)]
        while pending:
            done = pending.pop(0).result()
            for item in items:
                pending.append(pool.submit(function, item))
                break
            yield done


def _within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c - 1 for each count c, concatenated."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


# candidate pairs compared per block: two (block x num_perm) uint32 arrays of a few MB
_ESTIMATE_BLOCK = 16384

ESTIMATE_MARGIN = 0.15
"""Before the exact Jaccard (verify="exact"), candidates whose MinHash estimate is more
than this below the threshold are dropped unverified. With 128 signature values the
estimate's standard error is about sqrt(J(1 - J) / 128): 0.041 at the default threshold 0.7,
so a pair exactly at the threshold falls this far below it about once in 10,000 (3.7
standard errors, by the normal approximation)."""


def fingerprints(sig: np.ndarray) -> np.ndarray:
    """One byte per signature value (the top byte of the value times an odd constant):
    equal values have equal bytes, so counting equal bytes bounds the estimate from above,
    reading a quarter of the memory (estimates_at_least)."""
    with np.errstate(over="ignore"):
        return ((sig * np.uint32(0x9E3779B1)) >> np.uint32(24)).astype(np.uint8)


def estimates_at_least(
    sig: np.ndarray, pairs: np.ndarray, bound: float, prints: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs have a MinHash estimate >= bound, and those estimates: the same as
    ``estimated_jaccard(sig, pairs) >= bound``. The fingerprints' count of equal positions
    is never below the signatures' (equal values, equal bytes), so pairs whose fingerprint
    estimate is below the bound are left out exactly, and only the rest are counted on the
    full signatures. ``prints``: fingerprints(sig), when already made."""
    prints = fingerprints(sig) if prints is None else prints
    maybe = np.flatnonzero(estimated_jaccard(prints, pairs) >= bound)
    estimate = estimated_jaccard(sig, pairs[maybe])
    passed = estimate >= bound
    keep = np.zeros(len(pairs), dtype=bool)
    keep[maybe[passed]] = True
    return keep, estimate[passed]


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """MinHash estimate of the Jaccard similarity of each candidate pair."""
    estimate = np.empty(len(pairs))

    def blocks(lo: int, hi: int) -> None:
        for start in range(lo, hi, _ESTIMATE_BLOCK):
            block = pairs[start : min(start + _ESTIMATE_BLOCK, hi)]
            equal = np.count_nonzero(sig[block[:, 0]] == sig[block[:, 1]], axis=1)
            estimate[start : start + len(block)] = equal / sig.shape[1]

    # a few long runs of blocks, one per thread
    step = max(_ESTIMATE_BLOCK, -(-len(pairs) // (workers() * _ESTIMATE_BLOCK)) * _ESTIMATE_BLOCK)
    in_threads(blocks, ((lo, min(lo + step, len(pairs))) for lo in range(0, len(pairs), step)))
    return estimate


# shingles looked up per block of pairs in exact_jaccard: the larger texts' keys of a block
# (its pairs sorted by larger text) are then a stretch of a few hundred KB, searched in cache
_LOOKUP_BLOCK = 1 << 16


def _text_shingle_keys(shingles: Shingles) -> tuple[np.ndarray, int]:
    """Each text's distinct shingles as sorted keys ``text << bits | shingle number``
    (shingles numbered in order of first appearance, fewer than ``2**bits`` of them), and
    bits.

    This is the near stage's largest allocation, made once per partition of candidates.
    The numbers come from Arrow's hash table (dictionary_encode), not a sort of every
    hash: any numbering shared by all texts will do, and on dense corpora the hashes
    repeat (850k dense pairs: 42M shingles, 2.6M distinct; 3-4x faster than sorting them).
    The texts' bits are then added and each chunk of texts sorted on its own, in threads."""
    codes = pc.dictionary_encode(pa.array(shingles.hashes, type=pa.uint64())).indices
    number = codes.to_numpy(zero_copy_only=False).astype(np.uint64)
    del codes
    bits = max(int(number.max(initial=0)).bit_length(), 1)
    offsets = shingles.offsets

    distinct: dict[int, int] = {}  # of each chunk of texts (by its first text): its keys

    def keyed(lo: int, hi: int) -> None:
        part = number[offsets[lo] : offsets[hi]]
        part |= np.repeat(
            np.arange(lo, hi, dtype=np.uint64) << np.uint64(bits), np.diff(offsets[lo : hi + 1])
        )
        part.sort()
        own = _distinct_of_sorted(part)
        part[: len(own)] = own
        distinct[lo] = len(own)

    # text t's keys lie in [t << bits, (t + 1) << bits), so each chunk of texts is sorted
    # and de-duplicated on its own (in cache, over threads), its keys moved to its start;
    # then the chunks' keys are moved together
    chunks = list(_text_chunks(len(shingles), len(number)))
    in_threads(keyed, chunks)
    end = 0
    for lo, _ in chunks:
        start, size = offsets[lo], distinct[lo]
        if start != end:
            number[end : end + size] = number[start : start + size]
        end += size
    return number[:end], bits


class ShingleSets:
    """Each text's distinct shingles, sorted once (keys ``text << bits | shingle number``),
    to compute exact Jaccard similarities of many pairs of them, in one call or several."""

    def __init__(self, shingles: Shingles):
        self.keys, self.bits = _text_shingle_keys(shingles)
        # text t's keys are those in [t << bits, (t + 1) << bits)
        bounds = np.searchsorted(
            self.keys, np.arange(len(shingles) + 1, dtype=np.uint64) << np.uint64(self.bits)
        )
        self.starts, self.sizes = bounds[:-1], np.diff(bounds)

    def jaccard(self, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard similarity of each pair of texts (rows of ``pairs``)."""
        if len(pairs) == 0:
            return np.empty(0)
        keys, bits, sizes, starts = self.keys, np.uint64(self.bits), self.sizes, self.starts
        number = np.uint64((1 << self.bits) - 1)
        a, b = pairs[:, 0], pairs[:, 1]
        small = np.where(sizes[a] <= sizes[b], a, b)
        large = np.where(sizes[a] <= sizes[b], b, a)
        # pairs taken by their larger text, so a block of them looks its shingles up in one
        # short stretch of keys (the larger texts' own), in cache, not anywhere in them
        by_large = argsort_u64(large.astype(np.uint64))
        small, large = small[by_large], large[by_large]
        intersection = np.zeros(len(pairs), dtype=np.int64)
        looked_up = np.cumsum(sizes[small])
        cuts = np.searchsorted(looked_up, np.arange(0, looked_up[-1], _LOOKUP_BLOCK), side="right")

        def block(lo: int, hi: int) -> None:
            if hi <= lo:
                return
            counts = sizes[small[lo:hi]]
            at = np.repeat(starts[small[lo:hi]], counts) + _within(counts)
            first, last = large[lo], large[hi - 1]
            stretch = keys[starts[first] : starts[last] + sizes[last]]
            wanted = np.repeat(large[lo:hi].astype(np.uint64) << bits, counts)
            wanted |= keys[at] & number
            place = np.searchsorted(stretch, wanted)
            np.minimum(place, len(stretch) - 1, out=place)
            hit = stretch[place] == wanted
            intersection[lo:hi] = np.bincount(
                np.repeat(np.arange(hi - lo), counts)[hit], minlength=hi - lo
            )

        in_threads(block, zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(pairs)].tolist()))
        intersection[by_large] = intersection.copy()
        union = sizes[a] + sizes[b] - intersection
        return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def exact_jaccard(shingles: Shingles, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of each pair, all pairs at once.

    Each text's distinct shingles are sorted once, as keys ``text * V + shingle number``
    (V distinct shingles); a pair's intersection is then found by looking each shingle of
    its smaller text up among the larger text's keys (binary search), so the cost follows
    the pairs' smaller sides, with no sort per pair. Two empty texts have similarity 1.
    """
    if len(pairs) == 0:
        return np.empty(0)
    return ShingleSets(shingles).jaccard(pairs)


OPEN, KEPT, DROPPED = 0, 1, 2


@dataclass
class DropState:
    """What verify_for_dropping knows of each text: ``status`` OPEN, KEPT or DROPPED, and
    ``similar_kept``: a kept earlier text was verified similar to it (carried from one
    batch of pairs to the next)."""

    status: np.ndarray  # int8, (texts,)
    similar_kept: np.ndarray  # bool, (texts,)

    @classmethod
    def of(cls, n: int) -> DropState:
        return cls(np.zeros(n, dtype=np.int8), np.zeros(n, dtype=bool))


def verify_for_dropping(
    candidates: np.ndarray,
    similarity_of,
    threshold: float,
    state: DropState,
    settle_below: int,
    rounds: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """Verify candidate pairs for the drop rule, leaving out the pairs that cannot matter.

    The rule (hhdata.dedup, ``near_action="drop"``): texts are visited in index order and
    text j is dropped when an earlier *kept* text i is similar to it (>= threshold), onto
    the most similar such i. A pair whose first text is dropped decides nothing, so it is
    not verified. Which texts are dropped is learnt as pairs are verified, in rounds: each
    round settles every text whose earlier pairs are all settled (dropped if one of them
    joins it to a kept text; kept if none), then verifies the pairs whose first text is kept.
    After ``rounds`` rounds the pairs still open are verified at once, and the texts below
    ``settle_below`` settled one by one.

    ``candidates`` are sorted pairs (i, j), i < j, whose every pair with second text below
    ``settle_below`` is among them or was given in an earlier call with the same ``state``
    (batches of increasing first texts, as hhdata.dedup.spill's partitions). ``similarity_of``
    maps an array of pairs to their similarities. Returns (verified, similarity): a mask of
    the pairs verified and their similarities (0 where not verified). Every pair whose first
    text is kept under the rule is verified, so the rule drops the same texts onto the same
    texts with the same similarities from the verified pairs as from all of them.
    """
    m = len(candidates)
    verified, similarity = np.zeros(m, dtype=bool), np.zeros(m)
    first, second = candidates[:, 0], candidates[:, 1]
    status, similar_kept = state.status, state.similar_kept
    n = len(status)
    settled = np.zeros(m, dtype=bool)  # the pair's part in its second text's fate is known
    below = np.arange(n) < settle_below
    for _ in range(rounds):
        open_pairs = np.bincount(second[~settled], minlength=n)
        newly = (status == OPEN) & below & (similar_kept | (open_pairs == 0))
        status[newly] = np.where(similar_kept[newly], DROPPED, KEPT)
        settled |= status[first] == DROPPED
        todo = ~verified & (status[first] == KEPT)
        similarity[todo] = similarity_of(candidates[todo])
        verified |= todo
        settled |= todo
        joined = todo & (similarity >= threshold)
        similar_kept[second[joined]] = True
        if not (status[first] == OPEN).any():
            break
    # the rest at once: every pair whose first text may still be kept
    todo = ~verified & (status[first] != DROPPED)
    similarity[todo] = similarity_of(candidates[todo])
    verified |= todo
    _settle_in_order(candidates, verified & (similarity >= threshold), state, settle_below)
    return verified, similarity


def _settle_in_order(candidates, similar, state: DropState, settle_below: int) -> None:
    """Settle the open texts below ``settle_below`` one by one in index order, and mark the
    texts that ``similar`` pairs join to a kept text; every pair whose first text is not
    dropped has been verified, so each open text's earlier kept neighbours are known."""
    status, similar_kept = state.status, state.similar_kept
    pairs = candidates[similar]
    by_second = np.argsort(pairs[:, 1], kind="stable")
    pairs = pairs[by_second]
    ends = np.searchsorted(pairs[:, 1], np.arange(settle_below + 1))
    for text in np.flatnonzero(status[:settle_below] == OPEN).tolist():
        earlier = pairs[ends[text] : ends[text + 1], 0]
        dropped = similar_kept[text] or bool((status[earlier] == KEPT).any())
        status[text] = DROPPED if dropped else KEPT
    joined = pairs[status[pairs[:, 0]] == KEPT, 1]
    similar_kept[joined] = True


def similar_pairs(
    texts,
    *,
    shingle_size: int = 3,
    num_perm: int = 128,
    bands: int = 16,
    rows: int = 8,
    threshold: float = 0.7,
    verify: str = "exact",
    seed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of texts (i, j), i < j, whose word-shingle Jaccard similarity is >= threshold.

    Returns (pairs, similarity). ``verify="estimate"`` keeps candidates by the MinHash
    estimate alone; ``"exact"`` (default) then confirms each with the exact Jaccard of the
    shingle sets, dropping candidates whose estimate is more than ESTIMATE_MARGIN (0.15)
    below the threshold without computing it.

    >>> text = "how do i bake a loaf of bread at home without a bread machine"
    >>> pairs, sim = similar_pairs([text, text + " please", "dogs bark"])
    >>> pairs.tolist()
    [[0, 1]]
    """
    if verify not in ("exact", "estimate"):
        raise ValueError(f"verify must be 'exact' or 'estimate', not {verify!r}")
    shingles = word_shingles(texts, shingle_size)
    return similar_in_sketch(
        Sketch(shingles, signatures(shingles, num_perm, seed)),
        bands=bands,
        rows=rows,
        threshold=threshold,
        verify=verify,
    )


def similar_in_sketch(
    sketch: Sketch,
    *,
    bands: int = 16,
    rows: int = 8,
    threshold: float = 0.7,
    verify: str = "exact",
    groups: np.ndarray | None = None,
    drop_rule: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """similar_pairs on texts already shingled and signed (LSH, then verification).

    With ``groups`` (one label per text) only texts of the same group can be similar;
    the others are never verified. With ``drop_rule`` (and exact verification) the pairs
    whose first text the drop rule drops may be left out (verify_for_dropping): what
    hhdata.dedup's drop mode needs, with less work where near duplicates cluster.
    """
    if verify not in ("exact", "estimate"):
        raise ValueError(f"verify must be 'exact' or 'estimate', not {verify!r}")
    sig = sketch.signatures
    candidates = band_candidates(sig, bands, rows, groups=groups)
    if verify == "estimate":
        keep, estimate = estimates_at_least(sig, candidates, threshold)
        return candidates[keep], estimate
    candidates = candidates[estimates_at_least(sig, candidates, threshold - ESTIMATE_MARGIN)[0]]
    texts = np.unique(candidates)
    local = np.searchsorted(texts, candidates)
    if len(local) == 0:
        return candidates, np.empty(0)
    sets = ShingleSets(sketch.shingles_of(texts))
    if drop_rule:
        verified, similarity = verify_for_dropping(
            local, sets.jaccard, threshold, DropState.of(len(texts)), len(texts)
        )
        candidates, similarity = candidates[verified], similarity[verified]
    else:
        similarity = sets.jaccard(local)
    keep = similarity >= threshold
    return candidates[keep], similarity[keep]


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label of each of n items under the given edges: the smallest member index.

    Vectorised label propagation: every edge lowers the label of both ends' labels to the
    smaller of the two, then labels jump to their label's label until they stop moving;
    repeated until every edge joins equal labels. A label is always a member of its item's
    component and never rises, so the smallest member ends as the label of all.

    >>> connected_components(4, np.array([[1, 3]])).tolist()
    [0, 1, 2, 1]
    """
    labels = np.arange(n, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    while len(pairs):
        low = np.minimum(labels[a], labels[b])
        np.minimum.at(labels, labels[a], low)
        np.minimum.at(labels, labels[b], low)
        while True:
            jumped = labels[labels]
            if (jumped == labels).all():
                break
            labels = jumped
        joined = labels[a] == labels[b]
        if joined.all():
            break
        a, b = a[~joined], b[~joined]
        pairs = pairs[~joined]
    return labels
