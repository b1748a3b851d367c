"""Publish releases to the Hugging Face Hub and load them back, pinned and verified.

A release directory (hhdata.release) becomes ONE commit pinned to the branch's parent
commit, then a tag ``v<version>``; tags are never moved or overwritten. Publishing can be
re-run after a crash: no tag exists until the commit is complete, and a re-run that finds
the branch already holding exactly this release's files only adds the tag.

Loading downloads the tagged revision and checks every data file's sha256 against the
manifest before parsing it (hhdata.release_load). The raw upstream layout
(``Anthropic/hh-rlhf``: ``<subset>/<split>.jsonl.gz``) is fetched with fetch_upstream and
checked against the checksums in hhdata/data/hh-rlhf/UPSTREAM_MANIFEST.md.

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
from importlib import resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token, snapshot_download
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from hhdata.errors import HubError, IntegrityError, ReleaseError, VersionError

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

REPO_TYPE = "dataset"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
KEEP_ON_HUB = {".gitattributes"}
UPSTREAM_REPO = "Anthropic/hh-rlhf"
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
        """Bytes sent: files the branch did not already hold byte for byte (0 when a commit was reused)."""
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
    return HfApi(endpoint=endpoint.rstrip("/"), token=token or os.environ.get("HF_TOKEN") or get_token())


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
            f"{f' {status}' if status else ''}); nothing was tagged, re-run the same command to resume"
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
    for relative, _ in files:
        data = (release_dir / relative).read_bytes()
        entry = remote.get(relative)
        if entry is not None and entry.lfs is None:
            ids[relative] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        else:
            ids[relative] = hashlib.sha256(data).hexdigest()
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
    head = next(ref.target_commit for ref in refs.branches if ref.name == constants.DEFAULT_REVISION)
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
        head = next(ref.target_commit for ref in refs.branches if ref.name == constants.DEFAULT_REVISION)
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
        if error.status == 412:
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


# -- load -------------------------------------------------------------------------------
def _cache_dir(cache_dir: str | Path | None) -> str:
    """The hub cache: the argument, else HF_HUB_CACHE or HF_HOME/hub read now, not at import."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def download_release(
    repo_id: str,
    version: str | None = None,
    config: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download the files of one config of release ``version`` (default: the latest tag).

    Returns the local snapshot folder (a release directory holding manifest.json and the
    config's data files), not yet verified: load_from_hub verifies before parsing.
    """
    from hhdata.manifest import MANIFEST_NAME, read_manifest
    from hhdata.release_load import config_files

    api = hub_api(token, endpoint)
    tag = _resolve_tag(repo_id, version, token=token, endpoint=endpoint)

    def fetch(patterns):
        return snapshot_download(
            repo_id, repo_type=REPO_TYPE, revision=tag, allow_patterns=patterns, endpoint=api.endpoint,
            token=api.token, cache_dir=_cache_dir(cache_dir),
        )

    folder = Path(_retrying(lambda: fetch([MANIFEST_NAME]), retries=2, backoff=0.5, repo_id=repo_id,
                            doing=f"downloading {tag}/{MANIFEST_NAME}"))
    manifest = read_manifest(folder)
    wanted = sorted({f for files in config_files(manifest, config).values() for f in files})
    _retrying(lambda: fetch([MANIFEST_NAME, *wanted]), retries=2, backoff=0.5, repo_id=repo_id,
              doing=f"downloading {tag}")
    return folder


def _resolve_tag(repo_id, version, *, token, endpoint) -> str:
    versions = list_versions(repo_id, token=token, endpoint=endpoint)
    if not versions:
        raise VersionError(f"{repo_id}: no release tags (vX.Y.Z) on the Hub; publish one with `hhdata publish`")
    if version is None:
        return versions[-1].tag
    tag = f"v{version.removeprefix('v')}"
    if tag not in {v.tag for v in versions}:
        raise VersionError(
            f"{repo_id}: no version {version}; published versions: {', '.join(v.version for v in versions)}"
        )
    return tag


def load_from_hub(
    repo_id: str,
    config: str | None = None,
    split: str | None = None,
    version: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
):
    """Load a published release as ``datasets`` objects, every file checked against its manifest.

    ``version`` "1.0.0" loads tag v1.0.0 (default: the latest version). A DatasetDict, or
    one Dataset when ``split`` is given. ``Anthropic/hh-rlhf`` (the raw upstream layout,
    no manifest) is fetched with fetch_upstream and returned as raw chosen/rejected rows of
    the subset named by ``config``.

    >>> load_from_hub("org/hh-rlhf", "helpful", split="train", version="1.0.0")  # doctest: +SKIP
    Dataset({features: ['id', 'subset', 'family', 'split', 'prompt', ...], num_rows: ...})
    """
    from hhdata.release_load import load_release

    if repo_id == UPSTREAM_REPO:
        return _load_upstream(repo_id, config, split, version, token=token, endpoint=endpoint, cache_dir=cache_dir)
    with _quiet_unless_terminal():
        folder = download_release(repo_id, version, config, token=token, endpoint=endpoint, cache_dir=cache_dir)
    try:
        return load_release(folder, config, split)
    except IntegrityError as error:
        raise IntegrityError(
            f"{repo_id}@{folder.name[:12]}: {error}. The file on the Hub differs from what the "
            "release's manifest recorded: do not use this copy; report it to the repo owner"
        ) from None


# -- the raw upstream layout --------------------------------------------------------------
@dataclass(frozen=True)
class UpstreamFiles:
    """A local copy of upstream files: folder, the files checked, and those with no recorded checksum."""

    folder: Path
    verified: list[str]
    unverified: list[str]

    def files(self, subset: str | None = None) -> list[Path]:
        return [self.folder / p for p in self.verified + self.unverified if subset is None or p.startswith(f"{subset}/")]


def upstream_checksums() -> dict[str, tuple[int, str] | None]:
    """path -> (bytes, sha256) from UPSTREAM_MANIFEST.md; None where it records no checksum."""
    text = resources.files("hhdata").joinpath("data/hh-rlhf/UPSTREAM_MANIFEST.md").read_text("utf-8")
    sums: dict[str, tuple[int, str] | None] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].endswith((".jsonl.gz", ".jsonl")):
            continue
        numbers = [c for c in cells[1:] if c.isdigit()]
        digests = [c for c in cells[1:] if re.fullmatch(r"[0-9a-f]{64}", c)]
        sums[cells[0]] = (int(numbers[0]), digests[0]) if numbers and digests else None
    return sums


def fetch_upstream(
    repo_id: str = UPSTREAM_REPO,
    subsets: list[str] | None = None,
    *,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> UpstreamFiles:
    """Download the raw upstream layout (``<subset>/<name>.jsonl.gz``) and check its checksums.

    Each file with a checksum in UPSTREAM_MANIFEST.md must match it in size and sha256
    (IntegrityError otherwise); files the manifest has no checksum for are returned as
    ``unverified``. The folder can be passed to ``hhdata build`` as a SOURCE.
    """
    api = hub_api(token, endpoint)
    listed = _retrying(lambda: api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=revision),
                       retries=2, backoff=0.5, repo_id=repo_id, doing="listing files")
    wanted = [p for p in listed if re.fullmatch(r"[^/]+/[^/]+\.jsonl(\.gz)?", p)
              and (subsets is None or p.split("/")[0] in subsets)]
    if not wanted:
        raise HubError(f"{repo_id}@{revision}: no <subset>/<file>.jsonl.gz files{f' for {subsets}' if subsets else ''}")
    folder = Path(_retrying(
        lambda: snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, allow_patterns=wanted,
                                  endpoint=api.endpoint, token=api.token, cache_dir=_cache_dir(cache_dir)),
        retries=2, backoff=0.5, repo_id=repo_id, doing="downloading upstream files"))
    sums = upstream_checksums()
    verified, unverified = [], []
    for relative in wanted:
        expected = sums.get(relative)
        if expected is None:
            unverified.append(relative)
            continue
        data = (folder / relative).read_bytes()
        actual = (len(data), hashlib.sha256(data).hexdigest())
        if actual != expected:
            raise IntegrityError(
                f"{repo_id}@{revision}/{relative}: {actual[0]} bytes, sha256 {actual[1]}; "
                f"UPSTREAM_MANIFEST.md records {expected[0]} bytes, sha256 {expected[1]}: "
                "this is not the upstream file, do not build from it"
            )
        verified.append(relative)
    return UpstreamFiles(folder, verified, unverified)


def _load_upstream(repo_id, config, split, version, *, token, endpoint, cache_dir):
    import datasets

    revision = version or "main"
    with _quiet_unless_terminal():
        fetched = fetch_upstream(repo_id, [config] if config else None, revision=revision,
                                 token=token, endpoint=endpoint, cache_dir=cache_dir)
    by_split: dict[str, list[str]] = {}
    for path in fetched.files(config):
        name = path.name.split(".")[0]
        by_split.setdefault(name, []).append(str(path))
    if split is not None and split not in by_split:
        raise HubError(f"{repo_id}@{revision}: no split {split!r} for {config or 'any subset'}; have {sorted(by_split)}")
    data_files = {split: by_split[split]} if split else by_split
    loaded = datasets.load_dataset("json", data_files=data_files, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    return loaded[split] if split else loaded
