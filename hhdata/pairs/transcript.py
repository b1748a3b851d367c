"""Human/Assistant transcripts: parse into turns, render back byte for byte, split a pair.

An HH-RLHF transcript is a sequence of turns, each introduced by a separator
``"\\n\\nHuman: "`` or ``"\\n\\nAssistant: "``. A turn's content is everything up to the next
separator, so ``render_transcript(parse_transcript(x)) == x`` for every text that starts
with a separator.

A chosen/rejected pair shares its prompt. The prompt ends at the first ``"\\n\\nAssistant:"``
tag after the last ``"\\n\\nHuman:"`` tag of the two texts' common prefix. Splitting each text
at its *last* Assistant tag instead is a common bug: it breaks the pairs whose reply itself
contains an Assistant tag.

This module is the reference implementation; ``hhdata.pairs`` applies the same rules to a
whole Arrow table at once and is tested against it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from hhdata.errors import PairError, TranscriptError
from hhdata.quarantine import BAD_TRANSCRIPT_START, NO_HUMAN_TURN, PROMPT_MISMATCH

USER, ASSISTANT = "user", "assistant"
TAGS = {USER: "Human", ASSISTANT: "Assistant"}
SEPARATORS = {role: f"\n\n{tag}: " for role, tag in TAGS.items()}
HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"

_SEPARATOR_RE = re.compile(r"\n\n(Human|Assistant): ")
_ROLE_OF_TAG = {tag: role for role, tag in TAGS.items()}
# A speaker tag that is not a turn separator: at the start of a turn, or after anything
# but a blank line. It usually means the model wrote the other speaker's line itself.
INLINE_TAG_RE = re.compile(r"(?<!\n\n)\b(?:Human|Assistant):")

# Flags: irregularities inside a well-formed pair. They are reported, never fatal.
EMPTY_CHOSEN = "empty_chosen"
EMPTY_REJECTED = "empty_rejected"
TAG_IN_CHOSEN = "tag_in_chosen"
TAG_IN_REJECTED = "tag_in_rejected"
TAG_IN_PROMPT = "tag_in_prompt"
CONSECUTIVE_ASSISTANT = "consecutive_assistant"
CONSECUTIVE_USER = "consecutive_user"
FLAGS = (
    EMPTY_CHOSEN,
    EMPTY_REJECTED,
    TAG_IN_CHOSEN,
    TAG_IN_REJECTED,
    TAG_IN_PROMPT,
    CONSECUTIVE_ASSISTANT,
    CONSECUTIVE_USER,
)

# Reasons a pair is quarantined (its prompt cannot be determined) are named in
# hhdata.quarantine beside every other reason: BAD_TRANSCRIPT_START, NO_HUMAN_TURN, PROMPT_MISMATCH.


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split a transcript into turns.

    >>> parse_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]

    Raises TranscriptError when the text does not start with a speaker separator,
    because no turn structure would render back to it.
    """
    pieces = _SEPARATOR_RE.split(text)
    # pieces = [before_first_tag, tag, content, tag, content, ...]
    if pieces[0] or len(pieces) == 1:
        raise TranscriptError(
            BAD_TRANSCRIPT_START,
            f"transcript does not start with '\\n\\nHuman: ' or '\\n\\nAssistant: ' "
            f"(it starts with {text[:30]!r}); HH-RLHF transcripts begin with a blank line "
            "and a speaker tag",
        )
    return [
        {"role": _ROLE_OF_TAG[tag], "content": content}
        for tag, content in zip(pieces[1::2], pieces[2::2])
    ]


def render_transcript(turns: list[dict[str, str]]) -> str:
    """Render turns back to the transcript format; the exact inverse of parse_transcript.

    >>> render_transcript([{"role": "user", "content": "Hi"}])
    '\\n\\nHuman: Hi'
    """
    try:
        return "".join(SEPARATORS[turn["role"]] + turn["content"] for turn in turns)
    except KeyError as error:
        raise TranscriptError(
            "bad_role", f"unknown role {error.args[0]!r}; roles are 'user' and 'assistant'"
        ) from None


