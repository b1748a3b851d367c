"""hhdata: load, validate, deduplicate, release and train on human preference data (HH-RLHF)."""

from hhdata.errors import HhDataError
from hhdata.load import load
from hhdata.scan import scan
from hhdata.transcript import parse_transcript, render_transcript, split_pair

__version__ = "0.1.0"

__all__ = ["HhDataError", "__version__", "load", "parse_transcript", "render_transcript", "scan", "split_pair"]
