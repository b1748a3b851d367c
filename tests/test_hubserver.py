"""The local Hub (tests/hubserver) speaks the protocol huggingface_hub 2.x writes and reads.

Each test drives it with the real HfApi client; the git repository behind each Hub repo
is inspected with git itself to check that every Hub commit is a real git commit.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid

import httpx2 as httpx
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

PARQUET_LIKE = b"PAR1" + bytes(range(256)) * 8 + b"PAR1"


def git(repo_path, *args) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(repo_path / ".git"), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def api(local_hub):
    return HfApi(endpoint=local_hub.endpoint, token=local_hub.token)


@pytest.fixture
def repo(api):
    repo_id = f"org/hs-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id, repo_type="dataset")
    return repo_id


def test_commit_with_regular_and_lfs_files_is_a_real_git_commit(local_hub, api, repo, tmp_path):
    info = api.create_commit(
        repo,
        [
            CommitOperationAdd("README.md", b"# card\n"),
            CommitOperationAdd("data/x.parquet", PARQUET_LIKE),
        ],
        repo_type="dataset",
        commit_message="add data",
    )
    path = local_hub.repo_path(repo)
    assert git(path, "rev-parse", "main") == info.oid
    assert git(path, "log", "--format=%s", "main").splitlines() == ["add data", "initial commit"]
    pointer = git(path, "cat-file", "blob", f"{info.oid}:data/x.parquet")
    sha = hashlib.sha256(PARQUET_LIKE).hexdigest()
    assert pointer.splitlines()[1:] == [f"oid sha256:{sha}", f"size {len(PARQUET_LIKE)}"]
    assert local_hub.lfs_object(repo, sha).read_bytes() == PARQUET_LIKE

    tree = {f.path: f for f in api.list_repo_tree(repo, repo_type="dataset", recursive=True)}
    assert tree["data/x.parquet"].lfs.sha256 == sha and tree["README.md"].lfs is None
    got = hf_hub_download(
        repo,
        "data/x.parquet",
        repo_type="dataset",
        revision=info.oid,
        endpoint=local_hub.endpoint,
        cache_dir=tmp_path,
    )
    assert open(got, "rb").read() == PARQUET_LIKE


def test_received_bytes_count_what_crossed_the_wire(local_hub, api, repo):
    before = local_hub.received_bytes()
    api.create_commit(
        repo,
        [CommitOperationAdd("d/y.parquet", PARQUET_LIKE[::-1])],
        repo_type="dataset",
        commit_message="y",
    )
    again = api.create_commit(
        repo,
        [CommitOperationAdd("d/z.parquet", PARQUET_LIKE[::-1])],
        repo_type="dataset",
        commit_message="same bytes, new path",
    )
    after = local_hub.received_bytes()
    assert after["lfs_upload"] - before.get("lfs_upload", 0) == len(PARQUET_LIKE)  # stored once
    assert after["commit"] > before.get("commit", 0)
    assert api.list_repo_files(repo, repo_type="dataset", revision=again.oid)[-2:] == [
        "d/y.parquet",
        "d/z.parquet",
    ]


def test_unchanged_files_are_skipped_and_deletions_commit(api, repo):
    first = api.create_commit(
        repo,
        [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("b.txt", b"b")],
        repo_type="dataset",
        commit_message="two",
    )
    again = api.create_commit(
        repo, [CommitOperationAdd("a.txt", b"a")], repo_type="dataset", commit_message="same"
    )
    assert again.oid == first.oid  # the preupload oid told the client nothing changed
    gone = api.create_commit(
        repo, [CommitOperationDelete("b.txt")], repo_type="dataset", commit_message="rm"
    )
    assert api.list_repo_files(repo, repo_type="dataset", revision=gone.oid) == [
        ".gitattributes",
        "a.txt",
    ]


def test_stale_parent_commit_is_refused_and_branch_unchanged(api, repo):
    base = api.list_repo_refs(repo, repo_type="dataset").branches[0].target_commit
    moved = api.create_commit(
        repo, [CommitOperationAdd("a.txt", b"1")], repo_type="dataset", commit_message="m"
    )
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(
            repo,
            [CommitOperationAdd("a.txt", b"2")],
            repo_type="dataset",
            commit_message="late",
            parent_commit=base,
        )
    assert caught.value.response.status_code == 412
    assert api.list_repo_refs(repo, repo_type="dataset").branches[0].target_commit == moved.oid


def test_tags_are_never_moved_and_branches_work(api, repo):
    first = api.list_repo_refs(repo, repo_type="dataset").branches[0].target_commit
    api.create_tag(repo, tag="v1.0.0", revision=first, repo_type="dataset")
    second = api.create_commit(
        repo, [CommitOperationAdd("a.txt", b"x")], repo_type="dataset", commit_message="x"
    )
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_tag(repo, tag="v1.0.0", revision=second.oid, repo_type="dataset")
    assert caught.value.response.status_code == 409
    api.create_branch(repo, branch="dev", revision=first, repo_type="dataset")
    on_dev = api.create_commit(
        repo,
        [CommitOperationAdd("dev.txt", b"d")],
        repo_type="dataset",
        commit_message="dev",
        revision="dev",
    )
    refs = api.list_repo_refs(repo, repo_type="dataset")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0.0": first}
    assert {b.name: b.target_commit for b in refs.branches} == {
        "main": second.oid,
        "dev": on_dev.oid,
    }
    api.delete_branch(repo, branch="dev", repo_type="dataset")
    assert [b.name for b in api.list_repo_refs(repo, repo_type="dataset").branches] == ["main"]


@pytest.mark.parametrize("call", ["write", "read"])
def test_bad_token_gets_401(local_hub, repo, call):
    bad = HfApi(endpoint=local_hub.endpoint, token=local_hub.bad_token)
    with pytest.raises(HfHubHTTPError) as caught:
        if call == "write":
            bad.create_commit(
                repo, [CommitOperationAdd("a.txt", b"a")], repo_type="dataset", commit_message="x"
            )
        else:
            bad.list_repo_refs(repo, repo_type="dataset")
    assert caught.value.response.status_code == 401
    assert local_hub.bad_token not in str(caught.value)


def test_write_without_token_gets_401_read_without_token_works(local_hub, repo):
    anonymous = httpx.post(
        f"{local_hub.endpoint}/api/datasets/{repo}/commit/main",
        content=b'{"key":"header","value":{"summary":"x"}}\n',
    )
    assert anonymous.status_code == 401
    assert httpx.get(f"{local_hub.endpoint}/api/datasets/{repo}/refs").status_code == 200


def test_lfs_upload_with_wrong_content_or_missing_object_is_refused(local_hub, api, repo):
    oid = hashlib.sha256(b"the real bytes").hexdigest()
    put = httpx.put(f"{local_hub.endpoint}/_lfs/datasets/{repo}/{oid}", content=b"other bytes")
    assert put.status_code == 400
    ndjson = (
        b'{"key":"header","value":{"summary":"x"}}\n'
        + (
            '{"key":"lfsFile","value":{"path":"d.parquet","algo":"sha256",'
            f'"oid":"{oid}","size":14}}}}\n'
        ).encode()
    )
    commit = httpx.post(
        f"{local_hub.endpoint}/api/datasets/{repo}/commit/main",
        content=ndjson,
        headers={"Authorization": f"Bearer {local_hub.token}"},
    )
    assert commit.status_code == 422 and "never uploaded" in commit.json()["error"]


def test_creating_an_existing_repo_is_409(api, repo):
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo(repo, repo_type="dataset")
    assert caught.value.response.status_code == 409
    assert api.create_repo(repo, repo_type="dataset", exist_ok=True).repo_id == repo


def test_repo_info_without_revision_reads_main(local_hub, api, repo):
    head = api.create_commit(
        repo, [CommitOperationAdd("a.txt", b"a")], repo_type="dataset", commit_message="a"
    )
    assert api.dataset_info(repo).sha == head.oid  # GET /api/datasets/{repo}, no revision


def test_malformed_commit_is_400_and_the_server_keeps_serving(local_hub, api, repo):
    bad = httpx.post(
        f"{local_hub.endpoint}/api/datasets/{repo}/commit/main",
        content=b"not json\n",
        headers={"Authorization": f"Bearer {local_hub.token}"},
    )
    assert bad.status_code == 400 and "malformed" in bad.json()["error"]
    assert api.list_repo_refs(repo, repo_type="dataset").branches[0].name == "main"
