"""Load releases back from the Hugging Face Hub, pinned to a tag and verified byte for byte.

load_from_hub downloads the tagged revision ``v<version>`` (only manifest.json and the
files of the requested config) and hands it to hhdata.release.load, which checks every
data file's size and sha256 against the manifest before parsing it: a file changed on the
Hub is refused, not loaded. A mismatch is first blamed on the local cache: the files are
downloaded once more with ``force_download`` before the error is raised. The raw upstream
layout (``Anthropic/hh-rlhf``: ``<subset>/<split>.jsonl.gz``) is fetched with
fetch_upstream and checked against the checksums in hhdata/data/hh-rlhf/UPSTREAM_MANIFEST.md.

Endpoint, token and cache are read at call time: ``endpoint=`` / HF_ENDPOINT, ``token=`` /
HF_TOKEN / the Hub login, ``cache_dir=`` / HF_HUB_CACHE / HF_HOME.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huggingface_hub import constants, snapshot_download

from hhdata.errors import HubError, IntegrityError, VersionError
from hhdata.hub.client import REPO_TYPE, hub_api, list_versions, quiet_unless_terminal, retrying

UPSTREAM_REPO = "Anthropic/hh-rlhf"


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
    force_download: bool = False,
) -> Path:
    """Download the files of one config of release ``version`` (default: the latest tag).

    Returns the local snapshot folder (a release directory holding manifest.json and the
    config's data files), not yet verified: load_from_hub verifies before parsing. With
    ``force_download`` every file is fetched again, replacing what the cache holds.
    """
    from hhdata.release.load import config_files
    from hhdata.release.manifest import MANIFEST_NAME, read_manifest

    api = hub_api(token, endpoint)
    tag = _resolve_tag(repo_id, version, token=token, endpoint=endpoint)

    def fetch(patterns):
        return snapshot_download(
            repo_id,
            repo_type=REPO_TYPE,
            revision=tag,
            allow_patterns=patterns,
            endpoint=api.endpoint,
            token=api.token,
            cache_dir=_cache_dir(cache_dir),
            force_download=force_download,
        )

    folder = Path(
        retrying(
            lambda: fetch([MANIFEST_NAME]),
            retries=2,
            backoff=0.5,
            repo_id=repo_id,
            doing=f"downloading {tag}/{MANIFEST_NAME}",
        )
    )
    manifest = read_manifest(folder)
    wanted = sorted({f for files in config_files(manifest, config).values() for f in files})
    retrying(
        lambda: fetch([MANIFEST_NAME, *wanted]),
        retries=2,
        backoff=0.5,
        repo_id=repo_id,
        doing=f"downloading {tag}",
    )
    return folder


def _resolve_tag(repo_id, version, *, token, endpoint) -> str:
    versions = list_versions(repo_id, token=token, endpoint=endpoint)
    if not versions:
        raise VersionError(
            f"{repo_id}: no release tags (vX.Y.Z) on the Hub; publish one with `hhdata publish`"
        )
    if version is None:
        return versions[-1].tag
    tag = f"v{version.removeprefix('v')}"
    if tag not in {v.tag for v in versions}:
        raise VersionError(
            f"{repo_id}: no version {version}; published versions: "
            f"{', '.join(v.version for v in versions)}"
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
    force_download: bool = False,
):
    """Load a published release as ``datasets`` objects, every file checked against its manifest.

    ``version`` "1.0.0" loads tag v1.0.0 (default: the latest version). A DatasetDict, or
    one Dataset when ``split`` is given. A file that fails its check is downloaded once
    more (``force_download``), in case the cached copy was damaged; ``force_download=True``
    skips the cache from the start. ``Anthropic/hh-rlhf`` (the raw upstream layout,
    no manifest) is fetched with fetch_upstream and returned as raw chosen/rejected rows of
    the subset named by ``config``.

    >>> load_from_hub("org/hh-rlhf", "helpful", split="train", version="1.0.0")  # doctest: +SKIP
    Dataset({features: ['id', 'subset', 'family', 'split', 'prompt', ...], num_rows: ...})
    """
    from hhdata.release.load import load_release

    if repo_id == UPSTREAM_REPO:
        return _load_upstream(
            repo_id, config, split, version, token=token, endpoint=endpoint, cache_dir=cache_dir
        )

    def fetch(force: bool) -> Path:
        with quiet_unless_terminal():
            return download_release(
                repo_id,
                version,
                config,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
                force_download=force,
            )

    folder = fetch(force_download)
    try:
        return load_release(folder, config, split)
    except IntegrityError as error:
        if force_download:
            raise _bad_copy(repo_id, folder, cache_dir, error) from None
    folder = fetch(True)  # the cached copy may be what is damaged: fetch every file again, once
    try:
        return load_release(folder, config, split)
    except IntegrityError as error:
        raise _bad_copy(repo_id, folder, cache_dir, error) from None


def _bad_copy(repo_id: str, folder: Path, cache_dir, error: IntegrityError) -> IntegrityError:
    """The error for a file that failed its check in a fresh download: the cache or the Hub
    is bad."""
    cached = Path(_cache_dir(cache_dir)) / f"datasets--{repo_id.replace('/', '--')}"
    return IntegrityError(
        f"{repo_id}@{folder.name[:12]}: {error}. It was downloaded again and still differs from "
        "what "
        "the release's manifest recorded, so the copy in the cache or on the Hub is bad: clear the "
        f"cache (`hf cache delete`, or remove {cached}) and load with force_download=True; if it "
        "persists, the file on the Hub is bad: do not use it, report it to the repo owner"
    )


# -- the raw upstream layout --------------------------------------------------------------
@dataclass(frozen=True)
class UpstreamFiles:
    """A local copy of upstream files: folder, the files checked, and those with no recorded
    checksum."""

    folder: Path
    verified: list[str]
    unverified: list[str]

    def files(self, subset: str | None = None) -> list[Path]:
        return [
            self.folder / p
            for p in self.verified + self.unverified
            if subset is None or p.startswith(f"{subset}/")
        ]


def upstream_checksums() -> dict[str, tuple[int, str] | None]:
    """path -> (bytes, sha256) from UPSTREAM_MANIFEST.md; None where it records no checksum."""
    text = (
        resources.files("hhdata").joinpath("data/hh-rlhf/UPSTREAM_MANIFEST.md").read_text("utf-8")
    )
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
    # one commit for the listing and the download, even if the branch moves meanwhile
    commit = retrying(
        lambda: api.dataset_info(repo_id, revision=revision).sha,
        retries=2,
        backoff=0.5,
        repo_id=repo_id,
        doing=f"resolving {revision}",
    )
    listed = retrying(
        lambda: api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=commit),
        retries=2,
        backoff=0.5,
        repo_id=repo_id,
        doing="listing files",
    )
    wanted = [
        p
        for p in listed
        if re.fullmatch(r"[^/]+/[^/]+\.jsonl(\.gz)?", p)
        and (subsets is None or p.split("/")[0] in subsets)
    ]
    if not wanted:
        raise HubError(
            f"{repo_id}@{revision}: no <subset>/<file>.jsonl.gz "
            f"files{f' for {subsets}' if subsets else ''}"
        )
    snapshot = Path(
        retrying(
            lambda: snapshot_download(
                repo_id,
                repo_type=REPO_TYPE,
                revision=commit,
                allow_patterns=wanted,
                endpoint=api.endpoint,
                token=api.token,
                cache_dir=_cache_dir(cache_dir),
            ),
            retries=2,
            backoff=0.5,
            repo_id=repo_id,
            doing="downloading upstream files",
        )
    )
    sums = upstream_checksums()
    verified, unverified = [], []
    for relative in wanted:
        expected = sums.get(relative)
        if expected is None:
            unverified.append(relative)
            continue
        data = (snapshot / relative).read_bytes()
        actual = (len(data), hashlib.sha256(data).hexdigest())
        if actual != expected:
            raise IntegrityError(
                f"{repo_id}@{revision}/{relative}: {actual[0]} bytes, sha256 {actual[1]}; "
                f"UPSTREAM_MANIFEST.md records {expected[0]} bytes, sha256 {expected[1]}: "
                "this is not the upstream file, do not build from it"
            )
        verified.append(relative)
    return UpstreamFiles(_selection_folder(snapshot, wanted, cache_dir), verified, unverified)


def _selection_folder(snapshot: Path, wanted: list[str], cache_dir) -> Path:
    """A folder holding exactly `wanted` (links into the snapshot), so a build reads nothing else.

    The snapshot folder may hold more: files an earlier, wider download put there.
    """
    key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
    folder = Path(_cache_dir(cache_dir)) / "hhdata-upstream" / f"{snapshot.name}-{key}"
    for relative in wanted:
        link = folder / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((snapshot / relative).resolve())
    return folder


def _load_upstream(repo_id, config, split, version, *, token, endpoint, cache_dir):
    import datasets

    revision = version or "main"
    with quiet_unless_terminal():
        fetched = fetch_upstream(
            repo_id,
            [config] if config else None,
            revision=revision,
            token=token,
            endpoint=endpoint,
            cache_dir=cache_dir,
        )
    by_split: dict[str, list[str]] = {}
    for path in fetched.files(config):
        name = path.name.split(".")[0]
        by_split.setdefault(name, []).append(str(path))
    if split is not None and split not in by_split:
        raise HubError(
            f"{repo_id}@{revision}: no split {split!r} for {config or 'any subset'}; have "
            f"{sorted(by_split)}"
        )
    data_files = {split: by_split[split]} if split else by_split
    loaded = datasets.load_dataset(
        "json", data_files=data_files, cache_dir=os.environ.get("HF_DATASETS_CACHE")
    )
    return loaded[split] if split else loaded
