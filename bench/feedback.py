"""Latency of the feedback app: simulated annotators over HTTP (tiny policy or SmolLM2-135M).

Not a comparison (no other tool drives a live policy turn by turn): the real
`hhdata feedback serve` in a subprocess, a policy saved here as a transformers folder
(`--policy-model tiny`: a tiny random Llama; `smollm2-135m`: the embedded SmolLM2-135M-Instruct
GGUF de-quantised to float32, as training.models loads it), N annotators in threads, each
signing in and doing ROUNDS turns of: load the page, send a message (the server samples two
replies), load the page, submit a choice. Reported per request kind, and per whole turn
(those four requests): p50 / p95 / max in milliseconds. "generation alone" is Policy.reply
called in this process, one at a time, with the same settings (two of them make one
message's latency).

    PYTHONPATH=. python bench/feedback.py --annotators 20 --rounds 5 --out /tmp/feedback.json
    PYTHONPATH=. python bench/feedback.py --policy-model smollm2-135m --annotators 1 \
        --rounds 10 --max-new-tokens 64 --generations 10 --out /tmp/feedback-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from hhdata.feedback import db
from hhdata.feedback.policy import load_policy

HHDATA = (sys.executable, "-c", "import sys; from hhdata.cli import main; sys.exit(main())")


# what the annotators write, in turn (one conversation each)
MESSAGES = [
    "Hi! Can you help me plan a picnic?",
    "What food should I bring for six people?",
    "How do I keep the drinks cold?",
    "Any games we could play there?",
    "What if it rains?",
    "How early should we get to the park?",
    "Can you suggest a dessert that travels well?",
    "What should I pack for the kids?",
    "How do I find a spot in the shade?",
    "Thanks! Anything I am forgetting?",
]


def save_policy(model: str, folder: Path) -> Path:
    """A policy folder `hhdata feedback serve --policy` loads: tiny, or SmolLM2-135M."""
    from training.models import TINY, load_causal_lm, load_tokenizer

    texts = ["\n\nHuman: hello there, how are you?\n\nAssistant: fine, thanks. And you?"] * 20
    tokenizer = load_tokenizer(model, texts=texts if model == TINY else None)
    load_causal_lm(model, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def csrf_of(html: str, name: str = "csrf") -> str:
    marker = f'name="{name}" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def annotate(url: str, token: str, rounds: int, timings: dict[str, list[float]], lock):
    """One annotator's session; appends (kind, seconds) to timings."""
    client = httpx.Client(base_url=url, timeout=3600)  # a busy CPU: minutes per turn

    def timed(kind: str, call, *args, **kwargs) -> httpx.Response:
        start = time.perf_counter()
        response = call(*args, **kwargs)
        elapsed = time.perf_counter() - start
        if response.status_code >= 400:
            raise RuntimeError(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
        with lock:
            timings[kind].append(elapsed)
        return response

    login = client.get("/login")
    client.post("/login", data={"nonce": csrf_of(login.text, "nonce"), "token": token})
    csrf = csrf_of(client.get("/").text)
    started = client.post("/c", data={"csrf": csrf, "task": "helpful"})
    page_url = started.headers["location"]
    for turn in range(rounds):
        start = time.perf_counter()
        timed("page load", client.get, page_url)
        message = {"csrf": csrf, "message": MESSAGES[turn % len(MESSAGES)]}
        timed("send message (two generations)", client.post, page_url + "/message", data=message)
        timed("page load", client.get, page_url)
        choice = {"csrf": csrf, "turn": str(turn), "pick": "A:2"}
        timed("submit choice", client.post, page_url + "/choose", data=choice)
        with lock:
            timings["whole turn (the four requests)"].append(time.perf_counter() - start)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cut = statistics.quantiles(ordered, n=20, method="inclusive")  # 5% steps
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * cut[18], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy-model", default="tiny", choices=("tiny", "smollm2-135m"), help="the policy"
    )
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generations", type=int, default=40, help="for 'generation alone'")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    saving = time.perf_counter()
    policy_dir = save_policy(args.policy_model, work / "policy")
    saving = time.perf_counter() - saving
    db_path = work / "feedback.sqlite"
    store = db.connect(db_path)
    tokens = [db.add_annotator(store, f"bench-{i}") for i in range(args.annotators)]
    port = free_port()
    command = [
        *HHDATA,
        *("feedback", "serve", "--policy", str(policy_dir), "--db", str(db_path)),
        *("--port", str(port), "--max-new-tokens", str(args.max_new_tokens)),
        *("--rate-limit", "100000"),
    ]
    server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/login", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        timings: dict[str, list[float]] = {
            "page load": [],
            "send message (two generations)": [],
            "submit choice": [],
            "whole turn (the four requests)": [],
        }
        lock = threading.Lock()
        threads = [
            threading.Thread(target=annotate, args=(url, token, args.rounds, timings, lock))
            for token in tokens
        ]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
    finally:
        server.terminate()
        server.wait(timeout=60)

    policy = load_policy(policy_dir)
    alone = []
    so_far = [{"role": "user", "content": MESSAGES[0]}]
    for _ in range(args.generations):
        start = time.perf_counter()
        policy.reply(so_far, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.9)
        alone.append(time.perf_counter() - start)

    answered = db.connect(db_path).execute("SELECT COUNT(*) FROM turns WHERE choice = 'A'")
    results = {
        "policy_model": args.policy_model,
        "policy_saved_s": round(saving, 1),
        "annotators": args.annotators,
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "wall_s": round(wall, 1),
        "turns_answered": answered.fetchone()[0],
        "latency": {kind: percentiles(values) for kind, values in timings.items()},
        "generation alone (one reply, sequential)": percentiles(alone),
        "load": os.getloadavg(),
    }
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
