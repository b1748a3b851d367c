"""Publish releases to the Hugging Face Hub and load them back, pinned and verified.

A release directory (hhdata.release) becomes ONE commit pinned to the branch's parent
commit, then a tag ``v<version>``; tags are never moved or overwritten. What is sent is
exactly the files manifest.json lists plus the manifest and the documents made from it
(card, changelog, croissant), each a regular file whose sha256 matches the manifest; any
other file or a symlink in the folder stops the publish before a byte is sent. ``main``
always holds the highest version: an older one goes out only as a back-port, a commit on a
side branch that is tagged and leaves ``main`` alone. Publishing can be re-run after a
crash: no tag exists until the commit is complete, and a re-run that finds the branch
already holding exactly this release's files only adds the tag.

Loading back lives in hhdata.hub.load; the client helpers both share in hhdata.hub.client.

The endpoint comes from ``endpoint=``, else ``HF_ENDPOINT`` read at call time (not at
import time, as huggingface_hub does); the token from ``token=``, else ``HF_TOKEN``, else
the Hub login (``hf auth login``). Tokens never appear in messages or results.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from hhdata.errors import HubError, IntegrityError, ReleaseError, VersionError
from hhdata.hub.client import (
    REPO_TYPE,
    VERSION_TAG,
    http_status,
    hub_api,
    quiet_unless_terminal,
    retrying,
)
from hhdata.release.diff import parse_version
from hhdata.release.manifest import MANIFEST_NAME, read_manifest

KEEP_ON_HUB = {".gitattributes"}
# Written from the manifest after it (so it cannot hold their checksums); published with it.
RELEASE_DOCUMENTS = ("README.md", "CHANGELOG.md", "croissant.json")
BACKPORT_BRANCH = "hhdata-backport-{version}"


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
        """Bytes of the files the commit added or changed (0 when an earlier run's commit was
        reused)."""
        if self.reused_commit:
            return 0
        return sum(size for path, size in self.files if path not in set(self.unchanged))


# -- publish ----------------------------------------------------------------------------
def release_files(release_dir: str | Path) -> list[tuple[str, int]]:
    """The files publish sends: (relative posix path, bytes), sorted.

    Exactly manifest.json, the files it lists, and the documents made from it
    (RELEASE_DOCUMENTS, where present). Raises ReleaseError naming every other file (a
    hidden one too) and every symlink or non-regular file in the folder: nothing outside
    the release can ride along.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise ReleaseError(
            f"{root}: not a directory; pass the folder of one version, e.g. out/1.0.0"
        )
    found, odd = _folder_entries(root)
    if MANIFEST_NAME in odd:  # never read a manifest through a link
        raise ReleaseError(_refusal(root, [], odd))
    manifest = read_manifest(root)
    allowed = {MANIFEST_NAME, *RELEASE_DOCUMENTS, *manifest["files"]}
    unlisted = sorted(set(found) - allowed)
    if unlisted or odd:
        raise ReleaseError(_refusal(root, unlisted, odd))
    return sorted((path, size) for path, size in found.items() if path in allowed)


