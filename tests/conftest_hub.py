"""The `local_hub` pytest fixture: a Hub-compatible server on 127.0.0.1 for one test module.

Starts olah (reads) and hhdata's write server (tests/hubserver) on free ports, points
HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME, HF_HUB_CACHE and HF_DATASETS_CACHE at it and at a
temp dir, and stops everything afterwards. huggingface_hub reads HF_ENDPOINT and
HF_HUB_DISABLE_XET at import, so in-process callers pass ``endpoint=hub.endpoint`` (hhdata.hub
reads HF_ENDPOINT at call time) and subprocesses get ``hub.env(...)``.
"""

from __future__ import annotations

import os

import pytest

from hhdata.hub.localserver import LocalHub


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """A running LocalHub (endpoint, token, bad_token, kill_front(), start_front(),
    arm_faults())."""
    root = tmp_path_factory.mktemp("local-hub")
    hub = LocalHub(root).start()
    env = hub.env(root / "hf-home")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from huggingface_hub import constants

    saved_xet = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield hub
    finally:
        constants.HF_HUB_DISABLE_XET = saved_xet
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        hub.stop()
