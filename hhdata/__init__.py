"""hhdata: load, validate, deduplicate, release and train on human preference data (HH-RLHF).

The public names are imported on first use (PEP 562), so that ``import hhdata`` and the
command line's ``--help`` do not pay for Arrow, polars and the Hub client up front.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from hhdata._version import __version__
from hhdata.errors import HhDataError

if TYPE_CHECKING:
    from hhdata.load import load
    from hhdata.pairs.transcript import parse_transcript, render_transcript, split_pair
    from hhdata.scan import scan

_LAZY = {
    "load": "hhdata.load",
    "parse_transcript": "hhdata.pairs.transcript",
    "render_transcript": "hhdata.pairs.transcript",
    "scan": "hhdata.scan",
    "split_pair": "hhdata.pairs.transcript",
}

__all__ = [
    "HhDataError",
    "__version__",
    "load",
    "parse_transcript",
    "render_transcript",
    "scan",
    "split_pair",
]


def __getattr__(name: str):
    """Import a public name's module the first time the name is used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'hhdata' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The hhdata module: importing its submodule hhdata.load (or hhdata.scan) must not
    replace the function hhdata.load with the module, as Python's import would."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
