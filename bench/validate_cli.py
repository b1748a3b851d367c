"""Benchmark: the whole `hhdata validate` command against the jsonschema route, and --help.

Each side is a whole process, run one after the other in the same round, timed by
/usr/bin/time (wall, user and system seconds, peak RSS):

- hhdata: ``python -m hhdata.cli validate PATH...`` (what the installed ``hhdata`` runs);
- the jsonschema route: ``python bench/validate_cli.py --route PATH...``: ``json.loads`` per
  line, ``jsonschema`` (Draft 2020-12) against schemas/raw_record.schema.json, the
  chosen != rejected rule and a Python split of each pair (hhdata.pairs.transcript.split_pair,
  whose flags it counts), one record at a time: bench/read_validate_parse.py's baseline
  without the pair ids, which a validation does not compute.

on two corpora: (a) dense, one large uncompressed JSONL (bench/corpora.py --layout single),
validated with the layout flags --subset/--split; (b) sparse, the gzip multi-file layout of
hhdata.synth. The run fails unless both sides report the same accepted count, the same
quarantine counts per reason and the same flag counts. Then every ``hhdata [VERB] --help``
is started several times (best and median wall seconds).

    python bench/corpora.py --pairs 170000 --seed 0 --layout single --out /tmp/dense170k
    python -m hhdata.synth --pairs 170000 --seed 0 --out /tmp/synth170k
    PYTHONPATH=$PWD python bench/validate_cli.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HHDATA = [sys.executable, "-m", "hhdata.cli"]


def route(paths: list[Path]) -> dict:
    """The jsonschema route: the counts `hhdata validate` reports, one record at a time."""
    sys.path.insert(0, str(HERE))
    from read_validate_parse import baseline

    verdicts, rows = baseline(paths, pair_ids=False)
    flags = Counter(flag for _, _, pair, _ in rows for flag in pair.flags)
    return {
        "accepted": len(rows),
        "quarantined": dict(Counter(verdicts.values())),
        "flags": dict(flags),
    }


def parse_report(text: str) -> dict:
    """The counts in `hhdata validate`'s output."""
    accepted = int(re.search(r"= ([\d,]+) accepted", text).group(1).replace(",", ""))
    quarantined = {
        reason: int(count.replace(",", ""))
        for reason, count in re.findall(r"^  (\w+): ([\d,]+)$", text, re.MULTILINE)
    }
    flags = {}
    found = re.search(r"^flags \(reported, not failures\): (.*)$", text, re.MULTILINE)
    if found:
        for item in found.group(1).split(", "):
            flag, count = item.rsplit(" ", 1)
            flags[flag] = int(count.replace(",", ""))
    return {"accepted": accepted, "quarantined": quarantined, "flags": flags}


