"""Text rendering and encoding shared by every trainer: one conversation, one set of token ids.

The reward model, SFT and PPO must read the same tokens for the same words: the reward model
scores ``start | prompt | reply | end-of-turn`` and reads at the end-of-turn token; SFT
learns the reply and that token; PPO's queries are SFT's prompts and sampling stops at that
token. Everything that decides those ids lives here:

- ``render`` / ``reply_body``: the prompt's and the reply's text (chat template or HH text);
- ``end_of_turn_id``, ``start_token_id``, ``template_end_id``, ``reward_pad_id``: the tokens
  around a conversation, computed once per tokenizer by ``text_format`` (a cached
  ``TextFormat``), since a chat template renders a probe conversation to find them;
- ``encode_pair`` / ``truncate_pair``: (prompt, chosen, rejected) ids for the reward model;
- ``reward_text``: the plain text a saved sequence classifier scores to the same ids;
- ``encode_prompt`` / ``encode_reply`` / ``encode_example``: SFT's examples and PPO's queries.

>>> from training.models import train_tiny_tokenizer
>>> tok = train_tiny_tokenizer(["\\n\\nHuman: hi\\n\\nAssistant: hello"] * 20, vocab_size=300)
>>> row = {"prompt": [{"role": "user", "content": "hi"}],
...        "chosen": [{"role": "assistant", "content": "hello"}],
...        "rejected": [{"role": "assistant", "content": "hi"}]}
>>> prompt, chosen, rejected = encode_pair(tok, row, max_length=64, chat=False)
>>> tok.decode(prompt + chosen)
'<s>\\n\\nHuman: hi\\n\\nAssistant: hello</s>'
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from hhdata.errors import HhDataError
from hhdata.pairs.transcript import ASSISTANT_TAG, render_transcript

IGNORE_INDEX = -100  # label value torch's cross-entropy skips

# a conversation rendered once to learn what a chat template writes around a reply
PROBE = ([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}])


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    """Whether rows are rendered with the tokenizer's chat template (asked for, and it has one)."""
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> tuple[str, str]:
    """The text of the prompt and of the reply after it; their concatenation is the transcript.

    >>> render(None, [{"role": "user", "content": "Hi"}],
    ...        [{"role": "assistant", "content": "Yo"}], False)
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Yo')
    """
    if not chat:
        reply_text = render_transcript(reply)[len(ASSISTANT_TAG) :]
        return render_transcript(prompt) + ASSISTANT_TAG, reply_text
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not whole.startswith(head):
        raise HhDataError(
            f"the chat template of {tokenizer.name_or_path!r} renders the prompt differently "
            "with and without the reply; run with --no-chat-template"
        )
    return head, whole[len(head) :]


def start_token_id(tokenizer) -> int | None:
    """The token that opens a sequence: cls, else bos, else none (id 0 is a token like others)."""
    for candidate in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    return None


