"""Degenerate pairs: comparisons that carry no usable preference, found by reason code.

A pair row is degenerate for one or more of these reasons:

``identical_replies``
    chosen and rejected final replies are equal after lower-casing and collapsing
    whitespace: there is nothing to prefer.
``empty_reply``
    the chosen or the rejected final reply is empty or only whitespace.
``prompt_disagrees``
    the prompt and reply turns do not render back to both original transcripts, so the
    row's structure and its texts tell different stories.
``non_alternating``
    the prompt does not alternate user/assistant turns starting and ending with the user,
    or a final reply holds a second assistant turn.

What happens to each reason is a policy: ``"drop"`` removes the row (it lands in the drop
log with that reason), ``"flag"`` keeps it and adds the reason code to its ``flags``.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata.pairs.transcript import ASSISTANT, ASSISTANT_TAG, SEPARATORS, USER

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
            raise ValueError(
                f"unknown degenerate reason {reason!r}; the reasons are {list(REASONS)}"
            )
        if action not in (DROP, FLAG):
            raise ValueError(
                f"the policy for {reason!r} is {action!r}; it must be 'drop' or 'flag'"
            )


def one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array whose list offsets start at 0 and cover all its values.

    A single chunk that already is one is used as it is, since combine_chunks copies it.
    """
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1 or not _compact(column.chunk(0)):
            return column.combine_chunks()
        return column.chunk(0)
    return column if _compact(column) else pa.concat_arrays([column])


def _compact(array: pa.Array) -> bool:
    """No slice offset, and (for a list array) offsets that span exactly its values."""
    if array.offset != 0:
        return False
    if isinstance(array, pa.ListArray) and len(array):
        offsets = array.offsets
        return offsets[0].as_py() == 0 and offsets[-1].as_py() == len(array.values)
    return True


def joined_contents(turns: pa.Array, separator: str) -> pa.Array:
    """Each row's turn contents joined into one string."""
    contents = pc.struct_field(turns.values, "content")
    return pc.binary_join(pa.ListArray.from_arrays(turns.offsets, contents), separator)


# Whitespace for normalisation: RE2's \s (space, \t, \n, \f, \r), \v and the no-break space.
_WS = r"[\s\v\x{a0}]"
_SPACES = " \t\n\r\v\f\u00a0"
# after trimming, a text needs the regex only if it has a run or a space other than " "
_MESSY_WS = rf"{_WS}{_WS}|[\t\n\r\v\f\x{{a0}}]"


@functools.lru_cache(maxsize=1)
def _nfc_unstable() -> np.ndarray:
    """Sorted code points NFC can change or compose with the one before.

    Below U+0300 every character is NFC-stable. Above, a character is listed when it is a
    combining mark, has a canonical decomposition, is the second half of one, or is a Hangul
    jamo; a text with none of them is already in NFC.
    """
    found = set(range(0x1100, 0x1200))
    for code in range(0x300, 0x30000):
        char = chr(code)
        decomposition = unicodedata.decomposition(char)
        canonical = bool(decomposition) and not decomposition.startswith("<")
        if unicodedata.combining(char) or canonical:
            found.add(code)
        if canonical and len(decomposition.split()) == 2:
            found.add(int(decomposition.split()[1], 16))
    return np.array(sorted(found), dtype=np.int64)


