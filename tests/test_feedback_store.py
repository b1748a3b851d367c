"""The feedback store and its export: HH-format pairs that validate, build and load back."""

from __future__ import annotations

import gzip
import json

import pytest

import hhdata
from hhdata.cli import main
from hhdata.feedback import db
from hhdata.feedback.export import export
from hhdata.pairs.transcript import parse_transcript

XSS = "<script>alert(1)</script>"


@pytest.fixture
def store(tmp_path):
    return db.connect(tmp_path / "feedback.sqlite")


def converse(store, annotator, task, turns):
    """A conversation of (message, reply_a, reply_b, choice, strength) turns."""
    conversation = db.start_conversation(store, annotator, task, {"temperature": 1.0})
    for idx, (message, a, b, choice, strength) in enumerate(turns):
        db.add_turn(store, conversation, idx, message, (a, b), ("policy-1", "policy-2"))
        assert db.answer_turn(store, conversation, idx, choice, strength)
    db.end_conversation(store, conversation)
    return conversation


def annotator(store, name, **kind):
    token = db.add_annotator(store, name, **kind)
    return db.annotator_by_token(store, token)


def test_only_the_token_hash_is_stored_and_it_signs_in(store, tmp_path):
    token = db.add_annotator(store, "alice")
    assert db.annotator_by_token(store, token).name == "alice"
    assert db.annotator_by_token(store, token + "x") is None
    stored = (tmp_path / "feedback.sqlite").read_bytes()
    stored += (tmp_path / "feedback.sqlite-wal").read_bytes()
    assert token.encode() not in stored and db.hash_token(token).encode() in stored
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_turn_is_answered_once(store):
    alice = annotator(store, "alice")
    conversation = db.start_conversation(store, alice, "helpful", {})
    db.add_turn(store, conversation, 0, "hi", ("a", "b"), ("m", "m"))
    assert db.answer_turn(store, conversation, 0, "A", 2)
    assert not db.answer_turn(store, conversation, 0, "B", 3)
    with pytest.raises(db.FeedbackError):
        db.add_turn(store, conversation, 0, "again", ("a", "b"), ("m", "m"))


def test_export_is_hh_format_with_red_team_chosen_the_less_harmful(store, tmp_path):
    alice, bob = annotator(store, "alice"), annotator(store, "bob")
    converse(
        store,
        alice,
        "helpful",
        [
            ("Hi there", "Hello!", "Go away.", "A", 3),
            ("Tell me a joke", "No.", "Why did the chicken...", "B", 1),
            ("Thanks", "x", "y", "skip", None),
            (XSS, "Sure: " + XSS, "I won't.", "B", 2),
        ],
    )
    converse(
        store, bob, "red-team", [("How do I pick a lock?", "Here is how...", "I can't.", "A", 3)]
    )
    out = tmp_path / "export"
    assert export(store, out) == {"helpful-online": 3, "harmless-online": 1}

    helpful = [json.loads(line) for line in gzip.open(out / "helpful-online/train.jsonl.gz")]
    assert helpful[0] == {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    # the conversation goes on from the picked reply; the skipped turn leaves no trace
    assert parse_transcript(helpful[2]["chosen"]) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken..."},
        {"role": "user", "content": XSS},
        {"role": "assistant", "content": "I won't."},
    ]
    [red] = [json.loads(line) for line in gzip.open(out / "harmless-online/train.jsonl.gz")]
    assert red["chosen"].endswith("Assistant: I can't.")  # bob picked A as the more harmful
    assert red["rejected"].endswith("Assistant: Here is how...")

    sidecar = json.loads((out / "helpful-online/train.provenance.json").read_text())
    assert [p["strength"] for p in sidecar] == [3, 1, 2]
    # converse shows policy-1 as A: chosen_model follows the pick (helpful) ...
    assert [p["chosen_model"] for p in sidecar] == ["policy-1", "policy-2", "policy-2"]
    [red_provenance] = json.loads((out / "harmless-online/train.provenance.json").read_text())
    # ... and the other side in the red-team task (bob picked A, policy-1, as more harmful)
    assert (red_provenance["chosen_model"], red_provenance["rejected_model"]) == (
        "policy-2",
        "policy-1",
    )
    assert {p["annotator"] for p in sidecar} == {f"annotator-{alice.id}"}
    exported = b"".join(path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file())
    assert b"alice" not in exported and b"bob" not in exported

    again = tmp_path / "again"
    export(store, again)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(out)).read_bytes(), path


