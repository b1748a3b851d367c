"""Feedback verbs: ``hhdata feedback serve | add-annotator | export | status``.

Thin commands over hhdata.feedback. The web app's own dependencies (fastapi/starlette,
uvicorn, jinja2, transformers) are imported only by ``serve``, so the other verbs work with
the core install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hhdata.errors import HhDataError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the feedback verb and its sub-verbs."""
    feedback = subparsers.add_parser(
        "feedback",
        help="collect human comparisons in a web app and export them as HH-RLHF data",
        description="People chat with a policy, compare two replies per turn (helpful or "
        "red-team), and the comparisons are exported as raw HH-RLHF JSONL for the next "
        "release. See docs/feedback.md.",
        epilog="Example: hhdata feedback serve --policy runs/sft --db feedback.sqlite",
    )
    verbs = feedback.add_subparsers(dest="verb", metavar="VERB", required=True)

    serve = verbs.add_parser(
        "serve",
        help="run the web app",
        description="Serve the annotation app (needs the `feedback` extra).",
        epilog="Example: hhdata feedback serve --policy runs/sft --db feedback.sqlite",
    )
    serve.add_argument("--policy", required=True, metavar="RUN_DIR", help="a saved policy")
    serve.add_argument(
        "--policy-b", metavar="RUN_DIR", help="a second policy for reply B (default: --policy)"
    )
    _db(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000)")
    serve.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="reply length cap (64)"
    )
    serve.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="sample at least N tokens per reply: the end token is suppressed until then (0)",
    )
    serve.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1)")
    serve.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling p (0.9)")
    serve.add_argument(
        "--rate-limit",
        type=int,
        default=60,
        metavar="N",
        help="requests that change state, per annotator per minute (60)",
    )
    serve.add_argument(
        "--export-dir",
        metavar="DIR",
        help="where the admin page's export button writes (default: beside --db, "
        "FEEDBACK-export/ for FEEDBACK.sqlite)",
    )
    serve.set_defaults(func=run_serve)

    add = verbs.add_parser(
        "add-annotator",
        help="register an annotator and print their token once",
        description="Print a fresh sign-in token; only its hash is stored.",
        epilog="Example: hhdata feedback add-annotator alice --db feedback.sqlite",
    )
    add.add_argument("name", metavar="NAME", help="the annotator's name (kept in the db only)")
    _db(add)
    add.add_argument("--admin", action="store_true", help="an admin token (the admin page)")
    add.set_defaults(func=run_add_annotator)

    export = verbs.add_parser(
        "export",
        help="write the comparisons as raw HH-RLHF JSONL (<subset>/train.jsonl.gz)",
        description="One pair per compared turn; skipped turns are left out; a provenance "
        "sidecar beside each file. The same database gives the same bytes.",
        epilog="Example: hhdata feedback export --db feedback.sqlite --out batch-7/",
    )
    _db(export)
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    export.set_defaults(func=run_export)

    status = verbs.add_parser(
        "status",
        help="counts per annotator and task",
        description="Conversations, turns, compared, skipped and pending turns.",
        epilog="Example: hhdata feedback status --db feedback.sqlite",
    )
    _db(status)
    status.set_defaults(func=run_status)


def _db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="FILE", help="the SQLite feedback store")


def _open(path: str, *, must_exist: bool = True):
    from hhdata.feedback import db

    if must_exist and not Path(path).is_file():
        raise HhDataError(f"{path} does not exist; create it with `hhdata feedback add-annotator`")
    return db.connect(path)


def run_add_annotator(args: argparse.Namespace) -> int:
    from hhdata.feedback import db

    token = db.add_annotator(_open(args.db, must_exist=False), args.name, admin=args.admin)
    kind = "admin token" if args.admin else "token"
    print(f"{kind} for {args.name} (shown once, keep it secret):\n{token}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from hhdata.feedback.export import export

    written = export(_open(args.db), args.out)
    if not written:
        print("no answered comparison yet: nothing written")
    for subset, rows in written.items():
        print(f"{args.out}/{subset}/train.jsonl.gz: {rows} pairs")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from hhdata.feedback import db

    rows = db.counts(_open(args.db))
    columns = ("annotator", "task", "conversations", "turns", "compared", "skipped", "pending")
    print("  ".join(f"{name:>13}" for name in columns))
    for row in rows:
        print("  ".join(f"{row[name]!s:>13}" for name in columns))
    totals = {name: sum(row[name] for row in rows) for name in columns[2:]}
    print("  ".join(f"{value!s:>13}" for value in ("total", "", *totals.values())))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from hhdata.feedback.app import serve

    return serve(args)
