"""What both trainers need and nothing more: a CLI from a documented dataclass, and pair rows
from a release with the provenance to record.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Args:
...     seed: int = 1
...     '''random seed'''
>>> parse_args(Args, ["--seed", "3"])
Args(seed=3)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import hashlib
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path

import pyarrow.parquet as pq

from hhdata.errors import HhDataError, PairError, SourceError
from hhdata.schema import family_of, pair_id
from hhdata.transcript import split_pair

BUNDLED = Path(__file__).resolve().parent.parent / "hhdata/data/hh-rlhf/harmless-base/test.jsonl.gz"


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def parse_args(cls, argv: list[str] | None = None):
    """Build `cls` (a dataclass) from the command line; field docstrings become the help."""
    parser = argparse.ArgumentParser(
        description=inspect.getdoc(inspect.getmodule(cls)).split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        options = typing.get_args(kind)
        if isinstance(kind, types.UnionType):  # `int | None`: the value's type is the other one
            kind = next(option for option in options if option is not type(None))
        help_text = docs.get(field.name, "")
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=typing.get_args(kind), default=field.default, help=help_text
            )
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundled_rows() -> list[dict]:
    rows = []
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            try:
                pair = split_pair(record["chosen"], record["rejected"])
            except PairError:
                continue  # the few pairs without a determinable prompt cannot be trained on
            rows.append(
                {
                    "id": pair_id(record["chosen"], record["rejected"]),
                    "subset": "harmless-base",
                    "family": family_of("harmless-base"),
                    "split": "test",
                    "prompt": pair.prompt,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "chosen_text": record["chosen"],
                    "rejected_text": record["rejected"],
                    "flags": pair.flags,
                }
            )
    return rows


def _by_split(rows: list[dict]) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(row)
    return splits


def load_pairs(data: str | None, version: str | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Canonical pair rows by split, and the provenance a run records.

    `data` is None (the bundled harmless-base sample), a ``.parquet`` file of pair rows, a
    local release directory, or a Hub repo id (pinned with `version`). Provenance holds the
    source, the release version and the sha256 of its manifest.json for a release, or the
    sha256 of the file read otherwise.
    """
    if data is None:
        try:
            import hhdata

            dataset = hhdata.load()
        except AttributeError:  # hhdata.load not there yet: read the bundled file directly
            splits = _by_split(_bundled_rows())
        else:
            splits = {name: dataset[name].to_list() for name in dataset}
        return splits, {"source": "bundled", "file": BUNDLED.name, "sha256": sha256_file(BUNDLED)}
    path = Path(data)
    if path.is_file():
        if path.suffix != ".parquet":
            raise SourceError(f"{path}: pair rows are read from .parquet files; convert it first")
        rows = pq.read_table(path).to_pylist()
        return _by_split(rows), {"source": str(path), "sha256": sha256_file(path)}
    import hhdata

    if not hasattr(hhdata, "load"):
        raise HhDataError(f"{data}: loading a release needs hhdata.load, which is not installed")
    dataset = hhdata.load(data, version=version) if version else hhdata.load(data)
    provenance = {"source": data, "version": version}
    manifest = path / "manifest.json"
    if manifest.is_file():
        provenance["version"] = json.loads(manifest.read_text())["version"]
        provenance["manifest_sha256"] = sha256_file(manifest)
    return {name: dataset[name].to_list() for name in dataset}, provenance
