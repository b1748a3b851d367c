"""Run the write server alone: ``python -m hhdata.hub.localserver.front --root DIR --port P``.

LocalHub starts it this way so a test can SIGKILL it mid-publish and start it again on
the same port over the same repositories.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from hhdata.hub.localserver.app import make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hhdata's local Hub write server")
    parser.add_argument("--root", type=Path, required=True, help="folder of git repositories")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--olah-port", type=int, default=None, help="olah on 127.0.0.1 serves the reads"
    )
    parser.add_argument(
        "--token", action="append", required=True, help="a valid write token (repeatable)"
    )
    parser.add_argument(
        "--fired-log", type=Path, default=None, help="JSON Lines file of the faults that fired"
    )
    args = parser.parse_args(argv)
    olah = ("127.0.0.1", args.olah_port) if args.olah_port else None
    server = make_server(
        "127.0.0.1",
        args.port,
        args.root,
        {t: "hhdata-tester" for t in args.token},
        olah,
        args.fired_log,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
