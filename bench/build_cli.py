"""Benchmark whole commands as users run them: `hhdata build` and `hhdata dedup` against the
routes they would otherwise take, on a dense and a sparse corpus, and a cost curve over sizes.

Usage:
    .venv/bin/python bench/build_cli.py --corpus dense=/tmp/dense170k \\
        --corpus sparse=/tmp/synth170k --work /tmp/bc --md /tmp/bc/build_cli.md
    .venv/bin/python bench/build_cli.py --scale dense=42500,85000,170000 \\
        --scale sparse=42500,85000,170000 --rounds 3 --work /tmp/bc --md /tmp/bc/scale.md

Each command runs in a fresh process under /usr/bin/time (wall seconds, user and system
CPU seconds, peak resident memory), one after another in one run:

* ``hhdata build CORPUS --version 1.0.0 --out DIR`` (read, validate, parse, degenerate
  pairs, exact and near dedup, the train/test leakage check, Parquet, card, manifest);
* the ``datasets`` route: ``load_dataset("json")`` per file, ``map`` with a Python
  transcript split (hhdata.pairs.transcript.split_pair) and ``to_parquet`` per file. It
  validates and deduplicates nothing, so it does less work;
* ``hhdata dedup CORPUS`` (read, parse, degenerate pairs, exact and near dedup);
* the datasketch route: JSON lines read with ``json``, exact duplicates by a set of the
  lower-cased, whitespace-collapsed pair texts, then each pair's text (prompt and both
  replies, 5-word shingles) through ``MinHash.bulk``, ``MinHashLSH`` (32 bands x 4 rows of
  128 permutations) and ``query``, a text dropped when a kept one's estimate reaches 0.7.

Corpora (never in the repository): dense ``bench/corpora.py --pairs N --seed 0 --out DIR``
(real HH turns recombined: shared prompts and turns), sparse ``python -m hhdata.synth
--pairs N --seed 0 --out DIR`` (gzip upstream layout, planted duplicates). ``--scale``
makes the corpora it lacks under --work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HHDATA = [str(Path(PYTHON).parent / "hhdata")]  # the console script of this environment


def jsonl_files(corpus: Path) -> list[Path]:
    """The corpus's JSON Lines files (plain or gzip), in a stable order."""
    return sorted(p for p in corpus.rglob("*.jsonl*") if p.name.endswith((".jsonl", ".jsonl.gz")))


def synthetic_subsets(corpus: Path) -> list[str]:
    """The synth-* subsets of a corpus (`hhdata build` refuses them unless named)."""
    return sorted(
        {p.parent.name for p in jsonl_files(corpus) if p.parent.name.startswith("synth-")}
    )


def datasets_route(corpus: Path, out: Path) -> int:
    """load_dataset("json") + map(split_pair) + to_parquet, per file."""
    import datasets

    from hhdata.pairs.transcript import split_pair
    from hhdata.schema import pair_id

    datasets.disable_progress_bars()
    rows = 0
    for path in jsonl_files(corpus):
        subset, split = path.parent.name, path.name.split(".")[0]

        def parse(record):
            try:
                pair = split_pair(record["chosen_text"], record["rejected_text"])
            except ValueError:
                return {"id": None, "prompt": [], "chosen": [], "rejected": [], "flags": []}
            return {
                "id": pair_id(record["chosen_text"], record["rejected_text"]),
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "flags": pair.flags,
            }

        ds = datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(out / "hf-cache")
        )
        ds = ds.rename_columns({"chosen": "chosen_text", "rejected": "rejected_text"})
        ds = ds.map(parse).filter(lambda r: r["id"] is not None)
        ds = ds.add_column("subset", [subset] * ds.num_rows)
        ds = ds.add_column("split", [split] * ds.num_rows)
        target = out / "data" / subset / f"{split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(target))
        rows += ds.num_rows
    return rows