class Pair(NamedTuple):
    """A pair split into its shared prompt and the two final replies."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    flags: list[str]


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search on C slices)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:  # invariant: a[:low] == b[:low] and a[:high + 1] != b[:high + 1]
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def prompt_end(chosen_text: str, rejected_text: str) -> int:
    """Offset just past the prompt's final ``"\\n\\nAssistant:"`` tag, by the shared-prefix rule.

    Raises PairError with a reason code when the prompt cannot be determined.
    """
    common = chosen_text[: common_prefix_length(chosen_text, rejected_text)]
    last_human = common.rfind(HUMAN_TAG)
    if last_human < 0:
        raise PairError(
            NO_HUMAN_TURN,
            "chosen and rejected share no '\\n\\nHuman:' turn, so there is no prompt",
        )
    final_tag = common.find(ASSISTANT_TAG, last_human)
    if final_tag < 0:
        raise PairError(
            PROMPT_MISMATCH,
            "chosen and rejected disagree before the final '\\n\\nAssistant:' tag "
            f"(they differ from character {len(common)} on)",
        )
    return final_tag + len(ASSISTANT_TAG)


def _reply(remainder: str) -> str:
    """The content of a final reply: the text after its tag, less the one separating space."""
    return remainder[1:] if remainder.startswith(" ") else remainder


def split_pair(chosen_text: str, rejected_text: str) -> Pair:
    """Split a chosen/rejected pair into prompt turns, the two replies, and flags.

    >>> pair = split_pair("\\n\\nHuman: Hi\\n\\nAssistant: Hello!",
    ...                   "\\n\\nHuman: Hi\\n\\nAssistant: Go away")
    >>> pair.prompt
    [{'role': 'user', 'content': 'Hi'}]
    >>> pair.chosen, pair.rejected
    ([{'role': 'assistant', 'content': 'Hello!'}], [{'role': 'assistant', 'content': 'Go away'}])

    Raises PairError (reason ``no_human_turn``, ``prompt_mismatch`` or
    ``bad_transcript_start``) when the prompt cannot be determined.
    """
    end = prompt_end(chosen_text, rejected_text)
    try:
        # the prompt text ends with the bare tag; add the space its separator carries
        prompt = parse_transcript(chosen_text[:end] + " ")[:-1]
    except TranscriptError as error:
        raise PairError(error.reason, str(error)) from None
    replies = {"chosen": _reply(chosen_text[end:]), "rejected": _reply(rejected_text[end:])}
    for side, reply in replies.items():
        if SEPARATORS[USER] in reply:
            raise PairError(
                PROMPT_MISMATCH,
                f"the {side} transcript goes on with another Human turn after the shared "
                "prompt, so chosen and rejected disagree before the final reply",
            )
    return Pair(
        prompt=prompt,
        chosen=[{"role": ASSISTANT, "content": replies["chosen"]}],
        rejected=[{"role": ASSISTANT, "content": replies["rejected"]}],
        flags=pair_flags(prompt, replies["chosen"], replies["rejected"]),
    )


def pair_flags(prompt: list[dict[str, str]], chosen: str, rejected: str) -> list[str]:
    """The irregularity flags of a split pair, in the fixed order of FLAGS."""
    found = set()
    for _side, reply, empty, inline in (
        ("chosen", chosen, EMPTY_CHOSEN, TAG_IN_CHOSEN),
        ("rejected", rejected, EMPTY_REJECTED, TAG_IN_REJECTED),
    ):
        if not reply.strip():
            found.add(empty)
        if SEPARATORS[ASSISTANT] in reply:
            found.add(CONSECUTIVE_ASSISTANT)
        if INLINE_TAG_RE.search(reply):
            found.add(inline)
    if any(INLINE_TAG_RE.search(turn["content"]) for turn in prompt):
        found.add(TAG_IN_PROMPT)
    for previous, turn in zip(prompt, prompt[1:]):
        if previous["role"] == turn["role"]:
            found.add(CONSECUTIVE_USER if turn["role"] == USER else CONSECUTIVE_ASSISTANT)
    return [flag for flag in FLAGS if flag in found]
