"""The labellers of the online loop (training/online.py): who says which of two replies is better.

A round's samples are records ``{"key", "family", "prompt", "replies": [A, B], ...}``; a
labeller returns, for each key it labelled, ``{"key", "chosen", "rejected", ...}`` with the
two reply texts, or ``{"key", "skipped": True}``. Three kinds, named on the command line as
``KIND:ARG``:

- ``gold:RUN_DIR``: a fixed reward model as a simulated annotator (the synthetic-gold setup of
  Gao et al. 2022): P(A preferred) = sigmoid((r_A - r_B) / tau), drawn with the round's seed,
  so the label noise is realistic and known (tau = 0: always the higher reward).
- ``file:PATH``: labelled comparisons from a JSONL file, one record per line with the
  round's keys (the format of the feedback app's queue results).
- ``queue:URL``: the feedback app's queue (docs/feedback.md): the pairs are POSTed to
  ``URL/api/queue`` with an admin token from an environment variable, and
  ``URL/api/queue/results`` is polled until every key is answered or the timeout passes.

Any record that does not answer one of the round's pairs exactly raises LabelError naming
the round and the record, and the loop stops that round before anything is released.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from hhdata.errors import HhDataError
from training.reward_model import load_reward_model
from training.reward_model import score as text_scores

KINDS = ("gold", "file", "queue")


class LabelError(HhDataError):
    """A labeller failed or returned a malformed batch; the round is not released."""


@dataclass(frozen=True)
class InvalidJSON:
    """A line of a label file that does not parse (reported with the round by check_labels)."""

    message: str


@dataclass(frozen=True)
class LabellerSpec:
    """A parsed ``--labeller KIND:ARG``."""

    kind: str
    arg: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}"


def parse_labeller(text: str) -> LabellerSpec:
    """``KIND:ARG`` -> LabellerSpec, refusing an unknown kind or an empty argument.

    >>> parse_labeller("gold:runs/gold")
    LabellerSpec(kind='gold', arg='runs/gold')
    """
    kind, _, arg = text.partition(":")
    if kind not in KINDS or not arg:
        raise LabelError(
            f"--labeller {text!r}: expected KIND:ARG with KIND one of {list(KINDS)} "
            "(gold:RUN_DIR, file:PATH, queue:URL)"
        )
    return LabellerSpec(kind, arg)


# ---- gold: a reward model as a simulated annotator -------------------------------------------


def preference_probability(margins: torch.Tensor, tau: float) -> torch.Tensor:
    """P(A preferred) = sigmoid((r_A - r_B) / tau); tau = 0 is the noiseless limit (a tie: 1/2).

    >>> [round(p, 3) for p in preference_probability(torch.tensor([0.0, 2.0]), 1.0).tolist()]
    [0.5, 0.881]
    >>> preference_probability(torch.tensor([-1.0, 0.0, 3.0]), 0.0).tolist()
    [0.0, 0.5, 1.0]
    """
    if tau < 0:
        raise LabelError(f"--tau {tau}: the annotator's temperature cannot be negative")
    if tau == 0:
        return (margins > 0).float() + 0.5 * (margins == 0).float()
    return torch.sigmoid(margins / tau)


def gold_choices(margins: torch.Tensor, tau: float, seed: int) -> torch.Tensor:
    """True where A is preferred, drawn from preference_probability with a seeded generator."""
    draws = torch.rand(len(margins), generator=torch.Generator().manual_seed(seed))
    return draws < preference_probability(margins, tau)


def expected_disagreement(margins: torch.Tensor, tau: float) -> float:
    """The share of labels that will disagree with the gold model's own ranking:
    mean of sigmoid(-|margin| / tau) (ties count half)."""
    return float(preference_probability(-margins.abs(), tau).mean())


class GoldScorer:
    """A reward-model run that scores replies as text (reward_model.score), in batches."""

    def __init__(self, run_dir: str | Path, batch_size: int = 32):
        self.run_dir = str(run_dir)
        self.model, self.tokenizer, self.settings = load_reward_model(run_dir)
        self.batch_size = batch_size

    def __call__(self, prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        """Rewards of `replies` (texts) after `prompts`, shape [n]."""
        turns = [[{"role": "assistant", "content": text}] for text in replies]
        parts = [
            text_scores(
                self.model,
                self.tokenizer,
                self.settings,
                prompts[s : s + self.batch_size],
                turns[s : s + self.batch_size],
            )
            for s in range(0, len(prompts), self.batch_size)
        ]
        return torch.cat(parts).float() if parts else torch.zeros(0)


def label_gold(samples: list[dict], scorer: GoldScorer, tau: float, seed: int) -> list[dict]:
    """Labels drawn from the gold model, each with both gold rewards and P(A)."""
    prompts = [s["prompt"] for s in samples]
    reward_a = scorer(prompts, [s["replies"][0] for s in samples])
    reward_b = scorer(prompts, [s["replies"][1] for s in samples])
    a_wins = gold_choices(reward_a - reward_b, tau, seed)
    probability = preference_probability(reward_a - reward_b, tau)
    labels = []
    for sample, wins, r_a, r_b, p in zip(samples, a_wins.tolist(), reward_a, reward_b, probability):
        first, second = sample["replies"] if wins else sample["replies"][::-1]
        labels.append(
            {
                "key": sample["key"],
                "chosen": first,
                "rejected": second,
                "gold_reward_a": float(r_a),
                "gold_reward_b": float(r_b),
                "p_a": float(p),
            }
        )
    return labels


# ---- checking a batch of labels against the round's samples -----------------------------------


def check_labels(
    records: list[tuple[str, dict]], samples: list[dict], round_number: int, source: str
) -> list[dict]:
    """The labels of `records` ((where, record) pairs) in the samples' order, checked.

    Every record must be a JSON object with a `key` of this round, answered once, either
    skipped or with `chosen` and `rejected` being the sample's two replies. Records of other
    rounds' keys are ignored (a file may hold every round). Raises LabelError naming the
    round, the record and the fix.
    """
    by_key = {sample["key"]: sample for sample in samples}
    round_prefix = samples[0]["key"].rsplit("/", 1)[0] + "/" if samples else ""
    found: dict[str, dict] = {}
    for where, record in records:
        problem = _record_problem(record, by_key, round_prefix, found)
        if problem == "other round":
            continue
        if problem:
            raise LabelError(
                f"round {round_number}: {source} {where}: {problem}; fix the record and run again "
                "with --resume (nothing of this round was released)"
            )
        found[record["key"]] = record
    missing = [key for key in by_key if key not in found]
    if missing:
        raise LabelError(
            f"round {round_number}: {source} has no label for {len(missing)} of the round's "
            f"{len(samples)} pairs (first: {missing[0]}); label them and run again with --resume"
        )
    return [_label(found[sample["key"]]) for sample in samples]


def _record_problem(record, by_key: dict, round_prefix: str, found: dict) -> str | None:
    """What is wrong with one labelled record (None: nothing; "other round": not this round's)."""
    if isinstance(record, InvalidJSON):
        return f"not valid JSON ({record.message})"
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    key = record.get("key")
    if not isinstance(key, str):
        return "no string `key`"
    if key not in by_key:
        return "other round" if not key.startswith(round_prefix) else f"unknown key {key!r}"
    if key in found:
        return f"key {key!r} is labelled twice"
    if record.get("skipped") is True:
        return None
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return f"key {key!r}: `chosen` and `rejected` must be the two reply texts (or skipped)"
    if sorted([chosen, rejected]) != sorted(by_key[key]["replies"]):
        return f"key {key!r}: `chosen` and `rejected` are not the two replies that were sampled"
    return None


def _label(record: dict) -> dict:
    if record.get("skipped") is True:
        return {"key": record["key"], "skipped": True}
    label = {"key": record["key"], "chosen": record["chosen"], "rejected": record["rejected"]}
    for extra in ("annotator", "strength"):
        if extra in record:
            label[extra] = record[extra]
    return label


def read_label_file(path: str | Path) -> list[tuple[str, dict]]:
    """(``line N``, record) of every non-blank line of a JSONL file; a bad line raises LabelError
    (without the round: the caller adds it)."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such label file; write one record per labelled pair")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            records.append((f"line {number}", InvalidJSON(error.msg)))
    return records


def label_file(samples: list[dict], path: str, round_number: int) -> list[dict]:
    """The round's labels from a JSONL file (queue-results format)."""
    return check_labels(read_label_file(path), samples, round_number, path)


# ---- queue: people label the pairs in the feedback app ---------------------------------------


def queue_task(family: str) -> str:
    """The feedback app's task for a family: harmless pairs are judged as red-team pairs
    (chosen is the less harmful reply)."""
    return "red-team" if family == "harmless" else "helpful"


def _request(url: str, token: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if payload is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
        raise LabelError(f"{url}: {error}") from None


def label_queue(
    samples: list[dict],
    url: str,
    round_number: int,
    token_env: str,
    timeout: float,
    poll_seconds: float = 2.0,
) -> list[dict]:
    """Post the round's pairs to the feedback app's queue, wait for every key to be answered.

    Posting is idempotent (a key posted again is stored once), so a resumed round posts again
    safely. An item several annotators labelled keeps its first non-skipped label.
    """
    token = os.environ.get(token_env)
    if not token:
        raise LabelError(
            f"round {round_number}: the queue labeller needs the feedback app's admin token in "
            f"${token_env}; set it (or pass --queue-token-env)"
        )
    base = url.rstrip("/")
    for start in range(0, len(samples), 1000):  # the app takes at most 1,000 items per post
        chunk = samples[start : start + 1000]
        for task in sorted({queue_task(s["family"]) for s in chunk}):
            items = [
                {
                    "key": s["key"],
                    "prompt": s["prompt"],
                    "replies": list(s["replies"]),
                    "models": list(s.get("models", ["policy", "policy"])),
                }
                for s in chunk
                if queue_task(s["family"]) == task
            ]
            try:
                _request(f"{base}/api/queue", token, {"task": task, "items": items})
            except LabelError as error:
                raise LabelError(
                    f"round {round_number}: posting the pairs failed: {error}"
                ) from None
    wanted = {s["key"] for s in samples}
    deadline = time.monotonic() + timeout
    while True:
        try:
            results = _request(f"{base}/api/queue/results", token).get("results", [])
        except LabelError as error:
            raise LabelError(f"round {round_number}: reading the labels failed: {error}") from None
        answered = _first_answers(results, wanted)
        if len(answered) == len(wanted) or time.monotonic() >= deadline:
            break
        time.sleep(poll_seconds)
    records = [(f"result for {key}", record) for key, record in answered.items()]
    return check_labels(records, samples, round_number, f"{base}/api/queue/results")


def _first_answers(results: list, wanted: set[str]) -> dict[str, dict]:
    """Per wanted key, the first non-skipped answer (by answered_at), else a skip."""
    answers: dict[str, dict] = {}
    ordered = sorted(
        (r for r in results if isinstance(r, dict) and r.get("key") in wanted),
        key=lambda r: str(r.get("answered_at", "")),
    )
    for result in ordered:
        key = result["key"]
        if key not in answers or (answers[key].get("skipped") and not result.get("skipped")):
            answers[key] = result
    return answers


def agreement(labels: list[dict], gold: GoldScorer, samples: list[dict]) -> dict:
    """How often the labels agree with the gold model's ranking (ties count half)."""
    by_key = {s["key"]: s for s in samples}
    kept = [label for label in labels if not label.get("skipped")]
    if not kept:
        return {"pairs": 0, "agreement": math.nan}
    prompts = [by_key[label["key"]]["prompt"] for label in kept]
    chosen = gold(prompts, [label["chosen"] for label in kept])
    rejected = gold(prompts, [label["rejected"] for label in kept])
    agree = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"pairs": len(kept), "agreement": float(agree.mean())}
