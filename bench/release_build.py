"""Benchmark: build a release of N synthetic pairs, hhdata vs the usual datasets route.

Usage: .venv/bin/python bench/release_build.py [--pairs 170000] [--work DIR] [--sweep]
       .venv/bin/python bench/release_build.py --work DIR --sweep-only
       .venv/bin/python bench/release_build.py --work DIR --stages

1. End to end, same corpus, same machine, one run, each route in a fresh process:
   - hhdata: ``hhdata.pipeline.build_release`` (read + validate + parse + exact and near
     dedup + Parquet per subset/split + card, manifest, changelog, croissant);
   - usual: ``datasets.load_dataset("json")`` per file + ``map`` with a Python transcript
     split (hhdata.pairs.transcript.split_pair, the reference parser) + ``Dataset.to_parquet``
     per subset/split (the writer push_to_hub uses: content-defined chunking, page index).
     It validates nothing and deduplicates nothing, so it does less work.
2. Re-upload cost of a minor version: 1% new pairs appended to every source file, built
   with ``--previous``; bytes that change counted by file (plain LFS uploads whole files)
   and by content-defined chunk (Xet-style dedup: a gear-hash chunker, 8/64/128 KiB
   min/target/max, chunks already in the old release are not re-sent).
3. ``--sweep``: the Parquet settings behind ParquetSettings' defaults, each measured for
   size, write time and re-upload cost of two changes to the same rows: the 1% append,
   and a block of 1% of the rows removed from the middle (a withdrawn batch: major).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hhdata import pipeline, synth  # noqa: E402
from hhdata.dedup import DedupSettings  # noqa: E402
from hhdata.io.read import read_pairs, read_raw  # noqa: E402
from hhdata.pairs import build_pairs  # noqa: E402
from hhdata.pairs.transcript import split_pair  # noqa: E402
from hhdata.release import ParquetSettings, write_data_files, write_release  # noqa: E402
from hhdata.schema import family_of, pair_id  # noqa: E402

MIN_CHUNK, MAX_CHUNK, MASK_BITS = 8 * 1024, 128 * 1024, 16  # target 64 KiB
WINDOW, BLOCK = 48, 8 << 20
GEAR = np.random.default_rng(20240501).integers(0, 2**63, size=256, dtype=np.uint64)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse modulo 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
with np.errstate(over="ignore"):
    POWERS = np.concatenate(
        [[np.uint64(1)], np.cumprod(np.full(BLOCK + WINDOW - 1, _BASE, dtype=np.uint64))]
    )
    INVERSES = np.concatenate(
        [[np.uint64(1)], np.cumprod(np.full(BLOCK + WINDOW - 1, _BASE_INV, dtype=np.uint64))]
    )


def boundary_candidates(data: bytes) -> np.ndarray:
    """Offsets just past each byte where a rolling hash of the last 48 bytes has 16 zero top bits.

    The hash of a window is a polynomial sum_j gear[b_j] * B^(j - start) modulo 2^64, taken
    for every byte at once from prefix sums: (P_i - P_(i-48)) * B^-(i-47).
    """
    found = []
    with np.errstate(over="ignore"):
        for begin in range(0, len(data), BLOCK):
            lead = min(begin, WINDOW - 1)
            count = min(BLOCK, len(data) - begin) + lead
            gears = GEAR[np.frombuffer(data, dtype=np.uint8, count=count, offset=begin - lead)]
            prefix = np.concatenate(
                [[np.uint64(0)], np.cumsum(gears * POWERS[:count], dtype=np.uint64)]
            )
            ends = np.arange(WINDOW, count + 1)  # window = bytes [end - WINDOW, end)
            hashes = (prefix[ends] - prefix[ends - WINDOW]) * INVERSES[ends - WINDOW]
            hits = ends[(hashes >> np.uint64(64 - MASK_BITS)) == 0]
            found.append(hits[hits > lead] - lead + begin)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def chunk_hashes(data: bytes) -> list[tuple[bytes, int]]:
    """Content-defined chunks of data as (sha256, length), min 8 KiB, max 128 KiB."""
    candidates = boundary_candidates(data)
    chunks, start = [], 0
    while start < len(data):
        end = min(start + MAX_CHUNK, len(data))
        index = np.searchsorted(candidates, start + MIN_CHUNK, side="left")
        if index < len(candidates) and candidates[index] < end:
            end = int(candidates[index])
        chunks.append((hashlib.sha256(data[start:end]).digest(), end - start))
        start = end
    return chunks


def reupload(old: Path, new: Path) -> dict:
    """Bytes of ``new`` a Hub upload would send, given ``old`` is already there."""
    old_files = {p.relative_to(old): p for p in old.rglob("*") if p.is_file()}
    new_files = {p.relative_to(new): p for p in new.rglob("*") if p.is_file()}
    known = {digest for p in old_files.values() for digest, _ in chunk_hashes(p.read_bytes())}
    total = sum(p.stat().st_size for p in new_files.values())
    by_file = by_chunk = 0
    for name, path in new_files.items():
        data = path.read_bytes()
        if name in old_files and old_files[name].read_bytes() == data:
            continue
        by_file += len(data)
        by_chunk += sum(size for digest, size in chunk_hashes(data) if digest not in known)
    return {"release_bytes": total, "by_file": by_file, "by_chunk": by_chunk}


def append_new_pairs(corpus: Path, target: Path, fraction: float, seed: int) -> int:
    """Copy the corpus, appending ``fraction`` new pairs to each file; returns how many."""
    added = 0
    for source in sorted(corpus.rglob("*.jsonl.gz")):
        lines = gzip.decompress(source.read_bytes()).splitlines(keepends=True)
        extra = synth.generate(max(1, round(len(lines) * fraction)), seed=seed + added)
        lines += [(json.dumps(r) + "\n").encode() for r in extra]
        added += len(extra)
        out = target / source.relative_to(corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.compress(b"".join(lines), compresslevel=1, mtime=0))
    return added


def usual_route(corpus: Path, out: Path, cache: Path) -> int:
    """load_dataset("json") + map(split_pair) + to_parquet, per subset and split."""
    import datasets

    datasets.disable_progress_bars()
    rows = 0
    for path in sorted(corpus.rglob("*.jsonl.gz")):
        subset, split = path.parent.name, path.name.split(".")[0]
        family = family_of(subset)

        def parse(record, subset=subset, family=family, split=split):  # bound per file
            try:
                pair = split_pair(record["chosen"], record["rejected"])
            except ValueError:
                return {
                    "id": None,
                    "subset": subset,
                    "family": family,
                    "split": split,
                    "prompt": [],
                    "chosen": [],
                    "rejected": [],
                    "flags": [],
                }
            return {
                "id": pair_id(record["chosen"], record["rejected"]),
                "subset": subset,
                "family": family,
                "split": split,
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "flags": pair.flags,
            }

        ds = datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(cache)
        )
        ds = ds.rename_columns({"chosen": "chosen_text", "rejected": "rejected_text"})
        ds = ds.map(lambda r: parse({"chosen": r["chosen_text"], "rejected": r["rejected_text"]}))
        ds = ds.filter(lambda r: r["id"] is not None)
        target = out / "data" / subset / f"{split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(target))
        rows += ds.num_rows
    return rows


def same_work_as_usual(corpus: Path, out: Path) -> int:
    """hhdata's stages doing what the usual route does: read, parse, write (no dedup beyond
    one row per id)."""
    pair_rows = read_pairs([corpus]).table
    # a release holds each pair id once; the planted exact copies share an id
    _, first = np.unique(pair_rows["id"].to_numpy(zero_copy_only=False), return_index=True)
    pair_rows = pair_rows.take(np.sort(first))
    accounting = {
        "read": pair_rows.num_rows,
        "kept": pair_rows.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }
    write_release(pair_rows, out, "1.0.0", sources=[], accounting=accounting, settings={})
    return pair_rows.num_rows


ROUTES = {
    "usual": "usual: load_dataset(json) + map(split_pair) + to_parquet",
    "none": "hhdata stages, same work as usual (read_pairs + write_release, no dedup)",
    "exact": "hhdata build_release, exact dedup only",
    "default": "hhdata build_release, exact + near dedup (default)",
}


def same_start(corpus: Path) -> bool:
    """Every route starts from the same state: written files flushed, the page cache dropped
    where allowed (a route's leftovers, such as the datasets cache of several GB, otherwise
    make the next one reclaim memory as it allocates), and the corpus read into the cache.
    Returns whether the cache was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        dropped = True
    except OSError:
        dropped = False
    for path in corpus.rglob("*"):
        if path.is_file():
            path.read_bytes()
    return dropped


