"""Degenerate pairs: comparisons that carry no usable preference, found by reason code.

A pair row is degenerate for one or more of these reasons:

``identical_replies``
    chosen and rejected final replies are equal after lower-casing and collapsing
    whitespace: there is nothing to prefer.
``empty_reply``
    the chosen or the rejected final reply is empty or only whitespace.
``prompt_disagrees``
    the prompt turns do not render to the start of both original transcripts, so the row's
    structure and its texts tell different stories.
``non_alternating``
    the prompt does not alternate user/assistant turns starting and ending with the user,
    or a final reply holds a second assistant turn.

What happens to each reason is a policy: ``"drop"`` removes the row (it lands in the drop
log with that reason), ``"flag"`` keeps it and adds the reason code to its ``flags``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata.transcript import ASSISTANT, ASSISTANT_TAG, SEPARATORS, USER

IDENTICAL_REPLIES = "identical_replies"
EMPTY_REPLY = "empty_reply"
PROMPT_DISAGREES = "prompt_disagrees"
NON_ALTERNATING = "non_alternating"
REASONS = (IDENTICAL_REPLIES, EMPTY_REPLY, PROMPT_DISAGREES, NON_ALTERNATING)
DROP, FLAG = "drop", "flag"
DEFAULT_POLICY = {
    IDENTICAL_REPLIES: DROP,
    EMPTY_REPLY: FLAG,
    PROMPT_DISAGREES: DROP,
    NON_ALTERNATING: FLAG,
}


def check_policy(policy: dict[str, str]) -> None:
    """Raise ValueError naming the bad entry unless every reason maps to 'drop' or 'flag'."""
    for reason, action in policy.items():
        if reason not in REASONS:
            raise ValueError(f"unknown degenerate reason {reason!r}; the reasons are {list(REASONS)}")
        if action not in (DROP, FLAG):
            raise ValueError(
                f"the policy for {reason!r} is {action!r}; it must be 'drop' or 'flag'"
            )


def _joined_contents(turns: pa.Array, separator: str) -> pa.Array:
    """Each row's turn contents joined into one string."""
    contents = pc.struct_field(turns.values, "content")
    return pc.binary_join(pa.ListArray.from_arrays(turns.offsets, contents), separator)


def _loose(text: pa.Array) -> pa.Array:
    """Lower-cased, whitespace runs collapsed to one space, trimmed."""
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(text), r"\s+", " "))


def _rendered_prompts(prompt: pa.Array) -> pa.Array:
    """Each prompt rendered as a transcript up to and including the final Assistant tag."""
    turns = prompt.values
    is_user = pc.equal(pc.struct_field(turns, "role"), USER)
    tags = pc.if_else(is_user, SEPARATORS[USER], SEPARATORS[ASSISTANT])
    rendered_turns = pc.binary_join_element_wise(tags, pc.struct_field(turns, "content"), "")
    joined = pc.binary_join(pa.ListArray.from_arrays(prompt.offsets, rendered_turns), "")
    return pc.binary_join_element_wise(joined, pa.scalar(ASSISTANT_TAG), "")


def _non_alternating(prompt: pa.Array, replies: list[pa.Array]) -> np.ndarray:
    offsets = prompt.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    is_user = pc.equal(pc.struct_field(prompt.values, "role"), USER).to_numpy(zero_copy_only=False)
    position = np.arange(len(is_user)) - np.repeat(offsets[:-1], lengths)
    wrong = np.asarray(is_user != (position % 2 == 0), dtype=np.int64)
    bad = np.zeros(len(lengths), dtype=bool)
    has_turns = lengths > 0
    bad[has_turns] = np.add.reduceat(wrong, offsets[:-1][has_turns]) > 0
    # an odd number of turns ends with the user, so the final reply is the assistant's
    bad |= lengths % 2 == 0
    for reply in replies:  # a second assistant turn inside a final reply
        has_turn = pc.match_substring(reply, SEPARATORS[ASSISTANT])
        bad |= pc.fill_null(has_turn, False).to_numpy(zero_copy_only=False)
    return bad


def find_degenerate(pairs: pa.Table) -> dict[str, np.ndarray]:
    """A boolean mask per reason code: which rows are degenerate for that reason.

    >>> from hhdata.transcript import split_pair
    >>> p = split_pair("\\n\\nHuman: Hi\\n\\nAssistant: Hello", "\\n\\nHuman: Hi\\n\\nAssistant: hello ")
    >>> table = pa.table({"prompt": [p.prompt], "chosen": [p.chosen], "rejected": [p.rejected],
    ...     "chosen_text": ["\\n\\nHuman: Hi\\n\\nAssistant: Hello"],
    ...     "rejected_text": ["\\n\\nHuman: Hi\\n\\nAssistant: hello "], "flags": [p.flags]})
    >>> {reason: mask.tolist() for reason, mask in find_degenerate(table).items()}
    {'identical_replies': [True], 'empty_reply': [False], 'prompt_disagrees': [False], 'non_alternating': [False]}
    """
    def column(name: str) -> pa.Array:
        return pairs[name].combine_chunks()

    replies = [_joined_contents(column(side), "\n") for side in ("chosen", "rejected")]
    chosen, rejected = _loose(replies[0]), _loose(replies[1])
    empty = pc.or_(pc.equal(pc.utf8_length(chosen), 0), pc.equal(pc.utf8_length(rejected), 0))
    prefixes = _rendered_prompts(column("prompt")).to_pylist()
    chosen_texts, rejected_texts = column("chosen_text").to_pylist(), column("rejected_text").to_pylist()
    disagrees = np.array(
        [not (c.startswith(p) and r.startswith(p))
         for p, c, r in zip(prefixes, chosen_texts, rejected_texts)],
        dtype=bool,
    )
    return {
        IDENTICAL_REPLIES: pc.equal(chosen, rejected).to_numpy(zero_copy_only=False),
        EMPTY_REPLY: empty.to_numpy(zero_copy_only=False),
        PROMPT_DISAGREES: disagrees,
        NON_ALTERNATING: _non_alternating(column("prompt"), replies),
    }


def add_flags(flags: pa.Array, extra: dict[str, np.ndarray]) -> pa.Array:
    """Append each reason code to the flags of the rows its mask selects (no repeats)."""
    lists = flags.to_pylist()
    for reason, mask in extra.items():
        for row in np.flatnonzero(mask).tolist():
            current = lists[row] or []
            if reason not in current:
                lists[row] = [*current, reason]
    return pa.array(lists, pa.list_(pa.string()))
