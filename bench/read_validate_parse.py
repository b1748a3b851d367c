"""Benchmark: read + validate + parse 170k synthetic HH-RLHF pairs, hhdata vs the usual way.

The usual way: gzip line by line, ``json.loads`` per line, ``jsonschema`` validation of
each record against the same schema (schemas/raw_record.schema.json), and a Python split
of each transcript (hhdata.pairs.transcript.split_pair, the correct rule). hhdata: read_pairs,
that is read_raw (Arrow's JSON reader + vectorised schema checks) then build_pairs (speaker
tags found once with numpy, pieces cut by offsets) on each file in the thread that read
it, one thread per CPU, and again in one thread.

Each side runs in its own subprocess, one after the other in one run, so its peak memory
(VmHWM) and CPU time (user + system) are its own. Each writes a verdict per line
(accepted, or the reason) and a digest of every accepted pair's content; the run fails
unless all agree on every record.

    .venv/bin/python bench/read_validate_parse.py            # 170k pairs, corpus cached
    .venv/bin/python bench/read_validate_parse.py --pairs 20000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def corpus(pairs: int, seed: int, bad_rate: float) -> Path:
    """The synthetic corpus (hhdata.synth), written once into bench/.cache."""
    from hhdata.synth import write_corpus

    folder = HERE / ".cache" / f"synth-{pairs}-seed{seed}-bad{bad_rate}"
    if not (folder / "planted.json").is_file():
        write_corpus(folder, pairs, seed=seed, bad_rate=bad_rate)
    return folder


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jsonl.gz"))


def run_hhdata(folder: Path):
    """hhdata: read_pairs, that is read_raw + build_pairs per file in one pool (the timed part)."""
    from hhdata.io.read import read_pairs

    return read_pairs(files_of(folder))


def run_inflate(folder: Path) -> tuple[dict, list]:
    """The floor of any reader of these files: inflating them (ISA-L, as hhdata does)."""
    from isal import isal_zlib

    size = sum(len(isal_zlib.decompress(path.read_bytes(), wbits=31)) for path in files_of(folder))
    return {}, [size]


def hhdata_verdicts(result) -> tuple[dict, list]:
    """Verdicts by (file, line) and the accepted rows' (file, line), outside the timing."""
    quarantine = result.quarantine
    verdicts = {
        (file, line): reason
        for file, line, reason in zip(
            *(quarantine[c].to_pylist() for c in ("file", "line", "reason"))
        )
    }
    return verdicts, [result.sources, result.table]


def run_baseline(folder: Path) -> tuple[dict, list]:
    """The usual way, one record at a time."""
    return baseline(files_of(folder))


def baseline(paths: list[Path], pair_ids: bool = True) -> tuple[dict, list]:
    """json.loads + jsonschema + split_pair (+ pair_id), one record at a time, over plain
    or gzip JSONL files: verdicts by (file, line) and the accepted rows.

    Also the jsonschema route of bench/validate_cli.py (with pair_ids=False: a validation
    needs no ids).
    """
    import gzip

    from jsonschema import Draft202012Validator

    from hhdata.errors import PairError
    from hhdata.pairs.transcript import split_pair
    from hhdata.schema import pair_id

    schema = json.loads((HERE.parent / "schemas" / "raw_record.schema.json").read_text())
    validator = Draft202012Validator(schema)
    reason_of = {
        "required": "missing_key",
        "additionalProperties": "extra_key",
        "type": "wrong_type",
        "minLength": "empty_string",
    }
    verdicts, rows = {}, []
    for path in paths:
        with path.open("rb") as head:
            compressed = head.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                key = (str(path), number)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    verdicts[key] = "invalid_utf8"
                    continue
                if not text.strip(" \t\r\n"):
                    continue
                try:
                    record = json.loads(text)
                except ValueError:
                    verdicts[key] = "invalid_json"
                    continue
                if not isinstance(record, dict):
                    verdicts[key] = "not_an_object"
                    continue
                errors = sorted(validator.iter_errors(record), key=lambda e: list(e.path))
                if errors:
                    reason = reason_of.get(errors[0].validator, "schema_violation")
                    verdicts[key] = (
                        "null_value"
                        if reason == "wrong_type" and errors[0].instance is None
                        else reason
                    )
                    continue
                if record["chosen"] == record["rejected"]:
                    verdicts[key] = "chosen_equals_rejected"
                    continue
                try:
                    pair = split_pair(record["chosen"], record["rejected"])
                except PairError as error:
                    verdicts[key] = error.reason
                    continue
                row_id = pair_id(record["chosen"], record["rejected"]) if pair_ids else None
                rows.append((key, record, pair, row_id))
    return verdicts, rows


