"""Seeded synthetic HH-RLHF pairs with planted duplicates, irregularities and bad records.

Text is drawn from a model fitted on the bundled real sample (harmless-base/test): the
number of Human turns per prompt, the character length of user turns, of assistant turns
inside the prompt and of final replies (resampled from the observed values), and the word
vocabulary with its frequencies. Chosen and rejected share the whole prompt and differ in
the final reply, as upstream.

``write_corpus`` lays the pairs out as upstream does, ``<out>/synth-<subset>/<split>.jsonl.gz``
in the upstream subset/split proportions, and plants known cases at configurable rates:
exact, swapped and case/whitespace duplicates, near duplicates with an exactly computed
prompt Jaccard, hard negatives (long shared prefix, Jaccard below 0.5), irregular but
well-formed pairs, and optionally bad records. ``<out>/planted.json`` is the ground truth.
The "synth-" prefix on every subset keeps synthetic rows out of releases of real data.

Run it: ``python -m hhdata.synth --pairs 170000 --seed 0 --out /tmp/synth``.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gzip
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import msgspec
import numpy as np

from hhdata.errors import SynthError
from hhdata.pairs.transcript import ASSISTANT, SEPARATORS, USER, split_pair
from hhdata.schema import SYNTHETIC_PREFIX, pair_id

SAMPLE = ("data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
# Upstream rows per subset and split (Anthropic/hh-rlhf); 169,352 pairs in all.
UPSTREAM_COUNTS = {
    ("harmless-base", "train"): 42_537,
    ("harmless-base", "test"): 2_312,
    ("helpful-base", "train"): 43_835,
    ("helpful-base", "test"): 2_354,
    ("helpful-online", "train"): 22_007,
    ("helpful-online", "test"): 1_137,
    ("helpful-rejection-sampled", "train"): 52_421,
    ("helpful-rejection-sampled", "test"): 2_749,
}
FILES = tuple(f"{SYNTHETIC_PREFIX}{subset}/{split}.jsonl.gz" for subset, split in UPSTREAM_COUNTS)
SHINGLE_SIZE = 5
_TAG_WORD_RE = re.compile(r"(human|assistant):", re.IGNORECASE)
_encode = msgspec.json.Encoder().encode
_CHUNK_PAIRS = 20_000  # pairs whose text is built at once; bounds memory at full scale

# Reason codes of planted bad records (blank lines are counted by readers, not quarantined).
BAD_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "missing_key",
    "extra_key",
    "wrong_type",
    "null_value",
    "empty_string",
    "chosen_equals_rejected",
    "not_an_object",
    "blank_line",
)


@dataclass(frozen=True)
class Rates:
    """How many records of each planted kind, as a fraction of n_pairs (rounded)."""

    exact_duplicate: float = 0.01
    """the same pair again, in the same file half the time, else in any file"""
    swapped_duplicate: float = 0.003
    """the same pair with chosen and rejected swapped"""
    case_whitespace_variant: float = 0.005
    """the same pair lowercased, with doubled spaces, or with trailing whitespace per turn"""
    near_duplicate: float = 0.01
    """the pair with its prompt lightly edited (words substituted, inserted, deleted)"""
    hard_negative: float = 0.005
    """a new pair sharing a long prompt prefix with another, prompt Jaccard below 0.5"""
    empty_reply: float = 0.001
    """a pair whose chosen or rejected final reply is empty"""
    tag_in_reply: float = 0.002
    """a final reply that starts with or contains a speaker tag without the blank line"""
    consecutive_assistant: float = 0.001
    """two assistant turns in a row, in the prompt or inside a final reply"""
    bad_record: float = 0.0
    """extra lines that are not valid records (off by default), on top of n_pairs"""


@dataclass
class Truth:
    """Everything planted by write_corpus; saved as planted.json next to the data.

    Locations are ``"<file relative to the corpus dir>:<1-based line>"``; ids are
    ``hhdata.schema.pair_id(chosen, rejected)``.
    """

    seed: int
    n_pairs: int
    rates: dict
    files: dict = field(default_factory=dict)
    exact_duplicates: list = field(default_factory=list)
    swapped_duplicates: list = field(default_factory=list)
    case_whitespace_variants: list = field(default_factory=list)
    near_duplicates: list = field(default_factory=list)
    hard_negatives: list = field(default_factory=list)
    irregular: list = field(default_factory=list)
    bad_records: list = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write the truth as indented, key-sorted JSON (deterministic bytes)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        """Read a planted.json written by save."""
        return cls(**json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- the fitted text model


@dataclass(frozen=True)
class TextModel:
    """Distributions fitted on the bundled real sample."""

    vocabulary: np.ndarray  # object array of words (whitespace-free, no speaker tags)
    word_lengths: np.ndarray  # characters per word
    word_table: np.ndarray  # word ids, each repeated as often as it occurs in the sample
    human_turns: np.ndarray  # observed Human turns per prompt, one value per real pair
    user_chars: np.ndarray  # observed characters per user turn
    assistant_chars: np.ndarray  # observed characters per assistant turn inside a prompt
    reply_chars: np.ndarray  # observed characters per final reply
    chars_per_word: float  # mean characters per word plus its separating space

    def words(self, rng: np.random.Generator, count: int) -> list[str]:
        """count words drawn with the observed frequencies."""
        return self.vocabulary[self.word_ids(rng, count)].tolist()

    def word_ids(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """count word ids drawn with the observed frequencies (uniform over the sample's words)."""
        return self.word_table[rng.integers(0, len(self.word_table), count)]


@functools.lru_cache(maxsize=1)
def text_model() -> TextModel:
    """Fit the text model on hhdata/data/hh-rlhf/harmless-base/test.jsonl.gz (cached)."""
    counts: dict[str, int] = {}
    human_turns, user_chars, assistant_chars, reply_chars = [], [], [], []
    sample = resources.files("hhdata").joinpath(*SAMPLE)
    with gzip.open(sample.open("rb"), "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            pair = split_pair(record["chosen"], record["rejected"])
            if pair.flags:  # fit regular structure only; irregularities are planted
                continue
            human_turns.append(sum(turn["role"] == USER for turn in pair.prompt))
            for turn in pair.prompt:
                chars = user_chars if turn["role"] == USER else assistant_chars
                chars.append(len(turn["content"]))
            for reply in (pair.chosen[0]["content"], pair.rejected[0]["content"]):
                reply_chars.append(len(reply))
            for turn in pair.prompt + pair.chosen + pair.rejected:
                for word in turn["content"].split():
                    counts[word] = counts.get(word, 0) + 1
    vocabulary = sorted(word for word in counts if not _TAG_WORD_RE.search(word))
    frequency = np.array([counts[word] for word in vocabulary], dtype=np.int64)
    word_lengths = np.array([len(word) for word in vocabulary], dtype=np.int64)
    return TextModel(
        vocabulary=np.array(vocabulary, dtype=object),
        word_lengths=word_lengths,
        word_table=np.repeat(np.arange(len(vocabulary), dtype=np.int32), frequency),
        human_turns=np.array(human_turns, dtype=np.int64),
        user_chars=np.array(user_chars, dtype=np.int64),
        assistant_chars=np.array(assistant_chars, dtype=np.int64),
        reply_chars=np.array(reply_chars, dtype=np.int64),
        chars_per_word=float(np.dot(frequency, word_lengths + 1) / frequency.sum()),
    )


# ---------------------------------------------------------------- drafts: pairs as turns


@dataclass
class Draft:
    """A pair before rendering: prompt turns as (role, content), then the two final replies."""

    prompt: list[tuple[str, str]]
    chosen: str
    rejected: str

    def texts(self) -> tuple[str, str]:
        """The chosen and rejected transcripts, in HH-RLHF format."""
        prompt = "".join(SEPARATORS[role] + content for role, content in self.prompt)
        prompt += SEPARATORS[ASSISTANT]
        return prompt + self.chosen, prompt + self.rejected

    def tokens(self) -> list[str]:
        """The prompt's words as prompt_tokens counts them."""
        return " ".join(content for _, content in self.prompt).lower().split()


def prompt_tokens(prompt: list[dict[str, str]]) -> list[str]:
    """The words of a prompt for shingling: its turns' contents, lowercased, split on whitespace.

    Speaker tags are not words. This is the definition behind every Jaccard in planted.json.

    >>> prompt_tokens([{"role": "user", "content": "Hi  there"},
    ...                {"role": "assistant", "content": "Yes?"}])
    ['hi', 'there', 'yes?']
    """
    return " ".join(turn["content"] for turn in prompt).lower().split()


def shingles(tokens: list[str], size: int = SHINGLE_SIZE) -> set[tuple[str, ...]]:
    """The set of size-word shingles; a text shorter than size is one shingle of all its words."""
    if len(tokens) < size:
        return {tuple(tokens)}
    return {tuple(tokens[start : start + size]) for start in range(len(tokens) - size + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def prompt_jaccard(a: tuple[str, str], b: tuple[str, str], size: int = SHINGLE_SIZE) -> float:
    """Exact Jaccard of the prompts' word shingles of two (chosen_text, rejected_text) pairs."""
    first, second = split_pair(*a).prompt, split_pair(*b).prompt
    return jaccard(shingles(prompt_tokens(first), size), shingles(prompt_tokens(second), size))


def _draft_chunk(model: TextModel, rng: np.random.Generator, n: int) -> list[Draft]:
    """n regular pairs: turn counts and lengths resampled from the real sample, all at once."""
    humans = rng.choice(model.human_turns, n)
    prompt_turns = 2 * humans - 1
    turns_per_pair = prompt_turns + 2  # the prompt, then the chosen and the rejected reply
    pair_of_turn = np.repeat(np.arange(n), turns_per_pair)  # shape: [turns]
    position = np.arange(turns_per_pair.sum()) - np.repeat(
        np.cumsum(turns_per_pair) - turns_per_pair, turns_per_pair
    )
    is_reply = position >= prompt_turns[pair_of_turn]
    is_user = ~is_reply & (position % 2 == 0)
    is_assistant = ~is_reply & ~is_user
    chars = np.empty(len(position), dtype=np.int64)
    for mask, observed in (
        (is_user, model.user_chars),
        (is_assistant, model.assistant_chars),
        (is_reply, model.reply_chars),
    ):
        chars[mask] = rng.choice(observed, int(mask.sum()))
    words_per_turn = np.maximum(1, np.rint((chars + 1) / model.chars_per_word)).astype(np.int64)
    ids = model.word_ids(rng, int(words_per_turn.sum()))
    text = " ".join(model.vocabulary[ids].tolist())
    # every turn is a slice of one joined string: word spans are the word plus one space
    char_after_word = np.cumsum(model.word_lengths[ids] + 1)  # shape: [words]
    last_word = np.cumsum(words_per_turn) - 1  # shape: [turns]
    ends = char_after_word[last_word] - 1
    starts = np.concatenate([[0], char_after_word[last_word[:-1]]])
    contents = [text[start:end] for start, end in zip(starts.tolist(), ends.tolist())]
    drafts, turn = [], 0
    for count in prompt_turns.tolist():
        roles = [USER if index % 2 == 0 else ASSISTANT for index in range(count)]
        prompt = list(zip(roles, contents[turn : turn + count]))
        drafts.append(Draft(prompt, contents[turn + count], contents[turn + count + 1]))
        turn += count + 2
    return drafts


def _make_unique(drafts: list[Draft], model: TextModel, rng, seen: set[str]) -> None:
    """Lengthen the rare drafts whose prompt or replies collide after normalisation.

    Accidental duplicates would blur the planted truth, so no two generated prompts are
    equal up to case and whitespace, and no chosen reply equals its rejected one.
    """
    for draft in drafts:
        # generated contents are words joined by single spaces: this is " ".join(tokens)
        while (key := " ".join(content for _, content in draft.prompt).lower()) in seen:
            role, content = draft.prompt[0]
            draft.prompt[0] = (role, f"{content} {model.words(rng, 1)[0]}")
        seen.add(key)
        while draft.chosen.lower() == draft.rejected.lower():
            draft.rejected = f"{draft.rejected} {model.words(rng, 1)[0]}"


def _drafts(n: int, rng: np.random.Generator, seen: set[str] | None = None) -> list[Draft]:
    """n distinct regular drafts; seen holds the prompt keys of earlier drafts to avoid."""
    model = text_model()
    drafts: list[Draft] = []
    for start in range(0, n, _CHUNK_PAIRS):
        drafts.extend(_draft_chunk(model, rng, min(_CHUNK_PAIRS, n - start)))
    _make_unique(drafts, model, rng, set() if seen is None else seen)
    return drafts


def generate(n_pairs: int, *, seed: int = 0) -> list[dict[str, str]]:
    """n_pairs regular raw records ``{"chosen": ..., "rejected": ...}``, distinct, seeded.

    Nothing is planted here (see write_corpus); every record splits cleanly and has no flags.

    >>> records = generate(2, seed=1)
    >>> records[0]["chosen"].startswith("\\n\\nHuman: "), len(records)
    (True, 2)
    """
    drafts = _drafts(n_pairs, np.random.default_rng(seed))
    return [dict(zip(("chosen", "rejected"), draft.texts())) for draft in drafts]


# ---------------------------------------------------------------- planting


class _Corpus:
    """Records assigned to files; planted copies and bad lines are records too."""

    def __init__(self, rng: np.random.Generator, weights: np.ndarray):
        self.rng, self.weights = rng, weights
        self.file: list[int] = []
        self.content: list[tuple[str, str] | bytes] = []

    def add(self, file: int, content: tuple[str, str] | bytes) -> int:
        self.file.append(file)
        self.content.append(content)
        return len(self.file) - 1

    def some_file(self) -> int:
        return int(self.rng.choice(len(self.weights), p=self.weights))

    def copy_file(self, original: int) -> int:
        """Half the copies stay in their original's file, the others go anywhere."""
        return self.file[original] if self.rng.random() < 0.5 else self.some_file()

    def lay_out(self) -> tuple[list[list[int]], list[str]]:
        """Shuffle each file's records; return them per file and each record's location."""
        files = np.asarray(self.file)
        per_file, location = [], [""] * len(files)
        for index, name in enumerate(FILES):
            records = self.rng.permutation(np.flatnonzero(files == index)).tolist()
            per_file.append(records)
            for line, record in enumerate(records, start=1):
                location[record] = f"{name}:{line}"
        return per_file, location


class _Sources:
    """Hands out distinct base pairs as sources of plants, each at most once."""

    def __init__(self, rng: np.random.Generator, drafts: list[Draft]):
        self.drafts, self.order = drafts, rng.permutation(len(drafts)).tolist()
        self.used = np.zeros(len(drafts), dtype=bool)
        # generated contents are words joined by single spaces
        self.words = np.array(
            [sum(content.count(" ") + 1 for _, content in draft.prompt) for draft in drafts]
        )

    def take(self, count: int, min_words: int = 0) -> list[int]:
        taken = []
        for index in self.order:
            if len(taken) == count:
                break
            if not self.used[index] and self.words[index] >= min_words:
                self.used[index] = True
                taken.append(index)
        self.order = [index for index in self.order if not self.used[index]]
        return taken

    def take_each(self, needs: list[int]) -> list[int]:
        """One source per need with at least that many prompt words; -1 where none is left."""
        pending = sorted(range(len(needs)), key=needs.__getitem__)
        pending_needs = [needs[item] for item in pending]
        taken = [-1] * len(needs)
        for index in self.order:
            if not pending:
                break
            # give the source to the largest need it meets
            position = bisect.bisect_right(pending_needs, self.words[index]) - 1
            if self.used[index] or position < 0:
                continue
            pending_needs.pop(position)
            taken[pending.pop(position)] = index
            self.used[index] = True
        self.order = [index for index in self.order if not self.used[index]]
        return taken


def _words_for(model: TextModel, rng: np.random.Generator, observed_chars: np.ndarray) -> list[str]:
    chars = int(rng.choice(observed_chars))
    return model.words(rng, max(1, round((chars + 1) / model.chars_per_word)))


def _case_whitespace_variant(draft: Draft, transform: str) -> Draft:
    change = {
        "lowercase": str.lower,
        "double_space": lambda text: text.replace(" ", "  "),
        "trailing_whitespace": lambda text: text + " ",
    }[transform]
    prompt = [(role, change(content)) for role, content in draft.prompt]
    return Draft(prompt, change(draft.chosen), change(draft.rejected))


def _words_needed(target: float) -> int:
    """Prompt words for which one substitution (breaking SHINGLE_SIZE shingles) stays above target.

    n shingles keep (n - k) / (n + k) >= target when n >= k (1 + target) / (1 - target).
    """
    return SHINGLE_SIZE - 1 + int(np.ceil(SHINGLE_SIZE * (1 + target) / (1 - target)))


def _near_duplicate(draft: Draft, target: float, model: TextModel, rng) -> dict:
    """Edit prompt words (substitute, insert, delete) until the shingle Jaccard drops to target.

    k scattered edits leave about (n - 5k) / (n + 5k) of n shingles: a first batch of 60% of
    that estimate cannot overshoot, then one edit at a time lands just below target.
    """
    words = [content.split(" ") for _, content in draft.prompt]
    original = shingles(draft.tokens())
    n = len(original)
    highest = (n - SHINGLE_SIZE) / (n + SHINGLE_SIZE)
    target = min(target, highest)  # a prompt too short for the drawn target
    batch = max(1, int(0.6 * n * (1 - target) / (SHINGLE_SIZE * (1 + target))))
    edits, similarity = 0, 1.0
    while similarity > target:
        for _ in range(batch):
            _edit_word(words, model, rng)
        edits, batch = edits + batch, 1
        prompt = [(role, " ".join(turn)) for (role, _), turn in zip(draft.prompt, words)]
        edited = Draft(prompt, draft.chosen, draft.rejected)
        similarity = jaccard(original, shingles(edited.tokens()))
    return {"draft": edited, "target_jaccard": target, "jaccard": similarity, "edits": edits}


def _edit_word(words: list[list[str]], model: TextModel, rng: np.random.Generator) -> None:
    """Substitute, insert or delete one word at a random place (no turn is left empty)."""
    sizes = np.array([len(turn) for turn in words])
    turn = int(rng.choice(len(words), p=sizes / sizes.sum()))
    position = int(rng.integers(len(words[turn])))
    operation = ("substitute", "insert", "delete")[int(rng.integers(3))]
    if operation == "delete" and len(words[turn]) > 1:
        del words[turn][position]
    elif operation == "insert":
        words[turn].insert(position, model.words(rng, 1)[0])
    else:
        old = words[turn][position].lower()
        while (new := model.words(rng, 1)[0]).lower() == old:
            pass
        words[turn][position] = new


def _hard_negative(draft: Draft, model: TextModel, rng: np.random.Generator) -> dict:
    """Keep 45-70% of the prompt's words, write the rest afresh, until Jaccard < 0.5."""
    lengths = [len(content.split(" ")) for _, content in draft.prompt]
    keep = max(1, round(float(rng.uniform(0.45, 0.7)) * sum(lengths)))
    prompt, kept = [], 0
    for (role, content), length in zip(draft.prompt, lengths):
        shared = content.split(" ")[: max(0, keep - kept)]
        kept += len(shared)
        fresh = model.words(rng, length - len(shared))
        prompt.append((role, " ".join(shared + fresh)))
    replies = [" ".join(_words_for(model, rng, model.reply_chars)) for _ in range(2)]
    negative = Draft(prompt, *replies)
    while (similarity := jaccard(shingles(draft.tokens()), shingles(negative.tokens()))) >= 0.5:
        role, content = negative.prompt[-1]
        negative.prompt[-1] = (role, " ".join([content, *model.words(rng, SHINGLE_SIZE)]))
    ours, theirs = negative.texts()[0], draft.texts()[0]
    shared = len(os.path.commonprefix([ours, theirs]))
    return {"draft": negative, "jaccard": similarity, "shared_prefix_chars": shared}


def _make_irregular(draft: Draft, kind: str, variant: int, model: TextModel, rng) -> list[str]:
    """Turn a regular draft into an irregular but well-formed one; return its expected flags."""
    side = "chosen" if variant % 2 == 0 else "rejected"
    reply = getattr(draft, side)
    if kind == "empty_reply":
        setattr(draft, side, "")
        return [f"empty_{side}"]
    if kind == "tag_in_reply":
        words = reply.split(" ")
        middle = len(words) // 2
        setattr(
            draft,
            side,
            (
                f"Human: {reply}",
                f"Assistant: {reply}",
                " ".join(words[:middle] + ["\nHuman:"] + words[middle:]),
            )[variant % 3],
        )
        return [f"tag_in_{side}"]
    fresh = " ".join(_words_for(model, rng, model.assistant_chars))
    if variant % 2 == 0 and len(draft.prompt) >= 3:  # a second assistant turn in the prompt
        draft.prompt.insert(2, (ASSISTANT, fresh))
    else:  # the final reply goes on with another assistant turn
        setattr(draft, side, f"{reply}{SEPARATORS[ASSISTANT]}{fresh}")
    return ["consecutive_assistant"]


def _json_line(chosen: str, rejected: str) -> bytes:
    """One record as upstream writes it: raw UTF-8, ", " and ": " separators.

    msgspec escapes strings exactly as ``json.dumps(ensure_ascii=False)`` does, faster
    (bench/synth.md).
    """
    return b"".join((b'{"chosen": ', _encode(chosen), b', "rejected": ', _encode(rejected), b"}"))


def _bad_line(reason: str, draft: Draft) -> bytes:
    """A line that a reader must quarantine (or, for blank_line, count) for reason."""
    chosen, rejected = draft.texts()
    objects = {
        "missing_key": {"chosen": chosen},
        "extra_key": {"chosen": chosen, "rejected": rejected, "score": 1},
        "wrong_type": {"chosen": chosen, "rejected": [rejected]},
        "null_value": {"chosen": None, "rejected": rejected},
        "empty_string": {"chosen": chosen, "rejected": ""},
        "chosen_equals_rejected": {"chosen": chosen, "rejected": chosen},
        "not_an_object": [chosen, rejected],
    }
    if reason in objects:
        return json.dumps(objects[reason], ensure_ascii=False).encode()
    if reason == "invalid_json":  # cut mid-record, on a character boundary
        text = _json_line(chosen, rejected).decode()
        return text[: len(text) // 2].encode()
    if reason == "invalid_utf8":
        return _json_line(chosen, rejected).replace(b"Human: ", b"Human: \xff\xfe", 1)
    if reason == "blank_line":
        return b""
    raise ValueError(f"unknown bad-record reason {reason!r}; known: {', '.join(BAD_REASONS)}")


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split total into integer parts proportional to weights (largest remainder)."""
    exact = weights * total
    parts = np.floor(exact).astype(np.int64)
    parts[np.argsort(-(exact - parts), kind="stable")[: total - parts.sum()]] += 1
    return parts


def _check(n_pairs: int, rates: Rates) -> None:
    for name, value in asdict(rates).items():
        if not 0.0 <= value < 1.0:
            raise SynthError(f"rate {name}={value} is outside [0, 1); pass a fraction of n_pairs")
    planted = sum(value for name, value in asdict(rates).items() if name != "bad_record")
    if planted > 0.5:
        raise SynthError(
            f"planted rates add up to {planted:.3f} of the pairs; keep them at most 0.5 so "
            "every plant has its own regular source pair"
        )
    if n_pairs < 1:
        raise SynthError(f"n_pairs={n_pairs}; ask for at least one pair")


def write_corpus(
    out_dir: str | Path,
    n_pairs: int = 170_000,
    *,
    seed: int = 0,
    rates: Rates = Rates(),
    bad_rate: float | None = None,
    compresslevel: int = 1,
) -> Truth:
    """Write n_pairs synthetic pairs in the upstream layout, plus planted.json; return the truth.

    Files: ``<out_dir>/synth-<subset>/<split>.jsonl.gz`` for the four upstream subsets and two
    splits, in upstream proportions. n_pairs counts every valid record, planted copies
    included; bad lines (``bad_rate``, default ``rates.bad_record`` = 0) come on top. The same
    seed gives byte-identical files (gzip mtime 0, no file name). gzip level 1 by default:
    much faster than level 6 for slightly larger files (bench/synth.md).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as out:
    ...     truth = write_corpus(out, 1000, seed=1)
    >>> len(truth.exact_duplicates), truth.near_duplicates[0]["jaccard"] < 1
    (10, True)
    """
    if bad_rate is not None:
        rates = Rates(**{**asdict(rates), "bad_record": bad_rate})
    _check(n_pairs, rates)
    rng, model = np.random.default_rng(seed), text_model()
    planned = {name: round(value * n_pairs) for name, value in asdict(rates).items()}
    n_base = n_pairs - sum(planned[name] for name in _COPIES)
    seen: set[str] = set()
    drafts = _drafts(n_base + planned["bad_record"], rng, seen)
    base, material = drafts[:n_base], drafts[n_base:]
    plans = _choose_sources(_Sources(rng, base), planned, rng)
    # too few long prompts for every near duplicate or hard negative: regular pairs fill in
    missing = sum(planned[kind] - len(plans[kind]) for kind in _COPIES)
    missing += sum(index < 0 for index, _ in plans["near_duplicate"])
    base += _drafts(missing, rng, seen)
    irregular = [  # edits base drafts in place, before they are rendered
        (index, kind, _make_irregular(base[index], kind, variant, model, rng))
        for kind in ("empty_reply", "tag_in_reply", "consecutive_assistant")
        for variant, index in enumerate(plans[kind])
    ]
    weights = np.array(list(UPSTREAM_COUNTS.values()), dtype=np.float64)
    corpus = _Corpus(rng, weights / weights.sum())
    files = np.repeat(np.arange(len(FILES)), _allocate(len(base), corpus.weights))
    for index, file in enumerate(rng.permutation(files).tolist()):
        corpus.add(file, base[index].texts())  # base pairs are the corpus' first records

    truth = Truth(seed=seed, n_pairs=n_pairs, rates=asdict(rates))
    items = _plant_copies(corpus, base, plans, model, rng, truth)
    for index, kind, flags in irregular:
        item = {"id": pair_id(*corpus.content[index]), "kind": kind, "flags": flags}
        items.append((truth.irregular, {**item, "record": index}))
    for number, draft in enumerate(material):
        reason = BAD_REASONS[number % len(BAD_REASONS)]
        record = corpus.add(corpus.some_file(), _bad_line(reason, draft))
        items.append((truth.bad_records, {"reason": reason, "record": record}))

    per_file, location = corpus.lay_out()
    for target, item in items:  # record numbers become "file:line" locations
        for key, name in (("original", "original"), ("copy", "copy"), ("record", "location")):
            if key in item:
                item[name] = location[item.pop(key)]
        target.append(item)
    _write_files(Path(out_dir), corpus, per_file, truth, compresslevel)
    truth.save(Path(out_dir) / "planted.json")
    return truth


_COPIES = (
    "exact_duplicate",
    "swapped_duplicate",
    "case_whitespace_variant",
    "near_duplicate",
    "hard_negative",
)


def _choose_sources(sources: _Sources, planned: dict[str, int], rng) -> dict[str, list]:
    """Distinct base pairs for every plant; near duplicates get (index, target Jaccard)."""
    plans = {
        kind: sources.take(planned[kind])
        for kind in ("exact_duplicate", "swapped_duplicate", "case_whitespace_variant")
    }
    # near duplicates: targets uniform in [0.5, 0.95], each on a prompt long enough for it
    targets = rng.uniform(0.5, 0.95, planned["near_duplicate"]).tolist()
    near = sources.take_each([max(40, _words_needed(target + 0.02)) for target in targets])
    shorter = iter(sources.take(near.count(-1), min_words=_words_needed(0.5)))
    plans["near_duplicate"] = [
        (index if index >= 0 else next(shorter, -1), target) for index, target in zip(near, targets)
    ]
    plans["hard_negative"] = sources.take(planned["hard_negative"], min_words=30)
    for kind in ("empty_reply", "tag_in_reply", "consecutive_assistant"):
        plans[kind] = sources.take(planned[kind])
    return plans


def _plant_copies(
    corpus: _Corpus, base: list[Draft], plans: dict, model: TextModel, rng, truth: Truth
) -> list[tuple[list, dict]]:
    """Add the planted copies to the corpus; return (truth list, item) with record numbers."""
    items = []

    def plant(kind: str, index: int, texts: tuple[str, str], **extra) -> None:
        copy = corpus.add(corpus.copy_file(index), texts)
        ids = {"id": pair_id(*texts), "original_id": pair_id(*corpus.content[index])}
        items.append((getattr(truth, kind), {**ids, "original": index, "copy": copy, **extra}))

    for index in plans["exact_duplicate"]:
        plant("exact_duplicates", index, corpus.content[index])
    for index in plans["swapped_duplicate"]:
        plant("swapped_duplicates", index, corpus.content[index][::-1])
    for number, index in enumerate(plans["case_whitespace_variant"]):
        transform = ("lowercase", "double_space", "trailing_whitespace")[number % 3]
        chosen = corpus.content[index][0]
        if transform == "lowercase" and chosen == chosen.lower():
            transform = "trailing_whitespace"  # nothing to lowercase
        variant = _case_whitespace_variant(base[index], transform)
        plant("case_whitespace_variants", index, variant.texts(), transform=transform)
    for index, target in plans["near_duplicate"]:
        if index >= 0:  # -1: a corpus too small to hold this many near duplicates
            edit = _near_duplicate(base[index], target, model, rng)
            plant("near_duplicates", index, edit.pop("draft").texts(), **edit)
    for index in plans["hard_negative"]:
        negative = _hard_negative(base[index], model, rng)
        plant("hard_negatives", index, negative.pop("draft").texts(), **negative)
    return items


def _write_files(
    out: Path, corpus: _Corpus, per_file: list[list[int]], truth: Truth, level: int
) -> None:
    def write(path: Path, data: bytes) -> None:
        path.write_bytes(gzip.compress(data, compresslevel=level, mtime=0))

    # zlib lets go of the GIL: compress one file while the next one is encoded
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        for name, records in zip(FILES, per_file):
            lines = []
            for record in records:
                content = corpus.content[record]
                lines.append(content if isinstance(content, bytes) else _json_line(*content))
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            data = b"\n".join(lines) + b"\n" if lines else b""
            writes.append(pool.submit(write, out / name, data))
            bad = sum(isinstance(corpus.content[record], bytes) for record in records)
            truth.files[name] = {"lines": len(records), "records": len(records) - bad, "bad": bad}
        for done in writes:
            done.result()


def main(argv: list[str] | None = None) -> int:
    """``python -m hhdata.synth --pairs N --seed S --out DIR [--bad-rate R]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hhdata.synth",
        description="Write a seeded synthetic HH-RLHF corpus with planted cases and planted.json.",
    )
    parser.add_argument("--pairs", type=int, default=170_000, help="valid records (default 170000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--bad-rate", type=float, default=0.0, help="bad lines per pair, added on top (default 0)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        truth = write_corpus(args.out, args.pairs, seed=args.seed, bad_rate=args.bad_rate)
    except (SynthError, OSError) as error:
        print(f"python -m hhdata.synth: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    planted = {name: len(value) for name, value in asdict(truth).items() if isinstance(value, list)}
    print(
        f"wrote {args.pairs} pairs to {args.out} in {seconds:.1f} s; planted: {json.dumps(planted)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
