"""CPU seconds (user and system) and minor page faults per stage of a release build.

Usage:
    PYTHONPATH=$PWD .venv/bin/python bench/stage_cpu.py CORPUS OUT

Runs hhdata.pipeline.build_release(CORPUS) into OUT (what ``hhdata build`` runs) with
the stages' functions wrapped: each call adds its wall seconds and the deltas of
getrusage around it, twice: for its own thread (RUSAGE_THREAD: the stage's work, except
what it hands to other threads) and for the whole process (RUSAGE_SELF: everything
running meanwhile, the sketching thread beside the exact stage included). Nested calls of
the same function count once. A thread samples the resident set every 20 ms: each stage's
peak is the largest seen while it ran (whatever ran beside it). Prints one table; the
process's totals come first. Used for
bench/scale.md, "Where the system time went".
"""

from __future__ import annotations

import functools
import resource
import sys
import threading
import time
from collections import defaultdict

from hhdata import pipeline
from hhdata.dedup import configs, degenerate, minhash, run, spill
from hhdata.io import read
from hhdata.release import write

# label -> calls, wall, thread user, thread sys, thread faults, process user, sys, faults
TOTALS: dict[str, list[float]] = defaultdict(lambda: [0] * 8)

STAGES = [
    (read, ["read_pairs"]),
    (pipeline, ["one_chunk", "_leakage"]),
    (configs, ["leakage_report"]),
    (write, ["write_data_files"]),
    (run, ["exact_keys", "_text_identity", "_spilled_inputs", "_near_inputs", "sketches"]),
    (run, ["_near_duplicates", "kept_rows", "dedup_report"]),
    (degenerate, ["find_degenerate"]),
    (
        spill,
        [
            "partitioned_candidates",
            "verified_partitions",
            "_joined",
            "_verified",
            "_estimates_at_least",
        ],
    ),
    (minhash, ["similar_in_sketch", "band_candidates", "verify_for_dropping"]),
    (minhash, ["capped_bucket_pairs", "estimates_at_least", "sorted_distinct"]),
    (spill.SpilledSketch, ["append", "shingles_of"]),
    (minhash.ShingleSets, ["__init__", "jaccard"]),
]


# labels of the stages running now (any thread) -> how many calls; and each label's
# largest resident set seen while it ran (sampled every 20 ms by a thread of its own)
RUNNING: dict[str, int] = defaultdict(int)
PEAK: dict[str, int] = defaultdict(int)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _sample_resident_set(stop: threading.Event) -> None:
    while not stop.wait(0.02):
        resident = _resident_bytes()
        for label, calls in list(RUNNING.items()):
            if calls:
                PEAK[label] = max(PEAK[label], resident)


def _usage(who: int) -> tuple[float, float, int]:
    usage = resource.getrusage(who)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def wrapped(function, label: str):
    """``function`` adding its wall time and usage deltas to TOTALS[label]."""
    depth = threading.local()

    @functools.wraps(function)
    def timed(*args, **kwargs):
        outer = getattr(depth, "value", 0) == 0
        depth.value = getattr(depth, "value", 0) + 1
        start = (
            time.perf_counter(),
            *_usage(resource.RUSAGE_THREAD),
            *_usage(resource.RUSAGE_SELF),
        )
        RUNNING[label] += 1
        try:
            return function(*args, **kwargs)
        finally:
            RUNNING[label] -= 1
            depth.value -= 1
            if outer:
                stop = (
                    time.perf_counter(),
                    *_usage(resource.RUSAGE_THREAD),
                    *_usage(resource.RUSAGE_SELF),
                )
                totals = TOTALS[label]
                totals[0] += 1
                for i, (a, b) in enumerate(zip(start, stop)):
                    totals[i + 1] += b - a

    return timed


def main() -> None:
    corpus, out = sys.argv[1], sys.argv[2]
    for owner, names in STAGES:
        for name in names:
            label = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"
            setattr(owner, name, wrapped(getattr(owner, name), label))
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_resident_set, args=(stop,), daemon=True)
    sampler.start()
    start = time.perf_counter()
    pipeline.build_release([corpus], version="1.0.0", out=out)
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"process: wall {time.perf_counter() - start:.1f} s, user {usage.ru_utime:.1f} s, "
        f"sys {usage.ru_stime:.1f} s, minor faults {usage.ru_minflt:,}, "
        f"peak {usage.ru_maxrss / 1024:,.0f} MB"
    )
    print(
        "| stage | calls | wall s | thread user | thread sys | thread faults "
        "| process user | process sys | process faults | peak resident MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, (calls, wall, *rest) in TOTALS.items():
        u, s, f, pu, ps, pf = rest
        print(
            f"| {label} | {calls} | {wall:.1f} | {u:.1f} | {s:.1f} | {f:,.0f} "
            f"| {pu:.1f} | {ps:.1f} | {pf:,.0f} | {PEAK[label] / 1e6:,.0f} |"
        )


if __name__ == "__main__":
    main()
