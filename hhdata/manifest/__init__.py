"""Old path of hhdata.release.manifest, kept only while training/ imports it; delete once training/ is switched."""

from hhdata.release.manifest import MANIFEST_NAME, read_manifest  # noqa: F401
