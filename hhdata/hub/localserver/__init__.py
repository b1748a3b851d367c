"""A Hugging Face Hub-compatible server on 127.0.0.1 for tests and the demo.

Two processes: olah (PyPI) serves reads from git repositories in offline local-mirror
mode, and the project's own write server (app.py here) answers the write API
and forwards every other request to olah. Clients see one endpoint: the write server.

>>> with LocalHub(tmp_dir) as hub:                      # doctest: +SKIP
...     HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("org/x", repo_type="dataset")

From a shell (what `make demo` uses): ``python -m hhdata.hub.localserver --root DIR`` prints one
JSON line ``{"endpoint": ..., "token": ...}`` and serves until interrupted.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# the folder hhdata is imported from (a checkout or site-packages): the write server's import path
REPO_ROOT = Path(__file__).resolve().parents[3]
OLAH_CONFIG = """\
[basic]
host = "127.0.0.1"
port = {olah_port}
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"
repos-path = "{cache}"
mirrors-path = ["{mirrors}"]
metadata-cache-ttl = 0

[accessibility]
offline = true
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HubServerError(RuntimeError):
    """The local Hub did not start or answer; the message names its log file."""


class LocalHub:
    """Start olah and the write server on free ports over `root`; stop both on exit.

    `endpoint` is the URL clients use, `token` a valid write token, `bad_token` a
    well-formed token the server refuses.
    """

    def __init__(self, root: Path | str, token: str | None = None, startup_timeout: float = 60.0):
        self.root = Path(root).resolve()  # the servers run in other working directories
        self.token = token or f"hf_local_{secrets.token_hex(12)}"
        self.bad_token = f"hf_bad_{secrets.token_hex(12)}"
        self.port = free_port()
        self.olah_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.repos = self.root / "repos"
        self.logs = self.root / "logs"
        self.fired_log = self.logs / "faults-fired.jsonl"
        self._olah: subprocess.Popen | None = None
        self._front: subprocess.Popen | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> LocalHub:
        """Start olah, then the write server, and wait until both answer."""
        self.repos.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            OLAH_CONFIG.format(
                olah_port=self.olah_port,
                port=self.port,
                cache=self.root / "olah-cache",
                mirrors=self.repos,
            )
        )
        self._olah = self._spawn(
            "olah",
            [
                sys.executable,
                "-m",
                "olah.server",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.olah_port),
                "--log-path",
                str(self.logs / "olah"),
            ],
        )
        self.start_front()
        self._wait(
            f"http://127.0.0.1:{self.olah_port}/api/datasets/none/none/refs", self._olah, "olah"
        )
        return self

    def start_front(self) -> None:
        """(Re)start the write server on the same port, e.g. after kill_front()."""
        self._front = self._spawn(
            "front",
            [
                sys.executable,
                "-m",
                "hhdata.hub.localserver.front",
                "--root",
                str(self.repos),
                "--port",
                str(self.port),
                "--olah-port",
                str(self.olah_port),
                "--token",
                self.token,
                "--fired-log",
                str(self.fired_log),
            ],
        )
        self._wait(f"{self.endpoint}/api/whoami-v2", self._front, "front", token=self.token)

    def kill_front(self) -> None:
        """SIGKILL the write server, as a crash would."""
        if self._front is not None and self._front.poll() is None:
            self._front.kill()
        if self._front is not None:
            self._front.wait()

    def front_alive(self) -> bool:
        return self._front is not None and self._front.poll() is None

    def stop(self) -> None:
        """Stop both processes (terminate, then kill after 5 s)."""
        for proc in (self._front, self._olah):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self._front, self._olah):
            if proc is None:
                continue
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------
    def repo_path(self, repo_id: str, repo_type: str = "dataset") -> Path:
        """The git repository behind a Hub repo (to inspect or tamper with in tests)."""
        return self.repos / f"{repo_type}s" / repo_id

    def lfs_object(self, repo_id: str, oid: str, repo_type: str = "dataset") -> Path:
        return (
            self.repo_path(repo_id, repo_type)
            / ".git"
            / "lfs"
            / "objects"
            / oid[:2]
            / oid[2:4]
            / oid
        )

    def arm_faults(self, faults: list[dict]) -> None:
        """Arm faults on the write server.

        For example ``[{"route": "commit", "action": "exit", "times": 1}]``.

        `route` is a handler name (commit, preupload, lfs_batch, lfs_upload, create_tag, ...),
        `action` is "exit" (the process dies, no reply) or "status" (answer `status`),
        `when` is "before" (default) or "after" (commit only: after the git commit is written).
        Arming forgets the faults that fired before (see fired_faults).
        """
        self.fired_log.write_text("")
        request = urllib.request.Request(
            f"{self.endpoint}/_hubserver/faults",
            data=json.dumps(faults).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    def fired_faults(self) -> list[dict]:
        """The faults that fired since the last arm_faults, in order: route, when, action, status.

        Read from the server's log file, so a fault that killed the server is listed too.
        """
        if not self.fired_log.is_file():
            return []
        return [
            json.loads(line) for line in self.fired_log.read_text().splitlines() if line.strip()
        ]

    def received_bytes(self) -> dict[str, int]:
        """Request body bytes the write server received so far, by route (lfs_upload,
        commit, ...)."""
        return self._stats()["received_bytes"]

    def requests(self) -> dict[str, int]:
        """Requests the write server answered so far, by route (since it last started)."""
        return self._stats()["requests"]

    def _stats(self) -> dict:
        request = urllib.request.Request(
            f"{self.endpoint}/_hubserver/stats", headers={"Authorization": f"Bearer {self.token}"}
        )
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    def env(self, hf_home: Path | str) -> dict[str, str]:
        """Environment variables that point huggingface_hub and datasets at this Hub."""
        hf_home = Path(hf_home)
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_DATASETS_CACHE": str(hf_home / "datasets"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
        try:
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env
            )
        finally:
            log.close()

    def _wait(self, url: str, proc: subprocess.Popen, name: str, token: str | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HubServerError(
                    f"local Hub {name} exited with {proc.returncode}; see {self.logs / name}.log"
                )
            try:
                urllib.request.urlopen(
                    urllib.request.Request(url, headers=headers), timeout=2
                ).read()
                return
            except urllib.error.HTTPError:
                return  # it answered
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise HubServerError(
            f"local Hub {name} did not answer {url} in {self.startup_timeout} s; see "
            f"{self.logs / name}.log"
        )


__all__ = ["LocalHub", "HubServerError", "free_port"]
