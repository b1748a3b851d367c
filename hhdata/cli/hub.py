"""`hhdata publish` and `hhdata versions`: the Hub side of releases (see hhdata.hub)."""

from __future__ import annotations

import argparse
import sys

from hhdata.errors import IntegrityError


def register(subparsers) -> None:
    """Add the publish and versions verbs."""
    publish = subparsers.add_parser(
        "publish",
        help="upload a release directory as one Hub commit and tag it vX.Y.Z",
        description="Upload a release directory (e.g. out/1.0.0) to a Hub dataset repo as one "
        "commit "
        "pinned to the branch's parent commit, then tag it v<version>. Only the files "
        "manifest.json "
        "lists (plus the manifest, card, changelog and croissant.json) are sent, after their "
        "sha256 is "
        "checked; any other file or a symlink in the folder stops it. A version at or below the "
        "latest "
        "tag is refused unless --backport. Safe to re-run after a failure. The token comes from "
        "--token, HF_TOKEN or `hf auth login`, and is never printed.",
        epilog="Example: hhdata publish releases/1.1.0 --repo org/hh-rlhf",
    )
    publish.add_argument(
        "release_dir", metavar="DIR", help="the folder of one version, built by `hhdata build`"
    )
    publish.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub dataset repo")
    publish.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded; send nothing"
    )
    publish.add_argument(
        "--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT, else huggingface.co)"
    )
    publish.add_argument(
        "--token",
        default=None,
        help="write token (default: HF_TOKEN, else the Hub login; prefer those, a token "
        "on the command line shows in process lists)",
    )
    publish.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries of transient failures, LFS uploads included (default: 4)",
    )
    publish.add_argument(
        "--backport",
        action="store_true",
        help="publish a version below the latest one: tag it on a side branch, leave main alone",
    )
    publish.set_defaults(func=run_publish)

    versions = subparsers.add_parser(
        "versions",
        help="list the published versions of a Hub dataset repo",
        description="List the release tags vX.Y.Z of a Hub dataset repo with their commit and "
        "date.",
        epilog="Example: hhdata versions org/hh-rlhf",
    )
    versions.add_argument("repo", metavar="ORG/NAME", help="the Hub dataset repo")
    versions.add_argument(
        "--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT, else huggingface.co)"
    )
    versions.add_argument(
        "--token", default=None, help="token for a private repo (default: HF_TOKEN or login)"
    )
    versions.set_defaults(func=run_versions)


def run_publish(args: argparse.Namespace) -> int:
    from hhdata import hub  # here, not at the top: --help starts without the Hub client

    try:
        result = hub.publish(
            args.release_dir,
            args.repo,
            token=args.token,
            endpoint=args.endpoint,
            dry_run=args.dry_run,
            retries=args.retries,
            backport=args.backport,
        )
    except IntegrityError as error:
        print(f"hhdata publish: {error}", file=sys.stderr)
        return 1
    if result.dry_run:
        print(
            f"dry run: would publish {result.repo_id} {result.tag}: {len(result.files)} files, "
            f"{result.bytes} bytes"
        )
        for path, size in result.files:
            print(f"  {size:>12}  {path}")
        return 0
    how = "tagged the commit a previous run left" if result.reused_commit else "committed"
    if args.backport:
        how += " (back-port: main unchanged)"
    print(
        f"published {result.repo_id} {result.tag}: {how} {result.commit} "
        f"({len(result.files)} files, {result.bytes} bytes; {result.uploaded_bytes} bytes new to "
        "the branch)"
    )
    for path in result.deleted:
        print(f"  removed {path}")
    return 0


def run_versions(args: argparse.Namespace) -> int:
    from hhdata import hub

    versions = hub.list_versions(args.repo, token=args.token, endpoint=args.endpoint)
    if not versions:
        print(f"{args.repo}: no published versions", file=sys.stderr)
        return 0
    for version in versions:
        print(f"{version.version}\t{version.tag}\t{version.commit}\t{version.date or '-'}")
    return 0