def _folder_entries(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Regular files (path -> bytes) and everything else (path -> what it is) under root,
    links not followed."""
    found, odd = {}, {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                odd[relative] = f"a symbolic link (-> {os.readlink(path)})"
            elif stat.S_ISREG(info.st_mode):
                found[relative] = info.st_size
            elif not stat.S_ISDIR(info.st_mode):
                odd[relative] = "not a regular file"
    return found, odd


def _refusal(root: Path, unlisted: list[str], odd: dict[str, str]) -> str:
    problems = [f"{path} is {what}" for path, what in sorted(odd.items())]
    problems += [f"{path} is not listed in manifest.json" for path in unlisted if path not in odd]
    return (
        f"{root}: refusing to publish: {'; '.join(problems)}; a release folder holds only the "
        "regular "
        f"files manifest.json lists, plus {MANIFEST_NAME} and {', '.join(RELEASE_DOCUMENTS)}: "
        "remove the others (or rebuild the release with `hhdata build`)"
    )


def _refuse_other_repo(release_dir: Path, manifest: dict, repo_id: str) -> None:
    """A release built for one repo (``--name org/x``) names it in its card's usage code and
    croissant.json's url; published elsewhere, both would point users at the wrong place."""
    from hhdata.release.card import is_repo_id

    name = manifest["name"]
    if is_repo_id(name) and name != repo_id:
        raise ReleaseError(
            f"{release_dir}: the release was built for {name} (--name): its card's usage code "
            f"and croissant.json's url point there, not to {repo_id}; publish it to {name}, or "
            f"rebuild it with --name {repo_id}"
        )


def _read_release(release_dir: Path) -> tuple[dict, list[tuple[str, int]]]:
    """The manifest and the files to send, after checking the folder and every checksum."""
    from hhdata.release.load import verify_files

    _refuse_empty(Path(release_dir), _raw_manifest(Path(release_dir)))
    files = release_files(release_dir)
    manifest = verify_files(release_dir)
    _refuse_empty(Path(release_dir), manifest)
    return manifest, files


def _raw_manifest(root: Path) -> dict:
    """manifest.json as plain JSON, before its schema (which requires a row) is checked; {}
    if unreadable.

    An empty release written by an hhdata older than that schema rule must still get the
    "holds no rows" reason rather than a schema error that says to rebuild it.
    """
    path = root / MANIFEST_NAME
    try:
        if stat.S_ISREG(path.lstat().st_mode):
            manifest = json.loads(path.read_text(encoding="utf-8"))
            return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        pass  # release_files and read_manifest report it
    return {}


def _refuse_empty(release_dir: Path, manifest: dict) -> None:
    """Raise ReleaseError when the manifest lists data files and none holds a row."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return
    if not any(isinstance(entry, dict) and entry.get("rows") for entry in files.values()):
        raise ReleaseError(
            f"{release_dir}: release {manifest.get('version')} holds no rows (accounting: "
            f"{manifest.get('accounting')}); an empty release is not published: see why the build "
            "kept "
            "nothing (its quarantine and drop logs), fix the input and build again"
        )


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
        for item in api.list_repo_tree(
            repo_id, repo_type=REPO_TYPE, revision=commit, recursive=True
        )
        if hasattr(item, "blob_id")
    }


def _holds_release(remote: dict, local_ids: dict[str, str]) -> bool:
    """True when a commit holds exactly the release's files, byte for byte (by hash)."""
    if set(remote) - KEEP_ON_HUB != set(local_ids):
        return False
    return all(_remote_id(remote[path]) == wanted for path, wanted in local_ids.items())


def _remote_id(item) -> str:
    return item.lfs.sha256 if item.lfs is not None else item.blob_id


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
    backport: bool = False,
) -> PublishResult:
    """Upload a release as one commit on ``main`` pinned to its parent, then tag it ``v<version>``.

    The folder must hold only the release's files (release_files), each matching its
    sha256 in the manifest; both are checked before anything is sent. A version at or below
    the latest published one is refused, so ``main`` always holds the highest version;
    ``backport=True`` publishes such an older version as a commit on a side branch (based
    on the highest tag below it) that gets the tag, and leaves ``main`` alone.

    ``parent_commit`` pins the commit to a ``main`` you reviewed (default: the branch
    head read just before committing); if the branch moved since, the Hub refuses the commit
    and nothing is tagged. An existing tag raises VersionError. Transient failures (5xx,
    429, lost connections, also inside LFS uploads) are retried ``retries`` times with
    exponential backoff starting at ``backoff`` seconds. With ``dry_run`` nothing is sent:
    the result lists the files that would be uploaded.

    >>> publish("out/1.0.0", "org/hh-rlhf", dry_run=True).files[:1]  # doctest: +SKIP
    [('CHANGELOG.md', 412)]
    """
    release_dir = Path(release_dir)
    manifest, files = _read_release(release_dir)
    _refuse_other_repo(release_dir, manifest, repo_id)
    version = manifest["version"]
    tag = f"v{version}"
    if dry_run:
        return PublishResult(repo_id, version, tag, None, files, dry_run=True)
    if backport and parent_commit is not None:
        raise ReleaseError(
            "parent_commit pins main, and a back-port leaves main alone: drop parent_commit"
        )

    api = hub_api(token, endpoint)
    if api.token is None:
        raise HubError(
            f"{repo_id}: publishing needs a write token; pass --token / token=, set HF_TOKEN, or "
            "run `hf auth login`"
        )

    def call(fn, doing):
        return retrying(fn, retries=retries, backoff=backoff, repo_id=repo_id, doing=doing)

    call(lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, exist_ok=True), "creating the repo")
    refs = call(lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE), "reading refs")
    _refuse_existing_tag(refs, tag, repo_id)
    branch = constants.DEFAULT_REVISION
    if _needs_backport(refs, version, backport, repo_id):
        branch = BACKPORT_BRANCH.format(version=version)
        base = _backport_base(refs, version, repo_id)
        call(
            lambda: api.create_branch(
                repo_id, branch=branch, revision=base, repo_type=REPO_TYPE, exist_ok=True
            ),
            f"creating the back-port branch {branch}",
        )
        refs = call(lambda: api.list_repo_refs(repo_id, repo_type=REPO_TYPE), "reading refs")
    head = _branch_head(refs, repo_id, branch)
    remote = call(lambda: _remote_files(api, repo_id, head), "listing the branch")
    local_ids = _local_ids(release_dir, files, remote)
    deleted = sorted(set(remote) - KEEP_ON_HUB - set(local_ids))
    unchanged = sorted(
        path
        for path, wanted in local_ids.items()
        if path in remote and _remote_id(remote[path]) == wanted
    )

    with quiet_unless_terminal():
        if _holds_release(remote, local_ids) and parent_commit in (None, head):
            commit, reused = head, True  # a previous run committed but crashed before tagging
        else:
            target = _Target(repo_id, branch, parent_commit or head)
            commit = _commit(api, call, release_dir, manifest, target, files, deleted)
            reused = False
        _tag(api, call, repo_id, tag, commit, version)
    if branch != constants.DEFAULT_REVISION:  # the tag keeps the commit; the side branch is done
        call(
            lambda: api.delete_branch(repo_id, branch=branch, repo_type=REPO_TYPE),
            f"deleting {branch}",
        )
    return PublishResult(
        repo_id, version, tag, commit, files, deleted, unchanged, reused_commit=reused
    )


