"""hhdata.dedup.minhash: shingles, signatures, banding, verification against plain Python."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.dedup import minhash

WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "Ä", "x"]), min_size=0, max_size=12)


def python_shingles(text: str, k: int) -> set:
    words = text.lower().split()
    if not words:
        return set()
    if len(words) < k:
        return {tuple(words)}
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def python_jaccard(a: str, b: str, k: int) -> float:
    sa, sb = python_shingles(a, k), python_shingles(b, k)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(WORDS.map(" ".join), min_size=2, max_size=6), k=st.integers(1, 4))
def test_shingle_counts_and_exact_jaccard_match_python_sets(texts, k):
    shingles = minhash.word_shingles(texts, k)
    for index, text in enumerate(texts):
        distinct = np.unique(shingles.hashes[shingles.offsets[index] : shingles.offsets[index + 1]])
        assert len(distinct) == len(python_shingles(text, k))
    pairs = np.array([(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))])
    got = minhash.exact_jaccard(shingles, pairs)
    expected = [python_jaccard(texts[i], texts[j], k) for i, j in pairs.tolist()]
    assert np.allclose(got, expected)


def test_hashes_do_not_depend_on_the_rest_of_the_corpus():
    alone = minhash.word_shingles(["the quick brown fox jumps"], 3)
    among = minhash.word_shingles(["zebra crossing here", "the quick brown fox jumps", ""], 3)
    assert alone.hashes.tolist() == among.hashes[among.offsets[1] : among.offsets[2]].tolist()


@pytest.mark.parametrize(
    "texts",
    [
        ["a" * 63 + " "],  # the data ends on a 64-byte boundary, in whitespace
        ["x", "b" * 62 + "\n"],
        ["a a a", "a" * 124 + "\u00a0 "],
        ["é" + "a" * 61 + " ", "", None],
        ["a b c " * 32],
    ],
)
def test_words_are_the_same_however_the_data_ends(texts):
    """Arrow's utf8_split_whitespace reads past a string that ends in whitespace; for the
    last string that is memory outside the array, and the result changed from call to
    call. word_tokens must give Python's split every time."""
    import pyarrow as pa

    vocabulary = {
        word: minhash.word_tokens([word])[0][0] for t in texts if t for word in t.lower().split()
    }
    expected = [vocabulary[w] for t in texts if t for w in t.lower().split()]
    for _ in range(40):
        tokens, offsets = minhash.word_tokens(pa.array(texts, pa.string()))
        assert tokens.tolist() == expected
        assert np.diff(offsets).tolist() == [len(t.split()) if t else 0 for t in texts]


def test_case_and_spacing_do_not_change_shingles():
    shingles = minhash.word_shingles(["Hello  big\nWorld", "hello big world"], 2)
    assert shingles.hashes[:2].tolist() == shingles.hashes[2:].tolist()


def test_estimate_is_close_to_exact_jaccard():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 500, 200).astype(str).tolist()
    edited = list(base)
    for position in rng.choice(200, 20, replace=False):
        edited[position] = "new"
    texts = [" ".join(base), " ".join(edited)]
    shingles = minhash.word_shingles(texts, 3)
    exact = minhash.exact_jaccard(shingles, np.array([[0, 1]]))[0]
    estimate = minhash.estimated_jaccard(minhash.signatures(shingles, 512), np.array([[0, 1]]))[0]
    assert 0.3 < exact < 0.8
    assert abs(estimate - exact) < 0.06  # 512 permutations: standard error about 0.022


def test_empty_texts_are_never_candidates():
    shingles = minhash.word_shingles(["", "   ", "a b c"], 3)
    sig = minhash.signatures(shingles, 16)
    assert minhash.band_candidates(sig, 4, 4).tolist() == []


