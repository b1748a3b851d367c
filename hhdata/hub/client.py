"""The client side every Hub call shares: the HfApi, retries, messages, quiet progress, versions.

The endpoint comes from ``endpoint=``, else ``HF_ENDPOINT`` read at call time (not at
import time, as huggingface_hub does); the token from ``token=``, else ``HF_TOKEN``, else
the Hub login (``hf auth login``). Tokens never appear in messages or results.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from hhdata.errors import HubError

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

REPO_TYPE = "dataset"
TRANSIENT_STATUS = {408, 429}  # plus every 5xx: a server-side failure is worth another try
VERSION_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Version:
    """One published release: its version, tag, commit and commit date (ISO 8601)."""

    version: str
    tag: str
    commit: str
    date: str | None


# -- connection -------------------------------------------------------------------------
def hub_api(token: str | None = None, endpoint: str | None = None) -> HfApi:
    """An HfApi for `endpoint` (else HF_ENDPOINT now) with the token from the argument,
    HF_TOKEN or the Hub login."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if os.environ.get("HF_HUB_DISABLE_XET", "").upper() in {"1", "TRUE", "YES", "ON"}:
        # huggingface_hub reads this once at import; honour a value set later (tests, demo).
        constants.HF_HUB_DISABLE_XET = True
    return HfApi(
        endpoint=endpoint.rstrip("/"), token=token or os.environ.get("HF_TOKEN") or _login_token()
    )


def _login_token() -> str | None:
    """The token `hf auth login` stored, from HF_TOKEN_PATH or HF_HOME as they are now."""
    path = os.environ.get("HF_TOKEN_PATH") or (
        os.path.join(os.environ["HF_HOME"], "token") if os.environ.get("HF_HOME") else None
    )
    if path and os.path.isfile(path):
        return Path(path).read_text().strip() or None
    return get_token()  # huggingface_hub's own lookup (paths fixed at its import)


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: BaseException) -> bool:
    if isinstance(
        error, (_http.TransportError, ConnectionError, TimeoutError)
    ) or _is_upload_failure(error):
        return True
    status = http_status(error)
    return (
        isinstance(error, HfHubHTTPError)
        and status is not None
        and (status in TRANSIENT_STATUS or status >= 500)
    )


_HTTP_FAILURES = (HfHubHTTPError, _http.HTTPError, ConnectionError, TimeoutError)
_UPLOAD_FAILED = (
    "Error while uploading"  # how huggingface_hub words the RuntimeError around a failed LFS upload
)


def _is_upload_failure(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error).startswith(_UPLOAD_FAILED)


def _http_failure(error: BaseException) -> BaseException | None:
    """The HTTP or connection failure behind `error`, else None.

    huggingface_hub wraps a failed LFS upload in a bare RuntimeError ("Error while uploading
    'x' to the Hub."); its cause says what failed. When the cause is no HTTP error (a server
    that died under parallel uploads makes one thread close the shared client while another
    still sends: "the client has been closed"), the upload failure itself is returned.
    """
    wrapper = error if _is_upload_failure(error) else None
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, _HTTP_FAILURES):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return wrapper


def hub_error(error: BaseException, repo_id: str, doing: str) -> HubError:
    """A HubError (with .status) that says what failed, where, and what to do; never the token."""
    hub_error = _explain(error, repo_id, doing)
    hub_error.status = http_status(error)
    return hub_error


def _explain(error: BaseException, repo_id: str, doing: str) -> HubError:
    status = http_status(error)
    if status == 401:
        return HubError(
            f"{repo_id}: the Hub refused the token while {doing} (401 Unauthorized); pass a valid "
            "write token with --token / token=, set HF_TOKEN, or run `hf auth login`"
        )
    if status == 403:
        return HubError(
            f"{repo_id}: the token may not write to this repo while {doing} (403); use a token "
            "with write access"
        )
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)) or status == 404:
        return HubError(
            f"{repo_id}: not found on the Hub while {doing} (404); check the repo name, the "
            "version "
            "and the endpoint (HF_ENDPOINT)"
        )
    if _is_transient(error):
        return HubError(
            f"{repo_id}: the Hub is unreachable or failing while {doing} ({type(error).__name__}"
            f"{f' {status}' if status else ''}); it is safe to re-run the same command: a publish "
            "resumes "
            "where it stopped and tags only a complete commit"
        )
    return HubError(f"{repo_id}: the Hub refused {doing}: {str(error).splitlines()[0]}")


def retrying(call, *, retries: int, backoff: float, repo_id: str, doing: str):
    """Run call(); retry transient failures (5xx, 429, connection errors), backing off
    exponentially."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (*_HTTP_FAILURES, RuntimeError) as raised:
            error = _http_failure(raised)
            if error is None:  # a RuntimeError that is not a failed request: a bug, not the Hub
                raise
            if not _is_transient(error) or attempt == retries:
                what = doing if error is raised else f"{doing}: {str(raised).splitlines()[0]}"
                raise hub_error(error, repo_id, what) from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def quiet_unless_terminal():
    """huggingface_hub's progress bars on a terminal only; quiet in pipes and logs."""
    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


# -- versions ---------------------------------------------------------------------------
def list_versions(
    repo_id: str, *, token: str | None = None, endpoint: str | None = None
) -> list[Version]:
    """The releases of a repo (tags ``vX.Y.Z``), oldest version first, with commit and date."""
    api = hub_api(token, endpoint)
    refs = retrying(
        lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE),
        retries=2,
        backoff=0.5,
        repo_id=repo_id,
        doing="listing tags",
    )
    versions = []
    for ref in refs.tags:
        match = VERSION_TAG.match(ref.name)
        if not match:
            continue
        commit = ref.target_commit
        info = retrying(
            lambda commit=commit: api.dataset_info(repo_id, revision=commit),
            retries=2,
            backoff=0.5,
            repo_id=repo_id,
            doing=f"reading {ref.name}",
        )
        date = info.last_modified.isoformat() if info.last_modified else None
        versions.append(
            (
                tuple(map(int, match.groups())),
                Version(ref.name[1:], ref.name, ref.target_commit, date),
            )
        )
    return [version for _, version in sorted(versions)]
