"""Publish to and load from a local Hub end to end, faults included (hhdata.hub, hhdata.cli.hub)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

import hhdata
import hhdata.errors
import hhdata.release.card
import hhdata.release.manifest
from hhdata import hub, pipeline
from hhdata.cli import main as cli_main
from hhdata.errors import HubError, IntegrityError, VersionError
from hhdata.hub.localserver.releases import SAMPLE, build_release
from hhdata.release.load import load_release

FAST = {"retries": 1, "backoff": 0.01}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    out = tmp_path_factory.mktemp("releases")
    first = build_release(out, "1.0.0", count=24)
    second = build_release(
        out, "1.1.0", count=24, previous=first, added=6
    )  # a minor: one new subset
    return first, second


@pytest.fixture
def repo_id():
    return f"org/hh-{uuid.uuid4().hex[:8]}"


def files_in(folder) -> list[str]:
    """Every regular file under a folder, walked here (not with the code under test)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def git(local_hub, repo_id, *args) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(local_hub.repo_path(repo_id) / ".git"), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def commits_on_main(local_hub, repo_id) -> list[str]:
    out = subprocess.run(
        [
            "git",
            "--git-dir",
            str(local_hub.repo_path(repo_id) / ".git"),
            "log",
            "--format=%H %s",
            "main",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def test_publish_is_one_commit_then_a_tag_and_loads_back(local_hub, releases, repo_id, tmp_path):
    first, second = releases
    result = hub.publish(first, repo_id, token=local_hub.token, **FAST)
    assert (result.tag, result.reused_commit) == ("v1.0.0", False)
    assert [line.split(" ", 1)[1] for line in commits_on_main(local_hub, repo_id)] == [
        "Release 1.0.0",
        "initial commit",
    ]
    api = HfApi(endpoint=local_hub.endpoint)
    files = sorted(api.list_repo_files(repo_id, repo_type="dataset", revision="v1.0.0"))
    assert files == sorted([".gitattributes", *files_in(first)])

    later = hub.publish(second, repo_id, token=local_hub.token, **FAST)
    same = [
        path
        for path, _ in hub.release_files(second)
        if (first / path).is_file() and (first / path).read_bytes() == (second / path).read_bytes()
    ]
    assert later.unchanged == same and any(path.startswith("data/harmless-base/") for path in same)
    assert later.uploaded_bytes == later.bytes - sum(
        (second / path).stat().st_size for path in same
    )
    versions = hub.list_versions(repo_id)
    assert [(v.version, v.commit) for v in versions] == [
        ("1.0.0", result.commit),
        ("1.1.0", later.commit),
    ]
    assert all(v.date and v.date.startswith("20") for v in versions)

    local = load_release(first, "helpful", split="train")
    loaded = hhdata.load(repo_id, "helpful", split="train", version="1.0.0")
    assert loaded.num_rows == local.num_rows > 0
    assert loaded["id"] == local["id"] and set(loaded["family"]) == {"helpful"}
    latest = hub.load_from_hub(repo_id, "harmless", cache_dir=tmp_path / "cache")
    assert latest["test"].num_rows == load_release(second, "harmless", split="test").num_rows


def test_plain_datasets_load_dataset_reads_the_tagged_release(
    local_hub, releases, repo_id, tmp_path
):
    first, _ = releases
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    code = (
        "import datasets, json, sys\n"
        f"ds = datasets.load_dataset({repo_id!r}, 'helpful', revision='v1.0.0')\n"
        "print(json.dumps({s: ds[s].num_rows for s in ds} | {'family': "
        "sorted(set(ds['train']['family']))}))\n"
    )
    env = {**os.environ, **local_hub.env(tmp_path / "hf-home")}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    local = load_release(first, "helpful")
    assert got == {
        "train": local["train"].num_rows,
        "test": local["test"].num_rows,
        "family": ["helpful"],
    }


def test_existing_tag_is_refused_and_nothing_is_committed(local_hub, releases, repo_id):
    first, _ = releases
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    before = commits_on_main(local_hub, repo_id)
    with pytest.raises(VersionError, match=r"tag v1\.0\.0 already exists .* immutable"):
        hub.publish(first, repo_id, token=local_hub.token, **FAST)
    assert commits_on_main(local_hub, repo_id) == before


def test_stale_parent_commit_refuses_the_release_and_tags_nothing(local_hub, releases, repo_id):
    first, second = releases
    reviewed = hub.publish(first, repo_id, token=local_hub.token, **FAST).commit
    HfApi(endpoint=local_hub.endpoint, token=local_hub.token).create_commit(
        repo_id,
        [CommitOperationAdd("NOTES.md", b"someone else's commit\n")],
        repo_type="dataset",
        commit_message="concurrent edit",
    )
    with pytest.raises(
        HubError, match="branch main moved since commit .* nothing was tagged"
    ) as caught:
        hub.publish(second, repo_id, token=local_hub.token, parent_commit=reviewed, **FAST)
    assert "--backport" in str(caught.value) and "then re-run publish" not in str(caught.value)
    assert [v.version for v in hub.list_versions(repo_id)] == ["1.0.0"]


def test_bad_token_is_a_clear_error_that_never_shows_the_token(local_hub, releases, repo_id):
    first, _ = releases
    with pytest.raises(HubError) as caught:
        hub.publish(first, repo_id, token=local_hub.bad_token, **FAST)
    assert "401" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert local_hub.bad_token not in str(caught.value)


def test_cli_publish_and_versions_never_print_the_token(
    local_hub, releases, repo_id, capsys, monkeypatch
):
    first, _ = releases
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    assert cli_main(["publish", str(first), "--repo", repo_id, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert (
        "dry run: would publish" in dry
        and "data/helpful-fixture/train-00000-of-00001.parquet" in dry
    )
    assert not local_hub.repo_path(repo_id).exists()  # a dry run sends nothing

    assert cli_main(["publish", str(first), "--repo", repo_id]) == 0
    assert cli_main(["versions", repo_id]) == 0
    assert cli_main(["publish", str(first), "--repo", repo_id]) == 2
    monkeypatch.setenv("HF_TOKEN", local_hub.bad_token)
    assert cli_main(["publish", str(first), "--repo", f"{repo_id}-b", "--retries", "0"]) == 2
    out, err = capsys.readouterr()
    assert f"published {repo_id} v1.0.0" in out and "\tv1.0.0\t" in out
    assert "already exists" in err and "401" in err
    for token in (local_hub.token, local_hub.bad_token):
        assert token not in out + err


def test_token_from_the_hub_login(local_hub, releases, repo_id, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text(local_hub.token + "\n")  # what `hf auth login` stores
    assert hub.publish(releases[0], repo_id, **FAST).tag == "v1.0.0"


def test_transient_server_errors_are_retried(local_hub, releases, repo_id):
    first, _ = releases
    local_hub.arm_faults(
        [
            {"route": "preupload", "action": "status", "status": 503, "times": 2},
            {"route": "create_tag", "action": "status", "status": 502, "times": 1},
        ]
    )
    result = hub.publish(first, repo_id, token=local_hub.token, retries=3, backoff=0.01)
    assert [v.tag for v in hub.list_versions(repo_id)] == [result.tag]
    assert [(f["route"], f["status"]) for f in local_hub.fired_faults()] == [
        ("preupload", 503),
        ("preupload", 503),
        ("create_tag", 502),
    ]


@pytest.mark.parametrize("when", ["before", "after"])
def test_server_killed_mid_publish_then_a_clean_rerun_completes(local_hub, releases, repo_id, when):
    """The server dies on the commit request: before writing it, or after (reply lost)."""
    first, _ = releases
    local_hub.arm_faults([{"route": "commit", "action": "exit", "when": when, "times": 1}])
    try:
        with pytest.raises(HubError, match="safe to re-run the same command"):
            hub.publish(first, repo_id, token=local_hub.token, **FAST)
        assert not local_hub.front_alive()
        assert local_hub.fired_faults() == [
            {"route": "commit", "when": when, "action": "exit", "status": None}
        ]
    finally:
        local_hub.start_front()
    assert hub.list_versions(repo_id) == []  # no tag until the commit is complete
    result = hub.publish(first, repo_id, token=local_hub.token, **FAST)
    assert result.reused_commit is (when == "after")
    subjects = [line.split(" ", 1)[1] for line in commits_on_main(local_hub, repo_id)]
    assert subjects == ["Release 1.0.0", "initial commit"]
    assert hub.load_from_hub(repo_id, "all", split="test", version="1.0.0").num_rows > 0


def test_tampered_file_on_the_hub_is_refused_on_load(local_hub, releases, repo_id, tmp_path):
    first, _ = releases
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    manifest = json.loads((first / "manifest.json").read_text())
    target = "data/helpful-fixture/train-00000-of-00001.parquet"
    stored = local_hub.lfs_object(repo_id, manifest["files"][target]["sha256"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=rf"{target}: sha256 .* does not match manifest"
    ) as caught:
        hub.load_from_hub(
            repo_id, "helpful", split="train", version="1.0.0", cache_dir=tmp_path / "c"
        )
    message = str(caught.value)
    assert (
        "cache or on the Hub" in message
        and "hf cache delete" in message
        and str(tmp_path / "c") in message
    )


def test_unknown_version_lists_the_published_ones(local_hub, releases, repo_id):
    hub.publish(releases[0], repo_id, token=local_hub.token, **FAST)
    with pytest.raises(VersionError, match="no version 9.9.9; published versions: 1.0.0"):
        hub.load_from_hub(repo_id, "all", version="9.9.9")


def test_upstream_layout_is_fetched_and_checked_against_its_checksums(local_hub, tmp_path):
    upstream = "Anthropic/hh-rlhf"
    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token)
    if not local_hub.repo_path(upstream).exists():
        api.create_repo(upstream, repo_type="dataset")
        red_team = gzip.compress(b'{"transcript": "\\n\\nHuman: hi", "rating": 0}\n', mtime=0)
        api.create_commit(
            upstream,
            [
                CommitOperationAdd("harmless-base/test.jsonl.gz", str(SAMPLE)),
                CommitOperationAdd("red-team-attempts/red_team_attempts.jsonl.gz", red_team),
                CommitOperationAdd("README.md", b"# hh-rlhf\n"),
            ],
            repo_type="dataset",
            commit_message="upstream layout",
        )
    everything = hub.fetch_upstream(upstream, cache_dir=tmp_path / "c")
    assert everything.verified == ["harmless-base/test.jsonl.gz"]
    assert everything.unverified == [
        "red-team-attempts/red_team_attempts.jsonl.gz"
    ]  # no checksum recorded
    fetched = hub.fetch_upstream(upstream, ["harmless-base"], cache_dir=tmp_path / "c")
    assert (fetched.verified, fetched.unverified) == (["harmless-base/test.jsonl.gz"], [])
    on_disk = sorted(p.relative_to(fetched.folder).as_posix() for p in fetched.folder.rglob("*.gz"))
    assert on_disk == ["harmless-base/test.jsonl.gz"]  # the wider download is not in this folder
    assert (fetched.folder / on_disk[0]).read_bytes() == SAMPLE.read_bytes()
    raw = hhdata.load(upstream, "harmless-base", split="test")
    assert raw.num_rows == 2312 and set(raw.column_names) == {"chosen", "rejected"}
    built = pipeline.build_release(f"hf://{upstream}", version="1.0.0", out=tmp_path / "out")
    assert built.manifest["accounting"]["read"] == 2312  # red-team attempts are not read as pairs

    forged = tmp_path / "forged.jsonl.gz"
    shutil.copy(SAMPLE, forged)
    with open(forged, "ab") as handle:
        handle.write(b"\0")
    api.create_commit(
        upstream,
        [CommitOperationAdd("harmless-base/test.jsonl.gz", str(forged))],
        repo_type="dataset",
        commit_message="not the upstream bytes",
    )
    with pytest.raises(IntegrityError, match="UPSTREAM_MANIFEST.md records 742801 bytes"):
        hub.fetch_upstream(upstream, cache_dir=tmp_path / "c2")


def test_dry_run_needs_no_token_and_lists_every_file(releases):
    first, _ = releases
    result = hub.publish(first, "org/never-sent", dry_run=True, endpoint="http://127.0.0.1:9")
    assert result.dry_run and result.commit is None
    assert [path for path, _ in result.files] == files_in(first)
    assert result.bytes == sum((first / path).stat().st_size for path, _ in result.files)
    assert {"README.md", "manifest.json", "CHANGELOG.md", "croissant.json"} <= {
        p for p, _ in result.files
    }


def test_lost_commit_reply_is_not_committed_twice(local_hub, releases, repo_id):
    """The commit lands but the client sees a 503: the retry finds it on the branch and tags it."""
    first, _ = releases
    local_hub.arm_faults(
        [{"route": "commit", "action": "status", "status": 503, "when": "after", "times": 1}]
    )
    result = hub.publish(first, repo_id, token=local_hub.token, retries=2, backoff=0.01)
    assert [(f["route"], f["when"]) for f in local_hub.fired_faults()] == [("commit", "after")]
    assert [line.split(" ", 1)[1] for line in commits_on_main(local_hub, repo_id)] == [
        "Release 1.0.0",
        "initial commit",
    ]
    assert [(v.tag, v.commit) for v in hub.list_versions(repo_id)] == [("v1.0.0", result.commit)]


def test_a_tampered_local_release_is_not_published(local_hub, releases, repo_id, tmp_path, capsys):
    copy = tmp_path / "1.0.0"
    shutil.copytree(releases[0], copy)
    target = copy / "data" / "harmless-base" / "test-00000-of-00001.parquet"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        hub.publish(copy, repo_id, token=local_hub.token, **FAST)
    assert cli_main(["publish", str(copy), "--repo", repo_id, "--token", local_hub.token]) == 1
    assert "test-00000-of-00001.parquet" in capsys.readouterr().err
    assert not local_hub.repo_path(repo_id).exists()


# -- publish sends exactly the release (issue 10, item 1) ---------------------------------
def test_an_unlisted_file_or_a_symlink_stops_publish_before_anything_is_sent(
    local_hub, releases, repo_id, tmp_path, capsys
):
    first, second = releases
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    main_before = commits_on_main(local_hub, repo_id)
    copy = tmp_path / "1.1.0"
    shutil.copytree(second, copy)
    (copy / "evil.py").write_text("import os\n")
    (copy / "notes.txt").symlink_to("/etc/hostname")
    received = local_hub.received_bytes()

    assert cli_main(["publish", str(copy), "--repo", repo_id, "--token", local_hub.token]) == 2
    err = capsys.readouterr().err
    assert "evil.py is not listed in manifest.json" in err
    assert "notes.txt is a symbolic link (-> /etc/hostname)" in err and "Traceback" not in err
    with pytest.raises(
        hhdata.errors.ReleaseError, match="refusing to publish: notes.txt is a symbolic link"
    ):
        hub.publish(copy, repo_id, token=local_hub.token, **FAST)
    assert local_hub.received_bytes() == received  # not one request
    assert [v.tag for v in hub.list_versions(repo_id)] == ["v1.0.0"]
    assert commits_on_main(local_hub, repo_id) == main_before


def test_a_symlinked_data_file_is_refused_even_when_its_bytes_match(releases, tmp_path):
    copy = tmp_path / "1.0.0"
    shutil.copytree(releases[0], copy)
    data = copy / "data" / "harmless-base" / "test-00000-of-00001.parquet"
    real = tmp_path / "elsewhere.parquet"
    shutil.move(data, real)
    data.symlink_to(real)
    with pytest.raises(
        hhdata.errors.ReleaseError, match=r"test-00000-of-00001.parquet is a symbolic link"
    ):
        hub.publish(copy, "org/never-sent", dry_run=True)


# -- main always holds the latest version; back-ports only tag (item 2) -------------------
def test_an_older_version_is_refused_and_a_backport_only_tags(
    local_hub, releases, repo_id, tmp_path, capsys
):
    first, second = releases
    patch = build_release(tmp_path / "out", "1.0.1", count=24)
    v100 = hub.publish(first, repo_id, token=local_hub.token, **FAST).commit
    v110 = hub.publish(second, repo_id, token=local_hub.token, **FAST).commit

    assert cli_main(["publish", str(patch), "--repo", repo_id, "--token", local_hub.token]) == 2
    err = capsys.readouterr().err
    assert (
        "version 1.0.1 is below the latest published version 1.1.0" in err and "--backport" in err
    )
    assert git(local_hub, repo_id, "rev-parse", "main") == v110

    result = hub.publish(patch, repo_id, token=local_hub.token, backport=True, **FAST)
    assert git(local_hub, repo_id, "rev-parse", "main") == v110  # main untouched
    assert (
        git(local_hub, repo_id, "rev-parse", f"{result.commit}^") == v100
    )  # built on the tag below
    assert [v.version for v in hub.list_versions(repo_id)] == ["1.0.0", "1.0.1", "1.1.0"]
    assert (
        git(local_hub, repo_id, "branch", "--format=%(refname:short)") == "main"
    )  # side branch removed
    assert hhdata.load(repo_id, "harmless", split="test", version="1.0.1").num_rows > 0
    with pytest.raises(VersionError, match="--backport is for a version below the latest"):
        hub.publish(second, f"{repo_id}-new", token=local_hub.token, backport=True, **FAST)

    latest = hhdata.load(repo_id, "all")
    code = (
        "import datasets, json\n"
        f"ds = datasets.load_dataset({repo_id!r}, 'all')\n"  # plain datasets reads main
        "print(json.dumps({s: sorted(ds[s]['id']) for s in ds}))\n"
    )
    env = {**os.environ, **local_hub.env(tmp_path / "hf-home")}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        s: sorted(latest[s]["id"]) for s in latest
    }
    assert sum(latest[s].num_rows for s in latest) == 30  # 1.1.0: 24 rows and 6 added


# -- a damaged cache is healed, a bad Hub file blamed honestly (item 3) --------------------
def test_a_corrupted_cache_blob_is_downloaded_again(local_hub, releases, repo_id, tmp_path):
    first, _ = releases
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    cache = tmp_path / "cache"
    expected = hub.load_from_hub(
        repo_id, "helpful", split="train", version="1.0.0", cache_dir=cache
    )["id"]
    manifest = json.loads((first / "manifest.json").read_text())
    sha256 = manifest["files"]["data/helpful-fixture/train-00000-of-00001.parquet"]["sha256"]
    [blob] = list(cache.glob(f"datasets--*/blobs/{sha256}"))
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))

    again = hub.load_from_hub(repo_id, "helpful", split="train", version="1.0.0", cache_dir=cache)
    assert again["id"] == expected
    assert (
        hashlib.sha256(blob.read_bytes()).hexdigest() == sha256
    )  # the cache holds the good copy again
    # force_download fetches the good cached blob again (a new file replaces it); through
    # hhdata.load it still applies beside strict_roles, which wraps the load
    before = blob.stat().st_ino
    forced = hub.load_from_hub(
        repo_id, "helpful", split="train", version="1.0.0", cache_dir=cache, force_download=True
    )
    assert forced["id"] == expected and blob.stat().st_ino != before
    strict = hhdata.load(repo_id, "helpful", split="train", version="1.0.0", strict_roles=True)
    [env_blob] = list(
        Path(os.environ["HF_HUB_CACHE"]).glob(
            f"datasets--{repo_id.replace('/', '--')}/blobs/{sha256}"
        )
    )
    before = env_blob.stat().st_ino
    forced = hhdata.load(
        repo_id, "helpful", split="train", version="1.0.0", strict_roles=True, force_download=True
    )
    assert forced["id"] == strict["id"] and env_blob.stat().st_ino != before


# -- failures inside the LFS upload (item 9) ----------------------------------------------
def test_a_failed_lfs_upload_is_retried(local_hub, releases, repo_id):
    first, _ = releases
    local_hub.arm_faults([{"route": "lfs_upload", "action": "status", "status": 507, "times": 1}])
    result = hub.publish(first, repo_id, token=local_hub.token, retries=1, backoff=0.01)
    assert [(f["route"], f["status"]) for f in local_hub.fired_faults()] == [("lfs_upload", 507)]
    assert [v.tag for v in hub.list_versions(repo_id)] == [result.tag]


def test_a_failing_lfs_upload_is_a_clear_error_after_the_retries(
    local_hub, releases, repo_id, capsys
):
    first, _ = releases
    local_hub.arm_faults(
        [{"route": "lfs_upload", "action": "status", "status": 507, "times": 1000}]
    )
    batches = local_hub.requests().get("lfs_batch", 0)
    code = cli_main(
        ["publish", str(first), "--repo", repo_id, "--token", local_hub.token, "--retries", "1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the Hub is unreachable or failing while committing release 1.0.0" in err
    assert "507" in err and "safe to re-run the same command" in err
    fired = local_hub.fired_faults()
    assert len(fired) >= 2 and {(f["route"], f["status"]) for f in fired} == {("lfs_upload", 507)}
    assert (
        local_hub.requests()["lfs_batch"] - batches == 2
    )  # --retries 1: two attempts, each failed
    assert hub.list_versions(repo_id) == []


def test_server_killed_during_the_lfs_upload_then_a_rerun_completes(
    local_hub, releases, repo_id, capsys
):
    first, _ = releases
    local_hub.arm_faults([{"route": "lfs_upload", "action": "exit", "times": 1}])
    try:
        code = cli_main(
            ["publish", str(first), "--repo", repo_id, "--token", local_hub.token, "--retries", "0"]
        )
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and "safe to re-run the same command" in err
        assert not local_hub.front_alive()
        assert [f["action"] for f in local_hub.fired_faults()] == ["exit"]
    finally:
        local_hub.start_front()
    assert hub.list_versions(repo_id) == []
    assert hub.publish(first, repo_id, token=local_hub.token, **FAST).tag == "v1.0.0"


# -- a release that drops a subset removes its files from main (item 19) ------------------
def test_a_dropped_subset_leaves_main(local_hub, releases, repo_id, tmp_path):
    first, _ = releases
    dropped = build_release(
        tmp_path / "out", "2.0.0", count=24, previous=first, drop="helpful-fixture"
    )
    hub.publish(first, repo_id, token=local_hub.token, **FAST)
    result = hub.publish(dropped, repo_id, token=local_hub.token, **FAST)
    api = HfApi(endpoint=local_hub.endpoint)
    on_main = sorted(api.list_repo_files(repo_id, repo_type="dataset", revision="main"))
    assert on_main == sorted([".gitattributes", *files_in(dropped)])
    assert not any("helpful-fixture" in path for path in on_main)
    assert result.deleted == [
        f"data/helpful-fixture/{s}-00000-of-00001.parquet" for s in ("test", "train")
    ]
    old = api.list_repo_files(repo_id, repo_type="dataset", revision="v1.0.0")
    assert "data/helpful-fixture/train-00000-of-00001.parquet" in old  # the old tag keeps them


def test_a_release_with_no_rows_is_not_published(local_hub, tmp_path, repo_id, capsys, monkeypatch):
    # Today's manifest schema refuses kept 0, so build cannot write such a release; an
    # hhdata from before that rule (and before the generated usage text) could. Write one as
    # it did, then publish with today's code: the reason must be "no rows", not "rebuild".
    with monkeypatch.context() as older_hhdata:
        older_hhdata.setattr(
            hhdata.release.manifest, "validate_manifest", lambda manifest, where="": None
        )
        older_hhdata.setattr(hhdata.release.card, "usage", lambda manifest: "")
        empty = build_release(tmp_path / "out", "1.0.0", count=0)
    assert cli_main(["publish", str(empty), "--repo", repo_id, "--token", local_hub.token]) == 2
    assert "release 1.0.0 holds no rows" in capsys.readouterr().err
    assert not local_hub.repo_path(repo_id).exists()


def test_a_release_built_for_another_repo_is_not_published_there(
    local_hub, releases, repo_id, tmp_path, capsys
):
    """Its card's usage code and croissant.json's url name the repo it was built for."""
    copy = tmp_path / "1.0.0"
    shutil.copytree(releases[0], copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "org/elsewhere"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(hhdata.errors.ReleaseError, match="built for org/elsewhere"):
        hub.publish(copy, repo_id, token=local_hub.token, dry_run=True)
    assert cli_main(["publish", str(copy), "--repo", repo_id, "--token", local_hub.token]) == 2
    err = capsys.readouterr().err
    assert f"rebuild it with --name {repo_id}" in err and "Traceback" not in err
    assert not local_hub.repo_path(repo_id).exists()