def test_long_shared_prefix_is_a_candidate_but_not_verified():
    rng = np.random.default_rng(1)
    prefix = " ".join(rng.integers(0, 10_000, 150).astype(str))
    endings = [" ".join(rng.integers(0, 10_000, 150).astype(str)) for _ in range(2)]
    texts = [
        prefix + " " + endings[0],
        prefix + " " + endings[1],
        prefix + " " + endings[0] + " ok",
    ]
    # loose banding (many bands of one row) makes the hard negative a candidate
    shingles = minhash.word_shingles(texts, 5)
    candidates = minhash.band_candidates(minhash.signatures(shingles, 64), 64, 1)
    assert [0, 1] in candidates.tolist()
    for verify in ("exact", "estimate"):
        pairs, similarity = minhash.similar_pairs(
            texts, shingle_size=5, num_perm=64, bands=64, rows=1, threshold=0.7, verify=verify
        )
        assert pairs.tolist() == [[0, 2]] and similarity[0] > 0.9


def test_bucket_larger_than_max_bucket_still_links_every_member():
    sig = np.zeros((100, 4), dtype=np.uint32)
    pairs = minhash.band_candidates(sig, 1, 4, max_bucket=3)
    components = minhash.connected_components(100, pairs)
    assert set(components.tolist()) == {0}
    assert len(pairs) < 100 * 99 // 2


def test_band_shape_is_checked():
    with pytest.raises(
        ValueError, match="8 bands x 4 rows need 32 permutations, but the signatures have 16"
    ):
        minhash.band_candidates(np.zeros((2, 16), dtype=np.uint32), 8, 4)


def test_signatures_are_seeded():
    shingles = minhash.word_shingles(["one two three four", "five six seven"], 2)
    assert (
        minhash.signatures(shingles, 8, seed=3) == minhash.signatures(shingles, 8, seed=3)
    ).all()
    assert (
        minhash.signatures(shingles, 8, seed=3) != minhash.signatures(shingles, 8, seed=4)
    ).any()


def test_connected_components_label_by_smallest_member():
    labels = minhash.connected_components(6, np.array([[4, 5], [2, 4], [0, 1]]))
    assert labels.tolist() == [0, 0, 2, 3, 2, 2]


def reference_densify(bins: np.ndarray, seed: int) -> np.ndarray:
    """densify by its definition, one bin at a time."""
    k = bins.shape[1]
    right = np.random.Generator(np.random.PCG64(seed)).random(k) < 0.5
    out = bins.copy()
    for row in range(len(bins)):
        filled = [i for i in range(k) if bins[row, i] != 0xFFFFFFFF]
        if not filled:
            continue
        for i in range(k):
            if bins[row, i] != 0xFFFFFFFF:
                continue
            step = 1 if right[i] else -1
            distance = 1
            while bins[row, (i + step * distance) % k] == 0xFFFFFFFF:
                distance += 1
            value = int(bins[row, (i + step * distance) % k])
            out[row, i] = ((value + distance * 0x9E3779B1) & 0x7FFFFFFE) | 0x80000000
    return out


@settings(max_examples=30, deadline=None)
@given(
    texts=st.lists(WORDS.map(" ".join), min_size=1, max_size=8),
    k=st.integers(1, 3),
    bins=st.sampled_from([4, 16, 37]),
    seed=st.integers(0, 5),
)
def test_one_permutation_hashing_fills_every_bin_by_its_definition(texts, k, bins, seed):
    shingles = minhash.word_shingles(texts, k)
    raw = minhash.oph_bins(shingles, bins, seed)
    assert ((raw == 0xFFFFFFFF).all(axis=1) == (shingles.counts() == 0)).all()
    assert (minhash.densify(raw, seed) == reference_densify(raw, seed)).all()
    # the bins of a union are the element-wise minimum (what dedup's pair sketch relies on)
    joined = minhash.word_shingles([texts[0] + " | " + texts[-1]], 1)
    parts = minhash.word_shingles([texts[0], "| " + texts[-1]], 1)
    union = minhash.oph_bins(joined, bins, seed)[0]
    assert (union == minhash.oph_bins(parts, bins, seed).min(axis=0)).all()


