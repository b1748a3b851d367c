"""Old path of hhdata.io.read, kept only while training/ imports it; delete once training/ is switched."""

from hhdata.io.read import bundled_sample_path  # noqa: F401
