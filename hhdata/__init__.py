"""hhdata: load, validate, deduplicate, release and train on human preference data (HH-RLHF)."""

from hhdata._version import __version__
from hhdata.errors import HhDataError
from hhdata.load import load
from hhdata.pairs.transcript import parse_transcript, render_transcript, split_pair
from hhdata.scan import scan

__all__ = [
    "HhDataError",
    "__version__",
    "load",
    "parse_transcript",
    "render_transcript",
    "scan",
    "split_pair",
]
