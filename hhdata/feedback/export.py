"""Export the answered comparisons as raw HH-RLHF JSONL, one pair per compared turn.

Layout: ``OUT/<subset>/train.jsonl.gz`` (what ``hhdata validate`` and ``hhdata build`` read)
and beside each data file ``train.provenance.json``: one entry per data line, in the same
order (annotator pseudonym, models, strength, task, times), which ``hhdata build`` summarises
in the release's manifest and card (hhdata.release.provenance). Helpfulness comparisons
with a deployed, updated policy are upstream's ``helpful-online`` (Bai et al. 2022, section
2); red-team comparisons are ``harmless-online``, hhdata's own subset named like it
(hhdata.schema.SUBSET_FAMILIES: harmless), not upstream's ``harmless-base``, so a release
keeps them apart from Anthropic's. Both are subsets hhdata knows, so a build needs no flags.

Each transcript is the conversation so far (earlier messages and the replies picked then)
plus this turn's message and one candidate, rendered by hhdata.pairs.transcript, so it
parses back to exactly those turns. chosen is the preferred reply (helpful task) or the
LESS harmful one (red-team: the annotator picks the more harmful, the dataset keeps the
other as chosen, as upstream's harmless-base does). Skipped turns are never exported.

Exports are idempotent: rows are ordered by conversation and turn, gzip writes no time or
name, JSON keys are sorted, so the same database gives the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sqlite3
import threading
from pathlib import Path

from hhdata.feedback.db import HELPFUL, RED_TEAM, history, pseudonym
from hhdata.pairs.transcript import ASSISTANT, USER, render_transcript

SUBSETS = {HELPFUL: "helpful-online", RED_TEAM: "harmless-online"}
SPLIT = "train"


def export_pairs(db: sqlite3.Connection) -> dict[str, list[tuple[dict, dict]]]:
    """Per subset, the (record, provenance) of every answered comparison, in a fixed order."""
    by_subset: dict[str, list[tuple[dict, dict]]] = {subset: [] for subset in SUBSETS.values()}
    conversations = db.execute("SELECT * FROM conversations ORDER BY id").fetchall()
    for conv in conversations:
        turns = db.execute(
            "SELECT * FROM turns WHERE conversation_id = ? ORDER BY idx", (conv["id"],)
        ).fetchall()
        for position, turn in enumerate(turns):
            if turn["choice"] not in ("A", "B"):
                continue  # pending or skipped: no preference to export
            record = _record(history(turns[:position]), turn, conv["task"])
            chosen, rejected = _sides(turn["choice"], conv["task"])
            provenance = {
                "annotator": pseudonym(conv["annotator_id"]),
                "task": conv["task"],
                "conversation": conv["id"],
                "turn": turn["idx"],
                "models": {"A": turn["model_a"], "B": turn["model_b"]},
                # flat, so the release card counts them: whose reply became chosen
                "chosen_model": turn[f"model_{chosen.lower()}"],
                "rejected_model": turn[f"model_{rejected.lower()}"],
                "picked": turn["choice"],
                "strength": turn["strength"],
                "settings": json.loads(conv["settings"]),
                "created_at": turn["created_at"],
                "answered_at": turn["answered_at"],
            }
            by_subset[SUBSETS[conv["task"]]].append((record, provenance))
    return by_subset


def _sides(choice: str, task: str) -> tuple[str, str]:
    """The sides ("A"/"B") that become chosen and rejected.

    >>> _sides("A", "helpful"), _sides("A", "red-team")
    (('A', 'B'), ('B', 'A'))
    """
    picked, other = ("A", "B") if choice == "A" else ("B", "A")
    if task == RED_TEAM:
        return other, picked  # the annotator picked the more harmful reply
    return picked, other


def _record(so_far: list[dict[str, str]], turn: sqlite3.Row, task: str) -> dict[str, str]:
    """The raw {chosen, rejected} record of one answered turn."""
    chosen, rejected = (f"reply_{side.lower()}" for side in _sides(turn["choice"], task))
    prompt = so_far + [{"role": USER, "content": turn["message"]}]
    return {
        "chosen": render_transcript(prompt + [{"role": ASSISTANT, "content": turn[chosen]}]),
        "rejected": render_transcript(prompt + [{"role": ASSISTANT, "content": turn[rejected]}]),
    }


def export(db: sqlite3.Connection, out: str | Path) -> dict[str, int]:
    """Write OUT/<subset>/train.jsonl.gz and its provenance sidecar; rows per subset.

    A subset with no comparison gets no file (an empty file would make an empty config).
    The rows are read in one transaction (one snapshot of a store the server may be
    writing to), and each file is written beside its place and renamed over it, so a
    reader never sees half a file.
    """
    out = Path(out)
    written = {}
    for subset, rows in _snapshot(db).items():
        if not rows:
            continue
        folder = out / subset
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record, _ in rows)
        buffer = io.BytesIO()
        # mtime=0 and no file name in the header: identical bytes on every export
        with gzip.GzipFile(filename="", fileobj=buffer, mode="wb", mtime=0) as gz:
            gz.write(lines.encode())
        _replace(folder / f"{SPLIT}.jsonl.gz", buffer.getvalue())
        sidecar = [provenance for _, provenance in rows]
        text = json.dumps(sidecar, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        _replace(folder / f"{SPLIT}.provenance.json", text.encode("utf-8"))
        written[subset] = len(rows)
    return written


def _snapshot(db: sqlite3.Connection) -> dict[str, list[tuple[dict, dict]]]:
    """export_pairs inside one read transaction (WAL: a consistent snapshot, no writer waits)."""
    if db.in_transaction:
        return export_pairs(db)
    db.execute("BEGIN")
    try:
        return export_pairs(db)
    finally:
        db.execute("COMMIT")


def _replace(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, then rename it into place."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    partial.write_bytes(data)
    os.replace(partial, path)
