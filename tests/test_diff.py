"""Diffs between releases, the semantic-versioning rules for data, and the CHANGELOG."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hhdata.errors import VersionError
from hhdata.io.read import bundled_sample_path, read_raw
from hhdata.pairs import build_pairs
from hhdata.release import ParquetSettings, diff, write_release


def build(table: pa.Table, out, version: str, **options):
    accounting = {
        "read": table.num_rows,
        "kept": table.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }
    return write_release(
        table, out, version, sources=[], accounting=accounting, settings={}, **options
    )


@pytest.fixture(scope="module")
def pairs() -> pa.Table:
    table, _ = build_pairs(read_raw(bundled_sample_path()).table)
    return table.slice(0, 800)


@pytest.fixture(scope="module")
def v1(pairs, tmp_path_factory):
    return build(pairs.slice(0, 700), tmp_path_factory.mktemp("releases"), "1.0.0")


@pytest.mark.parametrize(
    "previous, change, expected",
    [
        ("1.0.0", "patch", "1.0.1"),
        ("1.0.7", "minor", "1.1.0"),
        ("1.9.3", "major", "2.0.0"),
        ("0.1.0", "minor", "0.2.0"),
    ],
)
def test_next_version(previous, change, expected):
    assert diff.next_version(previous, change) == expected


def test_appending_rows_is_minor_and_lists_the_added_ids(v1, pairs):
    v2 = build(pairs, v1.path.parent, "1.1.0", previous=v1.path)
    added = set(pairs.slice(700)["id"].to_pylist())
    assert v2.diff.change == "minor"
    assert set(v2.diff.configs["all"].added) == added
    assert v2.diff.configs["harmless-base"].removed == []
    assert v2.manifest["previous"] == {
        "version": "1.0.0",
        "change": "minor",
        "version_check": "enforced",
    }
    changelog = (v2.path / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog\n\n## 1.1.0\n")
    assert "A minor change from 1.0.0: 100 rows added, 0 removed, 0 edited" in changelog
    assert all(pair_id in changelog for pair_id in added)
    assert "## 1.0.0\n\nFirst release: 700 pairs" in changelog
    assert v2.diff.changed_files  # the harmless-base file itself grew


@pytest.mark.parametrize(
    "version, expected_words",
    [
        (
            "1.0.1",
            "the change from 1.0.0 is minor (100 rows added, 0 removed, 0 edited), so the "
            "new version must be 1.1.0, not 1.0.1; use --version 1.1.0, or pass "
            "--allow-version-mismatch",
        ),
        ("2.0.0", "so the new version must be 1.1.0, not 2.0.0"),
        (
            "0.9.0",
            "version 0.9.0 is not greater than the previous release 1.0.0; the next version is "
            "1.1.0",
        ),
    ],
)
def test_a_contradicting_version_is_refused(v1, pairs, tmp_path, version, expected_words):
    with pytest.raises(VersionError) as refused:
        build(pairs, tmp_path, version, previous=v1.path)
    assert expected_words in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_a_mismatch_can_be_allowed_explicitly_and_is_recorded(v1, pairs, tmp_path):
    built = build(pairs, tmp_path, "2.0.0", previous=v1.path, allow_version_mismatch=True)
    assert built.manifest["previous"]["version_check"] == "overridden"
    with pytest.raises(VersionError, match="not greater"):
        build(pairs, tmp_path, "1.0.0", previous=v1.path, allow_version_mismatch=True)


def test_removing_rows_is_major(v1, pairs, tmp_path):
    built = build(pairs.slice(5, 695), tmp_path, "2.0.0", previous=v1.path)
    assert built.diff.change == "major"
    assert built.diff.configs["all"].removed == sorted(pairs.slice(0, 5)["id"].to_pylist())


def test_editing_a_row_is_major_and_names_it(v1, pairs, tmp_path):
    rows = pairs.slice(0, 700)
    edited_id = rows["id"][3].as_py()
    flags = rows["flags"].to_pylist()
    flags[3] = sorted(set(flags[3]) | {"tag_in_prompt"}) if "tag_in_prompt" not in flags[3] else []
    edited = rows.set_column(
        rows.schema.get_field_index("flags"), "flags", pa.array(flags, pa.list_(pa.string()))
    )
    with pytest.raises(VersionError, match="is major"):
        build(edited, tmp_path, "1.1.0", previous=v1.path)
    built = build(edited, tmp_path, "2.0.0", previous=v1.path)
    assert built.diff.configs["all"].edited == [edited_id]
    assert built.diff.configs["all"].added == built.diff.configs["all"].removed == []


def test_moving_a_row_to_another_split_is_an_edit(v1, pairs, tmp_path):
    rows = pairs.slice(0, 700)
    split = pc.if_else(pc.equal(rows["id"], rows["id"][0]), "train", rows["split"])
    moved = rows.set_column(rows.schema.get_field_index("split"), "split", split)
    change = build(moved, tmp_path, "2.0.0", previous=v1.path).diff
    assert change.configs["all"].edited == [rows["id"][0].as_py()]


def test_same_rows_in_new_bytes_is_a_patch(v1, pairs, tmp_path):
    built = build(
        pairs.slice(0, 700),
        tmp_path,
        "1.0.1",
        previous=v1.path,
        parquet=ParquetSettings(compression="snappy", compression_level=None),
    )
    assert built.diff.change == "patch"
    assert "data/harmless-base/test-00000-of-00001.parquet" in built.diff.changed_files
    assert all(not (c.added or c.removed or c.edited) for c in built.diff.configs.values())


def test_diff_of_a_release_with_itself_is_empty(v1):
    change = diff.diff_releases(v1.path, v1.path)
    assert change.change == "patch" and change.changed_files == []
    assert "1.0.0 -> 1.0.0: patch change (0 files with different bytes)" in change.summary()


def test_cli_diff_prints_counts_and_ids(v1, pairs, tmp_path, capsys):
    from hhdata.cli import main

    newer = build(pairs, tmp_path, "1.1.0", previous=v1.path)
    assert main(["diff", str(v1.path), str(newer.path), "--ids"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1.0.0 -> 1.1.0: minor change")
    assert "  all            +100 added  -0 removed  ~0 edited" in out
    assert out.count("added\t") == 100


def test_edited_ids_look_inside_the_turns(pairs):
    rows = pairs.slice(0, 50).select(
        ["id", "subset", "family", "split", "prompt", "chosen", "rejected", "flags"]
    )
    prompts = rows["prompt"].to_pylist()
    ids = rows["id"].to_pylist()
    prompts[4][0]["content"] += "!"  # one character in a turn
    prompts[9][-1]["role"] = "assistant"  # a role
    prompts[17].append({"role": "user", "content": "x"})  # one more turn
    changed = rows.set_column(
        rows.schema.get_field_index("prompt"),
        "prompt",
        pa.array(prompts, rows.schema.field("prompt").type),
    )
    shuffled = changed.take(pa.array(list(range(49, -1, -1))))  # order does not matter
    assert diff.edited_ids(rows, shuffled) == {ids[4], ids[9], ids[17]}
    assert diff.edited_ids(rows, rows.take(pa.array(list(range(49, -1, -1))))) == set()


MUTATIONS = ("content", "role", "extra_turn", "flags", "split", "subset")


def mutate(row: dict, kind: str) -> dict:
    row = {**row, "prompt": [dict(turn) for turn in row["prompt"]], "flags": list(row["flags"])}
    if kind == "content":
        row["prompt"][-1]["content"] += "."
    elif kind == "role":
        row["prompt"][0]["role"] = "assistant"
    elif kind == "extra_turn":
        row["chosen"] = row["chosen"] + [{"role": "user", "content": ""}]
    elif kind == "flags":
        row["flags"] = row["flags"] + ["tag_in_prompt"]
    elif kind == "split":
        row["split"] = "train"
    else:
        row["subset"] = "helpful-base"
    return row


@settings(max_examples=25, deadline=None)
@given(
    edits=st.dictionaries(st.integers(0, 29), st.sampled_from(MUTATIONS), max_size=8),
    order=st.permutations(list(range(30))),
)
def test_edited_ids_are_exactly_the_rows_changed(pairs, edits, order):
    rows = pairs.slice(0, 30).select(["id", *diff._CONTENT_COLUMNS])
    listed = rows.to_pylist()
    changed = [mutate(row, edits[i]) if i in edits else row for i, row in enumerate(listed)]
    after = pa.Table.from_pylist([changed[i] for i in order], schema=rows.schema)
    assert diff.edited_ids(rows, after) == {listed[i]["id"] for i in edits}
