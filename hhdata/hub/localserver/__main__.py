"""``python -m hhdata.hub.localserver --root DIR``: a local Hub for the demo, until interrupted.

Prints one JSON line, ``{"endpoint": ..., "token": ...}``, once both servers answer.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from hhdata.hub.localserver import LocalHub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub on 127.0.0.1")
    parser.add_argument("--root", required=True, help="folder for repositories, caches and logs")
    parser.add_argument(
        "--token", default=None, help="write token to accept (default: a random one)"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalHub(args.root, token=args.token) as hub:
        print(json.dumps({"endpoint": hub.endpoint, "token": hub.token}), flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
