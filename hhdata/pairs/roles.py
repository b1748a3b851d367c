"""Rows that strict chat templates accept: alternating roles from the user, non-empty replies.

Strict chat templates (Llama-2, Mistral) raise "Conversation roles must alternate
user/assistant/user/assistant/..." when two turns of one speaker follow each other. A few
real HH-RLHF transcripts have two Assistant turns in a row (flag ``consecutive_assistant``;
4 pairs of the bundled harmless-base test split) and some replies are empty
(``empty_chosen`` / ``empty_rejected``). TRL tokenises every row with the model's template
before training, so one such row stops a run. Here each conversation (prompt + chosen,
prompt + rejected) is checked as a template sees it:

- ``roles_not_alternating``: the turns do not go user, assistant, user, ..., assistant;
- ``empty_reply``: a chosen or rejected turn holds only whitespace.

The flags are not enough: ``consecutive_assistant`` also marks a reply that merely contains
an Assistant tag in its text, which renders fine as one turn.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NOT_ALTERNATING = "roles_not_alternating"
EMPTY_REPLY = "empty_reply"
REASONS = (NOT_ALTERNATING, EMPTY_REPLY)
REPLIES = ("chosen", "rejected")


def accepts_strict_template(row: dict) -> bool:
    """Whether every conversation of one pair row renders with a strict chat template.

    A plain predicate for ``datasets.Dataset.filter``: ``ds.filter(accepts_strict_template)``.

    >>> turn = lambda role, text: {"role": role, "content": text}
    >>> accepts_strict_template({"prompt": [turn("user", "Hi")],
    ...                          "chosen": [turn("assistant", "Hello")],
    ...                          "rejected": [turn("assistant", "Go away")]})
    True
    >>> accepts_strict_template({"prompt": [turn("user", "Hi"), turn("assistant", "Hm")],
    ...                          "chosen": [turn("assistant", "Hello")],
    ...                          "rejected": [turn("assistant", "No")]})
    False
    """
    for side in REPLIES:
        turns = row["prompt"] + row[side]
        if [t["role"] for t in turns] != ["user", "assistant"] * (len(turns) // 2):
            return False
        if not all(t["content"].strip() for t in row[side]):
            return False
    return True


def strict_role_reasons(table: pa.Table) -> list[str | None]:
    """Per row, why a strict template would refuse it (first of REASONS), or None.

    Vectorised over the turn lists: no Python loop over rows.
    """
    bad_roles = _misplaced(table["prompt"], first="user")
    for side in REPLIES:
        bad_roles |= _misplaced(table[side], first="assistant")
    empty = np.zeros(table.num_rows, dtype=bool)
    for side in REPLIES:
        empty |= _any_blank(table[side])
    return [NOT_ALTERNATING if r else EMPTY_REPLY if e else None for r, e in zip(bad_roles, empty)]


def strict_counts(table: pa.Table) -> dict[str, int]:
    """How many rows a strict template refuses, by reason (reasons with no rows left out)."""
    counts = Counter(reason for reason in strict_role_reasons(table) if reason is not None)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def keep_strict_rows(table: pa.Table) -> pa.Table:
    """The rows every strict chat template accepts, in their order."""
    reasons = strict_role_reasons(table)
    return table.filter(pa.array([reason is None for reason in reasons]))


def keep_strict(loaded):
    """A Dataset or DatasetDict (as hhdata.load returns) with only strict-template rows."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return datasets.DatasetDict({name: keep_strict(ds) for name, ds in loaded.items()})
    rows = loaded.with_format("arrow")[:]  # the rows as the Dataset sees them, after any select
    reasons = strict_role_reasons(rows)
    return loaded.select([i for i, reason in enumerate(reasons) if reason is None])


def _misplaced(column: pa.ChunkedArray, first: str) -> np.ndarray:
    """Per row: a turn list that does not alternate from ``first`` and end on the other role.

    A prompt must go user, assistant, ..., user (odd length); a reply assistant, ..., assistant.
    """
    turns = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(turns), 0).to_numpy(zero_copy_only=False)
    bad = (lengths % 2 == 0) | (lengths == 0)  # also covers a null list
    roles = pc.list_flatten(turns).field("role").to_numpy(zero_copy_only=False)
    if len(roles):
        parents = pc.list_parent_indices(turns).to_numpy()
        offsets = turns.offsets.to_numpy()  # of a sliced array: they start at offsets[0], not 0
        position = np.arange(len(roles)) - (offsets[:-1] - offsets[0])[parents]
        other = "assistant" if first == "user" else "user"
        expected = np.where(position % 2 == 0, first, other)
        wrong = np.bincount(parents[roles != expected], minlength=len(lengths)) > 0
        bad |= wrong
    return bad


def _any_blank(column: pa.ChunkedArray) -> np.ndarray:
    """Per row: any turn whose content is empty or whitespace."""
    turns = column.combine_chunks()
    contents = pc.list_flatten(turns).field("content")
    if not len(contents):
        return np.zeros(len(turns), dtype=bool)
    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(contents)), 0), True)
    blank = blank.to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(turns).to_numpy()
    return np.bincount(parents[blank], minlength=len(turns)) > 0
