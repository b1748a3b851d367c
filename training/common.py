"""What every trainer needs and nothing more: a CLI from a documented dataclass that turns
usage and data errors into one line and exit code 2, pair rows from a release with the
provenance to record, and checkpoint pieces (optimizer moments, per-rank RNG state).

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
import json
import random
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hhdata.errors import HhDataError, SourceError
from hhdata.io.read import bundled_sample_path
from hhdata.release.manifest import MANIFEST_NAME, read_manifest

# owner/name: what load_pairs sends to the Hub when no such local path exists
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class UsageError(HhDataError, ValueError):
    """Command-line settings that contradict each other or the data (exit code 2)."""


def prompt_key(row: dict) -> tuple[tuple[str, str], ...]:
    """A row's prompt as a hashable value: rows of one prompt (several comparisons) share it."""
    return tuple((turn["role"], turn["content"]) for turn in row["prompt"])


def refuse_changed_settings(run_dir: Path, settings_file: str, comparable: dict) -> None:
    """Raise UsageError when a resumed run's settings differ from those the run was started with.

    `settings_file` is the JSON file in `run_dir` whose "args" holds the saved settings.
    """
    saved = json.loads((Path(run_dir) / settings_file).read_text())["args"]
    changed = sorted(k for k in comparable if saved.get(k) != comparable[k])
    if changed:
        raise UsageError(
            f"{run_dir}: cannot resume with changed settings {changed}; use those in "
            f"{settings_file}"
        )


def choose_split(splits: dict[str, list[dict]], wanted: str | None, source: str) -> str:
    """The split a trainer trains on: `wanted`, else `train`, else the data's only split.

    >>> choose_split({"train": [], "test": []}, None, "rel")
    'train'
    >>> choose_split({"test": []}, None, "rel")
    'test'
    """
    if wanted is not None:
        if wanted not in splits:
            raise UsageError(
                f"{source}: no split {wanted!r} (it has {sorted(splits)}); pass --split"
            )
        return wanted
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return next(iter(splits))
    raise UsageError(f"{source}: no `train` split among {sorted(splits)}; pass --split")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not the whole usage) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings), those of
    its dataclass bases included (the trainers' Args extend training.scale.ScaleArgs)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(own_field_docs(klass))
    return docs


def own_field_docs(cls) -> dict[str, str]:
    """The attribute docstrings written in the body of `cls` itself."""
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
    parser = _OneLineParser(
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
        elif typing.get_origin(kind) is tuple:  # `tuple[str, ...]`: a flag given once per value
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    values = vars(parser.parse_args(argv))
    for field in dataclasses.fields(cls):  # repeated flags: a tuple, the default when absent
        if isinstance(field.default, tuple):
            given = values[field.name]
            values[field.name] = field.default if given is None else tuple(given)
    return cls(**values)


def run_cli(main: Callable, cls, argv: list[str] | None = None) -> None:
    """A trainer's command line: parse `cls` from argv, run `main`, and turn a usage or data
    error (any HhDataError) into one line ``error: ...`` on stderr and exit code 2.

    Anything else is a bug in the trainer and keeps its traceback.
    """
    args = parse_args(cls, argv)
    try:
        main(args)
    except HhDataError as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


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
    from hhdata.release.load import load_release

    if data is None:
        bundled = bundled_sample_path()
        return _rows(hhdata.load()), {
            "source": "bundled",
            "file": bundled.name,
            "sha256": sha256_file(bundled),
        }
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
        if not HUB_REPO_ID.fullmatch(data):
            raise SourceError(
                f"{data}: no such file or directory, and not a Hub repo id (owner/name); pass "
                "a release directory, a .parquet of pair rows, raw HH files or a Hub repo id "
                "to --data"
            )
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
    tensors = {
        f"{index}.{name}": value
        for index, moments in state["state"].items()
        for name, value in moments.items()
    }
    return tensors, state["param_groups"]


def restore_optimizer(optimizer, tensors: dict, param_groups: list) -> None:
    """Load what optimizer_tensors saved (`tensors` holds only optimizer entries)."""
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": param_groups})


# ---- per-rank RNG state: every process resumes with its own random numbers ----------------


def rng_state_path(folder: str | Path, rank: int) -> Path:
    """The file of rank `rank`'s RNG state inside a checkpoint folder."""
    return Path(folder) / f"rng-rank{rank:03d}.safetensors"


def save_rng_state(folder: str | Path, rank: int, generator: torch.Generator | None = None) -> Path:
    """Save this process's RNG state (python, numpy, torch CPU, every CUDA device, and
    `generator` when given) to its own file in `folder`, so that after a resume each rank
    draws the numbers it would have drawn, not rank 0's.

    Tensors go to safetensors; python's and numpy's states (tuples of ints) to its metadata.
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    if generator is not None:
        tensors["generator"] = generator.get_state()
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(words), gauss]),
        "numpy": json.dumps([name, keys.tolist(), position, has_gauss, cached]),
    }
    path = rng_state_path(folder, rank)
    save_file(tensors, path, metadata=metadata)
    return path


def load_rng_state(folder: str | Path, rank: int, generator: torch.Generator | None = None) -> None:
    """Restore what save_rng_state wrote for `rank` (and `generator`'s state when given)."""
    path = rng_state_path(folder, rank)
    if not path.is_file():
        raise HhDataError(
            f"{path}: no RNG state for process {rank}; resume with the number of processes "
            "the run was saved with"
        )
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [
        tensors[f"torch_cuda_{i}"] for i in range(len(tensors)) if f"torch_cuda_{i}" in tensors
    ]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if generator is not None:
        generator.set_state(tensors["generator"])
    version, words, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(words), gauss))
    name, keys, position, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
