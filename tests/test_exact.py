"""hhdata.dedup.run.exact_keys, the exact-duplicate stage's keys, against the plain definition.

exact_keys hashes texts and normalises only those whose normal form is not their ASCII lower
case; these tests check that it groups rows exactly as normalising every text would, on the
bundled real pairs with planted case, whitespace and Unicode variants, on generated texts
made of the characters that matter, and against the groups the implementation before it
(dictionary codes of every normalised text) gave.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hhdata import synth
from hhdata._arrow import splitmix64
from hhdata.dedup import DedupSettings
from hhdata.dedup import run as dedup
from hhdata.io import read
from hhdata.schema import TURNS


def turn_table(rows: list[tuple[list[tuple[str, str]], str, str]]) -> pa.Table:
    """A table of prompt, chosen and rejected columns from (prompt turns as (role, content),
    chosen reply, rejected reply) rows: what exact_keys reads."""
    return pa.table(
        {
            "prompt": pa.array(
                [[{"role": r, "content": c} for r, c in prompt] for prompt, _, _ in rows], TURNS
            ),
            "chosen": pa.array([[{"role": "assistant", "content": c}] for _, c, _ in rows], TURNS),
            "rejected": pa.array(
                [[{"role": "assistant", "content": r}] for _, _, r in rows], TURNS
            ),
        }
    )


def plain_labels(table: pa.Table, settings: DedupSettings) -> list[int]:
    """The definition done plainly: every text normalised by ``normalized`` (no shortcut), a
    row is its (role, text) prompt turns and its two replies (as a set unless reply order
    matters); each row labelled by the first row equal to it."""
    rows = table.select(["prompt", "chosen", "rejected"]).to_pylist()
    texts = [t["content"] for row in rows for side in row.values() for t in side]
    forms = iter(dedup.normalized(pa.array(texts, pa.string()), settings).to_pylist())
    first_of, labels = {}, []
    for row in rows:
        prompt = tuple((t["role"], next(forms)) for t in row["prompt"])
        chosen, rejected = (
            "\n".join(next(forms) for _ in row[side]) for side in ("chosen", "rejected")
        )
        replies = (
            (chosen, rejected) if settings.reply_order_matters else frozenset((chosen, rejected))
        )
        labels.append(first_of.setdefault((prompt, replies), len(labels)))
    return labels


def first_equal(labels) -> list[int]:
    """Each row's label replaced by the first row with the same label: equal lists, equal
    groups."""
    first = {}
    return [first.setdefault(label, i) for i, label in enumerate(np.asarray(labels).tolist())]


# (name, before, after): appending `before` or `after` to a text gives forms that are equal
# under the default settings (the reference decides; the test checks that it does)
VARIANTS = [
    ("ascii case", " Hello World", " hello world"),
    ("space runs", " a  b   c", " a b c"),
    ("tab, newline, cr, vt, ff", " a\tb\nc\rd\x0be\x0cf", " a b c d e f"),
    ("no-break space", " a\xa0b", " a b"),
    ("trailing space", " end ", " end"),
    ("nfc", " cafe\u0301", " caf\u00e9"),
    ("hangul jamo", " \u1100\u1161", " \uac00"),
    ("latin-1 case", " \u00c9T\u00c9", " \u00e9t\u00e9"),
    ("greek case", " \u03a3\u039f\u03a6\u0399\u0391", " \u03c3\u03bf\u03c6\u03b9\u03b1"),
    ("kelvin sign", " 5 \u212a", " 5 k"),
    ("dotted capital i", " \u0130stanbul", " istanbul"),
    ("curly quote, emoji", " it\u2019s \U0001f600", " it\u2019s \U0001f600"),
]


def with_variants(base: pa.Table, copies: int) -> pa.Table:
    """The bundled pairs' prompt and replies, then for each variant two rows: one text of
    a real pair changed by `before`, and one by `after`, each as a prompt turn or a reply
    (alternating), the last variant's rows with their replies swapped; all `copies` times."""
    rows = [
        (
            [(t["role"], t["content"]) for t in row["prompt"]],
            row["chosen"][0]["content"],
            row["rejected"][0]["content"],
        )
        for row in base.select(["prompt", "chosen", "rejected"]).to_pylist()
    ]
    planted = []
    for i, (_, before, after) in enumerate(VARIANTS):
        prompt, chosen, rejected = rows[i]
        for suffix in (before, after):
            if i % 2:
                planted.append((prompt, chosen + suffix, rejected))
            else:
                edited = [*prompt[:-1], (prompt[-1][0], prompt[-1][1] + suffix)]
                planted.append((edited, chosen, rejected))
    prompt, chosen, rejected = planted[-1]
    planted[-1] = (prompt, rejected, chosen)
    leading = [
        ([(r, "  " + c.upper()) for r, c in p], "\n" + ch, re + " ") for p, ch, re in rows[:5]
    ]
    return turn_table((rows + planted + leading) * copies)


