"""The near stage in bounded memory: sketches kept on disk, candidates in partitions.

hhdata.dedup.minhash.similar_in_sketch holds every text's shingles and signatures and
every band's candidate pairs at once; at ten times HH-RLHF's size that is over 10 GB.
Here the same answer is reached in pieces (docs/dedup.md, "Large tables"):

1. **Sketch in row batches** (``SpilledSketch.append``): each batch's full shingles and
   signatures go to two files in a temporary folder, and each band's 64-bit key to one
   file per band; only the shingle offsets stay in memory.
2. **Band, then partition** (``partitioned_candidates``): one band at a time, the texts'
   keys are read back and each bucket's pairs made exactly as minhash.band_candidates
   makes them (capped buckets, same groups) and counted per first text; then every pair
   ``i << 32 | j`` goes to the file of the partition that holds ``i`` (partitions are
   ranges of ``i`` cut to hold about as many pairs each).
3. **Verify per partition** (``verified_partitions``): a partition's pairs are sorted and
   de-duplicated, estimated from the signatures on disk, and the survivors' exact Jaccard
   is computed from the shingles of just the texts involved, read back from disk.

Partitions are ranges of the first index, so their sorted pairs concatenate into the
sorted pairs similar_in_sketch returns: the same pairs and similarities, in the same order
(tests/test_dedup.py compares both paths). The files are read through memory maps whose
pages are handed back after each band or partition, so the resident set stays bounded.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from hhdata import memory
from hhdata.dedup import minhash

_EMPTY_SIGNATURE = np.iinfo(np.uint32).max
_LOW32 = np.uint64(0xFFFFFFFF)


class _Mapped:
    """A read-only memory map of a file as a numpy array; ``release`` hands its resident
    pages back to the kernel (they stay in the page cache, and are read again if used)."""

    def __init__(self, path: Path, dtype, width: int = 1):
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), size, prot=mmap.PROT_READ) if size else None
        flat = np.frombuffer(self._map, dtype=dtype) if size else np.empty(0, dtype)
        self.array = flat.reshape(-1, width) if width > 1 else flat

    def release(self) -> None:
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None
        if self._map is not None:
            self._map.close()
        self._file.close()


class SpilledSketch:
    """Shingles, signatures and band keys of every row, written batch by batch to
    ``folder``; rows must be appended in order. Call ``finish`` before reading."""

    def __init__(self, folder: Path, bands: int, rows: int, num_perm: int):
        self.folder = Path(folder)
        self.bands, self.rows, self.num_perm = bands, rows, num_perm
        self._band_files = [open(self.folder / f"band-{b:03d}.u64", "wb") for b in range(bands)]
        self._signature_file = open(self.folder / "signatures.u32", "wb")
        self._print_file = open(self.folder / "fingerprints.u8", "wb")
        self._shingle_file = open(self.folder / "shingles.u64", "wb")
        self._offsets = [np.zeros(1, dtype=np.int64)]
        self._turns: list[np.ndarray] = []
        self._signatures: _Mapped | None = None
        self._prints: _Mapped | None = None
        self._shingles: _Mapped | None = None

    def append(self, sketch: minhash.Sketch, turns: np.ndarray) -> None:
        """Add a batch of rows: their sketch (full shingles reachable by shingles_of) and
        their number of prompt turns."""
        for band, handle in enumerate(self._band_files):
            minhash.band_keys(sketch.signatures, band, self.rows).tofile(handle)
        np.ascontiguousarray(sketch.signatures).tofile(self._signature_file)
        minhash.fingerprints(sketch.signatures).tofile(self._print_file)
        shingles = sketch.shingles_of(np.arange(len(sketch)))
        shingles.hashes.tofile(self._shingle_file)
        self._offsets.append(self._offsets[-1][-1] + shingles.offsets[1:])
        self._turns.append(np.asarray(turns, dtype=np.int64))

    def finish(self) -> SpilledSketch:
        """Close the files for writing and map the signatures and shingles for reading."""
        for handle in [
            *self._band_files,
            self._signature_file,
            self._print_file,
            self._shingle_file,
        ]:
            handle.close()
        self.offsets = np.concatenate(self._offsets)
        self.turns = np.concatenate(self._turns) if self._turns else np.zeros(0, np.int64)
        del self._offsets, self._turns
        self._signatures = _Mapped(self.folder / "signatures.u32", np.uint32, self.num_perm)
        self._prints = _Mapped(self.folder / "fingerprints.u8", np.uint8, self.num_perm)
        self._shingles = _Mapped(self.folder / "shingles.u64", np.uint64)
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def band(self, band: int) -> np.ndarray:
        """Every row's key in one band (read whole: 8 bytes a row)."""
        return np.fromfile(self.folder / f"band-{band:03d}.u64", dtype=np.uint64)

    def signature_map(self) -> np.ndarray:
        """Every row's signature, mapped from the file (pages read as they are used)."""
        return self._signatures.array

    def fingerprint_map(self) -> np.ndarray:
        """Every row's signature fingerprints (minhash.fingerprints), mapped from the file."""
        return self._prints.array

    def nonempty(self, rows: np.ndarray) -> np.ndarray:
        """Whether each given row has any shingle (empty texts are never candidates)."""
        return np.diff(self.offsets)[rows] > 0

    def shingles_of(self, rows: np.ndarray) -> minhash.Shingles:
        """All shingles of the given rows, in that order, copied into memory."""
        return minhash.Shingles(self._shingles.array, self.offsets).take(rows)

    def release(self) -> None:
        """Hand back the pages of the mapped files read so far."""
        for mapped in (self._signatures, self._prints, self._shingles):
            if mapped is not None:
                mapped.release()

    def close(self) -> None:
        for mapped in (self._signatures, self._prints, self._shingles):
            if mapped is not None:
                mapped.close()


