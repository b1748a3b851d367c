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
SUBSET_FAMILIES = {
    "harmless-base": HARMLESS,
    "helpful-base": HELPFUL,
    "helpful-online": HELPFUL,
    "helpful-rejection-sampled": HELPFUL,
}
SPLITS = ("train", "test")
RED_TEAM_SUBSET = "red-team-attempts"
# Synthetic subsets (hhdata.synth) carry this prefix on every row, so they can never be
# mistaken for real data; a release takes them only when asked for by name.
SYNTHETIC_PREFIX = "synth-"


def family_of(subset: str, declared: str | None = None) -> str:
    """The helpful/harmless family of a subset; new batches must declare theirs.

    A family declared for a known subset must be that subset's own: ``harmless-base``
    labelled helpful would put its rows in the wrong config, so the contradiction raises
    ValueError.

    >>> family_of("harmless-base"), family_of("synth-helpful-online"), family_of("batch-7", "helpful")
    ('harmless', 'helpful', 'helpful')
    """
    if declared is not None and declared not in (HELPFUL, HARMLESS):
        raise ValueError(f"family must be 'helpful' or 'harmless', not {declared!r}")
    known = SUBSET_FAMILIES.get(subset.removeprefix(SYNTHETIC_PREFIX))
    if known is None and declared is None:
        raise ValueError(
            f"subset {subset!r} is not one of {sorted(SUBSET_FAMILIES)}; declare its family "
            "('helpful' or 'harmless') for a new batch"
        )
    if known is not None and declared is not None and declared != known:
        raise ValueError(
            f"subset {subset!r} is {known}, not {declared}; drop the declared family, or name "
            "the batch as a new subset if it really is a different one"
        )
    return known or declared


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