def datasketch_route(corpus: Path) -> dict:
    """Exact duplicates by a set of normalised texts, then datasketch MinHash LSH."""
    from datasketch import MinHash, MinHashLSH

    from hhdata.pairs.transcript import split_pair

    texts, seen, exact = [], set(), 0
    for path in jsonl_files(corpus):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                try:
                    pair = split_pair(record["chosen"], record["rejected"])
                except ValueError:
                    continue
                text = " ".join(t["content"] for t in pair.prompt + pair.chosen + pair.rejected)
                key = " ".join(text.lower().split())
                if key in seen:
                    exact += 1
                    continue
                seen.add(key)
                texts.append(text)
    shingles = []
    for text in texts:
        words = text.lower().split()
        if len(words) < 5:
            shingles.append([" ".join(words).encode()] if words else [])
        else:
            shingles.append(
                list({" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)})
            )
    minhashes = MinHash.bulk(shingles, num_perm=128, seed=1)
    lsh = MinHashLSH(threshold=0.7, num_perm=128, params=(32, 4))
    near = 0
    for key, (shingle_list, mh) in enumerate(zip(shingles, minhashes)):
        if not shingle_list:
            continue
        if any(mh.jaccard(minhashes[other]) >= 0.7 for other in lsh.query(mh)):
            near += 1  # a near duplicate of a kept text: dropped, not indexed
            continue
        lsh.insert(key, mh)
    return {"read": len(texts) + exact, "exact": exact, "near": near}


def timed(command: list[str], log: Path) -> dict:
    """Run a command under /usr/bin/time; wall, user, sys seconds and peak RSS (MB)."""
    stats = log.with_suffix(".time")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-o", str(stats), "-f", "%e %U %S %M", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    fields = stats.read_text().split()[-4:]
    return {
        "wall": wall,
        "user": float(fields[1]),
        "sys": float(fields[2]),
        "peak_mb": int(fields[3]) / 1024,
        "command": " ".join(command),
    }


def build_command(corpus: Path, out: Path) -> list[str]:
    extra = [f for s in synthetic_subsets(corpus) for f in ("--include-synthetic", s)]
    return [*HHDATA, "build", str(corpus), "--version", "1.0.0", "--out", str(out), *extra]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def side_by_side(corpora: dict[str, Path], work: Path, skip: set[str]) -> list[str]:
    """Both comparisons on every corpus; markdown lines."""
    lines = [
        "| corpus | command | wall s | user s | sys s | peak RSS MB | hhdata vs route (wall) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, corpus in corpora.items():
        runs = {}
        shutil.rmtree(work / f"hh-{name}", ignore_errors=True)
        runs["hhdata build"] = timed(
            build_command(corpus, work / f"hh-{name}"), work / f"build-{name}.log"
        )
        shutil.rmtree(work / f"ds-{name}", ignore_errors=True)
        route = [PYTHON, str(Path(__file__).resolve()), "--route", "datasets", str(corpus)]
        runs["datasets route"] = timed([*route, str(work / f"ds-{name}")], work / f"ds-{name}.log")
        shutil.rmtree(work / f"ds-{name}", ignore_errors=True)  # its cache is GBs
        runs["hhdata dedup"] = timed([*HHDATA, "dedup", str(corpus)], work / f"dedup-{name}.log")
        if "datasketch" not in skip:
            route = [PYTHON, str(Path(__file__).resolve()), "--route", "datasketch", str(corpus)]
            runs["datasketch route"] = timed(route, work / f"datasketch-{name}.log")
        versus = {"hhdata build": "datasets route", "hhdata dedup": "datasketch route"}
        for label, run in runs.items():
            other = runs.get(versus.get(label, ""))
            ratio = f"{other['wall'] / run['wall']:.2f}x" if other else ""
            lines.append(
                f"| {name} | {label} | {run['wall']:.1f} | {run['user']:.1f} | {run['sys']:.1f} | "
                f"{run['peak_mb']:,.0f} | {ratio} |"
            )
            print(lines[-1], flush=True)
        (work / f"side-by-side-{name}.json").write_text(json.dumps(runs, indent=1))
    return lines


def make_corpus(shape: str, pairs: int, work: Path) -> Path:
    """The corpus of a shape and size under work (made when missing)."""
    out = work / f"{shape}{pairs}"
    if not out.exists():
        if shape == "dense":
            command = [PYTHON, "bench/corpora.py", "--pairs", str(pairs), "--out", str(out)]
        else:
            command = [PYTHON, "-m", "hhdata.synth", "--pairs", str(pairs), "--out", str(out)]
        subprocess.run(
            [*command, "--seed", "0"],
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return out


def scale(sizes: dict[str, list[int]], work: Path, rounds: int = 1) -> list[str]:
    """`hhdata build` over sizes of each shape, ``rounds`` times (each round runs every
    size once, smallest first, so a burst of load on the shared machine lands on one round,
    not on one size); markdown lines with each size's median and the ratios of the medians
    to the smallest size's, and with several rounds the range of the ratios per round."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for number in range(rounds):
        for shape, counts in sizes.items():
            for pairs in counts:
                corpus = make_corpus(shape, pairs, work)
                out = work / f"scale-{shape}{pairs}"
                shutil.rmtree(out, ignore_errors=True)
                run = timed(build_command(corpus, out), work / f"scale-{shape}{pairs}.log")
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault((shape, pairs), []).append(run)
                print(
                    f"round {number + 1}: {shape} {pairs:,} pairs: {run['wall']:.1f} s wall, "
                    f"{run['user']:.1f} user, {run['sys']:.1f} sys, {run['peak_mb']:,.0f} MB",
                    flush=True,
                )
    lines = [
        f"{rounds} round(s); each figure is the median of its size's rounds"
        + ("; in brackets the lowest and highest ratio of one round's runs" if rounds > 1 else ""),
        "",
        "| corpus | pairs | wall s | user s | sys s | peak RSS MB | pairs vs first "
        "| time vs first | CPU vs first | memory vs first |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, counts in sizes.items():
        first = runs[shape, counts[0]]
        for pairs in counts:
            these = runs[shape, pairs]
            cells = {
                key: statistics.median(r[key] for r in these)
                for key in these[0]
                if key != "command"
            }
            base = {key: statistics.median(r[key] for r in first) for key in cells}
            cpu = (cells["user"] + cells["sys"]) / (base["user"] + base["sys"])
            time_ratio = f"{cells['wall'] / base['wall']:.2f}x"
            if rounds > 1:
                per_round = [a["wall"] / b["wall"] for a, b in zip(these, first)]
                time_ratio += f" [{min(per_round):.2f}-{max(per_round):.2f}]"
            lines.append(
                f"| {shape} | {pairs:,} | {cells['wall']:.1f} | {cells['user']:.1f} | "
                f"{cells['sys']:.1f} | {cells['peak_mb']:,.0f} | {pairs / counts[0]:.1f}x | "
                f"{time_ratio} | {cpu:.2f}x | {cells['peak_mb'] / base['peak_mb']:.2f}x |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=("datasets", "datasketch"), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--scale", action="append", default=[], metavar="SHAPE=N,N,N")
    parser.add_argument(
        "--rounds", type=int, default=1, help="--scale: runs of every size (medians reported)"
    )
    parser.add_argument("--skip", action="append", default=[], choices=("datasketch",))
    parser.add_argument("--work", type=Path, default=Path("/tmp/build_cli"))
    parser.add_argument("--md", type=Path, help="append the tables to this markdown file")
    args = parser.parse_args()
    if args.route == "datasets":
        print(datasets_route(Path(args.paths[0]), Path(args.paths[1])), "rows")
        return
    if args.route == "datasketch":
        print(json.dumps(datasketch_route(Path(args.paths[0]))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        f"Run of commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, {os.cpu_count()} cores; load before: `{uptime()}`",
        "",
    ]
    if args.corpus:
        corpora = {n: Path(p) for n, p in (c.split("=", 1) for c in args.corpus)}
        lines += side_by_side(corpora, args.work, set(args.skip))
    if args.scale:
        sizes = {
            s: [int(n) for n in v.split(",")] for s, v in (c.split("=", 1) for c in args.scale)
        }
        lines += [""] + scale(sizes, args.work, args.rounds)
    lines += ["", f"load after: `{uptime()}`", ""]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "a") as md:
            md.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