def test_one_permutation_estimate_is_unbiased_and_close_for_long_texts():
    """Densified OPH agrees at a position with probability ~ Jaccard, like MinHash."""
    rng = np.random.default_rng(0)
    errors = {5: [], 200: []}
    for n in errors:
        for trial in range(200):
            base = rng.integers(0, 2**40, 2 * n).astype(np.uint64)
            a, b = base[:n], base[n // 4 : n // 4 + n]
            jaccard = len(set(a.tolist()) & set(b.tolist())) / len(
                set(a.tolist()) | set(b.tolist())
            )
            sketch = minhash.Shingles(np.concatenate([a, b]), np.array([0, n, 2 * n]))
            sig = minhash.oph_signatures(sketch, 128, trial)
            errors[n].append((sig[0] == sig[1]).mean() - jaccard)
    assert abs(np.mean(errors[5])) < 0.03 and abs(np.mean(errors[200])) < 0.01
    assert np.std(errors[200]) < 0.05  # MinHash with 128 permutations: ~0.043


def reference_candidates(sig, bands, rows, max_bucket, groups=None) -> list[list[int]]:
    """band_candidates by its definition: dict buckets, each of a bucket's first max_bucket
    members (by index) paired with every later member, pairs of one group only."""
    found = set()
    usable = [i for i in range(len(sig)) if sig[i, 0] != np.iinfo(np.uint32).max]
    for band in range(bands):
        buckets: dict[tuple, list[int]] = {}
        for i in usable:
            buckets.setdefault(tuple(sig[i, band * rows : (band + 1) * rows]), []).append(i)
        for members in buckets.values():
            for head_rank, i in enumerate(members[:max_bucket]):
                for j in members[head_rank + 1 :]:
                    if groups is None or groups[i] == groups[j]:
                        found.add((i, j))
    return [list(pair) for pair in sorted(found)]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 2), min_size=8, max_size=8 * 40),
    max_bucket=st.integers(1, 6),
    grouped=st.booleans(),
)
def test_candidates_follow_the_definition_with_capped_buckets_and_groups(
    values, max_bucket, grouped
):
    sig = np.array(values[: len(values) // 8 * 8], dtype=np.uint32).reshape(-1, 8)
    sig[::5] = np.iinfo(np.uint32).max  # some empty texts
    groups = np.arange(len(sig)) % 2 if grouped else None
    found = minhash.band_candidates(sig, 2, 4, max_bucket=max_bucket, groups=groups)
    assert found.tolist() == reference_candidates(sig, 2, 4, max_bucket, groups)


def test_giant_buckets_of_a_dense_corpus_give_the_defined_candidates_and_verified_pairs():
    # many texts share long stretches (one shared opening, a few endings): buckets far
    # larger than the cap, as in a dense corpus of shared prompts
    rng = np.random.default_rng(5)
    opening = " ".join(rng.integers(0, 50, 60).astype(str))
    endings = [" ".join(rng.integers(0, 10_000, 12).astype(str)) for _ in range(40)]
    texts = [f"{opening} {endings[e]} {endings[f]}" for e, f in rng.integers(0, 40, (300, 2))]
    shingles = minhash.word_shingles(texts, 5)
    sig = minhash.oph_signatures(shingles, 64, seed=2)
    groups = rng.integers(0, 2, len(texts))
    candidates = minhash.band_candidates(sig, 16, 4, max_bucket=8, groups=groups)
    assert candidates.tolist() == reference_candidates(sig, 16, 4, 8, groups)
    assert len(candidates) > 1000
    pairs, similarity = minhash.similar_in_sketch(
        minhash.Sketch(shingles, sig), bands=16, rows=4, threshold=0.8, groups=groups
    )
    # every verified pair is one of the capped candidates, with its exact Jaccard; every
    # capped candidate at or above the threshold (estimate within 0.15) is verified
    expected = {}
    for i, j in minhash.band_candidates(sig, 16, 4, groups=groups).tolist():
        exact = python_jaccard(texts[i], texts[j], 5)
        if exact >= 0.8 and (sig[i] == sig[j]).mean() >= 0.8 - 0.15:
            expected[(i, j)] = exact
    assert dict(zip(map(tuple, pairs.tolist()), similarity.tolist())) == expected
    assert len(expected) > 30


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), edges=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39))))
def test_connected_components_equal_a_plain_union_find(n, edges):
    edges = [(i, j) for i, j in edges if i < n and j < n]
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in edges:
        ri, rj = root(i), root(j)
        parent[max(ri, rj)] = min(ri, rj)
    labels = minhash.connected_components(n, np.array(edges, dtype=np.int64).reshape(-1, 2))
    assert labels.tolist() == [root(i) for i in range(n)]


