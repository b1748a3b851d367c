"""Benchmark: the exact-duplicate stage on a 170k-pair table, two checkouts side by side.

What is timed, in a child process per checkout and corpus (``--child``), after the pair
table has been read (hhdata.io.read.read_pairs, not timed):

- **keys**: the exact stage as a library call: ``exact_keys(pairs, DedupSettings())`` and the
  grouping ``deduplicate`` does with them (``np.unique(keys, return_index=True,
  return_inverse=True)``), ``--repeat`` calls, the first one in a fresh process included;
- **dedup --no-near**: ``deduplicate(pairs, DedupSettings(near=False))`` (degenerate checks
  in a second thread, exact keys, the drop log and report), once.

Each child also runs the whole ``hhdata dedup PATH --no-near`` command in-process
(hhdata.cli.main) with exact_keys wrapped by a timer, so the stage's share of the command
is measured in the command itself. The parent alternates the checkouts per corpus and
checks that both give the same groups (a digest of each row's first equal row).

    python bench/corpora.py --pairs 170000 --seed 0 --layout single --out /tmp/dense170k
    python -m hhdata.synth --pairs 170000 --seed 0 --out /tmp/synth170k
    git worktree add --detach /tmp/old-exact 5cbe032   # the checkout before
    python bench/exact_dedup.py --before /tmp/old-exact --after . --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the dense file's subset and split come from its path (<subset>/<split>.jsonl)
CORPORA = {
    "sparse": ["/tmp/synth170k"],
    "dense": ["/tmp/dense170k/harmless-base/train.jsonl"],
}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(call):
    """(result, wall seconds, CPU seconds) of call()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = call()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def child(corpus: str, repeat: int) -> dict:
    """Time the exact stage in this process (the checkout on PYTHONPATH) on one corpus."""
    import numpy as np

    from hhdata import memory
    from hhdata.cli import main
    from hhdata.dedup import run as dedup
    from hhdata.io.read import read_pairs

    paths = CORPORA[corpus]
    pairs = read_pairs(paths).table
    settings = dedup.DedupSettings()

    def keys_and_groups():
        keys = dedup.exact_keys(pairs, settings)
        np.unique(keys, return_index=True, return_inverse=True)
        return keys

    rounds = []
    with memory.large_run():  # as `hhdata dedup` runs it
        for _ in range(repeat):
            keys, wall, cpu = timed(keys_and_groups)
            rounds.append((wall, cpu))
        result, dedup_wall, dedup_cpu = timed(
            lambda: dedup.deduplicate(pairs, dedup.DedupSettings(near=False))
        )
    first = {}
    groups = [first.setdefault(k, i) for i, k in enumerate(keys.tolist())]

    # the whole command, with the stage timed inside it
    stage = []
    exact_keys = dedup.exact_keys

    def timed_keys(*args, **kwargs):
        keys, wall, cpu = timed(lambda: exact_keys(*args, **kwargs))
        stage.append((wall, cpu))
        return keys

    dedup.exact_keys = timed_keys
    _, command_wall, command_cpu = timed(lambda: main(["dedup", *paths, "--no-near"]))
    dedup.exact_keys = exact_keys
    return {
        "rows": pairs.num_rows,
        "keys_wall": [w for w, _ in rounds],
        "keys_cpu": [c for _, c in rounds],
        "dedup_wall": dedup_wall,
        "dedup_cpu": dedup_cpu,
        "dropped": result.report["dropped_by_reason"],
        "groups": len(set(keys.tolist())),
        "digest": hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:16],
        "command_wall": command_wall,
        "command_cpu": command_cpu,
        "stage_in_command_wall": stage[0][0],
        "stage_in_command_cpu": stage[0][1],
    }


def run_child(checkout: Path, corpus: str, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    command = [sys.executable, __file__, "--child", corpus, "--repeat", str(repeat)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="checkout before the change")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout after it")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--corpus", action="append", choices=sorted(CORPORA))
    parser.add_argument("--child", choices=sorted(CORPORA), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    sides = [("before", args.before), ("after", args.after)] if args.before else []
    sides = sides or [("after", args.after)]
    print(
        "| corpus | checkout | keys wall s (best, median) | keys CPU s (best) | "
        "first call wall / CPU s | dedup --no-near wall / CPU s | stage in `hhdata dedup "
        "--no-near`: wall / CPU s of the command's |"
    )
    print("|---|---|---|---|---|---|---|")
    for corpus in args.corpus or sorted(CORPORA):
        digests = set()
        for name, checkout in sides:
            r = run_child(checkout, corpus, args.repeat)
            digests.add(r["digest"])
            print(
                f"| {corpus} ({r['rows']:,} pairs) | {name} | {min(r['keys_wall']):.2f}, "
                f"{statistics.median(r['keys_wall']):.2f} | {min(r['keys_cpu']):.2f} | "
                f"{r['keys_wall'][0]:.2f} / {r['keys_cpu'][0]:.2f} | "
                f"{r['dedup_wall']:.2f} / {r['dedup_cpu']:.2f} | "
                f"{r['stage_in_command_wall']:.2f} / {r['stage_in_command_cpu']:.2f} of "
                f"{r['command_wall']:.1f} / {r['command_cpu']:.1f} |",
                flush=True,
            )
            print(f"<!-- {corpus} {name}: {json.dumps(r)} -->", flush=True)
        if len(digests) != 1:
            raise SystemExit(f"{corpus}: the checkouts give different groups: {digests}")
        print(f"<!-- {corpus}: same groups in both checkouts ({digests.pop()}) -->")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
