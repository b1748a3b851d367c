"""hhdata.synth: determinism, layout, rates, and a planted truth that is exactly right.

The checks here are written independently of the generator: lines are read and classified
with plain json/gzip code, Jaccard is recomputed from split_pair's prompt.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hhdata import synth
from hhdata.errors import HhDataError, SynthError
from hhdata.pairs.transcript import split_pair
from hhdata.schema import (
    SYNTHETIC_PREFIX,
    UPSTREAM_SUBSET_FAMILIES,
    family_of,
    is_synthetic,
    pair_id,
)

N_PAIRS = 3000
BAD_RATE = 0.01
COPY_KINDS = (
    "exact_duplicates",
    "swapped_duplicates",
    "case_whitespace_variants",
    "near_duplicates",
    "hard_negatives",
)
RATES = synth.Rates(empty_reply=0.002, tag_in_reply=0.003, consecutive_assistant=0.002)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, synth.Truth]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth.write_corpus(out, N_PAIRS, seed=7, rates=RATES, bad_rate=BAD_RATE)


def read_lines(out: Path) -> dict[str, bytes]:
    """Every line of the corpus by location "file:line", read plainly."""
    lines = {}
    for path in sorted(out.glob("*/*.jsonl.gz")):
        name = path.relative_to(out).as_posix()
        data = gzip.decompress(path.read_bytes())
        assert data == b"" or data.endswith(b"\n")
        for number, line in enumerate(data.split(b"\n")[:-1], start=1):
            lines[f"{name}:{number}"] = line
    return lines


def classify(line: bytes) -> str:
    """What a careful reader would say about one line: "ok" or the reason it is bad."""
    if not line.strip():
        return "blank_line"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return "invalid_json"
    if not isinstance(record, dict):
        return "not_an_object"
    if set(record) < {"chosen", "rejected"}:
        return "missing_key"
    if set(record) > {"chosen", "rejected"}:
        return "extra_key"
    if None in record.values():
        return "null_value"
    if not all(isinstance(value, str) for value in record.values()):
        return "wrong_type"
    if "" in record.values():
        return "empty_string"
    if record["chosen"] == record["rejected"]:
        return "chosen_equals_rejected"
    return "ok"


def texts_at(lines: dict[str, bytes], location: str) -> tuple[str, str]:
    record = json.loads(lines[location])
    return record["chosen"], record["rejected"]


def prompt_shingles(chosen: str, rejected: str) -> set[tuple[str, ...]]:
    prompt = split_pair(chosen, rejected).prompt
    words = " ".join(turn["content"] for turn in prompt).lower().split()
    if len(words) < 5:
        return {tuple(words)}
    return {tuple(words[i : i + 5]) for i in range(len(words) - 4)}


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def test_generate_is_seeded_regular_and_distinct():
    records = synth.generate(300, seed=1)
    assert records == synth.generate(300, seed=1)
    assert records != synth.generate(300, seed=2)
    assert len({pair_id(r["chosen"], r["rejected"]) for r in records}) == 300
    for record in records:
        assert set(record) == {"chosen", "rejected"}
        assert record["chosen"].startswith("\n\nHuman: ")
        pair = split_pair(record["chosen"], record["rejected"])
        assert pair.flags == []
        assert pair.chosen != pair.rejected
        roles = [turn["role"] for turn in pair.prompt]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


def test_same_seed_gives_byte_identical_files(tmp_path):
    first, second, other = (tmp_path / name for name in ("a", "b", "c"))
    synth.write_corpus(first, 400, seed=3, bad_rate=0.02)
    synth.write_corpus(second, 400, seed=3, bad_rate=0.02)
    synth.write_corpus(other, 400, seed=4, bad_rate=0.02)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len(files) == 9
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / files[0]).read_bytes() != (other / files[0]).read_bytes()
    header = (first / files[1]).read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[3] == 0  # no FNAME or other flag
    assert header[4:8] == b"\x00\x00\x00\x00"  # mtime 0


def test_layout_is_upstream_with_the_synthetic_prefix(corpus):
    out, truth = corpus
    expected = {
        f"{SYNTHETIC_PREFIX}{subset}/{split}.jsonl.gz"
        for subset in UPSTREAM_SUBSET_FAMILIES
        for split in ("train", "test")
    }
    found = {path.relative_to(out).as_posix() for path in out.glob("*/*")}
    assert found == expected
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == ["planted.json"]
    families = set()
    for name in found:
        subset = name.split("/")[0]
        assert is_synthetic(subset)
        families.add(family_of(subset))
    assert families == {"helpful", "harmless"}


def test_files_follow_the_upstream_proportions(corpus):
    out, truth = corpus
    lines = read_lines(out)
    per_file = Counter(location.rsplit(":", 1)[0] for location in lines)
    upstream_total = sum(synth.UPSTREAM_COUNTS.values())
    for (subset, split), upstream in synth.UPSTREAM_COUNTS.items():
        name = f"{SYNTHETIC_PREFIX}{subset}/{split}.jsonl.gz"
        assert truth.files[name]["lines"] == per_file[name]
        share = truth.files[name]["records"] / N_PAIRS
        assert share == pytest.approx(upstream / upstream_total, abs=0.01), name


def test_every_line_is_good_except_the_planted_bad_ones(corpus):
    out, truth = corpus
    lines = read_lines(out)
    verdicts = {location: classify(line) for location, line in lines.items()}
    bad = {item["location"]: item["reason"] for item in truth.bad_records}
    assert {location: reason for location, reason in verdicts.items() if reason != "ok"} == bad
    assert sum(verdict == "ok" for verdict in verdicts.values()) == N_PAIRS
    assert Counter(bad.values()) == Counter({reason: 3 for reason in synth.BAD_REASONS})


def test_good_records_split_with_exactly_the_planted_flags(corpus):
    out, truth = corpus
    lines = read_lines(out)
    bad = {item["location"] for item in truth.bad_records}
    flagged = {}
    for location in lines:
        if location not in bad:
            flags = split_pair(*texts_at(lines, location)).flags
            if flags:
                flagged[location] = flags
    assert flagged == {item["location"]: item["flags"] for item in truth.irregular}
    for item in truth.irregular:
        assert item["id"] == pair_id(*texts_at(lines, item["location"]))
    kinds = Counter(item["kind"] for item in truth.irregular)
    assert kinds == {"empty_reply": 6, "tag_in_reply": 9, "consecutive_assistant": 6}


@pytest.mark.parametrize(
    "kind, rate",
    [
        ("exact_duplicates", RATES.exact_duplicate),
        ("swapped_duplicates", RATES.swapped_duplicate),
        ("case_whitespace_variants", RATES.case_whitespace_variant),
        ("near_duplicates", RATES.near_duplicate),
        ("hard_negatives", RATES.hard_negative),
        ("bad_records", BAD_RATE),
    ],
)
def test_planted_counts_follow_the_rates(corpus, kind, rate):
    _, truth = corpus
    assert len(getattr(truth, kind)) == round(rate * N_PAIRS) > 0


def test_rates_are_configurable(tmp_path):
    rates = synth.Rates(near_duplicate=0.05, exact_duplicate=0)
    truth = synth.write_corpus(tmp_path, 1000, seed=1, rates=rates)
    assert len(truth.near_duplicates) == 50 and truth.exact_duplicates == []
    assert truth.rates["near_duplicate"] == 0.05


def test_regular_pairs_fill_in_when_too_few_prompts_are_long_enough(tmp_path):
    rates = synth.Rates(near_duplicate=0.2, hard_negative=0.2)
    truth = synth.write_corpus(tmp_path, 100, seed=0, rates=rates)
    assert len(truth.near_duplicates) + len(truth.hard_negatives) < 40  # short of the plan
    lines = read_lines(tmp_path)
    assert len(lines) == sum(file["records"] for file in truth.files.values()) == 100
    assert all(classify(line) == "ok" for line in lines.values())


def test_duplicates_are_what_the_truth_says(corpus):
    out, truth = corpus
    lines = read_lines(out)
    for kind in COPY_KINDS:
        for item in getattr(truth, kind):
            original, copy = texts_at(lines, item["original"]), texts_at(lines, item["copy"])
            assert item["original_id"] == pair_id(*original) and item["id"] == pair_id(*copy)
            assert item["original"] != item["copy"]
    for item in truth.exact_duplicates:
        assert lines[item["original"]] == lines[item["copy"]]
    for item in truth.swapped_duplicates:
        assert texts_at(lines, item["copy"]) == texts_at(lines, item["original"])[::-1]
    for item in truth.case_whitespace_variants:
        original, copy = texts_at(lines, item["original"]), texts_at(lines, item["copy"])
        assert original != copy
        assert [normalised(text) for text in original] == [normalised(text) for text in copy]
        assert split_pair(*copy).flags == []
    transforms = {item["transform"] for item in truth.case_whitespace_variants}
    assert transforms == {"lowercase", "double_space", "trailing_whitespace"}


def test_near_duplicate_and_hard_negative_jaccard_is_exact(corpus):
    out, truth = corpus
    lines = read_lines(out)
    for item in truth.near_duplicates + truth.hard_negatives:
        original = prompt_shingles(*texts_at(lines, item["original"]))
        copy = prompt_shingles(*texts_at(lines, item["copy"]))
        assert item["jaccard"] == len(original & copy) / len(original | copy)
    near = [item["jaccard"] for item in truth.near_duplicates]
    assert all(0 < value < 1 for value in near)
    assert all(item["jaccard"] <= item["target_jaccard"] for item in truth.near_duplicates)
    assert statistics.median(near) > 0.55 and max(near) > 0.8
    for item in truth.near_duplicates:  # same replies, only the prompt edited
        original, copy = texts_at(lines, item["original"]), texts_at(lines, item["copy"])
        assert split_pair(*original).chosen == split_pair(*copy).chosen
    for item in truth.hard_negatives:
        assert item["jaccard"] < 0.5
        original, copy = texts_at(lines, item["original"]), texts_at(lines, item["copy"])
        shared = len(_common_prefix(original[0], copy[0]))
        assert shared == item["shared_prefix_chars"]
        prompt_chars = len(original[0]) - len(split_pair(*original).chosen[0]["content"])
        assert shared >= 0.25 * prompt_chars


def _common_prefix(a: str, b: str) -> str:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return a[:length]


def test_nothing_similar_is_left_unplanted(corpus):
    """Every pair of prompts with a shingle Jaccard >= 0.2 is a planted pair, and vice versa."""
    out, truth = corpus
    lines = read_lines(out)
    bad = {item["location"] for item in truth.bad_records}
    prompts = {loc: prompt_shingles(*texts_at(lines, loc)) for loc in lines if loc not in bad}
    holders = defaultdict(list)
    for location, shingle_set in prompts.items():
        for shingle in shingle_set:
            holders[shingle].append(location)
    similar = set()
    for sharing in holders.values():
        for i, a in enumerate(sharing):
            for b in sharing[i + 1 :]:
                if len(prompts[a] & prompts[b]) / len(prompts[a] | prompts[b]) >= 0.2:
                    similar.add(frozenset((a, b)))
    planted = {
        frozenset((item["original"], item["copy"]))
        for kind in COPY_KINDS
        for item in getattr(truth, kind)
        if item.get("jaccard", 1.0) >= 0.2
    }
    assert similar == planted


def test_lengths_and_turns_match_the_real_sample():
    sample = resources.files("hhdata").joinpath("data/hh-rlhf/harmless-base/test.jsonl.gz")
    real = [json.loads(line) for line in gzip.decompress(sample.read_bytes()).splitlines()]

    def profile(records):
        humans, user, replies = [], [], []
        for record in records:
            pair = split_pair(record["chosen"], record["rejected"])
            humans.append(sum(turn["role"] == "user" for turn in pair.prompt))
            user += [len(turn["content"]) for turn in pair.prompt if turn["role"] == "user"]
            replies += [len(pair.chosen[0]["content"]), len(pair.rejected[0]["content"])]
        return statistics.mean(humans), statistics.median(user), statistics.median(replies)

    for ours, theirs in zip(profile(synth.generate(2000, seed=5)), profile(real)):
        assert ours == pytest.approx(theirs, rel=0.12)


def test_truth_round_trips_through_planted_json(corpus):
    out, truth = corpus
    assert synth.Truth.load(out / "planted.json") == truth


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_pairs": 0}, "n_pairs=0; ask for at least one pair"),
        ({"bad_rate": 1.5}, "rate bad_record=1.5 is outside [0, 1); pass a fraction of n_pairs"),
        (
            {"rates": synth.Rates(exact_duplicate=0.3, near_duplicate=0.3)},
            "planted rates add up to 0.617",
        ),
    ],
)
def test_out_of_range_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(SynthError, match=re.escape(message)) as error:
        synth.write_corpus(tmp_path, **{"n_pairs": 10, **kwargs})
    assert isinstance(error.value, HhDataError)


def test_command_line(tmp_path, capsys):
    out = str(tmp_path / "a")
    arguments = ["--pairs", "200", "--seed", "2", "--out", out, "--bad-rate", "0.05"]
    assert synth.main(arguments) == 0
    assert "wrote 200 pairs to" in capsys.readouterr().out
    assert len(synth.Truth.load(tmp_path / "a" / "planted.json").bad_records) == 10
    assert synth.main(["--pairs", "-1", "--out", str(tmp_path / "b")]) == 2
    assert "n_pairs=-1; ask for at least one pair" in capsys.readouterr().err
    command = [sys.executable, "-m", "hhdata.synth", "--pairs", "50", "--out", str(tmp_path / "c")]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "wrote 50 pairs" in done.stdout
    assert (tmp_path / "c" / "synth-harmless-base" / "train.jsonl.gz").exists()


def test_the_reader_sees_exactly_the_planted_truth(corpus):
    """hhdata.io.read and hhdata.pairs agree with planted.json on every bad line and flag."""
    from hhdata.io.read import read_raw
    from hhdata.pairs import build_pairs

    out, truth = corpus
    raw = read_raw(out)
    quarantined = {
        f"{Path(row['file']).relative_to(out).as_posix()}:{row['line']}": row["reason"]
        for row in raw.quarantine.to_pylist()
    }
    bad = {item["location"]: item["reason"] for item in truth.bad_records}
    assert quarantined == {loc: reason for loc, reason in bad.items() if reason != "blank_line"}
    assert raw.report.blank == Counter(bad.values())["blank_line"]
    assert raw.report.accepted == N_PAIRS
    pairs, pair_quarantine = build_pairs(raw.table)
    assert pair_quarantine.num_rows == 0
    rows = pairs.select(["id", "flags"]).to_pylist()
    flagged = {row["id"]: row["flags"] for row in rows if row["flags"]}
    assert flagged == {item["id"]: item["flags"] for item in truth.irregular}
    subsets = set(pairs.column("subset").to_pylist())
    assert subsets == {f"{SYNTHETIC_PREFIX}{subset}" for subset in UPSTREAM_SUBSET_FAMILIES}


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), n_pairs=st.integers(60, 400))
def test_any_seed_gives_a_consistent_truth(tmp_path_factory, seed, n_pairs):
    """High rates on small corpora: the short-prompt fallbacks are exercised too."""
    out = tmp_path_factory.mktemp("law")
    rates = synth.Rates(
        exact_duplicate=0.05,
        swapped_duplicate=0.05,
        case_whitespace_variant=0.05,
        near_duplicate=0.1,
        hard_negative=0.1,
        empty_reply=0.02,
        tag_in_reply=0.02,
        consecutive_assistant=0.02,
        bad_record=0.05,
    )
    truth = synth.write_corpus(out, n_pairs, seed=seed, rates=rates)
    lines = read_lines(out)
    verdicts = {location: classify(line) for location, line in lines.items()}
    bad = {item["location"]: item["reason"] for item in truth.bad_records}
    assert {location: verdict for location, verdict in verdicts.items() if verdict != "ok"} == bad
    good = [location for location, verdict in verdicts.items() if verdict == "ok"]
    flagged = {location: split_pair(*texts_at(lines, location)).flags for location in good}
    irregular = {item["location"]: item["flags"] for item in truth.irregular}
    assert {location: flags for location, flags in flagged.items() if flags} == irregular
    assert len(flagged) == n_pairs
    for item in truth.exact_duplicates:
        assert lines[item["original"]] == lines[item["copy"]]
    for item in truth.near_duplicates + truth.hard_negatives:
        original = prompt_shingles(*texts_at(lines, item["original"]))
        copy = prompt_shingles(*texts_at(lines, item["copy"]))
        assert item["jaccard"] == len(original & copy) / len(original | copy)
    assert all(item["jaccard"] < 0.5 for item in truth.hard_negatives)