@settings(max_examples=80, deadline=None)
@given(
    highs=st.lists(st.integers(0, 3), min_size=0, max_size=300),
    lows=st.lists(st.integers(0, 2**12 - 1), min_size=300, max_size=300),
)
def test_argsort_u64_is_the_stable_argsort_even_when_high_bits_tie(highs, lows):
    # few distinct high parts and low parts that differ below the bits the index takes:
    # runs of equal high bits holding different values, the case argsort_u64 repairs
    values = np.array([(h << 60) | low for h, low in zip(highs, lows)], dtype=np.uint64).reshape(-1)
    expected = np.argsort(values, kind="stable")
    assert minhash.argsort_u64(values).tolist() == expected.tolist()
    order, ordered = minhash._sorted_order(values)
    assert order.tolist() == expected.tolist() and ordered.tolist() == values[expected].tolist()


def test_argsort_u64_when_neighbouring_hashes_differ_in_their_lowest_bit():
    # pairs of hashes that differ only in bit 0, the larger one first half of the time: the
    # packed sort (high bits, then index) puts them in index order, which must be repaired
    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64)
    values[1::2] = values[0::2] ^ np.uint64(1)
    expected = np.argsort(values, kind="stable")
    order, ordered = minhash._sorted_order(values)
    assert np.array_equal(order, expected) and np.array_equal(ordered, values[expected])


def test_argsort_u64_on_hashes_with_repeats():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2**63, 5000).astype(np.uint64)[rng.integers(0, 5000, 20_000)]
    assert np.array_equal(minhash.argsort_u64(values), np.argsort(values, kind="stable"))


def drop_rule(n: int, pairs: list[tuple[int, int]], similarity: list[float], threshold: float):
    """hhdata.dedup's drop mode, plainly: texts in index order, each dropped onto its most
    similar earlier kept text (the first such pair on ties), or kept."""
    earlier: dict[int, list[tuple[int, float]]] = {}
    for (i, j), sim in zip(pairs, similarity):
        if sim >= threshold:
            earlier.setdefault(j, []).append((i, sim))
    kept, dropped = set(), {}
    for text in range(n):
        matches = [(sim, i) for i, sim in earlier.get(text, ()) if i in kept]
        if matches:
            sim, i = max(matches, key=lambda match: match[0])
            dropped[text] = (i, sim)
        else:
            kept.add(text)
    return dropped


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 14),
    data=st.data(),
    batches=st.integers(1, 4),
    rounds=st.integers(0, 3),
)
def test_verifying_for_the_drop_rule_leaves_out_only_pairs_that_cannot_matter(
    n, data, batches, rounds
):
    every = [(i, j) for i in range(n) for j in range(i + 1, n)]
    pairs = sorted(data.draw(st.sets(st.sampled_from(every), max_size=len(every))))
    truth = dict(
        zip(
            pairs,
            data.draw(
                st.lists(
                    st.sampled_from([0.2, 0.7, 0.8, 0.9]), min_size=len(pairs), max_size=len(pairs)
                )
            ),
        )
    )
    candidates = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    asked = []

    def similarity_of(chosen):
        asked.extend(map(tuple, chosen.tolist()))
        return np.array([truth[pair] for pair in map(tuple, chosen.tolist())])

    # in batches of increasing first texts, as the spilled partitions come
    state = minhash.DropState.of(n)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, n), min_size=batches - 1, max_size=batches - 1))
    )
    got_pairs, got_sims = [], []
    for low, high in zip([0, *cuts], [*cuts, n]):
        batch = candidates[(candidates[:, 0] >= low) & (candidates[:, 0] < high)]
        if len(batch) == 0:
            continue
        verified, sims = minhash.verify_for_dropping(
            batch, similarity_of, 0.7, state, int(batch[:, 0].max()) + 1, rounds=rounds
        )
        got_pairs += list(map(tuple, batch[verified].tolist()))
        got_sims += sims[verified].tolist()
    assert len(asked) == len(set(asked))  # each pair verified at most once
    assert drop_rule(n, got_pairs, got_sims, 0.7) == drop_rule(n, pairs, list(truth.values()), 0.7)
    expected = drop_rule(n, pairs, list(truth.values()), 0.7)
    # nothing is verified whose first text is dropped by then... and the saving is real
    skipped = set(pairs) - set(asked)
    assert all(i in expected for i, _ in skipped)


