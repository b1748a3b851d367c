"""The whole flow: raw files -> release, with every row accounted for."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hhdata import pipeline, synth
from hhdata.cli import main
from hhdata.dedup import DedupSettings
from hhdata.dedup.run import NearStream as DedupStream
from hhdata.errors import ReleaseError, SourceError, VersionError
from hhdata.io.read import ReadReport, bundled_sample_path
from hhdata.quarantine import quarantine_table

SAMPLE_LINES = gzip.decompress(bundled_sample_path().read_bytes()).splitlines()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """An upstream-layout folder: 300 real harmless pairs, 200 as helpful-base train, plus
    known trouble: 2 broken lines, 1 pair with no human turn, 2 exact copies, 1 blank line."""
    root = tmp_path_factory.mktemp("upstream")
    harmless = list(SAMPLE_LINES[:300])
    harmless += [b'{"chosen": "oops"', b"", SAMPLE_LINES[0], SAMPLE_LINES[1]]
    no_human = {"chosen": "\n\nAssistant: hi there", "rejected": "\n\nAssistant: go away"}
    harmless.append(json.dumps(no_human).encode())
    (root / "harmless-base").mkdir()
    (root / "harmless-base" / "test.jsonl").write_bytes(b"\n".join(harmless) + b"\n")
    helpful = list(SAMPLE_LINES[300:500]) + [b"[1, 2]"]
    (root / "helpful-base").mkdir()
    (root / "helpful-base" / "train.jsonl.gz").write_bytes(
        gzip.compress(b"\n".join(helpful), mtime=0)
    )
    return root


@pytest.fixture(scope="module")
def built(upstream, tmp_path_factory):
    return pipeline.build_release([upstream], version="1.0.0", out=tmp_path_factory.mktemp("out"))


def independent_count(root: Path) -> int:
    """Non-blank lines of every raw file, counted without hhdata."""
    total = 0
    for path in root.rglob("*.jsonl*"):
        data = path.read_bytes()
        data = gzip.decompress(data) if path.suffix == ".gz" else data
        total += sum(1 for line in data.splitlines() if line.strip())
    return total


def test_every_row_read_is_kept_or_leaves_with_a_reason(built, upstream):
    accounting = built.manifest["accounting"]
    assert accounting["read"] == independent_count(upstream) == 505
    assert accounting["quarantined"] == {"invalid_json": 1, "no_human_turn": 1, "not_an_object": 1}
    assert accounting["removed"]["exact_duplicate"] == 2
    left = sum(sum(accounting[fate].values()) for fate in ("quarantined", "removed", "filtered"))
    assert accounting["kept"] + left == accounting["read"]
    rows = sum(s["rows"] for s in built.manifest["configs"]["all"]["splits"].values())
    assert rows == accounting["kept"]


def test_configs_follow_the_subsets_read(built):
    configs = built.manifest["configs"]
    assert list(configs) == ["all", "helpful", "harmless", "harmless-base", "helpful-base"]
    assert configs["helpful"]["splits"]["train"]["files"] == [
        "data/helpful-base/train-00000-of-00001.parquet"
    ]
    assert (
        configs["all"]["splits"]["train"]["rows"] + configs["all"]["splits"]["test"]["rows"]
        == built.manifest["accounting"]["kept"]
    )


def test_sources_are_recorded_relative_with_checksums(built, upstream):
    sources = {s["path"]: s for s in built.manifest["sources"]}
    assert sorted(sources) == ["harmless-base/test.jsonl", "helpful-base/train.jsonl.gz"]
    data = (upstream / "helpful-base" / "train.jsonl.gz").read_bytes()
    assert sources["helpful-base/train.jsonl.gz"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert built.manifest["settings"]["dedup"]["threshold"] > 0


def hhdata_in_a_new_process(argv: list[str], cwd: Path, hash_seed: str) -> None:
    """Run `hhdata ARGV` in a fresh interpreter with its own PYTHONHASHSEED and folder."""
    cwd.mkdir(parents=True, exist_ok=True)
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys; from hhdata.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_release_rebuilt_in_other_processes_is_byte_identical(built, upstream, tmp_path):
    """Set and dict order, string hashing and the working folder must not reach the bytes:
    `hhdata build` under two other hash seeds, from two other folders, writes the same files
    as this process did."""
    expected = files_of(built.path)
    assert "manifest.json" in expected and any(name.endswith(".parquet") for name in expected)
    for seed in ("1", "4242"):
        out = tmp_path / f"out-{seed}"
        argv = ["build", str(upstream), "--version", "1.0.0", "--out", str(out)]
        hhdata_in_a_new_process(argv, tmp_path / f"cwd-{seed}", seed)
        again = files_of(out / "1.0.0")
        assert sorted(again) == sorted(expected)
        assert [name for name in expected if again[name] != expected[name]] == []
        manifest = json.loads(again["manifest.json"])
        assert manifest["files"] == built.manifest["files"]  # the same sha256 per file


def test_dedup_output_is_byte_identical_across_processes(upstream, tmp_path):
    """`hhdata dedup` writes the same kept rows, drop log and report under other hash seeds."""
    outputs = []
    for seed in ("1", "4242"):
        out = tmp_path / f"dedup-{seed}"
        out.mkdir()
        argv = ["dedup", str(upstream), "--out", str(out / "kept.parquet")]
        argv += ["--drops", str(out / "drops.parquet"), "--report", str(out / "report.json")]
        hhdata_in_a_new_process(argv, tmp_path / f"cwd-{seed}", seed)
        outputs.append(files_of(out))
    first, second = outputs
    assert sorted(first) == ["drops.parquet", "kept.parquet", "report.json"]
    assert pq.read_table(tmp_path / "dedup-1" / "drops.parquet").num_rows > 0
    assert [name for name in first if first[name] != second[name]] == []


def test_bundled_sample_accounting_matches_an_independent_count(tmp_path):
    result = pipeline.run_pipeline([bundled_sample_path()])
    assert result.accounting["read"] == len(SAMPLE_LINES) == 2312
    assert result.accounting["quarantined"] == {}
    removed = Counter(result.drops["reason"].to_pylist())
    assert result.accounting["kept"] == 2312 - sum(removed.values())
    assert set(result.pairs["id"].to_pylist()).isdisjoint(result.drops["id"].to_pylist())


def test_counts_that_do_not_reconcile_are_refused():
    report = ReadReport(lines=10, blank=1, accepted=9)
    drops = pa.table({"fate": ["removed"], "reason": pa.array(["exact_duplicate"], pa.string())})
    with pytest.raises(
        ReleaseError,
        match=r"read 9 records but kept 7 \+ quarantined 0 \+ "
        r"removed 1 \+ filtered 0 = 8",
    ):
        pipeline.reconcile(report, quarantine_table([]), drops, kept=7)
    assert pipeline.reconcile(report, quarantine_table([]), drops, kept=8)["removed"] == {
        "exact_duplicate": 1
    }


def test_each_drop_is_counted_under_the_fate_the_stage_gave_it():
    """The fate column decides, not the reason's wording: a filter whose reason mentions
    duplicates (turns repeated inside one pair) is still a filter."""
    report = ReadReport(lines=3, accepted=3)
    drops = pa.table(
        {"fate": ["removed", "filtered"], "reason": ["near_duplicate", "duplicate_turns"]}
    )
    accounting = pipeline.reconcile(report, quarantine_table([]), drops, kept=1)
    assert accounting["removed"] == {"near_duplicate": 1}
    assert accounting["filtered"] == {"duplicate_turns": 1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.write_corpus(root, 400, seed=3)
    return root


def test_synthetic_subsets_are_refused_unless_named(synthetic, tmp_path):
    subsets = sorted(p.parent.name for p in synthetic.rglob("*.jsonl.gz"))
    assert subsets and all(name.startswith("synth-") for name in subsets)
    with pytest.raises(ReleaseError, match="--include-synthetic synth-harmless-base"):
        pipeline.build_release([synthetic], version="1.0.0", out=tmp_path)
    with pytest.raises(ReleaseError, match=r"\['synth-helpful-base'"):
        pipeline.build_release(
            [synthetic], version="1.0.0", out=tmp_path, include_synthetic=["synth-harmless-base"]
        )
    assert list(tmp_path.iterdir()) == []
    built = pipeline.build_release(
        [synthetic], version="1.0.0", out=tmp_path, include_synthetic=sorted(set(subsets))
    )
    assert built.manifest["subsets"]["synth-harmless-base"] == "harmless"
    assert built.manifest["settings"]["include_synthetic"] == sorted(set(subsets))


def test_cli_build_then_a_contradicting_version(upstream, tmp_path, capsys):
    out = tmp_path / "releases"
    assert main(["build", str(upstream), "--version", "1.0.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"built {out / '1.0.0'}\n")
    assert "read 505  kept" in printed
    code = main(
        [
            "build",
            str(upstream),
            "--version",
            "1.1.0",
            "--out",
            str(out),
            "--previous",
            str(out / "1.0.0"),
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "the change from 1.0.0 is patch" in error and "must be 1.0.1, not 1.1.0" in error
    assert (
        main(
            [
                "build",
                str(upstream),
                "--version",
                "1.1.0",
                "--out",
                str(out),
                "--previous",
                str(out / "1.0.0"),
                "--allow-version-mismatch",
            ]
        )
        == 0
    )
    assert "1.0.0 -> 1.1.0: patch change" in capsys.readouterr().out


def test_the_upstream_layout_on_the_hub_is_a_source(local_hub, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token)
    repo = "Anthropic/hh-rlhf"
    if not local_hub.repo_path(repo).exists():
        api.create_repo(repo, repo_type="dataset")
    api.create_commit(
        repo,
        [CommitOperationAdd("harmless-base/test.jsonl.gz", str(bundled_sample_path()))],
        repo_type="dataset",
        commit_message="upstream layout",
    )
    built = pipeline.build_release([f"hf://{repo}"], version="1.0.0", out=tmp_path)
    digest = hashlib.sha256(bundled_sample_path().read_bytes()).hexdigest()
    assert built.manifest["sources"] == [
        {"path": "harmless-base/test.jsonl.gz", "sha256": digest, "bytes": 742801}
    ]
    assert built.manifest["accounting"]["read"] == 2312


def test_train_test_leakage_is_counted_in_the_manifest_and_the_card(tmp_path):
    """The same real conversation in train and test is a leak; counted independently here."""
    root = tmp_path / "leaky"
    (root / "harmless-base").mkdir(parents=True)
    (root / "harmless-base" / "train.jsonl").write_bytes(b"\n".join(SAMPLE_LINES[:40]) + b"\n")
    shared = [json.loads(line) for line in SAMPLE_LINES[:3]]
    other_reply = [
        {"chosen": r["chosen"], "rejected": r["rejected"] + " (asked again)"} for r in shared
    ]
    test_lines = [json.dumps(r).encode() for r in other_reply] + list(SAMPLE_LINES[100:120])
    (root / "harmless-base" / "test.jsonl").write_bytes(b"\n".join(test_lines) + b"\n")
    # by default the test copies go as near duplicates of their train prompts ...
    deduplicated = pipeline.run_pipeline([root])
    assert deduplicated.accounting["removed"] == {"near_duplicate": 3}
    assert deduplicated.leakage["exact"]["test_rows"] == 0
    # ... without near dedup they stay, and the leak is reported
    built = pipeline.build_release(
        [root], version="1.0.0", out=tmp_path / "out", dedup_settings=DedupSettings(near=False)
    )
    exact = built.manifest["leakage"]["exact"]
    assert exact["test_rows"] == 3 and exact["within_subset"] == {"harmless-base": 3}
    card = (built.path / "README.md").read_text()
    assert "Train/test leakage: 3 test pairs have a prompt that is also a train prompt" in card


def test_a_large_run_checks_leakage_after_the_files_are_written(upstream, built, tmp_path):
    """A run large enough (lowered here to every table) does not check leakage beside the
    Parquet writer, and releases the same files and counts."""
    small = DedupStream(min_rows=0, batch_rows=100, pairs_per_partition=3000, bounded_rows=0)
    result = pipeline.run_pipeline([upstream], stream=small)
    assert not result.pending_leakage.done()  # waits for the data files
    # the kept rows (slices of the pair table) are copied into one array per column
    assert {column.num_chunks for column in result.pairs.columns} == {1}
    again = pipeline.release_from(result, version="1.0.0", out=tmp_path / "out")
    assert result.pending_leakage.done()
    assert again.manifest["leakage"] == built.manifest["leakage"]
    assert again.manifest["files"] == built.manifest["files"]
    assert again.manifest["accounting"] == built.manifest["accounting"]


def test_a_streamed_run_below_the_row_limit_checks_leakage_beside_the_writer(
    upstream, built, tmp_path
):
    streamed = DedupStream(min_rows=0, batch_rows=100, pairs_per_partition=3000)
    assert streamed.bounded_rows > 1000  # the test corpus is smaller
    result = pipeline.run_pipeline([upstream], stream=streamed)
    assert isinstance(result.pending_leakage, Future)  # started at once, in the background
    again = pipeline.release_from(result, version="1.0.0", out=tmp_path / "out")
    assert again.manifest["leakage"] == built.manifest["leakage"]
    assert again.manifest["files"] == built.manifest["files"]


def test_cli_build_writes_the_quarantine_and_the_drop_log(upstream, tmp_path, capsys):
    quarantine, drops = tmp_path / "quarantine.jsonl", tmp_path / "drops.jsonl"
    assert (
        main(
            [
                "build",
                str(upstream),
                "--version",
                "1.0.0",
                "--out",
                str(tmp_path / "out"),
                "--quarantine",
                str(quarantine),
                "--drops",
                str(drops),
            ]
        )
        == 0
    )
    assert f"wrote 3 quarantined records to {quarantine}" in capsys.readouterr().out
    bad = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert sorted(r["reason"] for r in bad) == ["invalid_json", "no_human_turn", "not_an_object"]
    assert {r["line"] for r in bad if r["reason"] == "invalid_json"} == {301}
    logged = [json.loads(line) for line in drops.read_text().splitlines()]
    copies = [r for r in logged if r["reason"] == "exact_duplicate"]
    assert len(copies) == 2 and all(r["kept_id"] for r in copies)


def test_every_build_and_diff_option_is_documented():
    import argparse

    from hhdata.cli import build_parser

    docs = (Path(__file__).parent.parent / "docs" / "releases.md").read_text()
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for verb in ("build", "diff"):
        assert f"hhdata {verb} " in docs
        for action in subparsers.choices[verb]._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in docs, f"hhdata {verb} {option} is not in docs/releases.md"


def test_an_existing_version_is_refused_before_any_work(built, tmp_path, capsys):
    missing = str(tmp_path / "no-such-folder")  # reading it would raise SourceError
    with pytest.raises(VersionError, match="already exists and versions are immutable"):
        pipeline.build_release([missing], version="1.0.0", out=built.path.parent)
    assert main(["build", missing, "--version", "1.0.0", "--out", str(built.path.parent)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SourceError, match="does not exist"):
        pipeline.build_release([missing], version="1.0.1", out=built.path.parent)
    with pytest.raises(ReleaseError, match="not a release directory"):
        pipeline.build_release([missing], version="1.0.1", out=built.path.parent, previous=tmp_path)


def test_large_run_swaps_allocator_settings_and_restores_them_after_nesting():
    import numpy as np
    import pyarrow as pa

    from hhdata import memory
    from hhdata._arrow import ARROW_POOL

    before = pa.default_memory_pool().backend_name
    with memory.large_run():
        assert pa.default_memory_pool().backend_name == ARROW_POOL.backend_name
        with memory.large_run():
            pass
        assert pa.default_memory_pool().backend_name == ARROW_POOL.backend_name  # still inside
        inside = memory._set_hugepage(False)
    assert pa.default_memory_pool().backend_name == before
    switch = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        pytest.skip(f"numpy {np.__version__} has no _set_madvise_hugepage: no advice to restore")
    assert inside is False  # numpy was told not to advise huge pages
    current = switch(True)
    switch(current)
    assert current == memory._saved[1]  # the huge-page advice came back as it was


def _faults_of_reuse(values: int, rounds: int = 8) -> int:
    """Minor page faults of making and freeing two arrays of ``values`` floats, ``rounds``
    times, after one of them was made and freed once."""
    import resource

    import numpy as np

    np.ones(values)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(rounds):
        a = np.ones(values)
        b = a + 1.0
        del a, b
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@pytest.mark.parametrize("values", [2 << 20, 8 << 20])
def test_large_run_reuses_freed_arrays_instead_of_faulting_in_fresh_pages(values):
    # glibc's default gives back the free top of its heap past a threshold that follows the
    # largest block freed, so arrays of 16 MiB made and freed in turn were faulted in and
    # zeroed by the kernel every time (bench/scale.md, "Where the system time went"); and
    # it maps every block over 32 MiB on its own, unmapped when freed: arrays of 64 MiB
    # were faulted in afresh however the thresholds were set
    import resource

    from hhdata import memory

    if memory._glibc() is None:
        pytest.skip("not glibc: large_run leaves malloc alone")
    pages = values * 8 // resource.getpagesize()  # of one array
    with memory.large_run():
        inside = _faults_of_reuse(values)
    # 16 arrays made: at most the first few are faulted in (glibc's default: most of them)
    assert inside < 4 * pages
    memory.give_back()


def test_a_bounded_run_lets_freed_large_arrays_go():
    # in a fresh process (whose heap holds no large free block yet): after
    # map_large_blocks, arrays of 64 MiB are mapped on their own and unmapped when freed
    from hhdata import memory

    if memory._glibc() is None:
        pytest.skip("not glibc: large_run leaves malloc alone")
    script = (
        "import resource, sys\n"
        "from hhdata import memory\n"
        "from tests.test_pipeline import _faults_of_reuse\n"
        "with memory.large_run():\n"
        "    memory.map_large_blocks()\n"
        "    faults = _faults_of_reuse(8 << 20)\n"
        "print(faults * resource.getpagesize() // (64 << 20))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        check=True,
    )
    # 16 arrays of 64 MiB made one after the other: each faulted in afresh
    assert int(ran.stdout) >= 12, ran.stdout + ran.stderr


def test_a_build_that_keeps_no_row_exits_1_and_writes_no_release(tmp_path, capsys):
    empty, broken = tmp_path / "empty" / "harmless-base", tmp_path / "broken" / "harmless-base"
    empty.mkdir(parents=True)
    broken.mkdir(parents=True)
    (empty / "test.jsonl").write_bytes(b"\n  \n")
    (broken / "test.jsonl").write_bytes(
        b'{"chosen": 1, "rejected": "b"}\n{oops\n' + SAMPLE_LINES[0] * 2 + b"\n"
    )
    out, saved = tmp_path / "out", tmp_path / "quarantine.jsonl"

    assert main(["build", str(empty.parent), "--version", "1.0.0", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        "hhdata build: error: the sources hold no record (1 file read, all empty or blank); no "
        "release is written: check that the right files were given\n"
    )
    assert (
        main(
            [
                "build",
                str(broken.parent),
                "--version",
                "1.0.0",
                "--out",
                str(out),
                "--quarantine",
                str(saved),
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert captured.err == (
        "hhdata build: error: all 3 records read left the flow (invalid_json 2, wrong_type 1), so "
        "no row is left to release; no release is written: fix the records (hhdata validate shows "
        "them, --quarantine FILE saves them) and build again\n"
    )
    assert f"wrote 3 quarantined records to {saved}" in captured.out  # saved before refusing
    assert not (out / "1.0.0").exists()
    with pytest.raises(ReleaseError, match="all 3 records read left the flow"):
        pipeline.build_release([broken.parent], version="1.0.0", out=out)


def test_a_manifest_that_keeps_no_row_is_refused_on_read(built, tmp_path):
    """publish and hhdata.load read the manifest through read_manifest, so neither takes it."""
    from hhdata.errors import SchemaError
    from hhdata.release.manifest import validate_manifest

    manifest = json.loads((built.path / "manifest.json").read_text())
    validate_manifest(manifest)
    manifest["accounting"]["kept"] = 0
    with pytest.raises(SchemaError, match="field accounting/kept: 0 is less than the minimum of 1"):
        validate_manifest(manifest)


def _lower_percentile(values: list[int], fraction: Fraction) -> int:
    """The q-th percentile as the observed value at floor(q * (n - 1)) of the sorted values."""
    return sorted(values)[math.floor(fraction * (len(values) - 1))]


def test_length_statistics_agree_with_a_plain_computation(tmp_path, capsys):
    """manifest.json, the card and `hhdata stats` against pure Python over the release's rows."""
    built = pipeline.build_release([bundled_sample_path()], version="1.0.0", out=tmp_path)
    rows = [
        row
        for path in sorted((built.path / "data").rglob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]
    assert len(rows) == built.manifest["accounting"]["kept"] == 2312  # every sample row

    def chars(turns):
        return sum(len(turn["content"]) for turn in turns)

    columns = {
        "prompt": [chars(row["prompt"]) for row in rows],
        "chosen": [chars(row["chosen"]) for row in rows],
        "rejected": [chars(row["rejected"]) for row in rows],
        "chosen_text": [len(row["chosen_text"]) for row in rows],
        "rejected_text": [len(row["rejected_text"]) for row in rows],
        "prompt_turns": [len(row["prompt"]) for row in rows],
    }
    expected = {
        name: {
            "mean": round(sum(v) / len(v), 1),
            "median": statistics.median_low(v),
            "p90": _lower_percentile(v, Fraction(9, 10)),
            "p99": _lower_percentile(v, Fraction(99, 100)),
            "max": max(v),
        }
        for name, v in columns.items()
    }

    manifest = json.loads((built.path / "manifest.json").read_text())
    assert {
        name: [s["mean"], s["p50"], s["p90"], s["p99"], s["max"]]
        for name, s in manifest["lengths"].items()
    } == {name: list(e.values()) for name, e in expected.items()}

    card = (built.path / "README.md").read_text()
    header = "| field | mean | median | p90 | p99 | max |"
    table = card[card.index(header) :].split("\n\n")[0].splitlines()
    for name, e in expected.items():
        cells = next(line for line in table if line.startswith(f"| `{name}` |")).split("|")[2:-1]
        assert [float(cell) for cell in cells] == list(e.values()), name

    assert main(["stats"]) == 0  # the bundled sample: the same rows as this release
    printed = {}
    for line in capsys.readouterr().out.splitlines()[1:]:  # after the header of subset names
        label, _, rest = line.rpartition(" ")
        printed[" ".join(label.split()[:-1])] = float(rest.replace(",", ""))  # the `all` column
    for name, label in (
        ("prompt_turns", "prompt turns"),
        ("prompt", "prompt chars"),
        ("chosen", "chosen chars"),
        ("rejected", "rejected chars"),
    ):
        assert [printed[f"{label} {m}"] for m in ("mean", "median", "p90", "p99", "max")] == list(
            expected[name].values()
        ), label


def test_one_chunk_frees_each_chunked_column_as_it_copies_it():
    """The pipeline hands deduplicate one array per column without holding the read table
    twice: Arrow's allocations peak at the table plus one column, not two tables."""
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # its own statistics
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        table = pa.table(
            {
                name: pa.chunked_array(
                    [
                        pa.array([f"{name} {i} " * 20 for i in range(j, j + 2_000)])
                        for j in range(0, 20_000, 2_000)
                    ]
                )
                for name in "abcd"
            }
        )
        expected = {name: table[name].to_pylist() for name in "abcd"}
        start, column = pool.bytes_allocated(), table["a"].nbytes
        assert start >= 4 * column
        columns, schema = table.columns, table.schema
        del table
        combined = pipeline.one_chunk(columns, schema)
        assert columns == []
        assert [combined[name].num_chunks for name in "abcd"] == [1, 1, 1, 1]
        assert {name: combined[name].to_pylist() for name in "abcd"} == expected
        # the four chunked columns (start) and at most one copy beside them
        peak = pool.max_memory() - start
        del combined  # every buffer goes back before the pool is dropped
        assert peak < 1.5 * column
    finally:
        pa.set_memory_pool(previous)