def _published(refs) -> list[tuple[tuple[int, int, int], object]]:
    """(version, ref) of every release tag vX.Y.Z, oldest first."""
    tags = [
        (tuple(map(int, m.groups())), ref)
        for ref in refs.tags
        if (m := VERSION_TAG.match(ref.name))
    ]
    return sorted(tags, key=lambda pair: pair[0])


def _needs_backport(refs, version: str, backport: bool, repo_id: str) -> bool:
    """True when `version` is below the latest tag and a back-port was asked for; refuse the
    rest."""
    published = _published(refs)
    latest = published[-1] if published else None
    if latest is not None and parse_version(version) < latest[0]:
        if not backport:
            raise VersionError(
                f"{repo_id}: version {version} is below the latest published version "
                f"{latest[1].name[1:]}, "
                "and main must keep the highest version (plain `datasets.load_dataset` reads "
                "main); "
                "to publish it as a back-port that is only tagged and leaves main alone, pass "
                "--backport (backport=True)"
            )
        return True
    if backport:
        raise VersionError(
            f"{repo_id}: --backport is for a version below the latest published one "
            f"({latest[1].name[1:] if latest else 'none yet'}); {version} is the newest: publish "
            "it without --backport"
        )
    return False


def _backport_base(refs, version: str, repo_id: str) -> str:
    """The commit a back-port builds on: the highest tag below it, else main's head."""
    below = [ref for number, ref in _published(refs) if number < parse_version(version)]
    return (
        below[-1].target_commit
        if below
        else _branch_head(refs, repo_id, constants.DEFAULT_REVISION)
    )


