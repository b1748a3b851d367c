"""The feedback store: one SQLite file (WAL) holding annotators, conversations and turns.

A turn is one compared step of a conversation: the annotator's message, the two candidate
replies as shown (A on the left, B on the right, in an order drawn at random when they were
sampled), the model that wrote each, and, once answered, the choice (``A``, ``B`` or
``skip`` for "both bad") with its strength. Every write is its own transaction, committed
before the web app answers, so a reply the annotator saw is a row on disk.

Tokens are stored only as their SHA-256 (they are 256-bit random strings, so a plain hash
is enough: there is nothing to brute-force). Names never leave this file: exports and the
admin page use the pseudonym ``annotator-<id>``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from hhdata.errors import HhDataError

HELPFUL, RED_TEAM = "helpful", "red-team"
TASKS = (HELPFUL, RED_TEAM)
SKIP = "skip"
CHOICES = ("A", "B", SKIP)
STRENGTHS = (1, 2, 3)  # slightly, clearly, much better (or more harmful)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    task TEXT NOT NULL CHECK (task IN ('helpful', 'red-team')),
    settings TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    idx INTEGER NOT NULL,
    message TEXT NOT NULL,
    reply_a TEXT NOT NULL,
    reply_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    choice TEXT CHECK (choice IN ('A', 'B', 'skip')),
    strength INTEGER,
    created_at REAL NOT NULL,
    answered_at REAL,
    UNIQUE (conversation_id, idx)
);
"""


class FeedbackError(HhDataError):
    """A feedback request or store operation that cannot be done as asked."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool

    @property
    def pseudonym(self) -> str:
        """What exports and the admin page show instead of the name."""
        return pseudonym(self.id)


def pseudonym(annotator_id: int) -> str:
    return f"annotator-{annotator_id}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and create) the store; WAL so readers never wait for the one writer."""
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed comparison survives a power cut
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA + _QUEUE_SCHEMA)
    except sqlite3.Error as error:
        raise FeedbackError(f"cannot open the feedback database {path} ({error})") from None
    db.row_factory = sqlite3.Row
    return db


class _Write:
    """``with _Write(db):`` one IMMEDIATE transaction: committed on exit, rolled back on error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def add_annotator(db: sqlite3.Connection, name: str, *, admin: bool = False) -> str:
    """Register a name and return its fresh token (shown once; only its hash is kept)."""
    name = name.strip()
    if not name:
        raise FeedbackError("the annotator's name is empty; pass a name")
    token = secrets.token_urlsafe(32)
    try:
        with _Write(db):
            db.execute(
                "INSERT INTO annotators (name, token_hash, is_admin, created_at) "
                "VALUES (?, ?, ?, ?)",
                (name, hash_token(token), int(admin), time.time()),
            )
    except sqlite3.IntegrityError:
        raise FeedbackError(f"an annotator named {name!r} exists; pick another name") from None
    return token


def annotator_by_token(db: sqlite3.Connection, token: str) -> Annotator | None:
    row = db.execute(
        "SELECT id, name, is_admin FROM annotators WHERE token_hash = ?", (hash_token(token),)
    ).fetchone()
    return Annotator(row["id"], row["name"], bool(row["is_admin"])) if row else None


def open_session(db: sqlite3.Connection, annotator: Annotator) -> tuple[str, str]:
    """A new session for a signed-in annotator: (session id for the cookie, CSRF token)."""
    session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with _Write(db):
        db.execute(
            "INSERT INTO sessions (id_hash, annotator_id, csrf, created_at) VALUES (?, ?, ?, ?)",
            (hash_token(session), annotator.id, csrf, time.time()),
        )
    return session, csrf


def session_of(db: sqlite3.Connection, session: str) -> tuple[Annotator, str] | None:
    """The annotator and CSRF token of a session cookie, or None."""
    row = db.execute(
        "SELECT a.id, a.name, a.is_admin, s.csrf FROM sessions s "
        "JOIN annotators a ON a.id = s.annotator_id WHERE s.id_hash = ?",
        (hash_token(session),),
    ).fetchone()
    if row is None:
        return None
    return Annotator(row["id"], row["name"], bool(row["is_admin"])), row["csrf"]


def close_session(db: sqlite3.Connection, session: str) -> None:
    with _Write(db):
        db.execute("DELETE FROM sessions WHERE id_hash = ?", (hash_token(session),))


def start_conversation(db: sqlite3.Connection, annotator: Annotator, task: str, settings: dict):
    if task not in TASKS:
        raise FeedbackError(f"task {task!r} is not one of {list(TASKS)}")
    with _Write(db):
        cursor = db.execute(
            "INSERT INTO conversations (annotator_id, task, settings, started_at) "
            "VALUES (?, ?, ?, ?)",
            (annotator.id, task, json.dumps(settings, sort_keys=True), time.time()),
        )
    return cursor.lastrowid


def conversation(db: sqlite3.Connection, annotator: Annotator, conversation_id: int):
    """The annotator's own conversation row, or None (someone else's is never shown)."""
    return db.execute(
        "SELECT * FROM conversations WHERE id = ? AND annotator_id = ?",
        (conversation_id, annotator.id),
    ).fetchone()


def conversations_of(db: sqlite3.Connection, annotator: Annotator) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT c.*, (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) AS n_turns "
        "FROM conversations c WHERE annotator_id = ? ORDER BY id DESC",
        (annotator.id,),
    ).fetchall()


def turns_of(db: sqlite3.Connection, conversation_id: int) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT * FROM turns WHERE conversation_id = ? ORDER BY idx", (conversation_id,)
    ).fetchall()


def history(turns: list[sqlite3.Row]) -> list[dict[str, str]]:
    """The conversation so far as HH turns: each answered turn's message and picked reply.

    The annotator's pick continues the conversation in both tasks (as in the paper: a red
    teamer goes on from the more harmful reply). A skipped turn ("both bad") leaves no trace
    in the conversation: the annotator writes a new message instead.
    """
    turns_so_far = []
    for turn in turns:
        if turn["choice"] in ("A", "B"):
            picked = turn["reply_a"] if turn["choice"] == "A" else turn["reply_b"]
            turns_so_far += [
                {"role": "user", "content": turn["message"]},
                {"role": "assistant", "content": picked},
            ]
    return turns_so_far


def add_turn(
    db: sqlite3.Connection,
    conversation_id: int,
    idx: int,
    message: str,
    replies: tuple[str, str],
    models: tuple[str, str],
) -> None:
    """Store a new turn's message and its two candidates (A, B as shown)."""
    try:
        with _Write(db):
            db.execute(
                "INSERT INTO turns (conversation_id, idx, message, reply_a, reply_b, model_a, "
                "model_b, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, idx, message, *replies, *models, time.time()),
            )
    except sqlite3.IntegrityError:
        raise FeedbackError(f"turn {idx} of conversation {conversation_id} exists") from None