def digest_hhdata(accepted_and_pairs: list) -> tuple[int, str]:
    accepted, pairs = accepted_and_pairs
    digest = hashlib.sha256()
    columns = ["prompt", "chosen", "rejected", "flags", "chosen_text", "rejected_text", "id"]
    for start in range(0, pairs.num_rows, 20_000):
        keys = accepted.slice(start, 20_000).to_pylist()
        for key, row in zip(keys, pairs.select(columns).slice(start, 20_000).to_pylist()):
            digest.update(json.dumps([key["file"], key["line"], *row.values()]).encode())
    return pairs.num_rows, digest.hexdigest()


def digest_baseline(rows: list) -> tuple[int, str]:
    digest = hashlib.sha256()
    for (file, line), record, pair, row_id in rows:
        values = [
            pair.prompt,
            pair.chosen,
            pair.rejected,
            pair.flags,
            record["chosen"],
            record["rejected"],
            row_id,
        ]
        digest.update(json.dumps([file, line, *values]).encode())
    return len(rows), digest.hexdigest()


def peak_rss_kib() -> int:
    """Peak resident memory of this process since exec (VmHWM; ru_maxrss would include
    the parent's memory at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(mode: str, folder: Path, verdict_file: Path) -> None:
    """Run one side, then print its timing, peak memory and digest as JSON."""
    import jsonschema  # noqa: F401

    import hhdata.io.read  # noqa: F401  (imports are not timed on either side)
    import hhdata.pairs  # noqa: F401

    if mode.startswith("hhdata"):
        try:  # pyarrow imports pandas (0.2-0.3 s) on its first pa.array of Python objects
            import pandas  # noqa: F401
        except ImportError:
            pass
    if mode == "hhdata-1thread":
        os.cpu_count = lambda: 1  # hhdata sizes its thread pools by the CPU count
    started, cpu_started = time.perf_counter(), time.process_time()
    run = {
        "hhdata": run_hhdata,
        "hhdata-1thread": run_hhdata,
        "baseline": run_baseline,
        "inflate": run_inflate,
    }[mode]
    result = run(folder)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kib = peak_rss_kib()
    verdicts, result = hhdata_verdicts(result) if mode.startswith("hhdata") else result
    if mode == "inflate":
        accepted, digest = 0, f"{result[0]} bytes"
    else:
        accepted, digest = (digest_hhdata if mode.startswith("hhdata") else digest_baseline)(result)
    verdict_file.write_text(json.dumps(sorted([f, n, r] for (f, n), r in verdicts.items())))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_mib": peak_kib / 1024,
                "accepted": accepted,
                "quarantined": len(verdicts),
                "digest": digest,
            }
        )
    )


def phases(folder: Path) -> dict[str, float]:
    """CPU seconds of hhdata's parts, single-threaded, by wrapping its functions."""
    import functools

    os.cpu_count = lambda: 1  # one thread for reading and for pairs
    from hhdata.io import read
    from hhdata.pairs import build as pairs

    spent: dict[str, float] = {}

    def timed(owner, name):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - started

        setattr(owner, name, wrapper)

    timed(read.pa_json, "read_json")
    timed(read, "_invalid_utf8_rows")
    for name in ("_find_tags", "_split_fast", "_prompt_turns", "_flags", "_ids"):
        timed(pairs, name)
    for _ in range(2):  # the second run is reported: warm caches and kernels
        spent.clear()
        started = time.process_time()
        raw = read.read_raw(files_of(folder))
        spent["read_raw"] = time.process_time() - started
        started = time.process_time()
        pairs.build_pairs(raw.table)
        spent["build_pairs"] = time.process_time() - started
    return spent


