"""hhdata.dedup: planted duplicates with known outcomes, laws, and the real harmless-base split."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hhdata import pairs, synth
from hhdata.dedup import DedupSettings, DedupSettingsError, configs, deduplicate, minhash
from hhdata.dedup import run as dedup
from hhdata.errors import SchemaError
from hhdata.io import read
from hhdata.pairs.transcript import parse_transcript, split_pair
from hhdata.schema import family_of


def pair_table(records) -> pa.Table:
    """Canonical pair rows from (chosen, rejected, subset, split) records, via build_pairs."""
    raw = pa.table(
        {
            "subset": [r[2] for r in records],
            "split": [r[3] for r in records],
            "family": [family_of(r[2]) for r in records],
            "chosen": [r[0] for r in records],
            "rejected": [r[1] for r in records],
        }
    )
    table, quarantine = pairs.build_pairs(raw)
    assert quarantine.num_rows == 0
    return table


def long_records(n: int, min_words: int = 40, seed: int = 7) -> list[tuple[str, str]]:
    """n distinct generated pairs whose prompts have at least min_words words."""
    found = []
    for record in synth.generate(20 * n, seed=seed):
        prompt = split_pair(record["chosen"], record["rejected"]).prompt
        if sum(len(t["content"].split()) for t in prompt) >= min_words:
            found.append((record["chosen"], record["rejected"]))
        if len(found) == n:
            return found
    raise AssertionError("not enough long generated prompts")


def shout(text: str) -> str:
    """The transcript upper-cased, speaker tags left as they are."""
    return (
        text.upper().replace("\n\nHUMAN:", "\n\nHuman:").replace("\n\nASSISTANT:", "\n\nAssistant:")
    )


def edit_prompt_word(texts: tuple[str, str], word_index: int, new_word: str) -> tuple[str, str]:
    """Replace one word of the first Human turn in both transcripts (a near duplicate)."""
    chosen, rejected = texts
    first = parse_transcript(chosen)[0]["content"]
    words = first.split(" ")
    words[word_index % len(words)] = new_word
    edited = " ".join(words)
    return chosen.replace(first, edited, 1), rejected.replace(first, edited, 1)


def hard_negative(texts: tuple[str, str], fresh: tuple[str, str]) -> tuple[str, str]:
    """The first 60% of the prompt text, then the ending and replies of another pair."""
    pair = split_pair(*texts)
    prompt_text = "".join(
        f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}"
        for t in pair.prompt
    )
    cut = prompt_text.rfind(" ", 0, int(len(prompt_text) * 0.6))
    other = split_pair(*fresh)
    tail = " ".join(t["content"] for t in other.prompt)
    new_prompt = prompt_text[:cut] + " " + tail + "\n\nAssistant: "
    return new_prompt + other.chosen[0]["content"], new_prompt + other.rejected[0]["content"]


@pytest.fixture(scope="module")
def planted():
    base = long_records(8)
    c, r = base[0]
    records = [(*texts, "helpful-base", "train") for texts in base[:6]]
    cases = {
        "exact": (c, r, "helpful-base", "train"),
        "swapped": (r, c, "helpful-online", "train"),
        "case_space": (
            shout(c).replace(" ", "  "),
            shout(r).replace(" ", "  "),
            "helpful-base",
            "train",
        ),
        "near": (*edit_prompt_word(base[1], 5, "zebra"), "helpful-base", "train"),
        "hard_negative": (*hard_negative(base[2], base[6]), "helpful-base", "train"),
    }
    records += list(cases.values())
    table = pair_table(records)
    ids = table["id"].to_pylist()
    return table, {name: ids[6 + i] for i, name in enumerate(cases)}, ids


def test_planted_duplicates_have_known_outcomes(planted):
    table, case_ids, ids = planted
    result = deduplicate(table)
    drops = {row["id"]: row for row in result.drops.to_pylist()}
    assert drops[case_ids["swapped"]]["reason"] == "exact_duplicate"
    assert drops[case_ids["swapped"]]["kept_id"] == ids[0]
    assert drops[case_ids["case_space"]]["reason"] == "exact_duplicate"
    assert drops[case_ids["near"]]["reason"] == "near_duplicate"
    assert drops[case_ids["near"]]["kept_id"] == ids[1]
    assert 0.7 <= drops[case_ids["near"]]["similarity"] < 1.0
    assert case_ids["hard_negative"] not in drops
    # the exact copy has the same id as its original: one of the two is dropped, pointing at it
    assert Counter(result.drops["reason"].to_pylist()) == {
        "exact_duplicate": 3,
        "near_duplicate": 1,
    }
    assert result.report["dropped_by_reason"] == {"exact_duplicate": 3, "near_duplicate": 1}
    assert result.report["cluster_size_histogram"] == {"1": 5, "2": 1, "4": 1}


def test_prompt_scope_also_finds_the_near_duplicate_and_not_the_hard_negative(planted):
    table, case_ids, _ = planted
    result = deduplicate(table, DedupSettings(near_scope="prompt", threshold=0.5))
    dropped = set(result.drops["id"].to_pylist())
    assert case_ids["near"] in dropped and case_ids["hard_negative"] not in dropped


def test_switches_change_what_counts_as_exact(planted):
    table, case_ids, _ = planted
    strict = DedupSettings(
        lowercase=False, collapse_whitespace=False, reply_order_matters=True, near=False
    )
    dropped = set(deduplicate(table, strict).drops["id"].to_pylist())
    assert case_ids["swapped"] not in dropped and case_ids["case_space"] not in dropped
    assert case_ids["exact"] in dropped


def test_cluster_mode_keeps_near_duplicates_under_one_cluster_id(planted):
    table, case_ids, ids = planted
    result = deduplicate(table, DedupSettings(near_action="cluster"))
    kept = {
        row["id"]: row["cluster_id"] for row in result.kept.select(["id", "cluster_id"]).to_pylist()
    }
    assert kept[case_ids["near"]] == ids[1] == kept[ids[1]]
    assert "near_duplicate" not in result.drops["reason"].to_pylist()
    assert result.report["cluster_size_histogram"] == {"1": 5, "2": 1, "4": 1}


@pytest.mark.parametrize(
    "survivor, order, expected_kept",
    [
        ("first", (), ("helpful-base", "test")),
        ("train_first", (), ("helpful-online", "train")),
        ("subset_order", ("helpful-online",), ("helpful-online", "train")),
        ("subset_order", ("helpful-base",), ("helpful-base", "test")),
    ],
)
def test_which_copy_survives(survivor, order, expected_kept):
    c, r = long_records(1)[0]
    table = pair_table([(c, r, "helpful-base", "test"), (c, r, "helpful-online", "train")])
    result = deduplicate(table, DedupSettings(survivor=survivor, subset_order=order))
    kept = result.kept.to_pylist()
    assert len(kept) == 1 and (kept[0]["subset"], kept[0]["split"]) == expected_kept
    assert result.drops["reason"].to_pylist() == ["exact_duplicate"]


def test_settings_round_trip_through_json():
    settings = DedupSettings(
        survivor="subset_order",
        subset_order=("helpful-base",),
        threshold=0.8,
        degenerate={"empty_reply": "drop"},
    )
    text = json.dumps(settings.to_json())
    assert DedupSettings.from_json(json.loads(text)) == settings


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"survivor": "last"}, "survivor='last' is not one of"),
        ({"bands": 40, "rows": 4}, "bands x rows = 160 exceeds num_perm=128"),
        ({"threshold": 0.0}, "threshold=0.0 must be in (0, 1]"),
        ({"degenerate": {"empty_reply": "ignore"}}, "it must be 'drop' or 'flag'"),
        ({"degenerate": {"too_short": "drop"}}, "unknown degenerate reason 'too_short'"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(changes, message):
    with pytest.raises(DedupSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DedupSettings(**changes)


def test_missing_columns_are_named():
    with pytest.raises(SchemaError, match=r"missing \['subset', 'family', 'split', 'prompt'"):
        deduplicate(pa.table({"id": ["x"]}))


# ---------------------------------------------------------------- laws (Hypothesis)

POOL = long_records(4, min_words=10, seed=11)
VARIANTS = {
    "same": lambda c, r: (c, r),
    "swapped": lambda c, r: (r, c),
    "upper": lambda c, r: (shout(c), shout(r)),
    "spaced": lambda c, r: (c.replace(" ", "   ") + " ", r.replace(" ", "   ")),
    "edited": lambda c, r: edit_prompt_word((c, r), 3, "quokka"),
}
rows_strategy = st.lists(
    st.tuples(
        st.integers(0, len(POOL) - 1),
        st.sampled_from(sorted(VARIANTS)),
        st.sampled_from(["helpful-base", "harmless-base"]),
        st.sampled_from(["train", "test"]),
    ),
    min_size=1,
    max_size=14,
)


def build(rows):
    return pair_table(
        [(*VARIANTS[kind](*POOL[i]), subset, split) for i, kind, subset, split in rows]
    )


@hsettings(max_examples=25, deadline=None)
@given(
    rows=rows_strategy,
    survivor=st.sampled_from(["first", "train_first"]),
    scope=st.sampled_from(["prompt", "pair"]),
)
def test_laws_accounting_and_idempotence(rows, survivor, scope):
    table = build(rows)
    settings = DedupSettings(survivor=survivor, near_scope=scope)
    result = deduplicate(table, settings)
    # kept + dropped = input, as multisets of ids
    assert Counter(result.kept["id"].to_pylist()) + Counter(
        result.drops["id"].to_pylist()
    ) == Counter(table["id"].to_pylist())
    # a duplicate is removed, a degenerate pair filtered: the fate follows the reason's stage
    fates = {"exact_duplicate": "removed", "near_duplicate": "removed"}
    for drop in result.drops.select(["fate", "reason"]).to_pylist():
        assert drop["fate"] == fates.get(drop["reason"], "filtered")
    # every duplicate points at a kept row
    kept_ids = set(result.kept["id"].to_pylist())
    assert set(result.drops["kept_id"].drop_null().to_pylist()) <= kept_ids
    # idempotent: a second pass keeps everything
    again = deduplicate(result.kept.drop_columns(["cluster_id"]), settings)
    assert again.drops.num_rows == 0
    assert again.kept["id"].to_pylist() == result.kept["id"].to_pylist()


# ---------------------------------------------------------------- the real harmless-base test split


def real_records():
    sample = resources.files("hhdata").joinpath("data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
    with gzip.open(sample.open("rb"), "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def shingle_set(words: list[str], size: int = 5) -> set:
    if len(words) < size:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


def test_report_matches_an_independent_count_on_real_harmless_base():
    records = real_records()
    table = pair_table([(r["chosen"], r["rejected"], "harmless-base", "test") for r in records])
    result = deduplicate(table)
    report = result.report

    # independent count, plain Python. Exact: (chosen, rejected) in either order, lower-cased,
    # whitespace collapsed. Near: word 5-shingles of the prompt contents and both replies,
    # Jaccard >= 0.7 against any earlier kept row with as many prompt turns (every pair
    # compared; sets whose sizes
    # differ by more than the threshold allows cannot reach it)
    seen, exact, near, kept_sets = set(), 0, 0, []
    for r in records:
        key = frozenset(
            [" ".join(r["chosen"].lower().split()), " ".join(r["rejected"].lower().split())]
        )
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        pair = split_pair(r["chosen"], r["rejected"])
        words = (
            " ".join(t["content"] for t in pair.prompt + pair.chosen + pair.rejected)
            .lower()
            .split()
        )
        mine = shingle_set(words)
        turns = len(pair.prompt)
        if any(
            turns == other_turns
            and 0.7 * len(other) <= len(mine) <= len(other) / 0.7
            and len(mine & other) >= 0.7 * len(mine | other)
            for other, other_turns in kept_sets
        ):
            near += 1
        else:
            kept_sets.append((mine, turns))
    # degenerate: empty replies, identical replies, turns that do not alternate
    empty = identical = non_alternating = 0
    for r in records:
        pair = split_pair(r["chosen"], r["rejected"])
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        empty += not chosen.strip() or not rejected.strip()
        identical += " ".join(chosen.lower().split()) == " ".join(rejected.lower().split())
        roles = [t["role"] for t in pair.prompt]
        alternates = roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (
            len(roles) % 2
        )
        non_alternating += (
            not alternates
            or len(roles) % 2 == 0
            or "\n\nAssistant: " in chosen
            or "\n\nAssistant: " in rejected
        )

    assert report["input"] == len(records) == 2312
    assert report["dropped_by_reason"].get("exact_duplicate", 0) == exact
    assert report["dropped_by_reason"].get("near_duplicate", 0) == near
    assert report["degenerate_found"] == {
        "identical_replies": identical,
        "empty_reply": empty,
        "prompt_disagrees": 0,
        "non_alternating": non_alternating,
    }
    assert report["kept"] == len(records) - exact - near
    assert (
        sum(int(size) * count for size, count in report["cluster_size_histogram"].items())
        == report["input"]
    )


# ---------------------------------------------------------------- the CLI


def test_cli_dedup_and_leakage(tmp_path, capsys, planted):
    from hhdata.cli import main

    sample = resources.files("hhdata").joinpath("data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
    assert (
        main(
            [
                "dedup",
                str(sample),
                "--report",
                str(tmp_path / "r.json"),
                "--drops",
                str(tmp_path / "d.parquet"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("read 2,312 records: kept 2,312, quarantined 0, dropped 0\n")
    assert json.loads((tmp_path / "r.json").read_text())["input"] == 2312

    table, case_ids, _ = planted
    leaky = table.set_column(
        table.schema.get_field_index("split"),
        "split",
        pa.array(["train"] * (table.num_rows - 1) + ["test"]),
    )
    import pyarrow.parquet as pq

    pq.write_table(leaky, tmp_path / "pairs.parquet")
    assert (
        main(["dedup", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "kept.parquet")])
        == 0
    )
    assert "exact_duplicate: 3\n  near_duplicate: 1\n" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "kept.parquet").num_rows == table.num_rows - 4
    # the hard negative (last row) is in test; its prompt shares only a prefix with train
    assert main(["leakage", str(tmp_path / "pairs.parquet")]) == 0
    swapped = leaky.set_column(
        leaky.schema.get_field_index("split"),
        "split",
        pa.array(["test"] + ["train"] * (table.num_rows - 1)),
    )
    pq.write_table(swapped, tmp_path / "leaky.parquet")
    assert main(["leakage", str(tmp_path / "leaky.parquet")]) == 1
    assert (
        main(
            [
                "leakage",
                str(tmp_path / "leaky.parquet"),
                "--resplit-seed",
                "0",
                "--test-fraction",
                "0.2",
                "--out",
                str(tmp_path / "fixed.parquet"),
            ]
        )
        == 0
    )
    fixed = pq.read_table(tmp_path / "fixed.parquet")
    assert main(["leakage", str(tmp_path / "fixed.parquet")]) == 0
    assert fixed.num_rows == table.num_rows


WORDS = st.sampled_from(["a", "b", "c", "D", "e", "f"])


@hsettings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.lists(WORDS, max_size=7), min_size=1, max_size=3),
            st.lists(WORDS, max_size=4),
            st.lists(WORDS, max_size=4),
        ),
        min_size=1,
        max_size=6,
    )
)
# found by CI: the prompts' data ends in a space on a 64-byte boundary (minhash.split_whitespace)
@example(
    rows=[
        ([["a"] * 7], [], ["a"]),
        ([["a"] * 3, ["a"] * 6], [], []),
        ([["a"] * 3], [], []),
        ([["a"] * 7], [], []),
        ([["a"], ["a"] * 7, []], [], []),
    ]
)
def test_pair_sketch_from_the_prompt_equals_shingling_the_whole_text(rows):
    """The pair's signature is min(prompt's, rest's), its shingles the prompt's and the
    rest's: the same as shingling near_texts directly, short prompts and empty replies too."""

    def turns(contents, first_role="user"):
        roles = [first_role, "assistant"] * len(contents)
        return [{"role": r, "content": " ".join(c)} for r, c in zip(roles, contents)]

    table = pa.table(
        {
            "prompt": [turns(p) for p, _, _ in rows],
            "chosen": [turns([c], "assistant") for _, c, _ in rows],
            "rejected": [turns([r], "assistant") for _, _, r in rows],
        }
    )
    for kind in ("oph", "minhash"):
        settings = DedupSettings(shingle_size=3, num_perm=16, bands=4, rows=4, sketch=kind)
        pair, prompt = dedup.sketches(table, settings)
        for sketch, scope in ((pair, "pair"), (prompt, "prompt")):
            direct = minhash.word_shingles(dedup.near_texts(table, scope), 3)
            assert (sketch.signatures == dedup.signatures_of(direct, settings)).all(), kind
    settings = DedupSettings(shingle_size=3, num_perm=16, bands=4, rows=4)
    pair, prompt = dedup.sketches(table, settings)
    for sketch, scope in ((pair, "pair"), (prompt, "prompt")):
        direct = minhash.word_shingles(dedup.near_texts(table, scope), 3)
        every = sketch.shingles_of(np.arange(len(rows)))
        for row in range(len(rows)):
            mine = set(every.hashes[every.offsets[row] : every.offsets[row + 1]].tolist())
            assert mine == set(
                direct.hashes[direct.offsets[row] : direct.offsets[row + 1]].tolist()
            )


