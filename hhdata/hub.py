"""Publish releases to the Hugging Face Hub and load them back, pinned and verified.

A release directory (hhdata.release) becomes ONE commit pinned to the branch's parent
commit, then a tag ``v<version>``; tags are never moved or overwritten. Publishing can be
re-run after a crash: no tag exists until the commit is complete, and a re-run that finds
the branch already holding exactly this release's files only adds the tag.

Loading back (load_from_hub, fetch_upstream) lives in hhdata.hub_load and is re-exported here.

The endpoint comes from ``endpoint=``, else ``HF_ENDPOINT`` read at call time (not at
import time, as huggingface_hub does); the token from ``token=``, else ``HF_TOKEN``, else
the Hub login (``hf auth login``). Tokens never appear in messages or results.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from hhdata.errors import HubError, ReleaseError, VersionError

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

REPO_TYPE = "dataset"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
KEEP_ON_HUB = {".gitattributes"}
_VERSION_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class PublishResult:
    """What publish did: the tag, the commit it points at, and what was (or would be) sent."""

    repo_id: str
    version: str
    tag: str
    commit: str | None
    files: list[tuple[str, int]]
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dry_run: bool = False
    reused_commit: bool = False

    @property
    def bytes(self) -> int:
        """Size of the release."""
        return sum(size for _, size in self.files)

    @property
    def uploaded_bytes(self) -> int:
        """Bytes of the files the commit added or changed (0 when an earlier run's commit was reused)."""
        if self.reused_commit:
            return 0
        return sum(size for path, size in self.files if path not in set(self.unchanged))


@dataclass(frozen=True)
class Version:
    """One published release: its version, tag, commit and commit date (ISO 8601)."""

    version: str
    tag: str
    commit: str
    date: str | None


# -- connection -------------------------------------------------------------------------
def hub_api(token: str | None = None, endpoint: str | None = None) -> HfApi:
    """An HfApi for `endpoint` (else HF_ENDPOINT now) with the token from the argument, HF_TOKEN or login."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if os.environ.get("HF_HUB_DISABLE_XET", "").upper() in {"1", "TRUE", "YES", "ON"}:
        # huggingface_hub reads this once at import; honour a value set later (tests, demo).
        constants.HF_HUB_DISABLE_XET = True
    return HfApi(endpoint=endpoint.rstrip("/"), token=token or os.environ.get("HF_TOKEN") or _login_token())


def _login_token() -> str | None:
    """The token `hf auth login` stored, from HF_TOKEN_PATH or HF_HOME as they are now."""
    path = os.environ.get("HF_TOKEN_PATH") or (os.path.join(os.environ["HF_HOME"], "token") if os.environ.get("HF_HOME") else None)
    if path and os.path.isfile(path):
        return Path(path).read_text().strip() or None
    return get_token()  # huggingface_hub's own lookup (paths fixed at its import)


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (_http.TransportError, ConnectionError, TimeoutError)):
        return True
    return isinstance(error, HfHubHTTPError) and _status(error) in TRANSIENT_STATUS


def _hub_error(error: BaseException, repo_id: str, doing: str) -> HubError:
    """A HubError (with .status) that says what failed, where, and what to do; never the token."""
    hub_error = _explain(error, repo_id, doing)
    hub_error.status = _status(error)
    return hub_error


def _explain(error: BaseException, repo_id: str, doing: str) -> HubError:
    status = _status(error)
    if status == 401:
        return HubError(
            f"{repo_id}: the Hub refused the token while {doing} (401 Unauthorized); pass a valid "
            "write token with --token / token=, set HF_TOKEN, or run `hf auth login`"
        )
    if status == 403:
        return HubError(f"{repo_id}: the token may not write to this repo while {doing} (403); use a token with write access")
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)) or status == 404:
        return HubError(
            f"{repo_id}: not found on the Hub while {doing} (404); check the repo name, the version "
            "and the endpoint (HF_ENDPOINT)"
        )
    if _is_transient(error):
        return HubError(
            f"{repo_id}: the Hub is unreachable or failing while {doing} ({type(error).__name__}"
            f"{f' {status}' if status else ''}); re-run the same command: a publish resumes safely and tags "
            "only a complete commit"
        )
    return HubError(f"{repo_id}: the Hub refused {doing}: {str(error).splitlines()[0]}")


def _retrying(call, *, retries: int, backoff: float, repo_id: str, doing: str):
    """Run call(); retry transient failures (5xx, 429, connection errors) with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (HfHubHTTPError, _http.HTTPError, ConnectionError, TimeoutError) as error:
            if not _is_transient(error) or attempt == retries:
                raise _hub_error(error, repo_id, doing) from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


# -- publish ----------------------------------------------------------------------------
def release_files(release_dir: str | Path) -> list[tuple[str, int]]:
    """Every file of a release directory to upload: (relative posix path, bytes), sorted.

    Hidden files and folders (a leftover staging dir, .DS_Store) are not part of a release.
    """
    root = Path(release_dir)
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def _read_release(release_dir: Path) -> dict:
    from hhdata.release_load import verify_files

    if not release_dir.is_dir():
        raise ReleaseError(f"{release_dir}: not a directory; pass the folder of one version, e.g. out/1.0.0")
    return verify_files(release_dir)


def _local_ids(release_dir: Path, files: list[tuple[str, int]], remote: dict) -> dict[str, str]:
    """For each local file, the id the Hub would report for it: LFS sha256 or git blob sha1."""
    ids = {}
    for relative, size in files:
        entry = remote.get(relative)
        if entry is not None and entry.lfs is None:
            digest = hashlib.sha1(b"blob %d\0" % size)  # git's blob id: header, then the bytes
        else:
            digest = hashlib.sha256()
        with open(release_dir / relative, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        ids[relative] = digest.hexdigest()
    return ids


def _remote_files(api: HfApi, repo_id: str, commit: str) -> dict:
    """path -> RepoFile of every file in a commit."""
    return {
        item.path: item
        for item in api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=commit, recursive=True)
        if hasattr(item, "blob_id")
    }


def _holds_release(remote: dict, local_ids: dict[str, str]) -> bool:
    """True when a commit holds exactly the release's files, byte for byte (by hash)."""
    if set(remote) - KEEP_ON_HUB != set(local_ids):
        return False
    return all(_remote_id(remote[path]) == wanted for path, wanted in local_ids.items())


def _remote_id(item) -> str:
    return item.lfs.sha256 if item.lfs is not None else item.blob_id


@contextlib.contextmanager
def _quiet_unless_terminal():
    """huggingface_hub's progress bars on a terminal only; quiet in pipes and logs."""
    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def publish(
    release_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    parent_commit: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
) -> PublishResult:
    """Upload a release as one commit on ``main`` pinned to its parent, then tag it ``v<version>``.

    ``parent_commit`` pins the commit to a branch state you reviewed (default: the branch
    head read just before committing); if the branch moved since, the Hub refuses the commit
    and nothing is tagged. An existing tag raises VersionError. Transient failures are
    retried ``retries`` times with exponential backoff starting at ``backoff`` seconds.
    With ``dry_run`` nothing is sent: the result lists the files that would be uploaded.

    >>> publish("out/1.0.0", "org/hh-rlhf", dry_run=True).files[:1]  # doctest: +SKIP
    [('CHANGELOG.md', 412)]
    """
    release_dir = Path(release_dir)
    manifest = _read_release(release_dir)
    version = manifest["version"]
    tag = f"v{version}"
    files = release_files(release_dir)
    if dry_run:
        return PublishResult(repo_id, version, tag, None, files, dry_run=True)

    api = hub_api(token, endpoint)
    if api.token is None:
        raise HubError(f"{repo_id}: publishing needs a write token; pass --token / token=, set HF_TOKEN, or run `hf auth login`")

    def call(fn, doing):
        return _retrying(fn, retries=retries, backoff=backoff, repo_id=repo_id, doing=doing)

    call(lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, exist_ok=True), "creating the repo")
    refs = call(lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE), "reading refs")
    _refuse_existing_tag(refs, tag, repo_id)
    head = _branch_head(refs, repo_id)
    remote = call(lambda: _remote_files(api, repo_id, head), "listing the branch")
    local_ids = _local_ids(release_dir, files, remote)
    deleted = sorted(set(remote) - KEEP_ON_HUB - set(local_ids))
    unchanged = sorted(path for path, wanted in local_ids.items() if path in remote and _remote_id(remote[path]) == wanted)

    with _quiet_unless_terminal():
        if _holds_release(remote, local_ids) and parent_commit in (None, head):
            commit, reused = head, True  # a previous run committed but crashed before tagging
        else:
            commit = _commit(api, call, release_dir, repo_id, version, files, deleted, parent_commit or head)
            reused = False
        _tag(api, call, repo_id, tag, commit, version)
    return PublishResult(repo_id, version, tag, commit, files, deleted, unchanged, reused_commit=reused)


