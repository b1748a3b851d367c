"""Near-duplicate detection on the synthetic corpus: hhdata.dedup.minhash vs datasketch vs rensa.

Every tool gets the same prompts (the turn contents of each pair's prompt, as
hhdata.synth.prompt_tokens defines them), the same 5-word shingles, the same permutations,
bands and rows, and the same threshold; each runs end to end (shingling included) in a
fresh child process, so its peak memory is its own. Recall is measured on the planted near
duplicates whose prompt Jaccard is >= the threshold; a merged hard negative is a planted
hard-negative pair reported as similar.

    python -m hhdata.synth --pairs 170000 --seed 0 --out /tmp/synth170k
    python bench/dedup.py --corpus /tmp/synth170k --md bench/dedup.md

Also times exact deduplication (hhdata.dedup with near=False) of the whole pair table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = ("hhdata", "hhdata-estimate", "datasketch", "rensa")


def peak_mib() -> float:
    """This process's peak resident set so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- preparation (parent)


def prepare(corpus: Path, work: Path) -> dict:
    """Prompts of every pair (Parquet) and the planted truth as row-index pairs."""
    from hhdata.dedup import run as dedup
    from hhdata.io.read import read_pairs

    work.mkdir(parents=True, exist_ok=True)
    result = read_pairs([corpus], progress=False)
    pairs = result.table
    pq.write_table(pairs, work / "pairs.parquet")
    prompts = dedup.near_texts(pairs, "prompt")
    pq.write_table(pa.table({"text": prompts}), work / "prompts.parquet")
    rows_of: dict[str, list[int]] = {}
    for row, pair_id in enumerate(pairs["id"].to_pylist()):
        rows_of.setdefault(pair_id, []).append(row)
    truth = json.loads((corpus / "planted.json").read_text())
    planted = {}
    for kind in ("near_duplicates", "hard_negatives"):
        planted[kind] = [
            {
                "copies": rows_of[item["id"]],
                "originals": rows_of[item["original_id"]],
                "jaccard": item["jaccard"],
            }
            for item in truth[kind]
        ]
    return {"rows": pairs.num_rows, "planted": planted}


# ---------------------------------------------------------------- one tool (child)


def shingle_strings(texts: list[str], k: int) -> list[list[str]]:
    """The same shingles as hhdata.dedup.minhash, as strings: k lower-cased words joined by a
    space."""
    sets = []
    for text in texts:
        words = text.lower().split()
        if len(words) < k:
            sets.append([" ".join(words)] if words else [])
        else:
            sets.append(list({" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}))
    return sets


def run_hhdata(texts: pa.Array, args, verify: str) -> np.ndarray:
    """hhdata.dedup.minhash.similar_pairs over the prompt texts."""
    from hhdata.dedup import minhash

    pairs, _ = minhash.similar_pairs(
        texts,
        shingle_size=args.shingle_size,
        num_perm=args.num_perm,
        bands=args.bands,
        rows=args.rows,
        threshold=args.threshold,
        verify=verify,
        seed=1,
    )
    return pairs


def run_datasketch(texts: list[str], args) -> np.ndarray:
    """datasketch: MinHash.bulk, MinHashLSH with the same bands x rows, estimate-verified."""
    from datasketch import MinHash, MinHashLSH

    sets = shingle_strings(texts, args.shingle_size)
    minhashes = MinHash.bulk(
        [[s.encode("utf-8") for s in shingles] for shingles in sets], num_perm=args.num_perm, seed=1
    )
    lsh = MinHashLSH(
        threshold=args.threshold, num_perm=args.num_perm, params=(args.bands, args.rows)
    )
    with lsh.insertion_session() as session:
        for key, (shingles, mh) in enumerate(zip(sets, minhashes)):
            if shingles:
                session.insert(key, mh)
    found = []
    for key, (shingles, mh) in enumerate(zip(sets, minhashes)):
        if not shingles:
            continue
        for other in lsh.query(mh):
            if other > key and mh.jaccard(minhashes[other]) >= args.threshold:
                found.append((key, other))
    return np.array(found, dtype=np.int64).reshape(-1, 2)


def run_rensa(texts: list[str], args) -> np.ndarray:
    """rensa: RMinHash.from_token_sets, RMinHashLSH with the same bands, estimate-verified."""
    from rensa import RMinHash, RMinHashLSH

    sets = shingle_strings(texts, args.shingle_size)
    keys = [key for key, shingles in enumerate(sets) if shingles]
    minhashes = RMinHash.from_token_sets([sets[key] for key in keys], args.num_perm, 1)
    lsh = RMinHashLSH(args.threshold, args.num_perm, args.bands)
    lsh.insert_pairs(list(zip(keys, minhashes)))
    by_key = dict(zip(keys, minhashes))
    found = []
    for key, candidates in zip(keys, lsh.query_all(minhashes)):
        for other in candidates:
            if other > key and by_key[key].jaccard(by_key[other]) >= args.threshold:
                found.append((key, other))
    return np.array(found, dtype=np.int64).reshape(-1, 2)


def child(args) -> None:
    """Run one tool on the prepared prompts; print its time, memory and pair count as JSON."""
    texts = pq.read_table(Path(args.work) / "prompts.parquet")["text"].combine_chunks()
    if args.tool not in ("hhdata", "hhdata-estimate"):
        texts = texts.to_pylist()
    baseline = peak_mib()
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    if args.tool == "hhdata":
        pairs = run_hhdata(texts, args, "exact")
    elif args.tool == "hhdata-estimate":
        pairs = run_hhdata(texts, args, "estimate")
    elif args.tool == "datasketch":
        pairs = run_datasketch(texts, args)
    else:
        pairs = run_rensa(texts, args)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    np.save(Path(args.work) / f"pairs-{args.tool}.npy", pairs)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_mib": peak_mib(),
                "baseline_mib": baseline,
                "pairs": len(pairs),
            }
        )
    )