def answer_turn(
    db: sqlite3.Connection, conversation_id: int, idx: int, choice: str, strength: int | None
) -> bool:
    """Record the choice of an unanswered turn; False when it was answered already."""
    if choice not in CHOICES:
        raise FeedbackError(f"choice {choice!r} is not one of {list(CHOICES)}")
    if choice != SKIP and strength not in STRENGTHS:
        raise FeedbackError(f"strength {strength!r} is not one of {list(STRENGTHS)}")
    with _Write(db):
        cursor = db.execute(
            "UPDATE turns SET choice = ?, strength = ?, answered_at = ? "
            "WHERE conversation_id = ? AND idx = ? AND choice IS NULL",
            (choice, None if choice == SKIP else strength, time.time(), conversation_id, idx),
        )
    return cursor.rowcount == 1


def end_conversation(db: sqlite3.Connection, conversation_id: int) -> None:
    with _Write(db):
        db.execute(
            "UPDATE conversations SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
            (time.time(), conversation_id),
        )


def counts(db: sqlite3.Connection) -> list[dict]:
    """Per annotator (pseudonym) and task: conversations, turns, compared, skipped, pending."""
    rows = db.execute(
        "SELECT c.annotator_id, c.task, COUNT(DISTINCT c.id) AS conversations, "
        "COUNT(t.id) AS turns, "
        "COALESCE(SUM(t.choice IN ('A', 'B')), 0) AS compared, "
        "COALESCE(SUM(t.choice = 'skip'), 0) AS skipped, "
        "COALESCE(SUM(t.id IS NOT NULL AND t.choice IS NULL), 0) AS pending "
        "FROM conversations c LEFT JOIN turns t ON t.conversation_id = c.id "
        "GROUP BY c.annotator_id, c.task ORDER BY c.annotator_id, c.task"
    ).fetchall()
    return [{"annotator": pseudonym(row["annotator_id"]), **dict(row)} for row in rows]