def _branch_head(refs, repo_id: str, branch: str = constants.DEFAULT_REVISION) -> str:
    for ref in refs.branches:
        if ref.name == branch:
            return ref.target_commit
    raise HubError(f"{repo_id}: the repo has no {branch} branch to publish on; create it first")


def _refuse_existing_tag(refs, tag: str, repo_id: str) -> None:
    for ref in refs.tags:
        if ref.name == tag:
            raise VersionError(
                f"{repo_id}: tag {tag} already exists (commit {ref.target_commit[:12]}); published "
                "versions are immutable: build the release under the next version number"
            )


@dataclass(frozen=True)
class _Target:
    """Where a release commit goes: the repo, the branch, and the commit it must follow."""

    repo_id: str
    branch: str
    parent: str


def _operations(release_dir: Path, manifest: dict, files, deleted) -> list:
    """The commit's operations; every listed file's sha256 is checked as it will be sent."""
    operations = []
    for path, _ in files:
        operation = CommitOperationAdd(path, str(release_dir / path))  # hashes the file now
        expected = manifest["files"].get(path)
        if expected is not None and operation.upload_info.sha256.hex() != expected["sha256"]:
            raise IntegrityError(
                f"{release_dir / path}: changed since it was verified (sha256 no longer matches "
                "manifest.json); nothing was sent: stop whatever writes into the release folder, "
                "then re-run"
            )
        operations.append(operation)
    return operations + [CommitOperationDelete(path) for path in deleted]


def _commit(api, call, release_dir, manifest, target: _Target, files, deleted) -> str:
    """One commit with every release file and the deletion of files no longer in it."""
    version = manifest["version"]
    repo_id, parent = target.repo_id, target.parent

    def attempt():
        operations = _operations(release_dir, manifest, files, deleted)
        # After a lost reply the commit may already be there: retry only from the same parent.
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
        head = _branch_head(refs, repo_id, target.branch)
        if head != parent:
            remote = _remote_files(api, repo_id, head)
            if _holds_release(remote, _local_ids(release_dir, files, remote)):
                return head
        return api.create_commit(
            repo_id,
            operations,
            repo_type=REPO_TYPE,
            revision=target.branch,
            commit_message=f"Release {version}",
            commit_description=f"hhdata release {version}: {len(files)} files",
            parent_commit=parent,
        ).oid

    try:
        return call(attempt, f"committing release {version}")
    except HubError as error:
        if getattr(error, "status", None) == 412:
            raise HubError(
                f"{repo_id}: the branch {target.branch} moved since commit {parent[:12]}, so the "
                "release "
                f"commit was refused and nothing was tagged; see what was published meanwhile "
                f"(`hhdata versions {repo_id}`): if it is a newer version, this one can only go "
                "out as a "
                "back-port (--backport, main unchanged); otherwise review the new commits and "
                "publish "
                "again without a pinned parent"
            ) from None
        raise


def _tag(api, call, repo_id: str, tag: str, commit: str, version: str) -> None:
    def attempt():
        try:
            api.create_tag(
                repo_id,
                tag=tag,
                revision=commit,
                repo_type=REPO_TYPE,
                tag_message=f"Release {version}",
            )
        except HfHubHTTPError as error:
            if http_status(error) != 409:
                raise
            refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
            if not any(ref.name == tag and ref.target_commit == commit for ref in refs.tags):
                _refuse_existing_tag(refs, tag, repo_id)

    call(attempt, f"tagging {tag}")
