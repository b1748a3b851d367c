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
