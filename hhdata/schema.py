"""The canonical pair row: Arrow schema, subsets and their families, the stable pair id.

The JSON Schemas in ``schemas/`` are the source of truth for validation; this Arrow schema
is their in-memory form and a test checks that the two agree.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
TURNS = pa.list_(TURN)

PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("subset", pa.string()),
        ("family", pa.string()),
        ("split", pa.string()),
        ("prompt", TURNS),
        ("chosen", TURNS),
        ("rejected", TURNS),
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("flags", pa.list_(pa.string())),
    ]
)

HELPFUL, HARMLESS = "helpful", "harmless"
ALL = "all"  # the config of every preference subset
# What became of a row that was not kept: it left at reading or parsing (quarantined), it
# duplicates a kept row (removed), or it is too degenerate to learn from (filtered).
QUARANTINED, REMOVED, FILTERED = "quarantined", "removed", "filtered"
FATES = (QUARANTINED, REMOVED, FILTERED)
# the subsets of Anthropic/hh-rlhf (Bai et al. 2022)
UPSTREAM_SUBSET_FAMILIES = {
    "harmless-base": HARMLESS,
    "helpful-base": HELPFUL,
    "helpful-online": HELPFUL,
    "helpful-rejection-sampled": HELPFUL,
}
SUBSET_FAMILIES = {
    **UPSTREAM_SUBSET_FAMILIES,
    # hhdata's own collection subset: red-team comparisons from `hhdata feedback` and the
    # online loop, named like upstream's helpful-online (upstream has no online red-team set)
    "harmless-online": HARMLESS,
}
SPLITS = ("train", "test")
RED_TEAM_SUBSET = "red-team-attempts"
# Synthetic subsets (hhdata.synth) carry this prefix on every row, so they can never be
# mistaken for real data; a release takes them only when asked for by name.
SYNTHETIC_PREFIX = "synth-"


def family_of(subset: str, declared: str | None = None) -> str:
    """The helpful/harmless family of a subset; new batches name or declare theirs.

    A new subset whose name starts with ``helpful-`` or ``harmless-`` (``helpful-best-of-4``
    from best-of-N, a team's ``harmless-redteam-2027``) takes that family from its name;
    any other new name must declare one. A family declared for a known subset must be that
    subset's own: ``harmless-base`` labelled helpful would put its rows in the wrong config, so
    the contradiction raises ValueError.

    >>> family_of("harmless-base"), family_of("synth-helpful-online")
    ('harmless', 'helpful')
    >>> family_of("batch-7", "helpful"), family_of("helpful-best-of-4")
    ('helpful', 'helpful')
    """
    if declared is not None and declared not in (HELPFUL, HARMLESS):
        raise ValueError(f"family must be 'helpful' or 'harmless', not {declared!r}")
    name = subset.removeprefix(SYNTHETIC_PREFIX)
    known = SUBSET_FAMILIES.get(name) or _family_in_name(name)
    if known is None and declared is None:
        raise ValueError(
            f"subset {subset!r} is not one of {sorted(SUBSET_FAMILIES)}; declare its family "
            "('helpful' or 'harmless') for a new batch, or name it helpful-* or harmless-*"
        )
    if known is not None and declared is not None and declared != known:
        raise ValueError(
            f"subset {subset!r} is {known}, not {declared}; drop the declared family, or name "
            "the batch as a new subset if it really is a different one"
        )
    return known or declared


def _family_in_name(subset: str) -> str | None:
    """The family a new subset's name starts with (``helpful-...``, ``harmless-...``), if any."""
    for family in (HELPFUL, HARMLESS):
        if subset.startswith(f"{family}-"):
            return family
    return None


def is_synthetic(subset: str) -> bool:
    """True for subsets made by hhdata.synth."""
    return subset.startswith(SYNTHETIC_PREFIX)


def pair_id(chosen_text: str, rejected_text: str) -> str:
    """Stable content hash of a pair's original texts: 20 hex digits of sha256.

    >>> pair_id("a", "b") != pair_id("b", "a")
    True
    """
    digest = hashlib.sha256()
    digest.update(chosen_text.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(rejected_text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:20]


# -- the other tables the stages hand on ------------------------------------------------
# a raw record as read (hhdata.io.read), before it is parsed into a pair
RAW_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("subset", pa.string()),
        ("split", pa.string()),
        ("family", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
    ]
)

# a record that left at reading or parsing, with where it was and why (hhdata.quarantine)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("raw", pa.binary()),
    ]
)

# a pair the dedup stage dropped, with its fate and reason (hhdata.dedup.run)
DROPS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("fate", pa.string()),  # removed (a duplicate of kept_id) or filtered (degenerate)
        ("reason", pa.string()),
        ("kept_id", pa.string()),
        ("subset", pa.string()),
        ("split", pa.string()),
        ("similarity", pa.float64()),
    ]
)

# a red-team attempt (hhdata.io.redteam), never mixed into preference configs
REDTEAM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("subset", pa.string()),
        ("transcript", TURNS),
        ("transcript_text", pa.string()),
        ("min_harmlessness_score_transcript", pa.float64()),
        ("num_params", pa.string()),
        ("model_type", pa.string()),
        ("rating", pa.float64()),
        ("task_description", pa.string()),
        ("task_description_harmlessness_score", pa.float64()),
        ("red_team_member_id", pa.string()),
        ("is_upworker", pa.bool_()),
        ("tags", pa.list_(pa.string())),
    ]
)