def run_route(route: str, work: Path) -> dict:
    """One route, timed, in this (fresh) process: seconds and rows written."""
    corpus, subsets = work / "corpus", synthetic_subsets(work / "corpus")
    started = time.perf_counter()
    if route == "usual":
        rows = usual_route(corpus, work / "usual", work / "hf-cache")
    elif route == "none":
        rows = same_work_as_usual(corpus, work / "no-dedup")
    else:
        settings = DedupSettings(near=route == "default")
        built = pipeline.build_release(
            [corpus],
            version="1.0.0",
            include_synthetic=subsets,
            out=work / ("releases" if route == "default" else "exact-only"),
            dedup_settings=settings,
        )
        rows = built.manifest["accounting"]["kept"]
    return {"seconds": time.perf_counter() - started, "rows": rows}


def synthetic_subsets(corpus: Path) -> list[str]:
    return sorted({p.parent.name for p in corpus.rglob("*.jsonl.gz")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=170_000)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    parser.add_argument("--sweep", action="store_true", help="also measure Parquet settings")
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the settings sweep, on the releases already in --work",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="only seconds per stage, on the corpus already in --work",
    )
    parser.add_argument("--route", choices=list(ROUTES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.route:
        print(json.dumps(run_route(args.route, args.work)))
        return
    if args.stages:
        stage_timings(args.work / "corpus", args.work / "stages")
        return
    if args.sweep_only:
        sweep(args.work / "releases" / "1.0.0", args.work / "releases" / "1.1.0", args.work)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="hhdata-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-cache")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )

    started = time.perf_counter()
    synth.write_corpus(work / "corpus", args.pairs, seed=0)
    appended = append_new_pairs(work / "corpus", work / "corpus-1.1", 0.01, seed=10_000)
    print(
        f"corpus: {args.pairs} pairs (+{appended} for 1.1.0) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    subsets = synthetic_subsets(work / "corpus")

    # each route in a fresh process, one after the other: none inherits another's warm
    # caches, heap or imports, or pays for another's disk writes, and the order does not
    # favour a side
    results = {}
    dropped = True
    for route in ROUTES:
        dropped &= same_start(work / "corpus")
        child = subprocess.run(
            [sys.executable, __file__, "--work", str(work), "--route", route],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ,
        )
        results[route] = json.loads(child.stdout.strip().splitlines()[-1])
        print(route, results[route], flush=True)
    if not dropped:
        print(
            "note: the page cache could not be dropped between routes (not root); later routes "
            "may pay to reclaim the memory earlier ones left in it"
        )
    theirs = results["usual"]["seconds"]
    print("\n| route | rows written | seconds | speed-up |\n|---|---:|---:|---:|")
    for route, label in ROUTES.items():
        seconds = results[route]["seconds"]
        print(f"| {label} | {results[route]['rows']} | {seconds:.1f} | {theirs / seconds:.1f}x |")
    v1_path = work / "releases" / "1.0.0"

    started = time.perf_counter()
    v2 = pipeline.build_release(
        [work / "corpus-1.1"],
        version="1.1.0",
        out=work / "releases",
        previous=v1_path,
        include_synthetic=subsets,
    )
    print(
        f"\nhhdata build_release 1.1.0 with --previous 1.0.0 (diff included): "
        f"{time.perf_counter() - started:.1f} s"
    )
    sent = reupload(v1_path, v2.path)
    print(
        f"\nminor version 1.1.0 ({v2.diff.change}: +{len(v2.diff.configs['all'].added)} pairs, "
        f"-{len(v2.diff.configs['all'].removed)}, ~{len(v2.diff.configs['all'].edited)})"
    )
    print("| re-upload counted | bytes | % of the 1.1.0 release |\n|---|---:|---:|")
    for key in ("by_file", "by_chunk"):
        print(
            f"| {key.replace('_', ' ')} | {sent[key]} | "
            f"{100 * sent[key] / sent['release_bytes']:.2f}% |"
        )
    print(f"| (release size) | {sent['release_bytes']} | 100% |")

    if args.sweep:
        sweep(v1_path, v2.path, work)


def stage_timings(corpus: Path, out: Path) -> None:
    """Seconds per stage of build_release, each stage run once on the same corpus."""
    from hhdata import dedup, memory
    from hhdata.dedup import configs

    def timed(label, call):
        started = time.perf_counter()
        result = call()
        print(f"| {label} | {time.perf_counter() - started:.1f} |")
        return result

    print("\n| stage | seconds |\n|---|---:|")
    raw = timed("read_raw (read + validate)", lambda: read_raw([corpus]))
    pair_rows, _ = timed("build_pairs (parse)", lambda: build_pairs(raw.table))
    with memory.large_run():  # as build_release runs them
        timed(
            "deduplicate, exact only",
            lambda: dedup.deduplicate(pair_rows, DedupSettings(near=False)),
        )
        deduplicated = timed(
            "deduplicate, exact + near (default)", lambda: dedup.deduplicate(pair_rows)
        )
    kept = deduplicated.kept
    timed(
        "leakage_report, reusing deduplicate's prompt sketch (what build_release does)",
        lambda: configs.leakage_report(kept, examples=0, sketch=deduplicated.prompt_sketch),
    )
    timed(
        "leakage_report, making its own sketch (as with near=False)",
        lambda: configs.leakage_report(kept, examples=0),
    )
    accounting = {
        "read": kept.num_rows,
        "kept": kept.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }
    shutil.rmtree(out, ignore_errors=True)
    timed(
        "write_release (Parquet, plot, manifest, card, croissant)",
        lambda: write_release(kept, out, "1.0.0", sources=[], accounting=accounting, settings={}),
    )


def sweep(v1: Path, v2: Path, work: Path) -> None:
    """Data files only, each setting on the same rows: size, write time, and re-upload for
    two changes: the 1.1.0 append, and 1% of 1.0.0's rows removed in one block."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def rows(release: Path) -> pa.Table:
        return pa.concat_tables(pq.read_table(f) for f in sorted(release.glob("data/*/*.parquet")))

    base, appended = rows(v1), rows(v2)
    # a withdrawn batch: 1% of the rows, one block from the middle of the release
    cut = np.arange(base.num_rows)
    removed = base.filter(pa.array((cut < 0.45 * len(cut)) | (cut >= 0.46 * len(cut))))
    candidates = {
        "defaults (zstd 3, 1k rows, CDC 256 KiB-1 MiB pages)": ParquetSettings(),
        "zstd 3, 1k rows, no CDC": ParquetSettings(use_content_defined_chunking=False),
        "zstd 1, 1k rows, CDC": ParquetSettings(compression_level=1),
        "snappy, 1k rows, CDC": ParquetSettings(compression="snappy", compression_level=None),
        "zstd 3, 10k rows, CDC": ParquetSettings(row_group_size=10_000),
        "zstd 3, 10k rows, no CDC": ParquetSettings(
            row_group_size=10_000, use_content_defined_chunking=False
        ),
        "zstd 3, 100k rows, CDC": ParquetSettings(row_group_size=100_000),
    }
    print(
        "\n| parquet settings | data bytes | write s | re-upload, 1% appended | re-upload, 1% "
        "removed |"
        "\n|---|---:|---:|---:|---:|"
    )
    for label, settings in candidates.items():
        folder = work / "sweep" / "".join(c if c.isalnum() else "_" for c in label)
        shutil.rmtree(folder, ignore_errors=True)
        roots = {name: folder / name for name in ("base", "appended", "removed")}
        seconds = {}
        for (name, root), table in zip(roots.items(), (base, appended, removed)):
            root.mkdir(parents=True)
            started = time.perf_counter()
            write_data_files(table, root, settings)
            seconds[name] = time.perf_counter() - started
        cells = []
        for change in ("appended", "removed"):
            sent = reupload(roots["base"], roots[change])
            cells.append(
                f"{sent['by_chunk']} ({100 * sent['by_chunk'] / sent['release_bytes']:.2f}%)"
            )
        size = sum(p.stat().st_size for p in roots["base"].rglob("*.parquet"))
        print(f"| {label} | {size} | {seconds['base']:.1f} | {cells[0]} | {cells[1]} |")
    print(json.dumps(dataclasses.asdict(ParquetSettings())))


if __name__ == "__main__":
    main()