def _branch_head(refs, repo_id: str) -> str:
    for ref in refs.branches:
        if ref.name == constants.DEFAULT_REVISION:
            return ref.target_commit
    raise HubError(f"{repo_id}: the repo has no {constants.DEFAULT_REVISION} branch to publish on; create it first")


def _refuse_existing_tag(refs, tag: str, repo_id: str) -> None:
    for ref in refs.tags:
        if ref.name == tag:
            raise VersionError(
                f"{repo_id}: tag {tag} already exists (commit {ref.target_commit[:12]}); published "
                "versions are immutable: build the release under the next version number"
            )


def _commit(api, call, release_dir, repo_id, version, files, deleted, parent) -> str:
    """One commit with every release file and the deletion of files no longer in it."""

    def attempt():
        operations = [CommitOperationAdd(path, str(release_dir / path)) for path, _ in files]
        operations += [CommitOperationDelete(path) for path in deleted]
        # After a lost reply the commit may already be there: retry only from the same parent.
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
        head = _branch_head(refs, repo_id)
        if head != parent:
            remote = _remote_files(api, repo_id, head)
            if _holds_release(remote, _local_ids(release_dir, files, remote)):
                return head
        return api.create_commit(
            repo_id, operations, repo_type=REPO_TYPE, commit_message=f"Release {version}",
            commit_description=f"hhdata release {version}: {len(files)} files", parent_commit=parent,
        ).oid

    try:
        return call(attempt, f"committing release {version}")
    except HubError as error:
        if getattr(error, "status", None) == 412:
            raise HubError(
                f"{repo_id}: the branch moved since commit {parent[:12]}, so the release commit was "
                "refused and nothing was tagged; review the new commits, then re-run publish"
            ) from None
        raise