def free_cores() -> float:
    """How many CPUs two busy threads get right now: work done by 2 threads / by 1 thread
    in the same wall time (numpy releases the GIL), so 2.0 on an idle 2-CPU machine."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    values = np.random.default_rng(0).random(2_000_000)

    def work(_: int) -> None:
        for _ in range(20):
            np.sqrt(values).sum()

    walls = []
    for threads in (1, 2):
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        walls.append(time.perf_counter() - started)
    return 2 * walls[0] / walls[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=170_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bad-rate", type=float, default=0.002, help="bad lines per pair, planted by hhdata.synth"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds; each side's fastest is reported"
    )
    parser.add_argument(
        "--phases", action="store_true", help="print CPU seconds of hhdata's parts instead"
    )
    parser.add_argument(
        "--worker",
        choices=("hhdata", "hhdata-1thread", "baseline", "inflate"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--verdicts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.verdicts)
        return 0

    started = time.perf_counter()
    folder = corpus(args.pairs, args.seed, args.bad_rate)
    if args.phases:
        for name, seconds in phases(folder).items():
            print(f"| {name} | {seconds:.2f} |")
        return 0
    print(
        f"corpus {folder} ({time.perf_counter() - started:.1f} s, "
        f"{sum(p.stat().st_size for p in files_of(folder)) / 2**20:.1f} MiB gzip)",
        file=sys.stderr,
    )
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cores_before = free_cores()
    modes = ("hhdata", "hhdata-1thread", "baseline", "inflate")
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    verdicts: dict[str, list] = {mode: [] for mode in modes}
    for _ in range(args.repeat):  # sides alternate, so a busy spell on the machine hits all
        for mode in modes:
            verdict_file = HERE / ".cache" / f"verdicts-{mode}.json"
            command = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                "--data",
                str(folder),
                "--verdicts",
                str(verdict_file),
            ]
            completed = subprocess.run(command, check=True, capture_output=True, text=True)
            rounds[mode].append(json.loads(completed.stdout))
            verdicts[mode].append(json.loads(verdict_file.read_text()))
            print(f"{mode}: {rounds[mode][-1]}", file=sys.stderr)
    # each side's fastest round (by wall time) is reported; every round must agree
    results = {mode: min(runs, key=lambda r: r["seconds"]) for mode, runs in rounds.items()}
    sides = [v for mode in ("hhdata", "hhdata-1thread", "baseline") for v in verdicts[mode]]
    same_verdicts = all(v == sides[0] for v in sides)
    digests = {
        r["digest"] for mode in ("hhdata", "hhdata-1thread", "baseline") for r in rounds[mode]
    }
    same_pairs = len(digests) == 1
    fast, one, slow = results["hhdata"], results["hhdata-1thread"], results["baseline"]
    print("| side | wall s | CPU s | peak RSS (MiB) | pairs accepted | records quarantined |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, label in (
        ("baseline", "json.loads + jsonschema + split_pair + pair_id, per record"),
        (
            "hhdata",
            f"hhdata read_pairs (read_raw + build_pairs per file), {os.cpu_count()} threads",
        ),
        ("hhdata-1thread", "hhdata read_pairs, 1 thread"),
        ("inflate", "floor: inflating the files only (ISA-L)"),
    ):
        r = results[mode]
        counts = (
            f"{r['accepted']:,} | {r['quarantined']:,}"
            if mode != "inflate"
            else f"({r['digest']}) | "
        )
        print(
            f"| {label} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{r['peak_mib']:.0f} | {counts} |"
        )
    print(
        f"\nspeed-up, wall {slow['seconds'] / fast['seconds']:.1f}x, CPU "
        f"{slow['cpu_seconds'] / fast['cpu_seconds']:.1f}x; in one thread: wall "
        f"{slow['seconds'] / one['seconds']:.1f}x, "
        f"CPU {slow['cpu_seconds'] / one['cpu_seconds']:.1f}x; "
        f"peak memory ratio (hhdata / baseline) "
        f"{fast['peak_mib'] / slow['peak_mib']:.2f}; "
        f"same verdict on every record: {same_verdicts}; "
        f"same pair rows (content digest): {same_pairs}"
    )
    if args.repeat > 1:
        for mode in modes:
            walls = ", ".join(f"{r['seconds']:.2f}" for r in rounds[mode])
            print(f"{mode}: wall s per round {walls}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average before "
        f"the run {load_before}, after {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        "CPUs two threads got before "
        f"the run {cores_before:.1f}, after {free_cores():.1f}; Python {platform.python_version()}"
    )
    if not (same_verdicts and same_pairs):
        mismatched = [v for v in verdicts["hhdata"][0] if v not in verdicts["baseline"][0]][:5]
        print(f"MISMATCH, first verdicts only hhdata gave: {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
