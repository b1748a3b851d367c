"""hhdata.scan: a lazy polars frame over a release, local or on the (local) Hub, pinned to a
version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hhdata
from hhdata import hub
from hhdata.errors import IntegrityError, LoadError
from hhdata.hub.localserver.releases import build_release

HELPFUL = [
    "data/helpful-fixture/train-00000-of-00001.parquet",
    "data/helpful-fixture/test-00000-of-00001.parquet",
]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    out = tmp_path_factory.mktemp("releases")
    first = build_release(out, "1.0.0", count=24)
    second = build_release(out, "1.1.0", count=24, previous=first, added=6)
    return out, first, second


def read_ids(folder, files) -> list[str]:
    """The ids of some data files, read with pyarrow (not through hhdata)."""
    return pa.concat_tables([pq.read_table(folder / f, columns=["id"]) for f in files])[
        "id"
    ].to_pylist()


def test_a_local_scan_is_lazy_and_yields_the_configs_rows(releases):
    out, first, _ = releases
    lazy = hhdata.scan(out, "helpful", version="1.0.0")
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.collect()["id"].to_list() == read_ids(first, HELPFUL)
    assert hhdata.scan(first).collect().height == 24  # the default config `all`, every split
    assert hhdata.scan(first, "helpful", split="test").collect()["split"].unique().to_list() == [
        "test"
    ]


def test_filters_and_column_choices_are_pushed_into_the_parquet_scan(releases):
    _, first, _ = releases
    query = hhdata.scan(first, "all").filter(pl.col("family") == "helpful").select("id")
    plan = query.explain()
    scan_part = plan[plan.index("Parquet SCAN") :]
    assert 'SELECTION: col("family") == "helpful"' in scan_part  # the filter runs inside the scan
    assert "PROJECT 2/10 COLUMNS" in scan_part  # only id and family are read
    assert sorted(query.collect()["id"].to_list()) == sorted(read_ids(first, HELPFUL))


def test_scan_refuses_a_wrong_version_split_or_file(releases, tmp_path):
    out, first, _ = releases
    with pytest.raises(LoadError, match="holds release 1.0.0, not 2.0.0"):
        hhdata.scan(first, version="2.0.0")
    with pytest.raises(LoadError, match="has no split 'validation'; choose one of train, test"):
        hhdata.scan(first, "helpful", split="validation")
    with pytest.raises(LoadError, match="is not a release"):
        hhdata.scan(tmp_path)
    with pytest.raises(LoadError, match="holds no version 3.0.0; it holds 1.0.0, 1.1.0"):
        hhdata.scan(out, version="3.0.0")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    target = copy / HELPFUL[0]
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="bytes, manifest.json says"):
        hhdata.scan(copy, "helpful")


def test_a_hub_scan_is_pinned_to_the_version_asked_for(local_hub, releases):
    _, first, second = releases
    repo_id = f"org/hh-{uuid.uuid4().hex[:8]}"
    hub.publish(first, repo_id, token=local_hub.token, retries=1, backoff=0.01)
    hub.publish(second, repo_id, token=local_hub.token, retries=1, backoff=0.01)
    pinned = hhdata.scan(repo_id, "harmless", version="1.0.0").collect()
    assert sorted(pinned["id"].to_list()) == sorted(
        read_ids(
            first,
            [
                "data/harmless-base/train-00000-of-00001.parquet",
                "data/harmless-base/test-00000-of-00001.parquet",
            ],
        )
    )
    latest = hhdata.scan(repo_id, "harmless").collect()
    assert latest.height == pinned.height + 6 and "harmless-added" in latest["subset"].to_list()
    counts = (
        hhdata.scan(repo_id, "helpful", version="1.0.0", split="train")
        .group_by("family")
        .len()
        .collect()
    )
    assert counts.rows() == [("helpful", len(read_ids(first, HELPFUL[:1])))]


def test_the_cards_scan_line_runs_alone_in_a_fresh_process(local_hub, releases, tmp_path):
    """`import hhdata; hhdata.scan(repo, ...)` as the first Hub call of a process.

    hub_load imported hub, which re-exported hub_load's names: imported in that order the two
    once crashed with a circular ImportError, which the other tests hid by importing hub first.
    """
    _, first, _ = releases
    repo_id = f"org/hh-{uuid.uuid4().hex[:8]}"
    hub.publish(first, repo_id, token=local_hub.token, retries=1, backoff=0.01)
    code = (
        f"import hhdata; print(hhdata.scan({repo_id!r}, 'harmless', version='1.0.0')"
        ".collect().height)"
    )
    env = {**os.environ, **local_hub.env(tmp_path / "hf-home")}
    ran = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    harmless = [
        "data/harmless-base/train-00000-of-00001.parquet",
        "data/harmless-base/test-00000-of-00001.parquet",
    ]
    assert ran.stdout.split()[-1] == str(len(read_ids(first, harmless)))


def test_a_file_changed_on_the_hub_is_refused_before_it_is_scanned(local_hub, releases):
    _, first, _ = releases
    repo_id = f"org/hh-{uuid.uuid4().hex[:8]}"
    hub.publish(first, repo_id, token=local_hub.token, retries=1, backoff=0.01)
    manifest = json.loads((first / "manifest.json").read_text())
    stored = local_hub.lfs_object(repo_id, manifest["files"][HELPFUL[0]]["sha256"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{HELPFUL[0]}: sha256 does not match manifest.json"):
        hhdata.scan(repo_id, "helpful", version="1.0.0")
