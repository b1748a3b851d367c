"""Shared fixtures. Every test runs with its caches in a temp dir (hermetic, no network)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from hhdata.io.read import bundled_sample_path

pytest_plugins = ["tests.conftest_hub"]  # the local_hub fixture (a Hub on 127.0.0.1)


@pytest.fixture(autouse=True)
def _hermetic_caches(tmp_path_factory, monkeypatch):
    """hhdata's load cache and the Hugging Face caches live in a temp dir per test session."""
    root = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HHDATA_CACHE", str(root / "hhdata"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """The bundled real sample: harmless-base/test.jsonl.gz, 2,312 pairs."""
    return bundled_sample_path()


@pytest.fixture(scope="session")
def sample_records(sample_path) -> list[dict]:
    """The bundled sample's records, read the plain way (json.loads per line)."""
    with gzip.open(sample_path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture
def one_torch_thread():
    """One torch thread for a trainer test: on two shared cores, more threads only wait for
    each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_family_rows():
    """rows(n): pair rows of both families in the test split, for reports by family: the bundled
    sample's first n (harmless-base) and n helpful ones from hhdata.synth (seed 5, subset
    synth-helpful-base), built by hhdata's pair builder."""
    import pyarrow as pa

    from hhdata.pairs.build import build_pairs
    from hhdata.schema import family_of
    from hhdata.synth import generate
    from training.common import load_pairs

    def rows(n: int) -> list[dict]:
        records, subset = generate(n, seed=5), "synth-helpful-base"
        raw = {"subset": [subset] * n, "split": ["test"] * n, "family": [family_of(subset)] * n}
        raw |= {side: [record[side] for record in records] for side in ("chosen", "rejected")}
        helpful, quarantined = build_pairs(pa.table(raw), workers=1)
        assert quarantined.num_rows == 0
        return [dict(row) for row in load_pairs(None)[0]["test"][:n]] + helpful.to_pylist()

    return rows
