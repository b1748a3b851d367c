"""Benchmark: publish two versions to a Hub, hhdata publish vs datasets push_to_hub.

Usage: .venv/bin/python bench/hub_publish.py [--pairs 20000] [--work DIR]

Same corpus and procedure as bench/release_build.py (synthetic pairs; 1.1.0 appends 1% new
pairs to every source file). Both routes publish 1.0.0, then 1.1.0, to the local Hub
(hhdata.hub.localserver: olah + hhdata's write server, plain LFS, no Xet) over 127.0.0.1:

- hhdata: ``hhdata.hub.publish(release_dir, repo)``: one commit of the release folder
  (Parquet per subset/split + card, manifest, changelog, croissant, plot), then a tag;
- usual: ``DatasetDict.push_to_hub(repo)`` of the release's ``all`` config (train, test),
  then ``create_tag`` so both routes leave a pinned version.

Measured: wall time of each publish call (import and start-up excluded), and the request
bytes the server received (LFS uploads + commit payloads + API calls), counted by the
server itself. Each route runs in its own process with HF_ENDPOINT set before import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def publish_hhdata(release: str, repo: str) -> dict:
    import hhdata.release.load  # noqa: F401 - imports datasets; both routes import before timing
    from hhdata.hub import publish

    started = time.perf_counter()
    result = publish(release, repo)
    return {
        "seconds": time.perf_counter() - started,
        "uploaded_bytes_reported": result.uploaded_bytes,
    }


def publish_datasets(release: str, repo: str) -> dict:
    from huggingface_hub import HfApi

    from hhdata.release.load import load_release

    dataset = load_release(release, "all")
    version = json.loads((Path(release) / "manifest.json").read_text())["version"]
    started = time.perf_counter()
    dataset.push_to_hub(repo, commit_message=f"Release {version}")
    HfApi().create_tag(repo, tag=f"v{version}", repo_type="dataset")
    return {"seconds": time.perf_counter() - started}


def child(route: str, release: str, repo: str) -> None:
    result = (publish_hhdata if route == "hhdata" else publish_datasets)(release, repo)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--child", nargs=3, metavar=("ROUTE", "RELEASE", "REPO"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from release_build import append_new_pairs, synthetic_subsets

    from hhdata import pipeline, synth
    from hhdata.hub.localserver import LocalHub

    work = args.work or Path(tempfile.mkdtemp(prefix="hub-bench-"))
    synth.write_corpus(work / "corpus", args.pairs, seed=0)
    appended = append_new_pairs(work / "corpus", work / "corpus-1.1", 0.01, seed=10_000)
    subsets = synthetic_subsets(work / "corpus")
    v1 = pipeline.build_release(
        work / "corpus", version="1.0.0", out=work / "out", include_synthetic=subsets
    ).path
    v2 = pipeline.build_release(
        work / "corpus-1.1",
        version="1.1.0",
        out=work / "out",
        previous=v1,
        include_synthetic=subsets,
    ).path
    release_bytes = {
        v: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        for v, d in (("1.0.0", v1), ("1.1.0", v2))
    }
    print(f"corpus {args.pairs} pairs (+{appended} in 1.1.0); release bytes {release_bytes}")

    rows = []
    with LocalHub(work / "hub") as hub:
        env = {**os.environ, **hub.env(work / "hf-home"), "HF_TOKEN": hub.token}
        for route in ("hhdata", "datasets"):
            repo = f"bench/{route}"
            for version, release in (("1.0.0", v1), ("1.1.0", v2)):
                before = hub.received_bytes()
                run = subprocess.run(
                    [sys.executable, __file__, "--child", route, str(release), repo],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if run.returncode != 0:
                    raise SystemExit(f"{route} {version} failed:\n{run.stderr[-3000:]}")
                result = json.loads(run.stdout.strip().splitlines()[-1])
                after = hub.received_bytes()
                sent = sum(after.values()) - sum(before.values())
                rows.append((route, version, result["seconds"], sent, release_bytes[version]))
                print(
                    f"{route:8} {version}: {result['seconds']:.2f} s, {sent} bytes received by the "
                    "Hub"
                )

    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}"
    )
    print("| route | version | publish s | bytes sent | bytes sent / release bytes |")
    print("|---|---|---|---|---|")
    for route, version, seconds, sent, size in rows:
        print(f"| {route} | {version} | {seconds:.2f} | {sent:,} | {sent / size:.1%} |")
    by = {(r, v): (s, b) for r, v, s, b, _ in rows}
    for version in ("1.0.0", "1.1.0"):
        (hs, hb), (ds, db) = by[("hhdata", version)], by[("datasets", version)]
        print(
            f"{version}: time datasets/hhdata = {ds / hs:.2f}x, bytes datasets/hhdata = "
            f"{db / hb:.2f}x"
        )


if __name__ == "__main__":
    main()