def timed(command: list[str]) -> tuple[dict, str]:
    """Run a command under /usr/bin/time: wall, user, sys seconds, peak RSS MiB; its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %U %S %M", "-o", out.name, *command],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
        wall, user, system, peak = out.read().split()[-4:]
    return {
        "wall": float(wall),
        "cpu": float(user) + float(system),
        "peak_mib": int(peak) / 1024,
    }, done.stdout


def corpora(dense: Path, sparse: Path) -> list[tuple[str, list[str], list[Path]]]:
    """(label, hhdata validate arguments, files for the route) of each corpus."""
    cases = []
    if dense.is_file():
        size = dense.stat().st_size / 1e6
        cases.append(
            (
                f"dense: one {size:.0f} MB JSONL ({dense})",
                [str(dense), "--subset", dense.parent.name, "--split", dense.stem],
                [dense],
            )
        )
    else:
        print(f"no dense corpus at {dense}; see the docstring", file=sys.stderr)
    files = sorted(sparse.rglob("*.jsonl.gz"))
    if files:
        size = sum(f.stat().st_size for f in files) / 1e6
        cases.append(
            (f"sparse: {len(files)} gzip files, {size:.0f} MB ({sparse})", [str(sparse)], files)
        )
    else:
        print(f"no sparse corpus at {sparse}; see the docstring", file=sys.stderr)
    return cases


def help_times(repeat: int) -> list[tuple[str, float, float]]:
    """(command, best, median wall seconds) of `hhdata [VERB] --help`."""
    from hhdata.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = []
    for verb in [None, *verbs.choices]:
        command = [*HHDATA, *([verb] if verb else []), "--help"]
        walls = []
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
            walls.append(time.perf_counter() - started)
        rows.append(
            (f"hhdata {verb + ' ' if verb else ''}--help", min(walls), statistics.median(walls))
        )
    started = time.perf_counter()
    for _ in range(repeat):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    rows.append(("python -c pass (the floor)", (time.perf_counter() - started) / repeat, 0.0))
    return rows


def inflate(folder: Path, repeat: int) -> None:
    """CPU seconds to inflate every gzip file under folder, by ISA-L (what hhdata.io.lines
    uses), zlib-ng (when installed: pip install zlib-ng) and zlib, in 1 MiB reads as
    hhdata does: best of ``repeat``."""
    import resource
    import zlib

    from isal import isal_zlib

    decoders = {"isal": isal_zlib, "zlib": zlib}
    try:
        from zlib_ng import zlib_ng

        decoders["zlib-ng"] = zlib_ng
    except ImportError:
        print("zlib-ng is not installed: not measured")
    blobs = [path.read_bytes() for path in sorted(folder.rglob("*.jsonl.gz"))]
    best = {}
    for _ in range(repeat):
        for name, module in decoders.items():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            before, inflated = usage.ru_utime + usage.ru_stime, 0
            for blob in blobs:
                stream = module.decompressobj(wbits=31)
                for at in range(0, len(blob), 1 << 20):
                    inflated += len(stream.decompress(blob[at : at + (1 << 20)]))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            seconds = usage.ru_utime + usage.ru_stime - before
            best[name] = min(best.get(name, seconds), seconds)
    gzipped = sum(len(blob) for blob in blobs)
    print(f"{len(blobs)} gzip files, {gzipped / 2**20:.0f} MiB -> {inflated / 2**20:.0f} MiB")
    for name, seconds in sorted(best.items(), key=lambda item: item[1]):
        print(f"{name}: {seconds:.3f} CPU s (best of {repeat})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dense", type=Path, default=Path("/tmp/dense170k/harmless-base/train.jsonl")
    )
    parser.add_argument("--sparse", type=Path, default=Path("/tmp/synth170k"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds (best and median reported)")
    parser.add_argument("--help-repeat", type=int, default=10, help="starts of each --help")
    parser.add_argument("--route", nargs="+", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--inflate", action="store_true", help="only time gzip decoders on the sparse corpus"
    )
    args = parser.parse_args()
    if args.inflate:
        inflate(args.sparse, args.repeat)
        return 0
    if args.route:
        print(json.dumps(route(args.route)))
        return 0

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(f"commit {commit}; uptime before: {os.popen('uptime').read().strip()}")
    same = True
    for label, hhdata_args, files in corpora(args.dense, args.sparse):
        sides = {
            "hhdata validate": [*HHDATA, "validate", *hhdata_args],
            "jsonschema route": [sys.executable, __file__, "--route", *map(str, files)],
        }
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.repeat):  # sides alternate, so a busy spell hits both
            counts = {}
            for side, command in sides.items():
                measured, out = timed(command)
                runs[side].append(measured)
                counts[side] = parse_report(out) if side == "hhdata validate" else json.loads(out)
                print(f"{side}: {measured}", file=sys.stderr)
            agree = counts["hhdata validate"] == counts["jsonschema route"]
            same &= agree
            if not agree:
                print(f"MISMATCH on {label}: {counts}", file=sys.stderr)
        print(f"\n### {label}\n")
        print(f"counts (both sides agree: {agree}): {json.dumps(counts['hhdata validate'])}\n")
        print("| side | wall s best | wall s median | CPU s best | peak RSS MiB |")
        print("|---|---:|---:|---:|---:|")
        for side, measured in runs.items():
            walls = [m["wall"] for m in measured]
            print(
                f"| {side} | {min(walls):.2f} | {statistics.median(walls):.2f} | "
                f"{min(m['cpu'] for m in measured):.2f} | "
                f"{max(m['peak_mib'] for m in measured):.0f} |"
            )
        ours = [m["wall"] for m in runs["hhdata validate"]]
        theirs = [m["wall"] for m in runs["jsonschema route"]]
        rounds = ", ".join(f"{b / a:.1f}x" for a, b in zip(ours, theirs))
        cpu = {side: min(m["cpu"] for m in measured) for side, measured in runs.items()}
        print(
            f"\nratio (route / hhdata), wall: best {min(theirs) / min(ours):.1f}x, median "
            f"{statistics.median(theirs) / statistics.median(ours):.1f}x, per round {rounds}; "
            f"CPU best {cpu['jsonschema route'] / cpu['hhdata validate']:.1f}x"
        )
        print(f"hhdata wall s per round: {', '.join(f'{w:.2f}' for w in ours)}")
        print(f"route wall s per round: {', '.join(f'{w:.2f}' for w in theirs)}")
    print("\n| command | best wall s | median wall s |\n|---|---:|---:|")
    for command, best, median in help_times(args.help_repeat):
        print(f"| `{command}` | {best:.3f} | {median:.3f} |")
    print(f"\nuptime after: {os.popen('uptime').read().strip()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
