"""hhdata.dedup.configs: config views, leakage (exact and near, within and across subsets),
resplit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dedup import POOL, edit_prompt_word, long_records, pair_table

from hhdata import dedup
from hhdata.dedup import configs
from hhdata.dedup.configs import ConfigError


@pytest.fixture(scope="module")
def leaky():
    base = long_records(6, seed=5)
    records = [
        (*base[0], "helpful-base", "train"),
        (*base[0][::-1], "helpful-base", "test"),  # exact prompt, same subset
        (*base[1], "harmless-base", "train"),
        (*edit_prompt_word(base[1], 4, "walrus"), "helpful-online", "test"),  # near, across subsets
        (*base[2], "helpful-base", "train"),
        (*base[3], "helpful-base", "test"),  # clean
        (*base[4], "harmless-base", "test"),  # clean
        (*base[5], "harmless-base", "train"),
    ]
    return pair_table(records)


def test_config_names_and_views(leaky):
    names = configs.config_names(leaky["subset"].to_pylist())
    assert names == [
        "all",
        "helpful",
        "harmless",
        "harmless-base",
        "helpful-base",
        "helpful-online",
    ]
    assert configs.select_config(leaky, "all").num_rows == 8
    assert configs.select_config(leaky, "helpful").num_rows == 5
    assert set(configs.select_config(leaky, "harmless")["subset"].to_pylist()) == {"harmless-base"}
    assert configs.select_config(leaky, "helpful-online").num_rows == 1


def test_unknown_config_names_the_ones_that_exist(leaky):
    with pytest.raises(
        ConfigError, match=r"no config 'helpful-base-v2' in this table; its configs are \['all'"
    ):
        configs.select_config(leaky, "helpful-base-v2")


def test_red_team_rows_never_form_a_pair_config(leaky):
    mixed = leaky.set_column(
        leaky.schema.get_field_index("subset"),
        "subset",
        pa.array(["red-team-attempts"] + leaky["subset"].to_pylist()[1:]),
    )
    with pytest.raises(ConfigError, match="hhdata.io.redteam.read_redteam"):
        configs.select_config(mixed, "all")


def test_leakage_report_counts_exact_and_near_within_and_across(leaky):
    report = configs.leakage_report(leaky)
    assert report["rows"] == {"train": 4, "test": 4}
    assert report["exact"]["test_rows"] == 1
    assert report["exact"]["within_subset"] == {"helpful-base": 1}
    assert report["exact"]["across_subsets"] == {}
    assert report["near"]["test_rows"] == 2
    assert report["near"]["across_subsets"] == {"harmless-base (train) -> helpful-online (test)": 1}
    assert [example["train"]["id"] for example in report["near_examples"]] == [
        leaky["id"][2].as_py()
    ]


def test_resplit_fixes_the_leak_and_is_seeded(leaky):
    fixed = configs.resplit(leaky, seed=3, test_fraction=0.3)
    report = configs.leakage_report(fixed)
    assert report["near"]["test_rows"] == 0 and report["exact"]["test_rows"] == 0
    assert (
        fixed["split"].to_pylist()
        == configs.resplit(leaky, seed=3, test_fraction=0.3)["split"].to_pylist()
    )
    assert fixed.drop_columns(["split"]).equals(leaky.drop_columns(["split"]))


def test_resplit_refuses_a_bad_fraction(leaky):
    with pytest.raises(ConfigError, match="test_fraction must be between 0 and 1, not 1.5"):
        configs.resplit(leaky, seed=0, test_fraction=1.5)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, len(POOL) - 1),
            st.booleans(),
            st.sampled_from(["helpful-base", "harmless-base"]),
        ),
        min_size=2,
        max_size=16,
    ),
    seed=st.integers(0, 2**32 - 1),
    fraction=st.floats(0.05, 0.95),
)
def test_resplit_never_puts_one_cluster_on_both_sides(rows, seed, fraction):
    records = [
        (*(edit_prompt_word(POOL[i], 2, "axolotl") if edited else POOL[i]), subset, "train")
        for i, edited, subset in rows
    ]
    table = configs.resplit(pair_table(records), seed=seed, test_fraction=fraction)
    clusters, _ = configs.prompt_clusters(table)
    sides: dict[int, set] = {}
    for cluster, split in zip(clusters.tolist(), table["split"].to_pylist()):
        sides.setdefault(cluster, set()).add(split)
    assert all(len(found) == 1 for found in sides.values())
    assert configs.leakage_report(table)["near"]["test_rows"] == 0


def test_resplit_sizes_follow_the_fraction_per_subset():
    records = [
        (*texts, subset, "train")
        for texts in long_records(40, min_words=5, seed=9)
        for subset in ["helpful-base"]
    ]
    table = configs.resplit(pair_table(records), seed=1, test_fraction=0.25)
    sizes = configs.split_sizes(table)
    assert sizes["helpful-base"]["test"] == 10 and sizes["helpful-base"]["train"] == 30


@pytest.mark.parametrize("scope", ["pair", "prompt"])
def test_leakage_from_the_dedup_sketch_equals_leakage_made_alone(leaky, scope):
    extra = pair_table(
        [
            (
                "\n\nHuman: Cafe\u0301 hours?\n\nAssistant: Noon.",
                "\n\nHuman: Cafe\u0301 hours?\n\nAssistant: Six.",
                "helpful-base",
                "test",
            ),
            (
                "\n\nHuman: Caf\u00e9 hours?\n\nAssistant: Nine.",
                "\n\nHuman: Caf\u00e9 hours?\n\nAssistant: Ten.",
                "helpful-base",
                "train",
            ),
            (
                "\n\nHuman: Hi\n\nAssistant: Hello there friend of mine",
                "\n\nHuman: Hi\n\nAssistant: Go",
                "harmless-base",
                "test",
            ),
        ]
    )
    settings = dedup.DedupSettings(near_scope=scope, near_action="cluster")
    result = dedup.deduplicate(pa.concat_tables([leaky, extra]), settings)
    assert len(result.prompt_sketch) == result.kept.num_rows
    shared = configs.leakage_report(result.kept, settings, sketch=result.prompt_sketch)
    alone = configs.leakage_report(result.kept, settings)
    assert shared == alone
    # leaky's exact leak is a swapped copy, dropped by dedup; the NFC twin (shingled again,
    # normalised, since its first row is the decomposed one) leaks
    assert shared["exact"]["test_rows"] == 1


def test_a_sketch_of_other_rows_is_refused(leaky):
    result = dedup.deduplicate(leaky)
    with pytest.raises(ConfigError, match="pass the prompt_sketch of the DedupResult"):
        configs.leakage_report(leaky.slice(0, 3), sketch=result.prompt_sketch)


def python_leaks(split: list[str], subset: list[str], groups: list[int]) -> dict:
    """The leak counts by their definition, one row at a time."""
    from collections import Counter

    train_subsets: dict[int, set] = {}
    for g, sp, su in zip(groups, split, subset):
        if sp == "train":
            train_subsets.setdefault(g, set()).add(su)
    within, across, rows = Counter(), Counter(), []
    for row, (g, sp, su) in enumerate(zip(groups, split, subset)):
        found = train_subsets.get(g) if sp == "test" else None
        if not found:
            continue
        rows.append(row)
        if su in found:
            within[su] += 1
        for other in sorted(found - {su}):
            across[f"{other} (train) -> {su} (test)"] += 1
    return {
        "test_rows": len(rows),
        "groups_on_both_sides": len({groups[r] for r in rows}),
        "within_subset": dict(sorted(within.items())),
        "across_subsets": dict(sorted(across.items())),
        "_rows": rows,
    }


@pytest.mark.parametrize("seed", range(5))
def test_leak_counts_match_their_definition(seed):
    from hhdata.dedup.configs import _leaks

    rng = np.random.default_rng(seed)
    n = 400
    split = rng.choice(["train", "test"], n, p=[0.7, 0.3]).tolist()
    subset = rng.choice(["helpful-base", "harmless-base", "helpful-online"], n).tolist()
    groups = rng.integers(0, 120, n).tolist()
    table = pa.table({"split": split, "subset": subset})
    expected = python_leaks(split, subset, groups)
    assert expected["test_rows"] > 0 and expected["across_subsets"]  # the case is exercised
    assert _leaks(table, np.array(groups)) == expected
