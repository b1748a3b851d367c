"""Configs (all / helpful / harmless / one per subset), train-test leakage, group-aware re-split.

A config is a view over pair rows: ``all`` holds every row, ``helpful`` and ``harmless``
the rows of that family (``family`` column, set from the subset by hhdata.schema.family_of),
and each subset is a config of its own. Red-team attempts are not pairs: they have their
own schema and config in hhdata.io.redteam and are refused here.

Leakage is a test prompt that also appears in train, exactly (after normalisation) or
nearly (in the same near-duplicate cluster of prompts, hhdata.dedup.minhash). ``resplit`` fixes it:
whole clusters go to one side, chosen with a seed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata.dedup import degenerate, minhash
from hhdata.dedup import run as dedup
from hhdata.errors import HhDataError
from hhdata.schema import ALL, HARMLESS, HELPFUL, RED_TEAM_SUBSET, family_of


class ConfigError(HhDataError, ValueError):
    """A config name that does not exist, or a table that cannot be split into configs."""


def config_names(subsets) -> list[str]:
    """The config names of a set of subsets: all, the families present, then each subset.

    >>> config_names(["helpful-base", "harmless-base"])
    ['all', 'helpful', 'harmless', 'harmless-base', 'helpful-base']
    """
    subsets = sorted(set(subsets))
    if RED_TEAM_SUBSET in subsets:
        raise ConfigError(
            f"{RED_TEAM_SUBSET!r} holds red-team transcripts, not preference pairs; load them "
            "with hhdata.io.redteam.read_redteam, which gives them their own config"
        )
    families = {_known_family(subset) for subset in subsets}
    return [ALL] + [f for f in (HELPFUL, HARMLESS) if f in families] + subsets


def _known_family(subset: str) -> str | None:
    """The family of a known subset, or None for a new batch (it carries its own)."""
    try:
        return family_of(subset)
    except ValueError:
        return None


def select_config(table: pa.Table, name: str) -> pa.Table:
    """The rows of one config (a view: no row is copied or changed).

    Raises ConfigError naming the configs that exist when ``name`` is not one of them.
    """
    subsets = table["subset"].unique().to_pylist()
    if RED_TEAM_SUBSET in subsets:
        config_names(subsets)  # raises with the fix
    if name == ALL:
        return table
    if name in (HELPFUL, HARMLESS):
        return table.filter(pc.equal(table["family"], name))
    if name in subsets:
        return table.filter(pc.equal(table["subset"], name))
    raise ConfigError(f"no config {name!r} in this table; its configs are {config_names(subsets)}")


def prompt_clusters(
    table: pa.Table,
    settings: dedup.DedupSettings = dedup.DedupSettings(),
    sketch: dedup.RowSketch | None = None,
):
    """Near-duplicate clusters of prompts: per row, the index of its cluster's first row.

    Prompts equal after normalisation are in one cluster; prompts whose word-shingle Jaccard
    reaches ``settings.threshold`` are joined, transitively (connected components).
    ``sketch`` is the rows' prompt sketch made with the same settings (DedupResult's
    prompt_sketch); without it the prompts are shingled and signed here.
    """
    # prompts shared by several comparisons are joined and normalised once: the distinct
    # prompts are found by hashing them a batch of rows at a time (near_text_identity), so
    # the joined prompt of every row is never held at once (bench/scale.md, 10x HH size)
    # the distinct texts in order of first appearance, as a dictionary encoding numbers them
    text_of_row, first_of_text = dedup.by_first_appearance(
        dedup.near_text_identity(table, "prompt")
    )
    firsts = table.select(["prompt"]).take(pa.array(first_of_text))
    texts = dedup.near_texts(firsts, "prompt")
    unique_of_text, forms = degenerate.normalized_forms(
        texts,
        nfc=settings.unicode_nfc,
        lowercase=settings.lowercase,
        whitespace=settings.collapse_whitespace,
    )
    unique_of_row = unique_of_text.astype(np.int64)[text_of_row]
    first_row = np.full(len(forms), table.num_rows, dtype=np.int64)
    np.minimum.at(first_row, unique_of_row, np.arange(table.num_rows))
    first_texts = texts.take(pa.array(text_of_row[first_row]))
    pairs, _ = minhash.similar_in_sketch(
        _unique_prompt_sketch(forms, first_texts, first_row, table.num_rows, settings, sketch),
        bands=settings.bands,
        rows=settings.rows,
        threshold=settings.threshold,
        verify=settings.verify,
    )
    unique_cluster = minhash.connected_components(len(forms), pairs)
    # the first row of each cluster names it
    cluster_of_row = unique_cluster[unique_of_row]
    first_row = np.full(len(forms), table.num_rows, dtype=np.int64)
    np.minimum.at(first_row, cluster_of_row, np.arange(table.num_rows))
    return first_row[cluster_of_row], unique_of_row


def _unique_prompt_sketch(
    unique_texts: pa.Array,
    first_texts: pa.Array,
    first_row: np.ndarray,
    rows: int,
    settings: dedup.DedupSettings,
    sketch: dedup.RowSketch | None,
):
    """The sketch of each normalised prompt, taken from its first row's when one is given.

    ``first_texts`` holds the prompt of each one's first row (``first_row``) as it is;
    ``rows``: the number of rows in the table.
    Shingling lower-cases and splits on whitespace, so normalising changes a prompt's
    shingles only through NFC: prompts NFC could change are shingled again, normalised.
    """

    def made_here(chosen: pa.Array) -> minhash.Sketch:
        shingles = minhash.word_shingles(chosen, settings.shingle_size)
        return minhash.Sketch(shingles, dedup.signatures_of(shingles, settings))

    if sketch is None:
        return made_here(unique_texts)
    if len(sketch) != rows:
        raise ConfigError(
            f"the prompt sketch covers {len(sketch)} rows but the table has "
            f"{rows}; pass the prompt_sketch of the DedupResult these rows came from"
        )
    unique = sketch.take(first_row)
    if not settings.unicode_nfc:
        return unique
    redo = np.flatnonzero(degenerate.nfc_may_change(first_texts))
    if not len(redo):
        return unique
    again = made_here(unique_texts.take(pa.array(redo)))
    # the redone prompts go last, then every prompt is put back in its place
    place = np.arange(len(first_row))
    place[redo] = len(first_row) + np.arange(len(redo))
    kept = unique.shingles_of(np.arange(len(unique)))
    merged = minhash.Sketch(
        minhash.Shingles(
            np.concatenate([kept.hashes, again.shingles.hashes]),
            np.concatenate([kept.offsets, kept.offsets[-1] + again.shingles.offsets[1:]]),
        ),
        np.concatenate([unique.signatures, again.signatures]),
    )
    return merged.take(place)


def _leaks(table: pa.Table, groups: np.ndarray) -> dict:
    """Test rows whose group also holds train rows, within a subset and across subsets."""
    split = degenerate.one_array(table["split"])
    is_train = pc.equal(split, "train").to_numpy(zero_copy_only=False)
    is_test = pc.equal(split, "test").to_numpy(zero_copy_only=False)
    encoded = degenerate.one_array(table["subset"]).dictionary_encode()
    names = encoded.dictionary.to_pylist()
    subset = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    # the distinct (group, subset) of train rows, sorted by group
    train = np.unique(groups[is_train] * len(names) + subset[is_train])
    train_group, train_subset = np.divmod(train, max(len(names), 1))
    test_rows = np.flatnonzero(is_test)
    first = np.searchsorted(train_group, groups[test_rows], side="left")
    last = np.searchsorted(train_group, groups[test_rows], side="right")
    leaking = last > first
    rows, first, last = test_rows[leaking], first[leaking], last[leaking]
    within = np.isin(groups[rows] * len(names) + subset[rows], train)
    # every (train subset, test subset) of a leaking row, the test row's own subset left out
    counts = last - first
    partner = train_subset[
        np.repeat(first, counts)
        + np.arange(counts.sum())
        - np.repeat(np.cumsum(counts) - counts, counts)
    ]
    mine = np.repeat(subset[rows], counts)
    other = partner != mine
    across = Counter(zip(partner[other].tolist(), mine[other].tolist()))
    return {
        "test_rows": len(rows),
        "groups_on_both_sides": len(np.unique(groups[rows])),
        "within_subset": dict(
            sorted(Counter(names[i] for i in subset[rows][within].tolist()).items())
        ),
        "across_subsets": dict(
            sorted((f"{names[a]} (train) -> {names[b]} (test)", n) for (a, b), n in across.items())
        ),
        "_rows": rows.tolist(),
    }


def leakage_report(
    table: pa.Table,
    settings: dedup.DedupSettings = dedup.DedupSettings(),
    examples: int = 3,
    sketch: dedup.RowSketch | None = None,
) -> dict:
    """Prompts in both train and test, exact and near, per subset and across subsets.

    ``exact`` counts test rows whose normalised prompt equals a train row's prompt; ``near``
    counts test rows in a near-duplicate cluster that also holds train rows (exact ones
    included). ``within_subset`` is keyed by subset, ``across_subsets`` by
    "train subset -> test subset" (one test row can leak from several subsets). ``sketch``:
    the rows' prompt sketch from deduplicate (see prompt_clusters), which saves a MinHash pass.
    """
    clusters, exact_groups = prompt_clusters(table, settings, sketch)
    exact, near = _leaks(table, exact_groups), _leaks(table, clusters)
    split = pc.value_counts(degenerate.one_array(table["split"])).to_pylist()
    split = {count["values"]: count["counts"] for count in split}
    is_train = pc.equal(degenerate.one_array(table["split"]), "train").to_numpy(
        zero_copy_only=False
    )
    side_by_side = []
    exact_rows = set(exact["_rows"])
    for row in [r for r in near["_rows"] if r not in exact_rows][:examples]:
        partner = int(np.flatnonzero((clusters == clusters[row]) & is_train)[0])
        shown = table.take([row, partner])
        ids, prompts = shown["id"].to_pylist(), dedup.near_texts(shown, "prompt").to_pylist()
        side_by_side.append(
            {
                "test": {"id": ids[0], "prompt": prompts[0][:300]},
                "train": {"id": ids[1], "prompt": prompts[1][:300]},
            }
        )
    for part in (exact, near):
        del part["_rows"]
    return {
        "settings": {
            key: settings.to_json()[key]
            for key in (
                "shingle_size",
                "sketch",
                "num_perm",
                "bands",
                "rows",
                "threshold",
                "verify",
                "seed",
            )
        },
        "rows": {"train": split.get("train", 0), "test": split.get("test", 0)},
        "exact": exact,
        "near": near,
        "near_examples": side_by_side,
    }


def resplit(
    table: pa.Table,
    *,
    seed: int,
    test_fraction: float,
    settings: dedup.DedupSettings = dedup.DedupSettings(),
) -> pa.Table:
    """Assign train/test again so that every prompt cluster lies on one side.

    Clusters are visited in a seeded random order; a cluster goes to test while the test
    rows of its largest subset are below ``test_fraction`` of that subset, else to train.
    The same seed and rows give the same split; split_sizes reports the resulting sizes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    clusters, _ = prompt_clusters(table, settings)
    subset = np.asarray(table["subset"].to_pylist(), dtype=object)
    target = {s: test_fraction * n for s, n in Counter(subset.tolist()).items()}
    test_rows = Counter()
    is_test = np.zeros(table.num_rows, dtype=bool)
    names, members = np.unique(clusters, return_inverse=True)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(names))
    rows_of = np.argsort(members, kind="stable")
    starts = np.searchsorted(members[rows_of], np.arange(len(names) + 1))
    for cluster in order.tolist():
        rows = rows_of[starts[cluster] : starts[cluster + 1]]
        counts = Counter(subset[rows].tolist())
        main = max(sorted(counts), key=counts.__getitem__)
        if test_rows[main] < target[main]:
            is_test[rows] = True
            test_rows.update(counts)
    split = pa.array(np.where(is_test, "test", "train").tolist(), pa.string())
    return table.set_column(table.schema.get_field_index("split"), "split", split)


def split_sizes(table: pa.Table) -> dict:
    """Rows per subset and split, and the test fraction of each subset.

    >>> sizes = split_sizes(
    ...     pa.table({"subset": ["a", "a", "b"], "split": ["train", "test", "train"]})
    ... )
    >>> sizes["a"], sizes["b"]["test_fraction"]
    ({'train': 1, 'test': 1, 'test_fraction': 0.5}, 0.0)
    """
    counts = Counter(zip(table["subset"].to_pylist(), table["split"].to_pylist()))
    sizes = {}
    for subset in sorted({s for s, _ in counts}):
        train, test = counts[(subset, "train")], counts[(subset, "test")]
        sizes[subset] = {
            "train": train,
            "test": test,
            "test_fraction": round(test / (train + test), 4),
        }
    return sizes
