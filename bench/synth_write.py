"""Two choices in hhdata.synth's writer, measured on its own output (bench/synth.md).

1. one record's JSON: msgspec's encoder against json.dumps(ensure_ascii=False), same bytes;
2. gzip level 1 (the default) against level 6 (gzip's own default): seconds and size.

    python bench/synth_write.py --pairs 20000 --out /tmp/synth-bench
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import time
from pathlib import Path

import msgspec

from hhdata import synth


def best_of(rounds: int, work) -> float:
    """The fastest of `rounds` runs of work(), in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/synth-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    synth.write_corpus(args.out, args.pairs, seed=0)
    raw = b"".join(gzip.decompress(p.read_bytes()) for p in sorted(args.out.rglob("*.jsonl.gz")))
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    texts = [r[side] for r in records for side in ("chosen", "rejected")]

    encode = msgspec.json.Encoder().encode
    assert all(encode(t) == json.dumps(t, ensure_ascii=False).encode() for t in texts)
    with_msgspec = best_of(args.rounds, lambda: [encode(t) for t in texts])
    with_json = best_of(
        args.rounds, lambda: [json.dumps(t, ensure_ascii=False).encode() for t in texts]
    )
    print(f"{len(texts):,} strings, {len(raw) / 1e6:.1f} MB of JSON Lines")
    print(
        f"encode: msgspec {with_msgspec:.3f} s, json.dumps {with_json:.3f} s, "
        f"ratio {with_json / with_msgspec:.1f}x"
    )
    sizes, seconds = {}, {}
    for level in (1, 6):
        seconds[level] = best_of(
            args.rounds, lambda level=level: gzip.compress(raw, compresslevel=level, mtime=0)
        )
        sizes[level] = len(gzip.compress(raw, compresslevel=level, mtime=0))
        print(f"gzip level {level}: {seconds[level]:.2f} s, {sizes[level]:,} bytes")
    print(
        f"level 1 vs 6: {seconds[6] / seconds[1]:.1f}x faster, "
        f"{100 * (sizes[1] / sizes[6] - 1):.0f}% larger"
    )
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