@pytest.fixture(scope="module")
def bundled():
    """The bundled 2,312 real harmless-base pairs."""
    return read.read_pairs(read.bundled_sample_path()).table


SETTINGS = [
    {},
    {"reply_order_matters": True},
    {"unicode_nfc": False},
    {"lowercase": False},
    {"collapse_whitespace": False},
    {"unicode_nfc": False, "lowercase": False, "collapse_whitespace": False},
]


@pytest.mark.parametrize("copies", [1, 5], ids=["distinct", "repeated"])
@pytest.mark.parametrize("changes", SETTINGS, ids=lambda c: ",".join(c) or "defaults")
def test_exact_keys_group_rows_as_normalising_every_text_does(
    bundled, copies, changes, monkeypatch
):
    # with copies=5 most texts repeat, so only the distinct ones are hashed (a dictionary)
    settings = DedupSettings(**changes)
    table = with_variants(bundled.slice(0, 400), copies)
    expected = plain_labels(table, settings)
    assert first_equal(dedup.exact_keys(table, settings)) == expected
    # texts are handled in chunks of _CHUNK_BYTES: many small chunks give the same groups
    monkeypatch.setattr(dedup, "_CHUNK_BYTES", 3000)
    assert first_equal(dedup.exact_keys(table, settings)) == expected
    if not changes:  # the planted variants are duplicates under the defaults: not vacuous
        planted = expected[400 : 400 + 2 * len(VARIANTS)]
        assert planted[1::2] == planted[0::2]
        assert len(set(expected[: 400 + 2 * len(VARIANTS) + 5])) == 400 + len(VARIANTS)


CHARACTERS = [
    "a", "B", "z", " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1f", "\xa0", "\u00e9",
    "\u00c9", "e\u0301", "\u0301", "\u212a", "\u0130", "\u03a3", "\u00df", "\u1100\u1161",
    "\uac00", "\u2019", "\U0001f600", "\u2000", "\u3000", "\u0085",
]  # fmt: skip


@hsettings(max_examples=150, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.sampled_from(CHARACTERS), max_size=6).map("".join), min_size=3, max_size=40
    ),
    changes=st.sampled_from(SETTINGS),
)
def test_exact_keys_agree_with_the_plain_definition_on_generated_texts(texts, changes):
    # texts of the characters where normal forms differ from ASCII lower case, in every
    # place: a turn, a reply, at either end, alone
    rows = [
        ([("user", a)], b, c)
        for a, b, c in zip(texts, texts[1:] + texts[:1], texts[2:] + texts[:2])
    ]
    rows += [([("user", t), ("assistant", t.upper()), ("user", t)], "x", t) for t in texts]
    table = turn_table(rows)
    settings = DedupSettings(**changes)
    assert first_equal(dedup.exact_keys(table, settings)) == plain_labels(table, settings)


def test_row_labels_stay_exact_when_two_rows_share_a_hash():
    # rows (a, b) and (c, d) are built to have the same combined hash: splitmix64(splitmix64(
    # column 0) ^ column 1) is equal when d = splitmix64(a) ^ b ^ splitmix64(c)
    a, b, c = (np.array([v], dtype=np.uint64) for v in (11, 22, 33))
    d = splitmix64(a) ^ b ^ splitmix64(c)
    columns = [np.concatenate([a, c, a]), np.concatenate([b, d, b])]
    assert first_equal(dedup._row_labels(columns)) == [0, 1, 0]


def groups_digest(labels) -> str:
    return hashlib.sha256(json.dumps(first_equal(labels)).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """3,000 pairs of the synthetic corpus, with its planted exact duplicates and case and
    whitespace variants (hhdata.synth.write_corpus)."""
    root = tmp_path_factory.mktemp("generated")
    synth.write_corpus(root, 3000, seed=0)
    return read.read_pairs([root]).table


# digests of the groups exact_keys gave before it hashed texts (commit 5cbe032: every
# normalised text dictionary-encoded), on the bundled pairs with the planted variants and on
# the generated corpus
@pytest.mark.parametrize(
    "corpus, changes, groups, digest",
    [
        ("bundled", {}, 2324, "aef8c8819d7260f9"),
        ("bundled", {"reply_order_matters": True}, 2325, "b991df02c2a76887"),
        ("bundled", {"lowercase": False, "collapse_whitespace": False}, 2338, "3af241abc4da1dd0"),
        ("generated", {}, 2946, "0a7df245e1a85513"),
        ("generated", {"lowercase": False}, 2951, "e5058df4b499cd2d"),
    ],
)
def test_groups_equal_those_of_the_implementation_before(request, corpus, changes, groups, digest):
    table = request.getfixturevalue(corpus)
    if corpus == "bundled":
        table = with_variants(table, 1)
    labels = dedup.exact_keys(table, DedupSettings(**changes))
    assert (len(set(labels.tolist())), groups_digest(labels)) == (groups, digest)
