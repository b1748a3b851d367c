"""Benchmark corpora in the two shapes hhdata must be fast on: sparse and dense.

* sparse: ``python -m hhdata.synth`` (the project's synthetic corpus: every pair has its own
  prompt, drawn word by word from a model of the bundled sample, plus planted duplicates).
* dense (this file): real HH-RLHF turns (the bundled harmless-base test sample) recombined
  into conversations the way preference data is really collected. A conversation yields one
  comparison per Human turn (each prompt is a prefix of the next one), several comparisons
  are made at the same turn (pairs that share the whole prompt), and turns are drawn from a
  small pool with a heavy head, so many conversations share turns and whole openings. Exact
  and near duplicates arise on their own, as in real data, rather than being planted.

Layouts:

* ``--layout single``: ``OUT/harmless-base/train.jsonl`` (one large uncompressed file) and a
  small ``OUT/harmless-base/test.jsonl``;
* ``--layout gzip``: the upstream layout, ``OUT/<subset>/<split>.jsonl.gz`` over the four
  base/online subsets.

Example::

    python bench/corpora.py --pairs 170000 --seed 0 --layout single --out /tmp/dense170k

The same seed and size always give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from hhdata.io.read import bundled_sample_path
from hhdata.pairs.transcript import split_pair

GZIP_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
TEST_SHARE = 0.05


def real_turns() -> tuple[list[str], list[str]]:
    """The distinct Human and Assistant turn texts of the bundled sample, in file order."""
    human: dict[str, None] = {}
    assistant: dict[str, None] = {}
    with gzip.open(bundled_sample_path(), "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            pair = split_pair(record["chosen"], record["rejected"])
            for turn in pair.prompt:
                (human if turn["role"] == "user" else assistant)[turn["content"]] = None
            for reply in (pair.chosen, pair.rejected):
                for turn in reply:
                    assistant[turn["content"]] = None
    return [t for t in human if t], [t for t in assistant if t]


def heavy_head(rng: np.random.Generator, size: int, n: int, exponent: float) -> np.ndarray:
    """n indexes into a pool of `size`, Zipf-like: a few turns recur very often."""
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    order = rng.permutation(size)  # which turns are popular is itself random
    return order[rng.choice(size, size=n, p=weights / weights.sum())]


def transcript(turns: list[tuple[str, str]]) -> str:
    tags = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{tags[role]}: {text}" for role, text in turns)


def dense_pairs(n_pairs: int, seed: int):
    """Yield n_pairs (chosen, rejected) transcripts in the dense shape."""
    human, assistant = real_turns()
    rng = np.random.default_rng(seed)
    made = 0
    while made < n_pairs:
        block = 4096  # draw turn indexes in blocks: one rng call per block, not per turn
        openers = heavy_head(rng, len(human), block, 1.1)  # first turns: a heavy head
        followers = heavy_head(rng, len(human), 4 * block, 0.6)
        replies = heavy_head(rng, len(assistant), 16 * block, 0.6)
        n_turns = rng.integers(1, 5, size=block)  # Human turns per conversation
        comparisons = rng.geometric(0.45, size=(block, 4))  # pairs per turn, mean ~2.2
        f = r = 0
        for c in range(block):
            conversation: list[tuple[str, str]] = []
            for t in range(int(n_turns[c])):
                conversation.append(("user", human[openers[c]] if t == 0 else human[followers[f]]))
                f += 1
                prompt = transcript(conversation)
                for _ in range(int(comparisons[c, t])):
                    a, b = replies[r % len(replies)], replies[(r + 1) % len(replies)]
                    r += 2
                    if a == b:
                        continue
                    yield (
                        prompt + f"\n\nAssistant: {assistant[a]}",
                        prompt + f"\n\nAssistant: {assistant[b]}",
                    )
                    made += 1
                    if made == n_pairs:
                        return
                # the conversation goes on from the chosen reply, as in the paper's interface
                conversation.append(("assistant", assistant[replies[(r - 2) % len(replies)]]))


def write(n_pairs: int, seed: int, layout: str, out: Path) -> dict[str, int]:
    """Write the corpus; returns the pair count per written file."""
    rng = np.random.default_rng(seed + 1)
    if layout == "single":
        paths = {
            ("harmless-base", "train"): out / "harmless-base" / "train.jsonl",
            ("harmless-base", "test"): out / "harmless-base" / "test.jsonl",
        }
    else:
        paths = {
            (subset, split): out / subset / f"{split}.jsonl.gz"
            for subset in GZIP_SUBSETS
            for split in ("train", "test")
        }
    keys = list(paths)
    handles = {}
    for key, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        gzipped = layout == "gzip"
        handles[key] = gzip.open(path, "wb", compresslevel=6) if gzipped else open(path, "wb")
    counts = dict.fromkeys(keys, 0)
    try:
        for chosen, rejected in dense_pairs(n_pairs, seed):
            split = "test" if rng.random() < TEST_SHARE else "train"
            if layout == "single":
                subset = keys[0][0]
            else:
                subset = GZIP_SUBSETS[int(rng.integers(len(GZIP_SUBSETS)))]
            line = json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False)
            handles[(subset, split)].write(line.encode() + b"\n")
            counts[(subset, split)] += 1
    finally:
        for handle in handles.values():
            handle.close()
    return {str(paths[key]): count for key, count in counts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("single", "gzip"), default="single")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for path, count in write(args.pairs, args.seed, args.layout, args.out).items():
        size = Path(path).stat().st_size / 1e6
        print(f"{path}: {count:,} pairs, {size:,.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
