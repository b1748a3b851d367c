"""Old path of hhdata.pairs.transcript, kept only while training/ imports it; delete once training/ is switched."""

from hhdata.pairs.transcript import ASSISTANT_TAG, parse_transcript, render_transcript, split_pair  # noqa: F401
