"""Stage 5, the Hub: publish releases and load them back, pinned and verified.

client (the HfApi, retries, messages, versions), publish (a release as one commit and a tag),
load (download and verify a release or the upstream files), localserver (a Hub-compatible
server on 127.0.0.1 for tests and the demo).
"""

from hhdata.hub.client import Version, hub_api, list_versions
from hhdata.hub.load import (
    UPSTREAM_REPO,
    UpstreamFiles,
    download_release,
    fetch_upstream,
    load_from_hub,
    upstream_checksums,
)
from hhdata.hub.publish import PublishResult, publish, release_files

__all__ = [
    "UPSTREAM_REPO",
    "PublishResult",
    "UpstreamFiles",
    "Version",
    "download_release",
    "fetch_upstream",
    "hub_api",
    "list_versions",
    "load_from_hub",
    "publish",
    "release_files",
    "upstream_checksums",
]
