"""Shared parts of the feedback tests: a tiny saved policy and the real server in a subprocess.

(No tests here; the name keeps the file with the feedback tests it serves.)
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hhdata.feedback import db

ROOT = Path(__file__).resolve().parents[1]
# the `hhdata` command, run by this interpreter
HHDATA = (sys.executable, "-c", "import sys; from hhdata.cli import main; sys.exit(main())")


def save_tiny_policy(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama and its BPE tokenizer, saved as a plain transformers folder."""
    from training.models import load_causal_lm, load_tokenizer

    texts = ["\n\nHuman: hello there, how are you?\n\nAssistant: fine, thanks. And you?"] * 20
    tokenizer = load_tokenizer("tiny", texts=texts)
    model = load_causal_lm("tiny", tokenizer, seed=seed)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`hhdata feedback serve` in a subprocess, as a user runs it."""

    def __init__(self, policy: Path, db_path: Path, *extra: str):
        self.policy, self.db_path, self.extra = policy, db_path, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            *HHDATA,
            "feedback",
            "serve",
            *("--policy", str(self.policy), "--db", str(self.db_path)),
            *("--port", str(self.port), "--max-new-tokens", "12", *self.extra),
        ]

    def start(self, timeout: float = 180) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            try:
                httpx.get(self.url + "/login", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("the server did not answer in time")

    def stop(self) -> str:
        """Stop the server; its whole output (what it logged)."""
        if self.process is None:
            return ""
        self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        self.process = None
        return output


def token_for(db_path: Path, name: str, admin: bool = False) -> str:
    store = db.connect(db_path)
    try:
        return db.add_annotator(store, name, admin=admin)
    finally:
        store.close()


CSRF_RE = re.compile(r'name="(?:csrf|nonce)" value="([^"]+)"')


def csrf_of(html: str) -> str:
    return CSRF_RE.search(html).group(1)


class Annotator:
    """An httpx client that signs in and works the forms, as the page does."""

    def __init__(self, url: str, token: str):
        self.client = httpx.Client(base_url=url, timeout=120)
        login = self.client.get("/login")
        self.client.post("/login", data={"nonce": csrf_of(login.text), "token": token})
        home = self.client.get("/")
        assert home.status_code == 200 and 'action="/c"' in home.text, home.text[:300]
        self.csrf = csrf_of(home.text)

    def post(self, path: str, **form) -> httpx.Response:
        return self.client.post(path, data={"csrf": self.csrf, **form})

    def start(self, task: str = "helpful") -> int:
        response = self.post("/c", task=task)
        assert response.status_code == 303, response.text
        return int(response.headers["location"].rsplit("/", 1)[1])

    def say(self, cid: int, message: str) -> httpx.Response:
        return self.post(f"/c/{cid}/message", message=message)

    def pick(self, cid: int, turn: int, pick: str) -> httpx.Response:
        return self.post(f"/c/{cid}/choose", turn=str(turn), pick=pick)