def _bench_corpora():
    """bench/corpora.py (the dense benchmark corpus), imported by path: bench/ is no package."""
    path = Path(__file__).resolve().parents[1] / "bench" / "corpora.py"
    spec = importlib.util.spec_from_file_location("bench_corpora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory):
    """4,000 pairs of each corpus shape: dense (shared turns and prompts, giant LSH
    buckets) and sparse (the synthetic corpus with planted duplicates)."""
    root = tmp_path_factory.mktemp("shapes")
    _bench_corpora().write(4000, 0, "single", root / "dense")
    synth.write_corpus(root / "sparse", 4000, seed=0)
    return {shape: read.read_pairs([root / shape]).table for shape in ("dense", "sparse")}


def _outcome_digest(result, leakage) -> str:
    """sha256 of the kept rows (id, cluster_id, flags), the whole drop log and the leakage
    counts: equal digests, equal decisions."""
    kept = result.kept.select(["id", "cluster_id", "flags"]).to_pylist()
    leaks = {kind: leakage[kind] for kind in ("exact", "near")}
    text = json.dumps([kept, result.drops.to_pylist(), leaks], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# digests of the decisions of the implementation before issue 12 (commit 0e41e38: Python
# sets of candidates, exact Jaccard by sorting each pair's shingles), on the same corpora
@pytest.mark.parametrize(
    "shape, changes, dropped, digest",
    [
        ("dense", {}, {"near_duplicate": 118}, "a958c111b5ae3a0d"),
        ("dense", {"near_action": "cluster"}, {}, "827382d0abbdf59c"),
        (
            "dense",
            {"near_scope": "prompt", "survivor": "first"},
            {"near_duplicate": 2578},
            "cd45a30d268aabb5",
        ),
        ("sparse", {}, {"exact_duplicate": 72, "near_duplicate": 32}, "299a534a7f578a32"),
        ("sparse", {"near_action": "cluster"}, {"exact_duplicate": 72}, "f55ab7febea3d56c"),
        (
            "sparse",
            {"near_scope": "prompt", "survivor": "first"},
            {"exact_duplicate": 72, "near_duplicate": 15},
            "86eebcbdd5bbee2d",
        ),
    ],
)
def test_decisions_equal_the_implementation_before_issue_12(
    two_shapes, shape, changes, dropped, digest
):
    settings = DedupSettings(**changes)
    result = deduplicate(two_shapes[shape], settings)
    leakage = configs.leakage_report(result.kept, settings, sketch=result.prompt_sketch)
    assert result.report["dropped_by_reason"] == dropped
    assert _outcome_digest(result, leakage) == digest


@pytest.mark.parametrize("copies", [1, 6])
def test_exact_keys_group_rows_by_their_normalised_texts_with_and_without_repeats(copies):
    # with copies > 1 most texts repeat, so only the distinct ones are normalised
    base = long_records(5, min_words=5)
    variants = [(shout(c), shout(r)) for c, r in base] + [(c + "  \t ", r) for c, r in base]
    records = [(c, r, "harmless-base", "train") for c, r in (base + variants) * copies]
    table = pair_table(records)
    keys = dedup.exact_keys(table, DedupSettings())
    normalised = [
        (
            tuple(" ".join(t["content"].lower().split()) for t in row["prompt"]),
            frozenset(
                " ".join(t["content"].lower().split()) for t in row["chosen"] + row["rejected"]
            ),
        )
        for row in table.select(["prompt", "chosen", "rejected"]).to_pylist()
    ]
    first_of = {}
    expected = [first_of.setdefault(n, i) for i, n in enumerate(normalised)]
    found = {}
    assert [found.setdefault(k, i) for i, k in enumerate(keys.tolist())] == expected
    assert len(set(expected)) == 5


@pytest.mark.parametrize("scope", ["pair", "prompt"])
def test_near_text_identity_is_made_in_row_batches(two_shapes, scope):
    dense = two_shapes["dense"]
    table = pa.concat_tables([dense, dense.slice(1000, 500)]).combine_chunks()  # 500 repeats
    texts = dedup.near_texts(table, scope)
    pool, previous = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        identity = dedup.near_text_identity(table, scope, batch_rows=256)
    finally:
        pa.set_memory_pool(previous)
    # a batch of joined texts at a time, never the joined texts of every row
    assert pool.max_memory() < texts.nbytes / 4
    # equal codes exactly where the joined texts are equal: each row's first equal row agrees
    encoded = texts.dictionary_encode().indices.to_numpy()
    first_code = {}
    first_text = {}
    assert [first_code.setdefault(c, i) for i, c in enumerate(identity.tolist())] == [
        first_text.setdefault(c, i) for i, c in enumerate(encoded.tolist())
    ]
    assert len(first_text) <= table.num_rows - 500


def test_kept_rows_are_the_filtered_rows_without_copying_long_runs(two_shapes):
    table = two_shapes["sparse"].combine_chunks()
    keep = np.random.default_rng(0).random(table.num_rows) < 0.995  # runs of ~200 rows
    keep[1000:1020] = False
    for min_run in (1, 50, table.num_rows + 1):  # all slices, mixed, all gathered
        assert dedup.kept_rows(table, keep, min_run).equals(table.filter(pa.array(keep)))
    assert dedup.kept_rows(table, np.zeros(table.num_rows, bool)).num_rows == 0
    pool, previous = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        kept = dedup.kept_rows(table, keep, min_run=50).num_rows
    finally:  # (the gathered rows, allocated from the proxy pool, are freed before it)
        pa.set_memory_pool(previous)
    # only the rows of runs under 50 rows (about 3%) are copied
    assert pool.max_memory() < table.nbytes / 10
    assert kept == keep.sum()
    # by default runs of 8 rows or more are slices: their texts are the input's bytes
    data = table["chosen_text"].chunk(0).buffers()[2]
    chunks = dedup.kept_rows(table, keep)["chosen_text"].chunks
    shared = [c for c in chunks if c.buffers()[2].address == data.address]
    assert sum(len(c) for c in shared) > 0.9 * keep.sum()


# small batches and partitions, so the streaming near stage crosses several of each
_SMALL_STREAM = dedup.NearStream(min_rows=0, batch_rows=700, pairs_per_partition=3000)


@pytest.mark.parametrize("shape", ["dense", "sparse"])
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"near_action": "cluster"},
        {"near_scope": "prompt", "survivor": "first"},
        {"verify": "estimate"},
    ],
)
# the partitions' shingle sets made once for all of them, or per partition
@pytest.mark.parametrize("shared_shingles", [1 << 26, 0])
def test_streaming_near_stage_equals_the_in_memory_one(
    two_shapes, shape, changes, shared_shingles, tmp_path
):
    settings = DedupSettings(**changes)
    reference = deduplicate(two_shapes[shape], settings, stream=None)
    streamed = deduplicate(
        two_shapes[shape],
        settings,
        stream=dataclasses.replace(
            _SMALL_STREAM, temp_dir=str(tmp_path), shared_shingles=shared_shingles
        ),
    )
    assert streamed.kept.equals(reference.kept)
    assert streamed.drops.equals(reference.drops)
    assert streamed.report == reference.report
    assert list(tmp_path.iterdir()) == []  # the spilled files are gone
    # below bounded_rows the prompts' sketch is kept, one per distinct prompt, and gives
    # the leakage check the same sketch of every kept row as the in-memory run
    sketch, expected = streamed.prompt_sketch, reference.prompt_sketch
    assert len(sketch) == len(expected) == streamed.kept.num_rows
    # held once per distinct prompt of the table (both fixtures repeat prompts)
    assert len(sketch.distinct) < len(expected.distinct)
    every = np.arange(len(sketch))
    assert np.array_equal(sketch.take(every).signatures, expected.take(every).signatures)
    got, want = sketch.take(every).shingles_of(every), expected.take(every).shingles_of(every)
    assert np.array_equal(got.hashes, want.hashes) and np.array_equal(got.offsets, want.offsets)


def test_a_streamed_run_from_bounded_rows_keeps_no_prompt_sketch_and_leaks_the_same(
    two_shapes, tmp_path
):
    settings = DedupSettings()
    table = two_shapes["dense"]
    bounded = dataclasses.replace(_SMALL_STREAM, temp_dir=str(tmp_path), bounded_rows=0)
    streamed = deduplicate(table, settings, stream=bounded)
    kept = deduplicate(table, settings, stream=dataclasses.replace(bounded, bounded_rows=10**9))
    assert streamed.prompt_sketch is None
    assert streamed.kept.equals(kept.kept)
    with_sketch = configs.leakage_report(kept.kept, settings, sketch=kept.prompt_sketch)
    assert with_sketch["near"]["test_rows"] > 0  # the fixture leaks, so the check has work
    assert configs.leakage_report(streamed.kept, settings) == with_sketch