def _tag(api, call, repo_id: str, tag: str, commit: str, version: str) -> None:
    def attempt():
        try:
            api.create_tag(repo_id, tag=tag, revision=commit, repo_type=REPO_TYPE, tag_message=f"Release {version}")
        except HfHubHTTPError as error:
            if _status(error) != 409:
                raise
            refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
            if not any(ref.name == tag and ref.target_commit == commit for ref in refs.tags):
                _refuse_existing_tag(refs, tag, repo_id)

    call(attempt, f"tagging {tag}")


# -- versions ---------------------------------------------------------------------------
def list_versions(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> list[Version]:
    """The releases of a repo (tags ``vX.Y.Z``), oldest version first, with commit and date."""
    api = hub_api(token, endpoint)
    refs = _retrying(lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE), retries=2, backoff=0.5,
                     repo_id=repo_id, doing="listing tags")
    versions = []
    for ref in refs.tags:
        match = _VERSION_TAG.match(ref.name)
        if not match:
            continue
        info = _retrying(lambda: api.dataset_info(repo_id, revision=ref.target_commit), retries=2, backoff=0.5,
                         repo_id=repo_id, doing=f"reading {ref.name}")
        date = info.last_modified.isoformat() if info.last_modified else None
        versions.append((tuple(map(int, match.groups())), Version(ref.name[1:], ref.name, ref.target_commit, date)))
    return [version for _, version in sorted(versions)]


# Re-exported so callers need one module; imported last because hub_load uses the helpers above.
from hhdata.hub_load import (  # noqa: E402
    UPSTREAM_REPO,
    UpstreamFiles,
    download_release,
    fetch_upstream,
    load_from_hub,
    upstream_checksums,
)
