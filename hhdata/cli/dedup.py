"""Dedup verbs: ``hhdata dedup``, ``hhdata leakage``, ``hhdata redteam``.

Thin commands over hhdata.dedup, hhdata.dedup.configs and hhdata.io.redteam. Exit codes: 0 ok,
1 the data has a problem the command reports (train/test leakage left in place),
2 usage or I/O error (raised as HhDataError and printed by hhdata.cli.main).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from hhdata.errors import SourceError

if TYPE_CHECKING:  # Arrow is imported when a command runs, so --help starts at once
    import pyarrow as pa


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the dedup, leakage and redteam verbs."""
    dedup = subparsers.add_parser(
        "dedup",
        help="drop degenerate pairs, exact and near duplicates; log every drop",
        description="Read raw HH-RLHF files (or Parquet pair tables), drop degenerate pairs, "
        "exact duplicates and near duplicates, and print what was kept and dropped per "
        "reason. read = kept + quarantined + dropped, always.",
        epilog="Example: hhdata dedup raw/ --report dedup.json --out kept.parquet",
    )
    _inputs(dedup)
    dedup.add_argument(
        "--report",
        metavar="FILE",
        help="write the JSON report (settings, counts, clusters, examples)",
    )
    dedup.add_argument(
        "--drops", metavar="FILE", help="write the drop log (id, reason, kept_id, ...) as Parquet"
    )
    dedup.add_argument(
        "--out", metavar="FILE", help="write the kept rows (with cluster_id) as Parquet"
    )
    dedup.add_argument(
        "--settings", metavar="FILE", help="DedupSettings as JSON (as in a report's 'settings')"
    )
    dedup.add_argument(
        "--scope",
        choices=("prompt", "pair"),
        help="near duplicates of the prompt or the whole pair",
    )
    dedup.add_argument(
        "--near-action",
        choices=("drop", "cluster"),
        help="drop near duplicates or only cluster them",
    )
    dedup.add_argument(
        "--threshold", type=float, metavar="J", help="Jaccard similarity of near duplicates"
    )
    dedup.add_argument(
        "--survivor", choices=("first", "train_first", "subset_order"), help="which copy is kept"
    )
    dedup.add_argument(
        "--no-near", action="store_true", help="exact duplicates and degenerate pairs only"
    )
    dedup.set_defaults(func=run_dedup)

    leakage = subparsers.add_parser(
        "leakage",
        help="prompts in both train and test (exact and near); optionally re-split",
        description="Report test rows whose prompt also appears in train, exactly or as a near "
        "duplicate, within each subset and across subsets. With --resplit-seed, assign "
        "train/test again keeping every prompt cluster on one side. Exit 1 when leakage "
        "is found and not re-split.",
        epilog="Example: hhdata leakage raw/ --resplit-seed 0 --out resplit.parquet",
    )
    _inputs(leakage)
    leakage.add_argument("--report", metavar="FILE", help="write the JSON leakage report")
    leakage.add_argument("--resplit-seed", type=int, metavar="SEED", help="re-split with this seed")
    leakage.add_argument(
        "--test-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="test share of each subset when re-splitting (0.05)",
    )
    leakage.add_argument("--out", metavar="FILE", help="write the re-split rows as Parquet")
    leakage.set_defaults(func=run_leakage)

    red = subparsers.add_parser(
        "redteam",
        help="read red-team attempts into their own schema and summarise them",
        description="Read red_team_attempts.jsonl(.gz) (a JSON array or JSON Lines), check "
        "every record against schemas/redteam_row.schema.json and print a summary.",
        epilog="Example: hhdata redteam red_team_attempts.jsonl.gz --out red.parquet",
    )
    red.add_argument("path", metavar="PATH", help="the red-team attempts file")
    red.add_argument("--out", metavar="FILE", help="write the rows as Parquet")
    red.set_defaults(func=run_redteam)


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="raw JSONL(.gz) files, folders in the <subset>/<split> layout, globs, "
        "or .parquet pair tables",
    )


