"""The whole loop on the bundled HH-RLHF sample, in a few minutes on two cores (`make demo`).

1. load the bundled sample in one line and print its statistics;
2. validate raw files with planted faults: the bad lines are quarantined, the rest read;
3. build release 1.0.0 from the bundled sample (Parquet, card, manifest, changelog);
4. publish it to a local Hub server and load it back in one line, pinned to its version;
5. train a reward model on the release, an SFT policy, and a few PPO updates against it.

Run it as `python -m hhdata.demo`; the local Hub server is hhdata.hub.localserver (it needs
olah, in the `train` extra). Everything is written under `.demo/`, which is rebuilt on every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.compute as pc

WORK = Path(".demo")
REPO_ID = "demo/hh-rlhf"
VERSION = "1.0.0"


def banner(title: str) -> None:
    print(f"\n{'=' * 88}\n{title}\n{'=' * 88}", flush=True)


def clip(text: str, width: int = 84) -> str:
    return textwrap.shorten(text.replace("\n", " "), width=width, placeholder=" ...")


def step_load() -> None:
    import hhdata
    from hhdata.pairs.stats import format_stats, pair_stats

    banner("1. Load the bundled sample in one line:  ds = hhdata.load()")
    started = time.perf_counter()
    ds = hhdata.load()
    print(ds)
    print(f"(loaded in {time.perf_counter() - started:.2f} s)")
    row = ds["test"][0]
    print(
        f"\nfirst pair  id={row['id']}  subset={row['subset']}  family={row['family']}  "
        f"flags={row['flags']}"
    )
    for turn in row["prompt"]:
        print(f"  {turn['role']:>9}: {clip(turn['content'])}")
    print(f"  {'chosen':>9}: {clip(row['chosen'][0]['content'])}")
    print(f"  {'rejected':>9}: {clip(row['rejected'][0]['content'])}")
    print()
    print(format_stats(pair_stats(ds["test"].data.table)))


def step_validate() -> None:
    from hhdata import synth
    from hhdata.dedup.run import deduplicate
    from hhdata.io.read import read_pairs
    from hhdata.pairs.transcript import common_prefix_length
    from hhdata.quarantine import reason_counts

    banner(
        "2. Validate and deduplicate raw files with planted faults:  "
        "hhdata validate / hhdata dedup .demo/synth"
    )
    truth = synth.write_corpus(WORK / "synth", n_pairs=3000, seed=0, bad_rate=0.005)
    result = read_pairs([WORK / "synth"])
    report = result.report
    print(
        f"synthetic corpus (subsets named synth-*): {report.lines:,} lines read, "
        f"{report.blank:,} blank, {report.accepted:,} pairs, "
        f"{result.quarantine.num_rows:,} quarantined"
    )
    for reason, count in sorted(reason_counts(result.quarantine).items()):
        print(f"  quarantined {reason:<22} {count}")
    for record in result.quarantine.slice(0, 3).to_pylist():
        print(f"  e.g. {record['file']}:{record['line']}: {clip(record['message'], 70)}")
    planted = sum(1 for item in truth.bad_records if item["reason"] != "blank_line")
    print(
        f"planted bad records: {planted}; quarantined: {result.quarantine.num_rows}; "
        f"counts reconcile: {report.reconciles()}"
    )

    deduped = deduplicate(result.table)
    dropped = deduped.report["dropped_by_reason"]
    print(
        f"\ndedup: {result.table.num_rows:,} pairs -> {deduped.kept.num_rows:,} kept, "
        f"{deduped.drops.num_rows:,} dropped {dropped}"
    )
    print(
        f"planted: {len(truth.exact_duplicates)} exact, {len(truth.swapped_duplicates)} swapped, "
        f"{len(truth.case_whitespace_variants)} case/whitespace copies, "
        f"{len(truth.near_duplicates)} near duplicates (any Jaccard), "
        f"{len(truth.hard_negatives)} hard negatives that must stay"
    )
    near = (
        deduped.drops.filter(pc.equal(deduped.drops["reason"], "near_duplicate"))
        .slice(0, 1)
        .to_pylist()
    )
    if near:
        by_id = dict(zip(result.table["id"].to_pylist(), result.table["chosen_text"].to_pylist()))
        kept, dropped = by_id[near[0]["kept_id"]], by_id[near[0]["id"]]
        start = max(0, common_prefix_length(kept, dropped) - 30)
        print(
            f"a near duplicate (Jaccard {near[0]['similarity']:.2f}), side by side from "
            f"character {start}:"
        )
        print(f"  kept    {near[0]['kept_id']}: ...{clip(kept[start:], 62)}")
        print(f"  dropped {near[0]['id']}: ...{clip(dropped[start:], 62)}")


def step_build() -> Path:
    from hhdata.io.read import bundled_sample_path
    from hhdata.pipeline import build_release

    banner(
        f"3. Build release {VERSION}:  "
        f"hhdata build hhdata/data/hh-rlhf --version {VERSION} --out .demo/releases"
    )
    started = time.perf_counter()
    built = build_release([bundled_sample_path()], version=VERSION, out=WORK / "releases")
    manifest = built.manifest
    print(f"built {built.path} in {time.perf_counter() - started:.1f} s")
    for path in sorted(p for p in built.path.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(built.path)}  ({path.stat().st_size:,} bytes)")
    print("rows per config and split:")
    for name, config in manifest["configs"].items():
        splits = ", ".join(f"{split}={info['rows']:,}" for split, info in config["splits"].items())
        print(f"  {name:<16} {splits or '(empty)'}")
    print(f"accounting: {json.dumps(manifest.get('accounting', {}))}")
    return built.path


def step_publish(release_dir: Path) -> None:
    import hhdata
    from hhdata import hub
    from hhdata.hub.localserver import LocalHub

    banner(
        "4. Publish to a local Hub and load it back:  "
        f"hhdata publish {release_dir} --repo {REPO_ID}"
    )
    with LocalHub(WORK / "hub") as server:
        env = server.env(WORK / "hf-home")
        os.environ.update(env)
        result = hub.publish(release_dir, REPO_ID, token=server.token, endpoint=server.endpoint)
        print(
            f"one commit {result.commit[:12]} with {len(result.files)} files "
            f"({result.uploaded_bytes:,} bytes uploaded), then tag {result.tag}"
        )
        for version in hub.list_versions(REPO_ID, token=server.token, endpoint=server.endpoint):
            print(
                f"  hhdata versions {REPO_ID}: {version.tag}  commit {version.commit[:12]}  "
                f"{version.date}"
            )
        print(f'\n>>> hhdata.load("{REPO_ID}", "harmless", split="test", version="{VERSION}")')
        loaded = hhdata.load(REPO_ID, "harmless", split="test", version=VERSION)
        print(loaded)
        # datasets reads HF_ENDPOINT when it is imported, so the plain route runs in a fresh process
        plain = (
            "import datasets; "
            f"print(datasets.load_dataset('{REPO_ID}', 'harmless', revision='v{VERSION}'))"
        )
        print(f"\n>>> datasets.load_dataset('{REPO_ID}', 'harmless', revision='v{VERSION}')")
        subprocess.run([sys.executable, "-c", plain], env={**os.environ, **env}, check=True)


def run(command: list[str]) -> None:
    print("$ python " + " ".join(command), flush=True)
    # tiny models: one thread each is as fast, and far faster when other work shares the cores
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    subprocess.run([sys.executable, *command], check=True, env=env)


def step_train(release_dir: Path) -> None:
    banner("5. Train on the release: reward model -> SFT policy -> PPO (tiny models, CPU)")
    runs = WORK / "runs"
    run(
        [
            "-m",
            "training.reward_model",
            "--data",
            str(release_dir),
            "--run-dir",
            str(runs / "reward-model"),
            "--max-steps",
            "60",
            "--max-length",
            "128",
        ]
    )
    run(
        [
            "-m",
            "training.sft",
            "--data",
            str(release_dir),
            "--tokenizer",
            str(runs / "reward-model"),
            "--output-dir",
            str(runs / "sft"),
            "--max-steps",
            "60",
            "--max-length",
            "128",
            "--learning-rate",
            "3e-3",
        ]
    )
    run(
        [
            "-m",
            "training.ppo",
            "--data",
            str(release_dir),
            "--policy",
            str(runs / "sft"),
            "--reward-model",
            str(runs / "reward-model"),
            "--output-dir",
            str(runs / "ppo"),
            "--total-episodes",
            "128",
            "--batch-size",
            "16",
            "--learning-rate",
            "1e-3",
            "--query-length",
            "96",
            "--response-length",
            "24",
            "--eval-prompts",
            "32",
        ]
    )

    banner("Summary")
    reward = json.loads((runs / "reward-model" / "metrics.json").read_text())
    overall = reward["overall"]
    print(
        f"reward model: held-out accuracy {overall['accuracy']:.3f} on {overall['pairs']} pairs, "
        f"ECE {overall['ece']:.3f}  ({runs / 'reward-model'})"
    )
    ppo = json.loads((runs / "ppo" / "metrics.json").read_text())
    evaluation = ppo["evaluation"]
    print(
        f"PPO policy: wins {evaluation['win_rate']:.1%} of {evaluation['prompts']} held-out "
        f"prompts against the SFT reference under the reward model  ({runs / 'ppo'})"
    )
    print(f"plots, settings, checkpoints and model cards are in {runs}/")


# what the demo needs beyond the data toolkit: the trainers' packages and the local Hub (olah)
NEEDS = ("torch", "transformers", "accelerate", "olah")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo takes no flags; --help says what it does and where it writes."""
    parser = argparse.ArgumentParser(
        prog="python -m hhdata.demo",
        description=__doc__.split("\n\n")[0]
        + " Writes .demo/ in the current folder (rebuilt on every run); needs the train "
        "extra: pip install 'hhdata[train]'.",
        epilog="Example: cd /tmp && python -m hhdata.demo",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the five steps; 2 with one line naming the install when the train extra is missing."""
    parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"python -m hhdata.demo: error: the demo needs {', '.join(missing)}, which this "
            "environment lacks; install them with pip install 'hhdata[train]'",
            file=sys.stderr,
        )
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    started = time.perf_counter()
    step_load()
    step_validate()
    release_dir = step_build()
    step_publish(release_dir)
    step_train(release_dir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