def special_token_ids(tokenizer) -> list[int]:
    """Ids of every special token, named (bos, eos, ...) or added as special, in id order."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted({*tokenizer.all_special_ids, *added})


def template_end_id(tokenizer) -> int | None:
    """The last special token a chat template writes after a reply (`<|im_end|>` for ChatML),
    or None."""
    _, reply_text = render(tokenizer, *PROBE, chat=True)
    special = set(special_token_ids(tokenizer))
    ids = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    written = [t for t in ids if t in special]
    return written[-1] if written else None


def end_of_turn_id(tokenizer, chat: bool) -> int:
    """The one token that closes an assistant turn; the reward is read there, PPO stops there.

    With a chat template: the last special token the template writes after a reply
    (`<|im_end|>` for ChatML, eos for templates that end turns with it). Plain HH text, or a
    template that writes none (the tiny tokenizer's HH template): the tokenizer's sep, else
    its eos; the trainers append it to every reply.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["hi there"] * 10, vocab_size=300)
    >>> tok.convert_ids_to_tokens(end_of_turn_id(tok, chat=True))
    '</s>'
    """
    return text_format(tokenizer, chat).end_id


def _end_of_turn_id(tokenizer, written: int | None) -> int:
    """end_of_turn_id, given what the template writes after a reply (None: nothing, or no
    template)."""
    if written is not None:
        return written
    for candidate in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise HhDataError(
        f"the tokenizer of {tokenizer.name_or_path!r} has no end-of-sequence or separator token "
        "to close a reply with; set tokenizer.eos_token (or use a chat template that ends turns)"
    )


@dataclass(frozen=True)
class TextFormat:
    """The tokens around a conversation for one tokenizer and rendering, computed once.

    A chat template renders and tokenizes a probe conversation to find its end token; doing
    that for every row made encoding a chat-template release several times slower.
    """

    chat: bool
    """rendered with the chat template"""
    template_end: int | None
    """the last special token the template writes after a reply (template_end_id), or None"""
    template_end_token: str | None
    """that token's text, where a reply's text is cut"""
    end_id: int
    """the token that closes every reply (end_of_turn_id)"""
    start_id: int | None
    """the token that opens every sequence (start_token_id)"""


def _fingerprint(tokenizer) -> tuple:
    """What a TextFormat depends on, so a tokenizer changed in place is prepared again."""
    return (
        getattr(tokenizer, "chat_template", None),
        len(tokenizer),
        tokenizer.cls_token_id,
        tokenizer.bos_token_id,
        tokenizer.sep_token_id,
        tokenizer.eos_token_id,
    )


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_format(tokenizer, chat: bool) -> TextFormat:
    """The TextFormat of `tokenizer` rendered with (`chat`) or without its chat template,
    computed on first use and kept while the tokenizer lives and is unchanged."""
    state = _fingerprint(tokenizer)
    known_state, formats = _FORMATS.get(tokenizer, (None, {}))
    if known_state != state:  # new, or changed in place: its old formats are stale
        formats = {}
        _FORMATS[tokenizer] = (state, formats)
    if chat not in formats:
        formats[chat] = compute_text_format(tokenizer, chat)
    return formats[chat]


def compute_text_format(tokenizer, chat: bool) -> TextFormat:
    """A TextFormat computed from scratch (text_format caches this)."""
    written = template_end_id(tokenizer) if chat else None
    return TextFormat(
        chat=chat,
        template_end=written,
        template_end_token=None if written is None else tokenizer.convert_ids_to_tokens(written),
        end_id=_end_of_turn_id(tokenizer, written),
        start_id=start_token_id(tokenizer),
    )


def reward_pad_id(tokenizer, chat: bool) -> int:
    """A pad id that never occurs in a scored text, so a classifier that pools at the last
    non-pad token reads the end-of-turn token (SmolLM2 pads with `<|im_end|>`, its end of turn).

    The tokenizer's own pad when it is not the start or end token, else the first special
    token the format never writes (SmolLM2: `<|endoftext|>`).
    """
    form = text_format(tokenizer, chat)
    used = {form.end_id, form.start_id}
    if chat:
        prompt_text, reply_text = render(tokenizer, *PROBE, chat=True)
        used |= set(tokenizer(prompt_text + reply_text, add_special_tokens=False)["input_ids"])
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in used:
        return tokenizer.pad_token_id
    spare = [t for t in special_token_ids(tokenizer) if t not in used]
    if not spare:
        raise HhDataError(
            f"the tokenizer of {tokenizer.name_or_path!r} pads with its end-of-turn token and has "
            "no spare special token to pad with instead; add one (tokenizer.add_special_tokens("
            "{'pad_token': '<pad>'}) and resize the model's embeddings)"
        )
    return spare[0]


def reply_body(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> tuple[str, str]:
    """(prompt text, reply text without the end-of-turn token a chat template writes, and
    without anything after it, such as ChatML's newline)."""
    prompt_text, reply_text = render(tokenizer, prompt, reply, chat)
    end_token = text_format(tokenizer, chat).template_end_token
    if end_token is not None:
        reply_text = reply_text[: reply_text.rfind(end_token)]
    return prompt_text, reply_text


def truncate_pair(
    start: list[int], prompt: list[int], replies: list[list[int]], end: int, max_length: int
) -> tuple[list[int], ...]:
    """(start + prompt, reply + [end] for each reply), at most max_length tokens per sequence.

    When start + prompt + the longest reply + end fits, nothing is cut. Otherwise each reply
    keeps at least max_length // 2 tokens including its end token (more where the prompt is
    short), and the prompt keeps its last tokens, exactly as many as fit beside the longer one.

    >>> truncate_pair([0], [1, 2], [[5, 6], [7]], 9, max_length=6)  # fits: nothing cut
    ([0, 1, 2], [5, 6, 9], [7, 9])
    >>> truncate_pair([0], [1, 2, 3, 4], [[5, 6], [7]], 9, max_length=6)
    ([0, 3, 4], [5, 6, 9], [7, 9])
    """
    cap = max(max(max_length - len(start) - len(prompt), max_length // 2) - 1, 0)
    closed = [reply[:cap] + [end] for reply in replies]
    room = max_length - len(start) - max(map(len, closed))
    return (start + prompt[max(len(prompt) - room, 0) :], *closed)


def opening(tokenizer, prompt_ids: list[int]) -> list[int]:
    """The start token to put before `prompt_ids`: [start_token_id], or [] when the tokenizer
    has none or the chat template already wrote it."""
    start = start_token_id(tokenizer)
    return [] if start is None or prompt_ids[:1] == [start] else [start]


def encode_pair(tokenizer, row: dict, max_length: int, chat: bool) -> tuple[list[int], ...]:
    """Token ids of (prompt, chosen reply, rejected reply), truncated to fit max_length.

    The start token (cls/bos) opens the prompt unless the chat template writes it; each reply
    ends with the end-of-turn token (end_of_turn_id), kept through truncation; see
    truncate_pair for what is cut.
    """
    end = text_format(tokenizer, chat).end_id
    replies = []
    for reply in (row["chosen"], row["rejected"]):
        prompt_text, body_text = reply_body(tokenizer, row["prompt"], reply, chat)
        replies.append(tokenizer(body_text, add_special_tokens=False)["input_ids"])
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return truncate_pair(opening(tokenizer, prompt), prompt, replies, end, max_length)


def reward_text(tokenizer, prompt: list[dict], reply: list[dict], chat: bool) -> str:
    """The text whose `tokenizer(text)` ids (default special tokens) are those encode_pair
    gives untruncated: what the saved sequence-classification model, or
    pipeline("text-classification", function_to_apply="none"), scores.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["hi there"] * 10, vocab_size=300)
    >>> reward_text(tok, [{"role": "user", "content": "Hi"}],
    ...             [{"role": "assistant", "content": "Yo"}], chat=False)
    '<s>\\n\\nHuman: Hi\\n\\nAssistant: Yo</s>'
    """
    form = text_format(tokenizer, chat)
    end, start = form.end_id, form.start_id
    prompt_text, body_text = reply_body(tokenizer, prompt, reply, chat)
    text = prompt_text + body_text
    added = tokenizer("")["input_ids"]  # what the tokenizer adds by itself (BERT: [CLS] [SEP])
    first = tokenizer(prompt_text, add_special_tokens=False)["input_ids"][:1]
    if start is not None and first != [start] and added[:1] != [start]:
        text = tokenizer.convert_ids_to_tokens(start) + text
    if added[-1:] != [end]:
        text += tokenizer.convert_ids_to_tokens(end)
    return text


# ---- SFT examples and PPO queries --------------------------------------------------------


def encode_prompt(
    tokenizer, prompt: list[dict[str, str]], chat: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt rendered as the reward model renders it, and their labels.

    Labels are IGNORE_INDEX except on the words of the prompt's earlier assistant turns. The
    ids (without labels) are PPO's queries, so policy and reward model read the same tokens.

    >>> from training.models import train_tiny_tokenizer
    >>> tok = train_tiny_tokenizer(["\\n\\nHuman: hi\\n\\nAssistant: hello"] * 20, vocab_size=300)
    >>> ids, labels = encode_prompt(tok, [{"role": "user", "content": "hi"}], chat=False)
    >>> tok.decode(ids, skip_special_tokens=True), set(labels)
    ('\\n\\nHuman: hi\\n\\nAssistant:', {-100})
    """
    text, _ = render(tokenizer, prompt, [{"role": "assistant", "content": ""}], chat)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = opening(tokenizer, encoded["input_ids"])  # as in encode_pair
    # character spans of the assistant turns' words, found in order; a token that overlaps one
    # is a target (e.g. " Are", whose space belongs to the tag but whose word is the reply's)
    spans, cursor = [], 0
    for turn in prompt:
        found = text.find(turn["content"], cursor)
        if found >= 0:
            cursor = found + len(turn["content"])
            if turn["role"] == "assistant":
                spans.append((found, cursor))
    labels = [
        token if any(first < high and low < last for low, high in spans) else IGNORE_INDEX
        for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return start + encoded["input_ids"], [IGNORE_INDEX] * len(start) + labels


def encode_reply(tokenizer, prompt: list[dict[str, str]], content: str, chat: bool) -> list[int]:
    """Token ids of a final reply as it follows its prompt, closed by the end-of-turn token.

    The same end token the reward model reads at and PPO stops at (end_of_turn_id), whether
    or not a chat template writes one; what a template writes after it (ChatML's newline) is
    left out, as in encode_pair.
    """
    _, text = reply_body(tokenizer, prompt, [{"role": "assistant", "content": content}], chat)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [text_format(tokenizer, chat).end_id]


def encode_example(tokenizer, row: dict, max_length: int, chat: bool) -> dict[str, list[int]]:
    """input_ids and labels of one chosen conversation; labels are IGNORE_INDEX off the
    assistant turns.

    The reply's end token is a target too: PPO truncates replies at it. Long conversations
    keep their end (the final reply) and lose their oldest tokens.
    """
    ids, labels = encode_prompt(tokenizer, row["prompt"], chat)
    reply = encode_reply(tokenizer, row["prompt"], row["chosen"][0]["content"], chat)
    ids, labels = ids + reply, labels + reply
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}