def partitioned_candidates(
    spilled: SpilledSketch,
    texts: np.ndarray,
    groups: np.ndarray | None,
    pairs_per_partition: int,
    folder: Path,
    max_bucket: int = 64,
) -> list[Path]:
    """minhash.band_candidates over the rows ``texts`` of a spilled sketch (text t is row
    ``texts[t]``), written to files of packed pairs ``i << 32 | j`` by ranges of ``i``
    (pairs may repeat across bands: each file is de-duplicated when read).

    The ranges are cut so each file holds about ``pairs_per_partition`` pairs: a bucket's
    pairs all start at its first members, so equal ranges would put most pairs in the
    first. Each band's pairs are made once, counted per ``i`` and kept in a file of their
    own, then routed.
    """
    folder = Path(folder)
    usable = np.flatnonzero(spilled.nonempty(texts))
    group = None if groups is None else np.asarray(groups)[usable]
    pairs_from = np.zeros(len(texts) + 1, dtype=np.int64)  # pairs whose first text is i
    band_paths = []

    def band_pairs(band: int) -> tuple[np.ndarray, np.ndarray]:
        packed = minhash.capped_bucket_pairs(spilled.band(band)[texts[usable]], max_bucket, group)
        return usable[(packed >> np.uint64(32)).astype(np.int64)], usable[
            (packed & _LOW32).astype(np.int64)
        ]

    # the next bands' pairs are made in threads while this one's are counted and written
    for band, (first, second) in enumerate(minhash.ahead(band_pairs, range(spilled.bands))):
        pairs_from[1:] += np.bincount(first, minlength=len(texts))
        band_paths.append(folder / f"band-pairs-{band:03d}.u64")
        ((first.astype(np.uint64) << np.uint64(32)) | second.astype(np.uint64)).tofile(
            band_paths[-1]
        )
        del first, second
    # partition p holds first indices in [bounds[p], bounds[p + 1]): cut where the running
    # count of pairs passes each multiple of the budget
    cumulative = np.cumsum(pairs_from)
    budget = max(pairs_per_partition, 1)
    targets = np.arange(budget, int(cumulative[-1]), budget)
    cut = np.searchsorted(cumulative, targets, side="right") - 1
    bounds = np.unique(np.r_[0, cut, len(texts)])
    paths = [folder / f"candidates-{p:05d}.u64" for p in range(len(bounds) - 1)]
    handles = [open(path, "wb") for path in paths]
    try:
        for band_path in band_paths:
            pairs = np.fromfile(band_path, dtype=np.uint64)
            band_path.unlink()
            where = np.searchsorted(bounds, (pairs >> np.uint64(32)).astype(np.int64), "right")
            # few partitions: a stable radix sort of small integers groups the pairs
            where = where.astype(np.int16 if len(paths) < 1 << 15 else np.int64)
            order = np.argsort(where, kind="stable")
            edges = np.searchsorted(where[order], np.arange(1, len(paths) + 2))
            pairs = pairs[order]
            del where, order
            for p, handle in enumerate(handles):
                pairs[edges[p] : edges[p + 1]].tofile(handle)
    finally:
        for handle in handles:
            handle.close()
    return paths