# ---------------------------------------------------------------- scoring and the table (parent)


def score(found: np.ndarray, planted: dict, threshold: float) -> dict:
    """Recall on planted near duplicates at >= threshold; hard negatives reported as similar."""
    pairs = {(int(a), int(b)) for a, b in found.tolist()}

    def hit(item) -> bool:
        return any(
            (min(c, o), max(c, o)) in pairs for c in item["copies"] for o in item["originals"]
        )

    near = [item for item in planted["near_duplicates"] if item["jaccard"] >= threshold]
    return {
        "recall": sum(map(hit, near)) / max(len(near), 1),
        "near_planted": len(near),
        "near_found": sum(map(hit, near)),
        "hard_negatives_merged": sum(map(hit, planted["hard_negatives"])),
    }


def time_exact(work: Path) -> dict:
    """Time exact-duplicate keys alone and deduplicate(near=False) on the whole pair table."""
    from hhdata import memory
    from hhdata.dedup import run as dedup

    pairs = pq.read_table(work / "pairs.parquet")
    settings = dedup.DedupSettings(near=False)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    keys = dedup.exact_keys(pairs, settings)
    _, first = np.unique(keys, return_index=True)
    keys_seconds, keys_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with memory.large_run():  # as `hhdata dedup` runs it
        result = dedup.deduplicate(pairs, settings)
    return {
        "exact_keys_seconds": keys_seconds,
        "exact_keys_cpu_seconds": keys_cpu,
        "duplicates": pairs.num_rows - len(first),
        "deduplicate_seconds": time.perf_counter() - start,
        "deduplicate_cpu_seconds": cpu_seconds() - cpu_start,
        "dropped": result.report["dropped_by_reason"],
    }


def run_stage(work: Path, corpus: Path, scope: str, sketch: str = "oph") -> tuple[str, dict]:
    """The whole deduplicate() stage at its defaults (near_scope and sketch as given), scored
    on planted.json; also returns the drops by id."""
    from hhdata import memory
    from hhdata.dedup import run as dedup

    pairs = pq.read_table(work / "pairs.parquet")
    truth = json.loads((corpus / "planted.json").read_text())
    settings = dedup.DedupSettings(near_scope=scope, sketch=sketch)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with memory.large_run():  # as `hhdata dedup` runs it
        result = dedup.deduplicate(pairs, settings)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    drops = {row["id"]: row for row in result.drops.to_pylist()}

    def caught(item) -> bool:  # the copy dropped onto its original, or the other way round
        return (
            drops.get(item["id"], {}).get("kept_id") == item["original_id"]
            or drops.get(item["original_id"], {}).get("kept_id") == item["id"]
        )

    lines = [
        f"\n`deduplicate(pairs, DedupSettings(near_scope={scope!r}, sketch={sketch!r}))` on "
        f"{pairs.num_rows:,} pairs: {seconds:.1f} s wall, {cpu:.1f} s CPU, dropped "
        f"{result.report['dropped_by_reason']}\n",
        "| planted | count | dropped onto its original |",
        "|---|---:|---:|",
    ]
    for kind in ("exact_duplicates", "swapped_duplicates", "case_whitespace_variants"):
        lines.append(f"| {kind} | {len(truth[kind])} | {sum(map(caught, truth[kind]))} |")
    near = truth["near_duplicates"]
    high = [item for item in near if item["jaccard"] >= settings.threshold]
    lines.append(
        f"| near_duplicates, prompt J >= {settings.threshold} | {len(high)} "
        f"| {sum(map(caught, high))} |"
    )
    lines.append(f"| near_duplicates, all | {len(near)} | {sum(map(caught, near))} |")
    negatives = truth["hard_negatives"]
    merged = sum(1 for item in negatives if item["id"] in drops or item["original_id"] in drops)
    lines.append(f"| hard_negatives (either side dropped) | {len(negatives)} | {merged} |")
    return "\n".join(lines) + "\n", drops


