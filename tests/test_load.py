"""hhdata.load: the bundled sample offline and cached, config and split selection, dispatch."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

import hhdata
from hhdata import pipeline
from hhdata._arrow import ARROW_POOL
from hhdata.errors import LoadError, SourceError
from hhdata.load import cache_dir
from hhdata.schema import PAIR_SCHEMA


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HHDATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_load_returns_the_bundled_sample_as_canonical_pair_rows(fresh_cache, sample_records):
    ds = hhdata.load()
    assert isinstance(ds, datasets.DatasetDict) and list(ds) == ["test"]
    test = ds["test"]
    assert test.num_rows == 2312
    assert test.data.table.schema.remove_metadata() == PAIR_SCHEMA
    assert test.features["prompt"] == datasets.List(
        {"role": datasets.Value("string"), "content": datasets.Value("string")}
    )
    first = test[0]
    assert (first["chosen_text"], first["rejected_text"]) == (
        sample_records[0]["chosen"],
        sample_records[0]["rejected"],
    )
    assert (first["subset"], first["family"], first["split"]) == (
        "harmless-base",
        "harmless",
        "test",
    )


def test_the_second_load_maps_the_cache_and_builds_nothing(fresh_cache):
    """The cached load allocates no Arrow memory: its table lies in the memory-mapped file.

    A rebuild (read, parse, split) or a plain read of the file would allocate about the
    table's size in one of the two pools; counting bytes, not seconds, holds on a busy machine.
    """
    first = hhdata.load()["test"].data.table
    [cached] = list(fresh_cache.glob("sample-*/test.arrow"))
    assert cached.parent.name.startswith(f"sample-{hhdata.__version__}-")
    stamp = cached.stat().st_mtime_ns
    pools = (pa.default_memory_pool(), ARROW_POOL)
    before = [pool.bytes_allocated() for pool in pools]
    ds = hhdata.load()
    grown = [pool.bytes_allocated() - held for pool, held in zip(pools, before)]
    table = ds["test"].data.table
    assert table.num_rows == 2312 and table.equals(first)
    assert max(grown) < table.nbytes // 100, (
        f"{grown} bytes allocated for a {table.nbytes} byte table"
    )
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten


def test_the_cache_location_follows_the_environment(fresh_cache, monkeypatch):
    assert cache_dir() == fresh_cache
    monkeypatch.delenv("HHDATA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "hhdata"


def test_config_and_split_select_rows(fresh_cache):
    assert hhdata.load(config="harmless", split="test").num_rows == 2312
    assert hhdata.load(config="harmless-base")["test"].num_rows == 2312
    assert isinstance(hhdata.load(split="test"), datasets.Dataset)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"config": "helpful"},
            "config 'helpful' selects no rows of the bundled sample, which holds the subsets "
            "['harmless-base']; pass 'all', 'helpful', 'harmless' or one of those subsets",
        ),
        ({"split": "train"}, "the bundled sample has no split 'train'; it has ['test']"),
        (
            {"version": "1.0.0"},
            "version='1.0.0' names a release, but no source was given; the bundled sample "
            "has no versions (pass a release folder or a Hub repo id)",
        ),
    ],
)
def test_requests_the_sample_cannot_meet_are_refused(fresh_cache, kwargs, message):
    with pytest.raises(LoadError) as raised:
        hhdata.load(**kwargs)
    assert str(raised.value) == message


def test_raw_files_load_by_split(tmp_path, fresh_cache):
    folder = tmp_path / "helpful-base"
    folder.mkdir()
    for split in ("train", "test"):
        lines = [
            json.dumps(
                {
                    "chosen": f"\n\nHuman: {split} {n}\n\nAssistant: a",
                    "rejected": f"\n\nHuman: {split} {n}\n\nAssistant: b",
                }
            )
            for n in range(3)
        ]
        (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    ds = hhdata.load(tmp_path)
    assert sorted(ds) == ["test", "train"] and ds["train"].num_rows == 3
    assert ds["train"][0]["prompt"] == [{"role": "user", "content": "train 0"}]
    assert hhdata.load(tmp_path, "helpful", split="test").num_rows == 3


def test_an_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError) as raised:
        hhdata.load(str(tmp_path / "no" / "such" / "place"))
    assert str(raised.value).endswith(
        "is neither a local path nor a Hub repo id ('org/name'); check the spelling"
    )


def test_a_local_release_folder_goes_to_the_release_loader(tmp_path, fresh_cache, sample_path):
    pipeline.build_release([sample_path], version="1.0.0", out=tmp_path / "releases")
    by_path = hhdata.load(tmp_path / "releases" / "1.0.0", "harmless", split="test")
    by_version = hhdata.load(tmp_path / "releases", split="test", version="1.0.0")
    sample_ids = set(hhdata.load(split="test")["id"])
    assert set(by_path["id"]) == set(by_version["id"]) and set(by_path["id"]) <= sample_ids
    assert by_path.num_rows > 2000


def test_a_missing_version_names_the_versions_there(tmp_path, fresh_cache):
    from hhdata.hub.localserver.releases import build_release

    for version in ("1.0.0", "1.1.0"):
        build_release(tmp_path / "releases", version, count=8)
    with pytest.raises(LoadError) as raised:
        hhdata.load(tmp_path / "releases", version="3.0.0")
    releases = tmp_path / "releases"
    assert str(raised.value) == (
        f"{releases} has no release 3.0.0 (no {releases / '3.0.0'}/manifest.json); "
        "versions there: 1.0.0, 1.1.0"
    )
    with pytest.raises(LoadError) as raised:  # a version folder and another version: never load it
        hhdata.load(tmp_path / "releases" / "1.0.0", version="1.1.0")
    assert str(raised.value) == (
        f"{releases / '1.0.0'} holds release 1.0.0, not 1.1.0; pass the folder that "
        "holds the version folders, or drop version="
    )
    assert hhdata.load(tmp_path / "releases" / "1.0.0", version="1.0.0")["test"].num_rows > 0
    with pytest.raises(LoadError) as raised:  # no version: not "holds no *.jsonl file"
        hhdata.load(tmp_path / "releases", "harmless")
    assert str(raised.value) == (
        f"{tmp_path / 'releases'} is a folder of releases, not one release; pass version=, one of "
        "1.0.0, 1.1.0 (or the folder of one version)"
    )