def _load(paths: list[str]) -> tuple[pa.Table, int, int]:
    """Pair rows from the inputs, with the records read and quarantined."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hhdata.io.read import read_pairs
    from hhdata.schema import PAIR_SCHEMA

    parquet = [p for p in paths if p.endswith(".parquet")]
    raw = [p for p in paths if not p.endswith(".parquet")]
    tables, read, quarantined = [], 0, 0
    for path in parquet:
        if not Path(path).is_file():
            raise SourceError(f"{path}: no such file")
        table = pq.read_table(path)
        tables.append(
            table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
            if set(PAIR_SCHEMA.names) <= set(table.column_names)
            else table
        )
        read += table.num_rows
    if raw:
        result = read_pairs(raw, progress=None)  # None: a bar on a terminal outside CI
        tables.append(result.table)
        read += result.table.num_rows + result.quarantine.num_rows
        quarantined += result.quarantine.num_rows
    return pa.concat_tables(tables), read, quarantined


def _settings(args):
    from hhdata.dedup.run import DedupSettings

    values = json.loads(Path(args.settings).read_text()) if args.settings else {}
    chosen = {
        "near_scope": args.scope,
        "near_action": args.near_action,
        "threshold": args.threshold,
        "survivor": args.survivor,
    }
    values.update({key: value for key, value in chosen.items() if value is not None})
    if args.no_near:
        values["near"] = False
    return DedupSettings.from_json(values)


def run_dedup(args) -> int:
    """Deduplicate and print the accounting; 0 unless an error is raised."""
    import pyarrow.parquet as pq

    from hhdata import memory
    from hhdata.dedup.run import deduplicate, write_report

    settings = _settings(args)
    pairs, read, quarantined = _load(args.paths)
    with memory.large_run():
        result = deduplicate(pairs, settings, progress=None)
    report = result.report
    print(
        f"read {read:,} records: kept {report['kept']:,}, quarantined {quarantined:,}, "
        f"dropped {report['dropped']:,}"
    )
    for reason, count in report["dropped_by_reason"].items():
        print(f"  {reason}: {count:,}")
    flagged = {
        r: n
        for r, n in report["degenerate_found"].items()
        if settings.degenerate[r] == "flag" and n
    }
    if flagged:
        print("flagged, kept: " + ", ".join(f"{r} {n:,}" for r, n in flagged.items()))
    sizes = ", ".join(
        f"{size}: {count:,}" for size, count in report["cluster_size_histogram"].items()
    )
    print(f"clusters by size: {sizes}")
    if args.report:
        write_report(report, args.report)
        print(f"wrote the report to {args.report}")
    if args.drops:
        pq.write_table(result.drops, args.drops)
        print(f"wrote {result.drops.num_rows:,} drops to {args.drops}")
    if args.out:
        pq.write_table(result.kept, args.out)
        print(f"wrote {result.kept.num_rows:,} kept rows to {args.out}")
    return 0


def run_leakage(args) -> int:
    """Report leakage; 1 when some test prompt is in train and no re-split was asked for."""
    import pyarrow.parquet as pq

    from hhdata import progress
    from hhdata.dedup import configs
    from hhdata.dedup.run import write_report

    pairs, _, _ = _load(args.paths)
    # the check has no inner count to show: the bar says it runs and fills when it is done
    with progress.stage("leakage check", total=1, unit="steps") as advance:
        report = configs.leakage_report(pairs)
        advance(1)
    for kind in ("exact", "near"):
        found = report[kind]
        print(
            f"{kind}: {found['test_rows']:,} of {report['rows']['test']:,} test rows share a "
            "prompt "
            f"cluster with train"
        )
        for subset, count in found["within_subset"].items():
            print(f"  within {subset}: {count:,}")
        for direction, count in found["across_subsets"].items():
            print(f"  across {direction}: {count:,}")
    if args.resplit_seed is not None:
        pairs = configs.resplit(pairs, seed=args.resplit_seed, test_fraction=args.test_fraction)
        report["resplit"] = {
            "seed": args.resplit_seed,
            "test_fraction": args.test_fraction,
            "sizes": configs.split_sizes(pairs),
        }
        for subset, size in report["resplit"]["sizes"].items():
            print(
                f"re-split {subset}: train {size['train']:,}, test {size['test']:,} "
                f"({size['test_fraction']:.2%})"
            )
        if args.out:
            pq.write_table(pairs, args.out)
            print(f"wrote {pairs.num_rows:,} re-split rows to {args.out}")
    if args.report:
        write_report(report, args.report)
        print(f"wrote the report to {args.report}")
    return 1 if report["near"]["test_rows"] and args.resplit_seed is None else 0


def run_redteam(args) -> int:
    """Read red-team attempts and print their summary."""
    import pyarrow.parquet as pq

    from hhdata.io import redteam

    result = redteam.read_redteam(args.path)
    table = result.table
    print(json.dumps(redteam.summary(table), indent=1))
    for row in result.quarantine.to_pylist()[:3]:
        print(f"quarantined {row['file']}: {row['reason']}: {row['message']}")
    if result.quarantine.num_rows:
        print(
            f"{result.records:,} records: {table.num_rows:,} read, "
            f"{result.quarantine.num_rows:,} quarantined"
        )
    if args.out:
        pq.write_table(table, args.out)
        print(f"wrote {table.num_rows:,} red-team rows to {args.out}")
    return 1 if result.quarantine.num_rows else 0