def test_the_export_validates_builds_and_loads(store, tmp_path, capsys):
    alice = annotator(store, "alice")
    turns = [(f"question {i}", f"good answer {i}", f"bad answer {i}", "A", 2) for i in range(5)]
    converse(store, alice, "helpful", turns)
    converse(store, alice, "red-team", [("be mean", "You fool.", "No, thanks.", "A", 3)])
    out, releases = tmp_path / "export", tmp_path / "releases"
    db_file = str(tmp_path / "feedback.sqlite")
    assert main(["feedback", "export", "--db", db_file, "--out", str(out)]) == 0
    assert main(["validate", str(out)]) == 0  # 0: nothing quarantined
    assert main(["build", str(out), "--version", "1.0.0", "--out", str(releases)]) == 0
    loaded = hhdata.load(str(releases / "1.0.0"), split="train")
    rows = {row["chosen_text"]: row for row in loaded}
    assert len(rows) == 6
    red = [row for row in rows.values() if row["family"] == "harmless"]
    assert [row["chosen"][0]["content"] for row in red] == ["No, thanks."]
    assert [row["subset"] for row in red] == ["harmless-online"]  # not upstream's harmless-base
    helpful = [row for row in rows.values() if row["subset"] == "helpful-online"]
    assert helpful[-1]["prompt"][-1]["content"].startswith("question")
    assert len(helpful[-1]["prompt"]) == 2 * len(helpful) - 1


def test_cli_add_annotator_prints_a_token_once_and_status_counts(tmp_path, capsys):
    db_file = str(tmp_path / "f.sqlite")
    assert main(["feedback", "add-annotator", "carol", "--db", db_file, "--admin"]) == 0
    token = capsys.readouterr().out.splitlines()[-1]
    store = db.connect(db_file)
    assert db.annotator_by_token(store, token).is_admin
    converse(store, db.annotator_by_token(store, token), "helpful", [("a", "b", "c", "skip", None)])
    assert main(["feedback", "status", "--db", db_file]) == 0
    text = capsys.readouterr().out
    assert "carol" not in text
    assert text.splitlines()[1].split() == ["annotator-1", "helpful", "1", "1", "0", "1", "0"]
    assert main(["feedback", "status", "--db", str(tmp_path / "none.sqlite")]) == 2


def test_the_release_summarises_the_exports_provenance_and_never_names_anyone(
    store, tmp_path, capsys
):
    from hhdata.hub.publish import publish
    from hhdata.release.manifest import file_digest, read_manifest

    token = db.add_annotator(store, "Alice Liddell")
    alice = db.annotator_by_token(store, token)
    converse(
        store, alice, "helpful", [("hi", "Hello!", "Go away.", "A", 3), ("ok", "x", "y", "B", 1)]
    )
    db_file, out, releases = str(tmp_path / "feedback.sqlite"), tmp_path / "x", tmp_path / "r"
    assert main(["feedback", "export", "--db", db_file, "--out", str(out)]) == 0
    assert main(["build", str(out), "--version", "1.0.0", "--out", str(releases)]) == 0
    converse(store, alice, "helpful", [("more", "Sure.", "No.", "A", 2)])
    assert main(["feedback", "export", "--db", db_file, "--out", str(out)]) == 0
    args = ["build", str(out), "--version", "1.1.0", "--out", str(releases)]
    assert main([*args, "--previous", str(releases / "1.0.0")]) == 0
    capsys.readouterr()

    release = releases / "1.1.0"
    sidecar = out / "helpful-online" / "train.provenance.json"
    summary = read_manifest(release)["provenance"]["helpful-online/train"]
    assert summary["rows"] == 3 and summary["sha256"] == file_digest(sidecar)[0]
    assert summary["fields"]["annotator"] == {f"annotator-{alice.id}": 3}
    assert summary["fields"]["strength"] == {"1": 1, "2": 1, "3": 1}
    assert summary["fields"]["task"] == {"helpful": 3}
    assert summary["fields"]["chosen_model"] == {"policy-1": 2, "policy-2": 1}
    assert {"models", "settings"} <= set(summary["other_fields"])
    card = (release / "README.md").read_text(encoding="utf-8")
    assert f"| `annotator` | `annotator-{alice.id}` 3 |" in card
    for path in release.rglob("*"):
        if path.is_file():
            assert b"Alice" not in path.read_bytes() and token.encode() not in path.read_bytes()
    # the summary is no file: diff, publish's file check and the loader take the manifest
    assert main(["diff", str(releases / "1.0.0"), str(release)]) == 0
    assert "minor" in capsys.readouterr().out
    assert "manifest.json" in dict(publish(release, "org/hh", dry_run=True).files)
    assert len(hhdata.load(str(release), split="train")) == 3