# Queue mode: an outside sampler (the online loop) posts pre-sampled pairs, annotators label
# them in the app, the sampler reads the labels back. Each item may be labelled once per
# annotator, so two annotators on one item measure agreement.
_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL CHECK (task IN ('helpful', 'red-team')),
    prompt TEXT NOT NULL,
    reply_a TEXT NOT NULL,
    reply_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    swapped INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_labels (
    item_id INTEGER NOT NULL REFERENCES queue_items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'skip')),
    strength INTEGER,
    answered_at REAL NOT NULL,
    PRIMARY KEY (item_id, annotator_id)
);
"""


def enqueue(db: sqlite3.Connection, task: str, items: list[dict], swaps: list[bool]) -> list[int]:
    """Store pre-sampled pairs; an item whose key exists is kept as it was (posting is
    idempotent). Each item: key, prompt (HH turns), replies [2], models [2]."""
    if task not in TASKS:
        raise FeedbackError(f"task {task!r} is not one of {list(TASKS)}")
    ids = []
    with _Write(db):
        for item, swapped in zip(items, swaps, strict=True):
            replies, models = list(item["replies"]), list(item["models"])
            if swapped:  # shown order drawn at random: position says nothing of the sampler
                replies.reverse()
                models.reverse()
            db.execute(
                "INSERT OR IGNORE INTO queue_items (key, task, prompt, reply_a, reply_b, "
                "model_a, model_b, swapped, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(item["key"]),
                    task,
                    json.dumps(item["prompt"]),
                    *replies,
                    *models,
                    int(swapped),
                    time.time(),
                ),
            )
            row = db.execute("SELECT id FROM queue_items WHERE key = ?", (str(item["key"]),))
            ids.append(row.fetchone()[0])
    return ids


def next_queue_item(db: sqlite3.Connection, annotator: Annotator) -> sqlite3.Row | None:
    """The oldest item this annotator has not labelled, fewest labels first."""
    return db.execute(
        "SELECT q.* FROM queue_items q WHERE NOT EXISTS (SELECT 1 FROM queue_labels l "
        "WHERE l.item_id = q.id AND l.annotator_id = ?) ORDER BY "
        "(SELECT COUNT(*) FROM queue_labels l WHERE l.item_id = q.id), q.id LIMIT 1",
        (annotator.id,),
    ).fetchone()


def label_queue_item(
    db: sqlite3.Connection, annotator: Annotator, item_id: int, choice: str, strength: int | None
) -> bool:
    """Record this annotator's label of an item; False when they labelled it already."""
    if choice not in CHOICES:
        raise FeedbackError(f"choice {choice!r} is not one of {list(CHOICES)}")
    if choice != SKIP and strength not in STRENGTHS:
        raise FeedbackError(f"strength {strength!r} is not one of {list(STRENGTHS)}")
    try:
        with _Write(db):
            db.execute(
                "INSERT INTO queue_labels (item_id, annotator_id, choice, strength, answered_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (item_id, annotator.id, choice, None if choice == SKIP else strength, time.time()),
            )
    except sqlite3.IntegrityError:
        return False
    return True


def queue_results(db: sqlite3.Connection) -> list[dict]:
    """Every label, as the sampler needs it: its key, chosen and rejected reply (chosen is the
    preferred one, or the LESS harmful one in the red-team task), strength, pseudonym."""
    rows = db.execute(
        "SELECT q.key, q.task, q.reply_a, q.reply_b, l.annotator_id, l.choice, l.strength, "
        "l.answered_at FROM queue_labels l JOIN queue_items q ON q.id = l.item_id "
        "ORDER BY q.id, l.annotator_id"
    ).fetchall()
    results = []
    for row in rows:
        result = {
            "key": row["key"],
            "task": row["task"],
            "annotator": pseudonym(row["annotator_id"]),
            "skipped": row["choice"] == SKIP,
            "strength": row["strength"],
            "answered_at": row["answered_at"],
        }
        if row["choice"] != SKIP:
            picked, other = (
                (row["reply_a"], row["reply_b"])
                if row["choice"] == "A"
                else (row["reply_b"], row["reply_a"])
            )
            if row["task"] == RED_TEAM:
                picked, other = other, picked  # the annotator picked the more harmful reply
            result.update(chosen=picked, rejected=other)
        results.append(result)
    return results


def agreement(db: sqlite3.Connection) -> list[dict]:
    """Per task: queue items with two or more A/B labels, the annotator pairs that labelled
    the same item, and the share of those pairs that picked the same reply."""
    rows = db.execute(
        "SELECT q.task, COUNT(DISTINCT q.id) AS items, COUNT(*) AS pairs, "
        "SUM(l1.choice = l2.choice) AS agreeing FROM queue_labels l1 "
        "JOIN queue_labels l2 ON l1.item_id = l2.item_id AND l1.annotator_id < l2.annotator_id "
        "JOIN queue_items q ON q.id = l1.item_id "
        "WHERE l1.choice != 'skip' AND l2.choice != 'skip' GROUP BY q.task ORDER BY q.task"
    ).fetchall()
    return [{**dict(row), "agreement": row["agreeing"] / row["pairs"]} for row in rows]
