"""The `hhdata` command: one entry point, one module per group of verbs.

Each module in COMMAND_MODULES has `register(subparsers)`, which adds its verbs and sets
`func` on each parser; `func(args)` returns the exit code: 0 ok, 1 the data has problems
(reported), 2 usage or I/O error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): the
last two after the command's temporary files are removed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hhdata import __version__
from hhdata.cli._signals import Terminated, sigterm_interrupts
from hhdata.errors import HhDataError

COMMAND_MODULES = (
    "hhdata.cli.data",
    "hhdata.cli.release",
    "hhdata.cli.hub",
    "hhdata.cli.dedup",
    "hhdata.cli.train",
    "hhdata.cli.feedback",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hhdata",
        description="Validate, deduplicate, release and load human preference data (HH-RLHF).",
        epilog="Example: hhdata build raw/ --version 1.0.0 --out releases/",
    )
    parser.add_argument("--version", action="version", version=f"hhdata {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_interrupts():
            return args.func(args)
    except HhDataError as error:
        print(f"hhdata {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(
            f"\nhhdata {args.command}: {how}; its temporary files were removed",
            file=sys.stderr,
        )
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