def test_verifying_for_the_drop_rule_skips_a_cluster_s_inner_pairs():
    # ten copies of one text: the first is kept, the other nine dropped onto it; the 36
    # pairs among the nine are never verified
    candidates = np.array([(i, j) for i in range(10) for j in range(i + 1, 10)])
    asked = []

    def similarity_of(chosen):
        asked.extend(chosen.tolist())
        return np.full(len(chosen), 0.9)

    state = minhash.DropState.of(10)
    verified, _ = minhash.verify_for_dropping(candidates, similarity_of, 0.7, state, 10)
    assert sorted(map(tuple, asked)) == [(0, j) for j in range(1, 10)]
    assert state.status.tolist() == [minhash.KEPT] + [minhash.DROPPED] * 9


@pytest.mark.parametrize("rounds", [0, 1, 6])
def test_what_the_drop_rule_learns_carries_over_batches(rounds):
    # 1 is dropped onto 0; 1 ~ 3 then joins 3 to a dropped text only, so 3 stays kept and
    # 4, similar to 3, is dropped onto it: the pair (3, 4) in the last batch must be verified
    truth = {(0, 1): 0.9, (1, 3): 0.9, (2, 3): 0.2, (3, 4): 0.8}
    state = minhash.DropState.of(5)
    verified_pairs = []
    for batch in ([(0, 1), (1, 3)], [(2, 3)], [(3, 4)]):
        candidates = np.array(batch)
        verified, sims = minhash.verify_for_dropping(
            candidates,
            lambda chosen: np.array([truth[tuple(p)] for p in chosen.tolist()]),
            0.7,
            state,
            int(candidates[:, 0].max()) + 1,
            rounds=rounds,
        )
        verified_pairs += [tuple(p) for p in candidates[verified].tolist()]
    assert (3, 4) in verified_pairs
    assert drop_rule(5, verified_pairs, [truth[p] for p in verified_pairs], 0.7) == {
        1: (0, 0.9),
        4: (3, 0.8),
    }


@pytest.mark.parametrize("top", [3, 2**20, 2**40, 2**64 - 1])
def test_argsort_u64_of_small_and_large_values(top):
    rng = np.random.default_rng(top % 1000)
    values = rng.integers(0, top, 3000, dtype=np.uint64, endpoint=True)
    assert np.array_equal(minhash.argsort_u64(values), np.argsort(values, kind="stable"))


@pytest.mark.parametrize("bound", [0.0, 0.3, 0.55, 0.7, 1.0])
def test_estimates_at_least_equal_the_estimates_above_the_bound(bound):
    # signatures that agree on a random share of positions, many near the bound
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**32, (400, 64), dtype=np.uint64).astype(np.uint32)
    other = rng.integers(0, 2**32, (400, 64), dtype=np.uint64).astype(np.uint32)
    agree = rng.random((400, 64)) < rng.random((400, 1))
    sig = np.concatenate([base, np.where(agree, base, other)])
    pairs = np.stack([np.arange(400), np.arange(400, 800)], axis=1)
    pairs = np.concatenate([pairs, rng.integers(0, 800, (400, 2))])
    keep, estimate = minhash.estimates_at_least(sig, pairs, bound)
    expected = minhash.estimated_jaccard(sig, pairs)
    assert keep.tolist() == (expected >= bound).tolist()
    assert estimate.tolist() == expected[expected >= bound].tolist()
