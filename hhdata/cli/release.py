"""`hhdata build` (raw files -> a release directory) and `hhdata diff` (compare two releases)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `build` and `diff` verbs."""
    build = subparsers.add_parser(
        "build",
        help="build a versioned Parquet release from raw JSONL(.gz) files",
        description="Read, validate, parse and deduplicate raw files, then write "
        "OUT/VERSION/ with Parquet per subset and split, README.md (dataset card), "
        "manifest.json, CHANGELOG.md and croissant.json.",
        epilog="Example: hhdata build raw/ --version 1.0.0 --out releases/",
    )
    build.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder in the upstream layout <subset>/<split>.jsonl[.gz], files, globs, "
        "or hf://ORG/NAME[@REVISION] for the upstream layout on the Hub",
    )
    build.add_argument("--version", required=True, metavar="X.Y.Z", help="the release's version")
    build.add_argument(
        "--out", required=True, metavar="DIR", help="releases folder; writes DIR/X.Y.Z/"
    )
    build.add_argument(
        "--name",
        default="hh-rlhf",
        metavar="ORG/NAME",
        help="the release's name, best the Hub repo it will be published to: the "
        "card's usage code and croissant.json's url then point at it",
    )
    build.add_argument(
        "--previous",
        metavar="DIR",
        help="the previous release's folder: the change is diffed against it and "
        "a version number that contradicts the change is refused",
    )
    build.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="release under --version even if it contradicts the change",
    )
    build.add_argument(
        "--include-synthetic",
        action="append",
        default=[],
        metavar="SUBSET",
        help="let this synthetic subset (synth-*) into the release; repeat per subset",
    )
    build.add_argument(
        "--quarantine",
        metavar="FILE",
        help="write the records that could not be read or split, as JSON Lines",
    )
    build.add_argument(
        "--drops",
        metavar="FILE",
        help="write the drop log (id, reason, kept_id, ...) of deduplication, as JSON Lines",
    )
    build.add_argument(
        "--subset", help="subset of files not in the <subset>/<split>.jsonl.gz layout"
    )
    build.add_argument("--split", choices=("train", "test"), help="split of such files")
    build.add_argument("--family", choices=("helpful", "harmless"), help="family of a new subset")
    build.set_defaults(func=run_build)

    compare = subparsers.add_parser(
        "diff",
        help="pair ids added, removed and edited between two releases, and the version kind",
        description="Compare two release folders config by config and say whether the "
        "change is a patch, minor or major version.",
        epilog="Example: hhdata diff releases/1.0.0 releases/1.1.0 --ids",
    )
    compare.add_argument("old", metavar="OLD", help="the older release's folder")
    compare.add_argument("new", metavar="NEW", help="the newer release's folder")
    compare.add_argument("--ids", action="store_true", help="also list the ids of config `all`")
    compare.set_defaults(func=run_diff)


def run_build(args: argparse.Namespace) -> int:
    """Build one release and print where it is and what it holds."""
    from hhdata import (  # imported here so other verbs start without the build stack
        memory,
        pipeline,
    )
    from hhdata.quarantine import write_jsonl

    pipeline.check_targets(args.out, args.version, args.previous)  # fail before the work
    with memory.large_run():  # the allocator settings of the whole build, entered once here
        # progress=None: a bar per stage on a terminal outside CI, nothing in pipes and logs
        result = pipeline.run_pipeline(
            args.sources,
            include_synthetic=args.include_synthetic,
            progress=None,
            subset=args.subset,
            split=args.split,
            family=args.family,
        )
        if args.quarantine:
            print(
                f"wrote {write_jsonl(result.quarantine, args.quarantine)} quarantined records "
                f"to {args.quarantine}"
            )
        if args.drops:
            print(
                f"wrote {pipeline.write_drops(result.drops, args.drops)} dropped pairs to "
                f"{args.drops}"
            )
        empty = pipeline.nothing_kept(result)
        if empty:  # the data has the problem, not the command: exit 1, as validate does
            print(f"hhdata build: error: {empty}", file=sys.stderr)
            return 1
        built = pipeline.release_from(
            result,
            version=args.version,
            out=args.out,
            previous=args.previous,
            allow_version_mismatch=args.allow_version_mismatch,
            name=args.name,
            progress=None,
        )
    _print_built(built)
    return 0


def _print_built(built) -> None:
    """Where the release is, its configs, the accounting and the change against --previous."""
    from hhdata.schema import FATES  # here, not at the top: --help starts without Arrow

    manifest = built.manifest
    print(f"built {built.path}")
    for name, view in manifest["configs"].items():
        splits = "  ".join(f"{split} {s['rows']}" for split, s in view["splits"].items())
        print(f"  {name:<28} {splits}")
    accounting = manifest["accounting"]
    left = "  ".join(f"{fate} {sum(accounting[fate].values())}" for fate in FATES)
    print(f"read {accounting['read']}  kept {accounting['kept']}  {left}")
    if built.diff is not None:
        print(built.diff.summary())


def run_diff(args: argparse.Namespace) -> int:
    """Print the change between two releases."""
    from hhdata.release import diff

    change = diff.diff_releases(args.old, args.new)
    print(change.summary())
    if args.ids:
        everything = change.configs.get("all", diff.ConfigDiff())
        for label, ids in (
            ("added", everything.added),
            ("removed", everything.removed),
            ("edited", everything.edited),
        ):
            for pair_id in ids:
                print(f"{label}\t{pair_id}")
    return 0
