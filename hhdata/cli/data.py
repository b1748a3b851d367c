"""Data verbs: ``hhdata validate``, ``hhdata stats``, ``hhdata show``.

Thin commands over hhdata.io.read, hhdata.pairs and hhdata.pairs.stats. Exit codes: 0 every
record was accepted (flags are reported, not failures), 1 some record was quarantined,
2 usage or I/O error (raised as HhDataError and printed by hhdata.cli.main).

Arrow and the readers are imported when a command runs, not when the parser is built, so
``hhdata --help`` starts at once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hhdata.errors import HhDataError
from hhdata.io import MAX_LINE_BYTES

if TYPE_CHECKING:
    import pyarrow as pa

    from hhdata.io.read import ReadResult

_SHOWN_CHARS = 400


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the validate, stats and show verbs."""
    validate = subparsers.add_parser(
        "validate",
        help="check raw JSONL(.gz) files and report every bad record",
        description="Read raw HH-RLHF files, parse every pair and report what was quarantined, "
        "per reason, with the first examples as file:line. Exit 0 when every record was "
        "accepted, 1 when any was quarantined, 2 on a usage or I/O error.",
        epilog="Example: hhdata validate data/*/train.jsonl.gz --quarantine bad.jsonl",
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or globs")
    validate.add_argument(
        "--quarantine", metavar="FILE", help="write the bad records here as JSONL"
    )
    validate.add_argument(
        "--examples", type=int, default=3, metavar="N", help="examples shown per reason (3)"
    )
    validate.add_argument(
        "--stats",
        action="store_true",
        help="also print the statistics of the accepted pairs (as `hhdata stats`; slower)",
    )
    _source_arguments(validate)
    validate.set_defaults(func=run_validate)

    stats = subparsers.add_parser(
        "stats",
        help="rows, turns, lengths and flags per subset",
        description="Statistics of the parsed pairs, per subset; with no PATH, of the bundled "
        "sample.",
        epilog="Example: hhdata stats data/helpful-base/test.jsonl.gz",
    )
    stats.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files, folders or globs (default: the bundled sample)",
    )
    _source_arguments(stats)
    stats.set_defaults(func=run_stats)

    show = subparsers.add_parser(
        "show",
        help="print a few parsed pairs, readably",
        description="Print parsed pairs: prompt turns, then the chosen and rejected replies.",
        epilog="Example: hhdata show -n 2 --skip 10",
    )
    show.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files, folders or globs (default: the bundled sample)",
    )
    show.add_argument("-n", type=int, default=3, metavar="N", help="how many pairs (3)")
    show.add_argument(
        "--skip", type=int, default=0, metavar="K", help="start after the first K pairs"
    )
    _source_arguments(show)
    show.set_defaults(func=run_show)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subset", help="subset of files not in the <subset>/<split>.jsonl.gz layout"
    )
    parser.add_argument("--split", choices=("train", "test"), help="split of such files")
    parser.add_argument("--family", choices=("helpful", "harmless"), help="family of a new subset")
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=MAX_LINE_BYTES,
        metavar="N",
        help=f"longest line accepted, in bytes ({MAX_LINE_BYTES})",
    )


def _read(args, require_source: bool = True, columns: list[str] | None = None) -> ReadResult:
    from hhdata.io.read import read_pairs

    return read_pairs(
        args.paths,
        subset=args.subset,
        split=args.split,
        family=args.family,
        max_line_bytes=args.max_line_bytes,
        progress=None,
        require_source=require_source,
        columns=columns,
    )


def run_validate(args) -> int:
    """Report a validation; 0 when nothing was quarantined, else 1.

    Any file is validated as is: its subset, split and family matter only for a build, so
    a file outside the upstream layout needs no flags here (a notice says what was unknown).
    Only the flags of the pairs are kept (no ids, no texts: a build computes those), unless
    --stats asks for the statistics of the accepted pairs.
    """
    from hhdata import quarantine as q

    keep = ["subset", "split", "prompt", "chosen", "rejected", "flags"] if args.stats else ["flags"]
    with _pandas_declined():
        result = _read(args, require_source=False, columns=keep)
    print(validation_report(result, args.examples))
    if args.stats:
        from hhdata.pairs.stats import format_stats, pair_stats

        print(format_stats(pair_stats(result.table)))
    if args.quarantine:
        written = q.write_jsonl(result.quarantine, args.quarantine)
        print(f"wrote {written:,} quarantined records to {args.quarantine}")
    return 1 if result.quarantine.num_rows else 0