def main() -> None:
    """Prepare once, run each tool in a child process, score, print (and append) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="a corpus written by hhdata.synth (with planted.json)")
    parser.add_argument("--work", default="/tmp/hhdata-bench-dedup", help="scratch folder")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS)
    )
    parser.add_argument("--shingle-size", type=int, default=5)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--bands", type=int, default=32)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--reuse", action="store_true", help="reuse the prepared prompts in --work")
    parser.add_argument("--no-exact", action="store_true", help="skip timing exact deduplication")
    parser.add_argument(
        "--stage",
        choices=("prompt", "pair"),
        help="instead: time and score the whole deduplicate() stage with this near_scope",
    )
    parser.add_argument(
        "--sketch",
        choices=("oph", "minhash", "both"),
        default="oph",
        help="--stage: the signature scheme; 'both' runs each and compares their drops",
    )
    parser.add_argument("--md", help="append the result table to this Markdown file")
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tool:
        return child(args)

    work = Path(args.work)
    if args.reuse and (work / "prepared.json").is_file():
        prepared = json.loads((work / "prepared.json").read_text())
    else:
        prepared = prepare(Path(args.corpus), work)
        (work / "prepared.json").write_text(json.dumps(prepared))
    command = [
        sys.executable,
        __file__,
        "--work",
        str(work),
        "--shingle-size",
        str(args.shingle_size),
        "--num-perm",
        str(args.num_perm),
        "--bands",
        str(args.bands),
        "--rows",
        str(args.rows),
        "--threshold",
        str(args.threshold),
    ]
    if args.stage:
        runs = {
            sketch: run_stage(work, Path(args.corpus), args.stage, sketch)
            for sketch in (("minhash", "oph") if args.sketch == "both" else (args.sketch,))
        }
        text = "".join(table for table, _ in runs.values())
        if args.sketch == "both":
            (_, old), (_, new) = runs["minhash"], runs["oph"]
            same = sum(
                1 for key in old.keys() & new.keys() if old[key]["kept_id"] == new[key]["kept_id"]
            )
            text += (
                f"\nDrops compared: {len(old):,} with minhash, {len(new):,} with oph; {same:,} the "
                f"same row dropped onto the same kept row; only minhash: "
                f"{len(old.keys() - new.keys())}, "
                f"only oph: {len(new.keys() - old.keys())}\n"
            )
        print(text)
        if args.md:
            with open(args.md, "a", encoding="utf-8") as out:
                out.write(text)
        return
    results = {}
    for tool in args.tools.split(","):
        output = subprocess.run(
            command + ["--tool", tool], check=True, capture_output=True, text=True
        )
        measured = json.loads(output.stdout.strip().splitlines()[-1])
        measured.update(
            score(np.load(work / f"pairs-{tool}.npy"), prepared["planted"], args.threshold)
        )
        results[tool] = measured
        print(tool, json.dumps(measured), flush=True)
    exact = None if args.no_exact else time_exact(work)
    print("exact", json.dumps(exact), flush=True)

    rows = prepared["rows"]
    lines = [
        f"\n### {rows:,} pairs, shingles of {args.shingle_size} words, {args.num_perm} "
        f"permutations, {args.bands} bands x {args.rows} rows, threshold {args.threshold}\n",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, Python "
        f"{platform.python_version()}; one run, tools one after another in fresh processes.\n",
        "| tool | wall s | CPU s | pairs/s (wall) | vs datasketch (wall, CPU) | vs rensa (wall, "
        "CPU) | recall (J >= threshold) | hard negatives merged | similar pairs "
        "| peak RSS MiB (before start) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, m in results.items():
        versus = {
            base: (
                f"{results[base]['seconds'] / m['seconds']:.2f}x, "
                f"{results[base]['cpu_seconds'] / m['cpu_seconds']:.2f}x"
                if base in results
                else "-"
            )
            for base in ("datasketch", "rensa")
        }
        lines.append(
            f"| {tool} | {m['seconds']:.1f} | {m['cpu_seconds']:.1f} | {rows / m['seconds']:,.0f} "
            f"| {versus['datasketch']} | "
            f"{versus['rensa']} | {m['recall']:.4f} ({m['near_found']}/{m['near_planted']}) | "
            f"{m['hard_negatives_merged']} | {m['pairs']:,} | {m['peak_mib']:,.0f} "
            f"({m['baseline_mib']:,.0f}) |"
        )
    if exact is not None:
        lines.append(
            f"\nExact deduplication of all {rows:,} pairs: "
            "keys (normalise + encode) "
            f"{exact['exact_keys_seconds']:.2f} s wall, "
            f"{exact['exact_keys_cpu_seconds']:.2f} s CPU; whole "
            f"`deduplicate(near=False)` (with degenerate checks and the report) "
            f"{exact['deduplicate_seconds']:.2f} s wall, "
            f"{exact['deduplicate_cpu_seconds']:.2f} s CPU; "
            f"dropped {exact['dropped']}.\n"
        )
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "a", encoding="utf-8") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
