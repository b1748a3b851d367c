"""Loading a local release: datasets objects, configs, and refusing tampered files."""

from __future__ import annotations

import json
import shutil

import datasets
import pyarrow as pa
import pytest

from hhdata.errors import IntegrityError, ReleaseError
from hhdata.io.read import bundled_sample_path, read_raw
from hhdata.pairs import build_pairs
from hhdata.release import data_file, write_release
from hhdata.release.load import load_release, verify_files

HARMLESS_FILE = data_file("harmless-base", "test")


@pytest.fixture(scope="module")
def pairs() -> pa.Table:
    table, _ = build_pairs(read_raw(bundled_sample_path()).table)
    helpful = table.slice(0, 300)
    helpful = helpful.set_column(1, "subset", pa.array(["helpful-online"] * 300))
    helpful = helpful.set_column(2, "family", pa.array(["helpful"] * 300))
    return pa.concat_tables([helpful, table.slice(300)])


@pytest.fixture(scope="module")
def built(pairs, tmp_path_factory):
    accounting = {
        "read": pairs.num_rows,
        "kept": pairs.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }
    return write_release(
        pairs,
        tmp_path_factory.mktemp("out"),
        "1.0.0",
        sources=[],
        accounting=accounting,
        settings={},
    ).path


@pytest.fixture
def copy_of(built, tmp_path):
    target = tmp_path / "1.0.0"
    shutil.copytree(built, target)
    return target


def test_default_config_holds_every_row(built, pairs):
    loaded = load_release(built)
    assert isinstance(loaded, datasets.DatasetDict)
    assert list(loaded) == ["test"]
    assert loaded["test"].num_rows == pairs.num_rows
    assert sorted(loaded["test"]["id"]) == sorted(pairs["id"].to_pylist())


@pytest.mark.parametrize(
    "config, subsets, rows",
    [
        ("helpful", {"helpful-online"}, 300),
        ("harmless", {"harmless-base"}, 2012),
        ("helpful-online", {"helpful-online"}, 300),
        ("all", {"helpful-online", "harmless-base"}, 2312),
    ],
)
def test_a_config_is_a_view_over_its_subsets(built, config, subsets, rows):
    split = load_release(built, config, split="test")
    assert isinstance(split, datasets.Dataset)
    assert split.num_rows == rows
    assert set(split["subset"]) == subsets


def test_rows_are_typed_turns(built):
    row = load_release(built, "harmless", split="test")[0]
    assert row["prompt"][0]["role"] == "user"
    assert row["chosen"] == [{"role": "assistant", "content": row["chosen"][0]["content"]}]
    assert row["chosen_text"].endswith(row["chosen"][0]["content"])
    assert isinstance(row["flags"], list)


def test_plain_datasets_load_dataset_reads_the_card_configs(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    helpful = datasets.load_dataset(
        str(built), "helpful", split="test", cache_dir=str(tmp_path / "cache")
    )
    assert helpful.num_rows == 300
    assert set(helpful["family"]) == {"helpful"}
    default = datasets.load_dataset(str(built), cache_dir=str(tmp_path / "cache"))
    assert default["test"].num_rows == 2312
    assert default["test"].features == load_release(built)["test"].features


def test_a_tampered_file_is_refused(copy_of):
    path = copy_of / HARMLESS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=rf"{HARMLESS_FILE}: sha256 [0-9a-f]{{64}} does not match"
    ):
        load_release(copy_of, "harmless")
    # a config that does not read the file still loads
    assert load_release(copy_of, "helpful", split="test").num_rows == 300
    with pytest.raises(IntegrityError, match="modified after the release was built"):
        verify_files(copy_of)


def test_a_truncated_file_is_refused(copy_of):
    path = copy_of / HARMLESS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=r"bytes, manifest.json says \d+ \(truncated\)"):
        load_release(copy_of)


def test_a_missing_file_is_refused(copy_of):
    (copy_of / HARMLESS_FILE).unlink()
    with pytest.raises(IntegrityError, match="missing, but manifest.json lists it"):
        load_release(copy_of, "all", split="test")


def test_a_file_the_manifest_does_not_list_is_refused(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    del manifest["files"][HARMLESS_FILE]
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="not listed in manifest.json"):
        load_release(copy_of, "harmless")


def test_unknown_config_and_split_name_the_choices(built):
    with pytest.raises(
        ReleaseError, match="has no config 'helpful-base'; choose one of all, helpful"
    ):
        load_release(built, "helpful-base")
    with pytest.raises(ReleaseError, match="has no split 'train'; choose one of test"):
        load_release(built, "harmless", split="train")


def test_hhdata_load_dispatches_a_local_release(built):
    import hhdata

    assert hhdata.load(str(built), "helpful", split="test").num_rows == 300
    assert (
        hhdata.load(str(built.parent), "harmless", split="test", version="1.0.0").num_rows == 2012
    )


def edit_manifest(release, edit) -> None:
    manifest = json.loads((release / "manifest.json").read_text())
    edit(manifest)
    (release / "manifest.json").write_text(json.dumps(manifest, indent=2))  # no checksum covers it


def test_an_edited_file_row_count_is_refused(copy_of):
    edit_manifest(copy_of, lambda m: m["files"][HARMLESS_FILE].update(rows=9999))
    with pytest.raises(IntegrityError) as caught:
        load_release(copy_of, "harmless", split="test")
    assert str(caught.value).startswith(
        f"{copy_of / HARMLESS_FILE} (config 'harmless', split 'test'): manifest.json records 9999 "
        "rows, "
        "the file's Parquet metadata holds 2012;"
    )
    with pytest.raises(
        IntegrityError, match="records 9999 rows, the file's Parquet metadata holds 2012"
    ):
        verify_files(copy_of)


def test_an_edited_split_row_count_is_refused(copy_of):
    edit_manifest(copy_of, lambda m: m["configs"]["all"]["splits"]["test"].update(rows=9999))
    with pytest.raises(IntegrityError) as caught:
        load_release(copy_of)
    assert str(caught.value).startswith(
        f"{copy_of / 'manifest.json'}: config 'all' split 'test' records 9999 rows, its Parquet "
        "files "
        f"({HARMLESS_FILE}, {HARMLESS_FILE.replace('harmless-base', 'helpful-online')}) hold 2312;"
    )
    assert (
        load_release(copy_of, "harmless", split="test").num_rows == 2012
    )  # other configs still load
    with pytest.raises(IntegrityError, match="config 'all' split 'test' records 9999 rows"):
        verify_files(copy_of)