def _rows_with_code_points(texts: pa.Array, code_points: np.ndarray) -> np.ndarray:
    """Which texts hold any of the sorted code points (all >= U+0300), from the UTF-8 bytes."""
    texts = texts.cast(pa.large_string())
    _, offsets_buffer, data_buffer = texts.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        texts.offset : texts.offset + len(texts) + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    # lead bytes from 0xCC on start the code points from U+0300 on (continuations are < 0xC0)
    lead = np.flatnonzero(data >= 0xCC)
    b0, b1, b2, b3 = (data[np.minimum(lead + i, len(data) - 1)].astype(np.int64) for i in range(4))
    code = np.where(
        b0 < 0xE0,
        ((b0 & 0x1F) << 6) | (b1 & 0x3F),
        np.where(
            b0 < 0xF0,
            ((b0 & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (b2 & 0x3F),
            ((b0 & 0x07) << 18) | ((b1 & 0x3F) << 12) | ((b2 & 0x3F) << 6) | (b3 & 0x3F),
        ),
    )
    position = np.searchsorted(code_points, code)
    hit = code_points[np.minimum(position, len(code_points) - 1)] == code
    rows = np.searchsorted(offsets, lead[hit], side="right") - 1
    mask = np.zeros(len(texts), dtype=bool)
    mask[rows] = True
    return mask


def nfc_may_change(texts: pa.Array) -> np.ndarray:
    """Which texts Unicode NFC might change (False means the text is certainly in NFC).

    ASCII texts are in NFC: only the others' bytes are scanned (most texts are ASCII).
    """
    other = np.flatnonzero(
        ~pc.fill_null(pc.string_is_ascii(texts), True).to_numpy(zero_copy_only=False)
    )
    mask = np.zeros(len(texts), dtype=bool)
    if len(other):
        chosen = texts.take(pa.array(other))
        mask[other] = _rows_with_code_points(chosen, _nfc_unstable())
    return mask


def _fix_rows(texts: pa.Array, mask: np.ndarray, fix) -> pa.Array:
    """Apply fix only to the texts the mask selects (most texts need nothing)."""
    if not mask.any():
        return texts
    selected = pa.array(mask)
    return pc.replace_with_mask(texts, selected, fix(texts.filter(selected)))


def normalize(
    texts: pa.Array, *, nfc: bool = True, lowercase: bool = True, whitespace: bool = True
) -> pa.Array:
    """Texts in a comparable form: Unicode NFC, lower case, whitespace runs as one space, trimmed.

    Whitespace is space, tab, newline, carriage return, vertical tab, form feed and the
    no-break space. The expensive steps run only on the texts that need them.

    >>> normalize(pa.array(["  Hello\\n\\n  WORLD ", "Cafe\\u0301"])).to_pylist()
    ['hello world', 'café']
    """
    if nfc:
        unstable = nfc_may_change(texts)
        texts = _fix_rows(texts, unstable, lambda t: pc.utf8_normalize(t, "NFC"))
    if lowercase:
        texts = pc.utf8_lower(texts)
    if whitespace:
        texts = pc.utf8_trim(texts, _SPACES)
        messy = pc.fill_null(pc.match_substring_regex(texts, _MESSY_WS), False)
        texts = _fix_rows(
            texts,
            messy.to_numpy(zero_copy_only=False),
            lambda t: pc.replace_substring_regex(t, f"{_WS}+", " "),
        )
    return texts


# texts sampled to decide whether normalising only the distinct ones pays
_REPEAT_SAMPLE = 20_000


def normalized_forms(texts: pa.Array, **settings) -> tuple[np.ndarray, pa.Array]:
    """(code per text, distinct normalised forms): ``forms[codes[i]]`` is text i normalised
    (see normalize; ``settings`` are its keywords), forms numbered by first appearance.

    Where texts repeat (comparisons that share turns and replies) only the distinct ones
    are normalised; where a sample of the first texts shows few repeats, all are, which
    saves the extra encoding. Both ways give the same codes.
    """
    sample = texts.slice(0, _REPEAT_SAMPLE)
    if texts.null_count or len(sample.unique()) > 0.8 * len(sample):
        encoded = normalize(texts, **settings).dictionary_encode()
        return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary
    raw = texts.dictionary_encode()
    forms = normalize(raw.dictionary, **settings).dictionary_encode()
    codes = forms.indices.to_numpy(zero_copy_only=False)
    return codes[raw.indices.to_numpy(zero_copy_only=False)], forms.dictionary


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

    >>> from hhdata.pairs.transcript import split_pair
    >>> p = split_pair(
    ...     "\\n\\nHuman: Hi\\n\\nAssistant: Hello", "\\n\\nHuman: Hi\\n\\nAssistant: hello "
    ... )
    >>> table = pa.table({"prompt": [p.prompt], "chosen": [p.chosen], "rejected": [p.rejected],
    ...     "chosen_text": ["\\n\\nHuman: Hi\\n\\nAssistant: Hello"],
    ...     "rejected_text": ["\\n\\nHuman: Hi\\n\\nAssistant: hello "], "flags": [p.flags]})
    >>> [reason for reason, mask in find_degenerate(table).items() if mask[0]]
    ['identical_replies']
    """

    def column(name: str) -> pa.Array:
        return one_array(pairs[name])

    replies = [joined_contents(column(side), "\n") for side in ("chosen", "rejected")]
    n = pairs.num_rows
    # both sides in one dictionary of normalised forms: equal codes, equal replies
    codes, forms = normalized_forms(pa.concat_arrays(replies), nfc=False)
    empty_form = pc.equal(pc.utf8_length(forms), 0).to_numpy(zero_copy_only=False)
    prompts = _rendered_prompts(column("prompt"))
    disagrees = np.zeros(pairs.num_rows, dtype=bool)
    for side, reply in zip(("chosen_text", "rejected_text"), replies):
        text = column(side)
        # the reply follows its tag after one space, or directly when the text has none
        spaced = pc.equal(text, pc.binary_join_element_wise(prompts, reply, " "))
        differs = ~pc.fill_null(spaced, False).to_numpy(zero_copy_only=False)
        if differs.any():  # only those rows can be the unspaced form
            rows = pa.array(np.flatnonzero(differs))
            unspaced = pc.equal(
                text.take(rows),
                pc.binary_join_element_wise(prompts.take(rows), reply.take(rows), ""),
            )
            differs[differs] = ~pc.fill_null(unspaced, False).to_numpy(zero_copy_only=False)
        disagrees |= differs
    return {
        IDENTICAL_REPLIES: codes[:n] == codes[n:],
        EMPTY_REPLY: empty_form[codes[:n]] | empty_form[codes[n:]],
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