def verified_partitions(
    spilled: SpilledSketch,
    texts: np.ndarray,
    paths: list[Path],
    threshold: float,
    verify: str,
    drop_rule: bool = False,
    shared_shingles: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates in the partition files verified as minhash.similar_in_sketch does
    (estimate, then exact Jaccard unless ``verify='estimate'``; with ``drop_rule``, pairs
    whose first text the drop rule drops may be left out): (pairs, similarity) in text
    indices, sorted, each pair once. Partitions hold increasing ranges of first texts, so
    the drop rule's knowledge carries from one to the next.

    Each partition is read, de-duplicated and estimated first (the next one in a second
    thread), keeping the pairs whose estimate may reach the threshold (a tenth or less of
    the candidates on dense corpora). Their exact Jaccard needs each text's sorted shingle
    set: made once for the texts of every partition when they have at most
    ``shared_shingles`` shingles in all, else per partition, one after the other (texts
    shared by several partitions are then sorted once for each: about twice the work at
    850k dense pairs, in less memory).
    """

    def estimated(path: Path) -> tuple[np.ndarray, np.ndarray]:
        packed = minhash.sorted_distinct(np.fromfile(path, dtype=np.uint64))
        path.unlink()
        candidates = np.stack([packed >> np.uint64(32), packed & _LOW32], axis=1).astype(np.int64)
        del packed
        bound = threshold if verify == "estimate" else threshold - minhash.ESTIMATE_MARGIN
        keep, estimate = _estimates_at_least(spilled, texts, candidates, bound)
        spilled.release()
        return candidates[keep], estimate

    passing = list(minhash.ahead(estimated, paths, depth=1))
    if verify == "estimate":
        return _joined(passing)
    passing = [candidates for candidates, _ in passing if len(candidates)]
    state = minhash.DropState.of(len(texts)) if drop_rule else None
    needed = np.unique(np.concatenate(passing)) if passing else np.empty(0, np.int64)
    if int(np.diff(spilled.offsets)[texts[needed]].sum()) <= shared_shingles:
        sets = minhash.ShingleSets(spilled.shingles_of(texts[needed]))
        spilled.release()
        ready = ((candidates, needed, sets) for candidates in passing)
    else:

        def prepared(candidates: np.ndarray):
            own = np.unique(candidates)
            memory.give_back()  # what malloc keeps free of the last partition's arrays
            sets = minhash.ShingleSets(spilled.shingles_of(texts[own]))
            spilled.release()
            return candidates, own, sets

        ready = map(prepared, passing)
    del passing
    return _joined(_verified(*part, threshold, state) for part in ready)


def _joined(parts) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, similarity) of each partition, concatenated."""
    found, similarity = [np.empty((0, 2), np.int64)], [np.empty(0)]
    for pairs, sim in parts:
        found.append(pairs)
        similarity.append(sim)
    return np.concatenate(found), np.concatenate(similarity)


def _verified(candidates, needed, sets, threshold, state=None):
    """A partition's pairs (text indices) kept by their exact similarity, from the shingle
    sets of the texts ``needed`` (sorted; with a minhash.DropState, only the pairs the drop
    rule needs are verified: minhash.verify_for_dropping)."""

    def similarity_of(pairs: np.ndarray) -> np.ndarray:
        return sets.jaccard(np.searchsorted(needed, pairs))

    if state is None:
        similarity = similarity_of(candidates)
    else:
        verified, similarity = minhash.verify_for_dropping(
            candidates, similarity_of, threshold, state, int(candidates[:, 0].max()) + 1
        )
        candidates, similarity = candidates[verified], similarity[verified]
    keep = similarity >= threshold
    return candidates[keep], similarity[keep]


# candidate pairs estimated between hand-backs of the signature file's pages
_ESTIMATE_PAIRS = 1 << 21


def _estimates_at_least(spilled, texts, candidates, bound):
    """minhash.estimates_at_least of the candidates, reading the fingerprints and
    signatures of each block of pairs from the mapped files and handing their pages back
    as it goes."""
    keep, estimates = np.zeros(len(candidates), dtype=bool), [np.empty(0)]
    for start in range(0, len(candidates), _ESTIMATE_PAIRS):
        block = texts[candidates[start : start + _ESTIMATE_PAIRS]]
        passed, estimate = minhash.estimates_at_least(
            spilled.signature_map(), block, bound, spilled.fingerprint_map()
        )
        keep[start : start + len(block)] = passed
        estimates.append(estimate)
        spilled.release()
    return keep, np.concatenate(estimates)
