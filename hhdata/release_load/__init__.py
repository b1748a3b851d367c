"""Old path of hhdata.release.load, kept only while training/ imports it; delete once training/ is switched."""

from hhdata.release.load import load_release  # noqa: F401
