"""What both trainers need and nothing more: a CLI from a documented dataclass, and pair rows
from a release with the provenance to record.

>>> from training.reward_model import Args
>>> parse_args(Args, ["--seed", "3", "--no-chat-template"]).seed
3
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import textwrap
import types
import typing
from pathlib import Path

import pyarrow.parquet as pq

from hhdata.manifest import MANIFEST_NAME, read_manifest
from hhdata.read import bundled_sample_path



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


def _rows(dataset) -> dict[str, list[dict]]:
    return {name: dataset[name].to_list() for name in dataset}


def load_pairs(data: str | None, version: str | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Canonical pair rows by split, and the provenance a run records.

    `data` is None (the bundled harmless-base sample), a ``.parquet`` file of pair rows, a
    local release directory (or a folder of releases with `version`), a Hub repo id of a
    release (pinned with `version`, default the latest), or raw files hhdata.load parses.
    Provenance holds the release version and the sha256 of its manifest.json for a release,
    the sha256 of the file read otherwise.

    >>> splits, provenance = load_pairs(None)
    >>> len(splits["test"]), provenance["file"]
    (2312, 'test.jsonl.gz')
    """
    import hhdata
    from hhdata.release_load import load_release

    if data is None:
        bundled = bundled_sample_path()
        return _rows(hhdata.load()), {"source": "bundled", "file": bundled.name, "sha256": sha256_file(bundled)}
    path = Path(data)
    if path.is_file() and path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        splits: dict[str, list[dict]] = {}
        for row in rows:
            splits.setdefault(row["split"], []).append(row)
        return splits, {"source": str(path), "sha256": sha256_file(path)}
    if version is not None and (path / version / MANIFEST_NAME).is_file():
        path = path / version
    if not (path / MANIFEST_NAME).is_file():
        if path.exists():  # raw files: parsed on the spot, no release to pin
            digest = sha256_file(path) if path.is_file() else None
            return _rows(hhdata.load(data)), {"source": data, "raw": True, "sha256": digest}
        from hhdata.hub import download_release

        path = download_release(data, version)
    manifest = read_manifest(path)
    provenance = {
        "source": data,
        "version": manifest["version"],
        "manifest_sha256": sha256_file(path / MANIFEST_NAME),
    }
    return _rows(load_release(path)), provenance


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    """An optimizer's state as flat tensors for safetensors ("<param index>.<name>") plus its
    param_groups for JSON, so a checkpoint needs no pickle."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, moments in state["state"].items() for name, value in moments.items()}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer, tensors: dict, param_groups: list) -> None:
    """Load what optimizer_tensors saved (`tensors` holds only optimizer entries)."""
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": param_groups})
