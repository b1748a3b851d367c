"""Hub repositories stored as real git repositories, written with git plumbing.

Layout (what olah's local-mirror mode reads): ``<root>/<type>s/<org>/<name>/.git`` with an
empty work tree; LFS objects under ``.git/lfs/objects/<aa>/<bb>/<sha256>``; LFS files are
committed as git-lfs pointer blobs. Every Hub commit is one git commit on a branch; branch
and tag updates are compare-and-swap ``git update-ref`` calls, so a stale parent commit or
an existing tag can never be overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ZERO_OID = "0" * 40
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
LFS_POINTER_RE = re.compile(
    r"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n$"
)
GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in ("parquet", "arrow", "gz", "zip", "zst", "png", "jpg", "bin", "safetensors", "pt")
)
IDENTITY = {
    "GIT_AUTHOR_NAME": "hubserver",
    "GIT_AUTHOR_EMAIL": "hubserver@127.0.0.1",
    "GIT_COMMITTER_NAME": "hubserver",
    "GIT_COMMITTER_EMAIL": "hubserver@127.0.0.1",
}


class GitStoreError(Exception):
    """A repository operation the Hub would refuse; carries the HTTP status to answer."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree: its path, git blob id, size and LFS sha256 (or None)."""

    path: str
    blob: str
    size: int
    lfs_oid: str | None


class Repo:
    """One Hub repository: a git repository plus its LFS object store."""

    def __init__(self, path: Path):
        self.path = path
        self.git_dir = path / ".git"
        self.lfs_dir = self.git_dir / "lfs" / "objects"
        self.lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def git(self, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        """Run git in this repository and return its stdout (stripped)."""
        full_env = {**os.environ, **IDENTITY, **(env or {})}
        result = subprocess.run(
            ["git", "--git-dir", str(self.git_dir), "--work-tree", str(self.path), *args],
            input=input,
            capture_output=True,
            env=full_env,
            check=False,
        )
        if result.returncode != 0:
            raise GitStoreError(
                500, f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode().strip()

    def exists(self) -> bool:
        return self.git_dir.is_dir()

    def init(self) -> str:
        """Create the repository with an initial commit holding .gitattributes, as the Hub does."""
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "init", "-q", "-b", "main", str(self.path)], check=True, capture_output=True
        )
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        return self.commit(
            "main", "initial commit", {".gitattributes": GITATTRIBUTES.encode()}, {}, [], None
        )

    def resolve(self, revision: str) -> str | None:
        """The commit id a branch, tag or commit id names, or None."""
        try:
            return self.git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
        except GitStoreError:
            return None

    def refs(self, prefix: str) -> dict[str, str]:
        """Map of ref name (without prefix) to the commit it points at."""
        out = self.git("for-each-ref", "--format=%(refname) %(*objectname) %(objectname)", prefix)
        refs = {}
        for line in out.splitlines():
            name, *oids = line.split()
            refs[name[len(prefix) :]] = oids[0]
        return refs

    # -- LFS ------------------------------------------------------------------------------
    def lfs_path(self, oid: str) -> Path:
        return self.lfs_dir / oid[:2] / oid[2:4] / oid

    def has_lfs(self, oid: str, size: int | None = None) -> bool:
        path = self.lfs_path(oid)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def store_lfs(self, oid: str, stream, length: int) -> None:
        """Store an uploaded LFS object after checking its sha256; atomic (temp file, rename)."""
        target = self.lfs_path(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            remaining = length
            while remaining > 0:
                chunk = stream.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                tmp.write(chunk)
                remaining -= len(chunk)
        if remaining or digest.hexdigest() != oid:
            os.unlink(tmp.name)
            raise GitStoreError(
                400, f"uploaded content does not match LFS oid {oid} (or was truncated)"
            )
        os.replace(tmp.name, target)

    # -- trees and commits ----------------------------------------------------------------
    def tree(self, commit: str) -> dict[str, Entry]:
        """Every file of a commit, by path."""
        out = self.git("ls-tree", "-r", "-l", "-z", commit)
        entries = {}
        for record in filter(None, out.split("\0")):
            meta, path = record.split("\t", 1)
            _, kind, blob, size = meta.split()
            if kind != "blob":
                continue
            lfs_oid = None
            if int(size) < 200:
                match = LFS_POINTER_RE.match(self.git("cat-file", "blob", blob))
                if match:
                    lfs_oid, size = match.group(1), match.group(2)
            entries[path] = Entry(path, blob, int(size), lfs_oid)
        return entries

    def commit(
        self,
        branch: str,
        message: str,
        files: dict[str, bytes],
        lfs_files: dict[str, tuple[str, int]],
        deletions: list[str],
        parent: str | None,
        description: str = "",
    ) -> str:
        """Write one commit on `branch`; refuse it when the branch is no longer at `parent`.

        `files` are regular files (path -> content), `lfs_files` are path -> (sha256, size)
        of objects already in the LFS store, `deletions` are file or folder paths.
        """
        with self.lock:
            head = self.resolve(f"refs/heads/{branch}")
            if parent is not None and (head is None or not head.startswith(parent)):
                raise GitStoreError(
                    412,
                    f"parent commit {parent} is stale: branch {branch} is now at {head}",
                    "PreconditionFailed",
                )
            with tempfile.TemporaryDirectory() as tmp:
                env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                if head is not None:
                    self.git("read-tree", head, env=env)
                for path in deletions:
                    self.git(
                        "rm",
                        "-r",
                        "--cached",
                        "--ignore-unmatch",
                        "-q",
                        "--",
                        path.rstrip("/"),
                        env=env,
                    )
                for path, (oid, size) in lfs_files.items():
                    if not self.has_lfs(oid):
                        raise GitStoreError(
                            422, f"LFS object {oid} for {path} was never uploaded; upload it first"
                        )
                    files = {**files, path: LFS_POINTER.format(oid=oid, size=size).encode()}
                for path, content in files.items():
                    blob = self.git("hash-object", "-w", "--stdin", input=content)
                    self.git(
                        "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env
                    )
                tree = self.git("write-tree", env=env)
            parents = ["-p", head] if head is not None else []
            text = message if not description else f"{message}\n\n{description}"
            new = self.git("commit-tree", tree, *parents, "-m", text)
            self.git("update-ref", f"refs/heads/{branch}", new, head or ZERO_OID)
            return new

    def create_ref(self, ref: str, target: str) -> None:
        """Create a branch or tag; 409 when it exists already (never moved)."""
        with self.lock:
            commit = self.resolve(target)
            if commit is None:
                raise GitStoreError(404, f"revision {target} not found", "RevisionNotFound")
            if self.resolve(ref) is not None:
                raise GitStoreError(
                    409, f"{ref} already exists; refs are never moved or overwritten"
                )
            self.git("update-ref", ref, commit, ZERO_OID)

    def delete_ref(self, ref: str) -> None:
        with self.lock:
            if self.resolve(ref) is None:
                raise GitStoreError(404, f"{ref} not found", "RevisionNotFound")
            self.git("update-ref", "-d", ref)