class _DeclinePandas:
    """An import hook that refuses pandas (see _pandas_declined)."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("hhdata validate does not use pandas")
        return None


@contextlib.contextmanager
def _pandas_declined() -> Iterator[None]:
    """While reading, refuse pyarrow's probe for pandas: pyarrow imports pandas (an
    optional dependency of its own) on its first conversion of Python or numpy values, only
    to recognise pandas objects, which this command never passes; the import is 0.3-0.5 s
    of CPU, a tenth of a whole validation. Used by the command only, never by the library."""
    if "pandas" in sys.modules:
        yield
        return
    hook = _DeclinePandas()
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        sys.meta_path.remove(hook)


def validation_report(result: ReadResult, examples: int = 3) -> str:
    """The text ``hhdata validate`` prints: counts, reasons with file:line examples, flags."""
    import pyarrow as pa

    from hhdata.pairs.stats import flag_counts
    from hhdata.pairs.transcript import FLAGS

    report = result.report
    quarantined = sum(report.quarantined.values())
    if not report.reconciles():  # the reader lost or invented a line: never print such counts
        raise HhDataError(
            f"counts do not reconcile: {report.lines} lines but {report.blank} blank + "
            f"{report.accepted} accepted + {quarantined} quarantined; this is a bug in hhdata: "
            "please report it with the input files"
        )
    files = f"{len(report.files)} file" + ("s" if len(report.files) != 1 else "")
    lines = [
        f"read {files}: {_plural(report.lines, 'line')} ({report.blank:,} blank), "
        f"{_plural(report.lines - report.blank, 'record')} = {report.accepted:,} accepted "
        f"+ {quarantined:,} quarantined"
    ]
    if quarantined:
        lines.append("quarantined per reason:")
        reasons = result.quarantine.column("reason").to_pylist()
        for reason, count in report.quarantined.items():
            lines.append(f"  {reason}: {count:,}")
            shown = [i for i, r in enumerate(reasons) if r == reason][:examples]
            for row in result.quarantine.take(pa.array(shown, pa.int64())).to_pylist():
                lines.append(f"    {row['file']}:{row['line']}: {row['message']}")
    flags = flag_counts(result.table)
    if flags:
        counted = ", ".join(f"{flag} {flags[flag]:,}" for flag in FLAGS if flag in flags)
        lines.append(f"flags (reported, not failures): {counted}")
    lines += [f"note: {notice}" for notice in report.notices]
    lines.append(
        "ok: every record was accepted"
        if not quarantined
        else "FAILED: some records were quarantined (use --quarantine FILE to save them)"
    )
    return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _pairs(args) -> pa.Table:
    if args.paths:
        return _read(args).table
    from hhdata.load import bundled_table

    return bundled_table()


def run_stats(args) -> int:
    """Print statistics of the parsed pairs."""
    from hhdata.pairs.stats import format_stats, pair_stats

    print(format_stats(pair_stats(_pairs(args))))
    return 0


def run_show(args) -> int:
    """Print a few parsed pairs."""
    pairs = _pairs(args)
    chosen = pairs.slice(args.skip, max(args.n, 0)).to_pylist()
    for number, row in enumerate(chosen, start=args.skip + 1):
        print(format_pair(row, number, pairs.num_rows))
    return 0


def format_pair(row: dict, number: int, total: int) -> str:
    """One pair row as readable text: header, prompt turns, then the two replies."""
    flags = ", ".join(row["flags"]) or "none"
    lines = [
        f"=== pair {number:,} of {total:,} | {row['subset']}/{row['split']} | id {row['id']} "
        f"| flags: {flags}"
    ]
    for turn in row["prompt"]:
        lines.append(_turn(turn["role"], turn["content"]))
    lines.append(_turn("CHOSEN", row["chosen"][0]["content"]))
    lines.append(_turn("REJECTED", row["rejected"][0]["content"]))
    return "\n".join(lines) + "\n"


def _turn(label: str, content: str) -> str:
    text = (
        content
        if len(content) <= _SHOWN_CHARS
        else content[:_SHOWN_CHARS] + f" [... {len(content) - _SHOWN_CHARS:,} more chars]"
    )
    body = textwrap.indent(text.strip("\n") or "(empty)", "    ")
    return f"  {label}:\n{body}"
