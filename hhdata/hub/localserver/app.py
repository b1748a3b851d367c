"""The write side of the local Hub, plus a reverse proxy to olah for everything it reads.

Implements the endpoints huggingface_hub 2.x calls to write: create/delete repo, whoami,
validate-yaml, preupload, the git-LFS batch API with basic upload and verify, the NDJSON
commit endpoint (pinned to ``parentCommit``), branches and tags. Every other request (repo
info, tree, paths-info, refs, commits, resolve) is forwarded to an olah server that serves
the same git repositories in offline local-mirror mode.

Bearer tokens: a request that carries a token not in ``tokens`` gets 401 on any endpoint;
writes without a token get 401. Faults for tests are set with ``POST /_hubserver/faults``;
each one that fires is appended to ``fired_log`` (JSON Lines) before it acts, so a test can
check it fired even when the fault killed the server. ``GET /_hubserver/stats`` reports the
request bytes received and the requests made, per route.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from hhdata.hub.localserver.gitstore import GitStoreError, Repo

TYPES = "models|datasets|spaces"
REPO = r"(?P<repo>[^/]+/[^/]+)"
LFS_SUFFIXES = tuple(
    f".{ext}"
    for ext in ("parquet", "arrow", "gz", "zip", "zst", "png", "jpg", "bin", "safetensors", "pt")
)
LFS_MIN_SIZE = 10 * 1024 * 1024
HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}
INVALID_TOKEN = "Invalid credentials in Authorization header"


class HubState:
    """Everything the server knows: where repos live, valid tokens, olah's address, faults."""

    def __init__(
        self,
        root: Path,
        tokens: dict[str, str],
        olah: tuple[str, int] | None,
        fired_log: Path | None = None,
    ):
        self.root = root
        self.fired_log = fired_log
        self.tokens = tokens  # token -> user name
        self.olah = olah
        self.faults: list[dict] = []
        self.lock = threading.Lock()  # guards faults, received and requests
        self.repos: dict[str, Repo] = {}
        self.repos_lock = threading.Lock()
        self.received: dict[str, int] = {}  # request body bytes by route, for benchmarks
        self.requests: dict[str, int] = {}  # requests by route: how many attempts a client made

    def repo(self, kind: str, repo_id: str) -> Repo:
        with self.repos_lock:
            key = f"{kind}/{repo_id}"
            if key not in self.repos:
                self.repos[key] = Repo(self.root / kind / repo_id)
            return self.repos[key]

    def take_fault(self, route: str, when: str) -> dict | None:
        """The first armed fault for this route and moment, counting it down."""
        with self.lock:
            for fault in self.faults:
                if (
                    fault["route"] == route
                    and fault.get("when", "before") == when
                    and fault["times"] > 0
                ):
                    fault["times"] -= 1
                    self.record_fired(fault, route, when)
                    return fault
        return None

    def record_fired(self, fault: dict, route: str, when: str) -> None:
        """Append the fault that is about to act to fired_log (flushed: an exit follows)."""
        if self.fired_log is None:
            return
        entry = {
            "route": route,
            "when": when,
            "action": fault["action"],
            "status": fault.get("status"),
        }
        with open(self.fired_log, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")


class HubHandler(BaseHTTPRequestHandler):
    """One request. Routes are matched in order; unmatched requests go to olah."""

    protocol_version = "HTTP/1.1"
    server_version = "hhdata-hubserver/1"
    state: HubState  # set on the subclass made by make_server

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        if os.environ.get("HUBSERVER_LOG"):
            super().log_message(format, *args)

    # -- plumbing -------------------------------------------------------------------------
    def reply(self, status: int, body: dict | None = None, error_code: str | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and body and "error" in body:
            self.send_header("X-Error-Message", body["error"])
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def body(self) -> bytes:
        self.body_read = True
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def user(self) -> str | None:
        """The user the bearer token names; raises 401 for a token the Hub does not know."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise GitStoreError(401, INVALID_TOKEN)
        return self.state.tokens[token]

    def writer(self) -> str:
        user = self.user()
        if user is None:
            raise GitStoreError(401, "a write needs a token: pass token= or set HF_TOKEN")
        return user

    def base_url(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def existing(self, kind: str, repo_id: str) -> Repo:
        repo = self.state.repo(kind, repo_id)
        if not repo.exists():
            raise GitStoreError(404, f"repository {kind}/{repo_id} not found", "RepoNotFound")
        return repo

    def dispatch(self) -> None:
        path = urlsplit(self.path).path
        self.body_read = False
        self.count_received(path)
        try:
            if self.command != "GET" or not path.startswith("/api/whoami"):
                self.user()
            for method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and method == self.command:
                    route = handler.__name__.removeprefix("do_route_")
                    self.fault(route, "before")
                    handler(self, **match.groupdict())
                    return
            self.proxy()
        except (GitStoreError, KeyError, ValueError, TypeError) as error:
            if not isinstance(error, GitStoreError):  # a malformed request body
                error = GitStoreError(400, f"malformed request: {type(error).__name__}: {error}")
            if not self.body_read:
                self.body()  # drain it, or the next request on this keep-alive connection breaks
            self.reply(error.status, {"error": str(error)}, error.error_code)

    def count_received(self, path: str) -> None:
        route = next(
            (
                h.__name__.removeprefix("do_route_")
                for m, pattern, h in ROUTES
                if m == self.command and re.fullmatch(pattern, path)
            ),
            "read",
        )
        with self.state.lock:
            received = self.state.received
            received[route] = received.get(route, 0) + int(self.headers.get("Content-Length") or 0)
            self.state.requests[route] = self.state.requests.get(route, 0) + 1

    def fault(self, route: str, when: str) -> None:
        fault = self.state.take_fault(route, when)
        if fault is None:
            return
        if fault["action"] == "exit":
            os._exit(17)  # a crash: no reply, no cleanup, as a killed server would
        raise GitStoreError(fault["status"], f"injected fault on {route}")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = dispatch

    def proxy(self) -> None:
        """Forward the request to olah unchanged and relay its answer."""
        if self.state.olah is None:
            raise GitStoreError(404, f"no route for {self.command} {self.path}")
        data = self.body() if self.command in ("POST", "PUT") else None
        conn = http.client.HTTPConnection(*self.state.olah, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn.request(self.command, olah_path(self.path), body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS | {"server", "date"}:
                self.send_header(key, value)
        length = (
            response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
        )
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        conn.close()

    # -- account and repos ----------------------------------------------------------------
    def do_route_whoami(self) -> None:
        user = self.user()
        if user is None:
            raise GitStoreError(401, "no token given")
        self.reply(
            200,
            {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}},
        )

    def do_route_create_repo(self) -> None:
        self.writer()
        payload = json.loads(self.body() or b"{}")
        kind = f"{payload.get('type') or 'model'}s"
        repo_id = (
            f"{payload['organization']}/{payload['name']}"
            if payload.get("organization")
            else payload["name"]
        )
        if "/" not in repo_id:
            repo_id = f"{self.writer()}/{repo_id}"
        repo = self.state.repo(kind, repo_id)
        prefix = "" if kind == "models" else f"{kind}/"
        url = f"{self.base_url()}/{prefix}{repo_id}"
        with repo.lock:
            if repo.exists():
                # like the Hub: 409 with the repo's url, which create_repo(exist_ok=True) returns
                self.reply(
                    409,
                    {"error": f"You already created this {kind[:-1]} repo: {repo_id}", "url": url},
                )
                return
            repo.path.mkdir(parents=True, exist_ok=True)
        repo.init()
        self.reply(200, {"url": url, "name": repo_id})

    def do_route_delete_repo(self) -> None:
        self.writer()
        payload = json.loads(self.body() or b"{}")
        kind = f"{payload.get('type') or 'model'}s"
        repo_id = (
            f"{payload['organization']}/{payload['name']}"
            if payload.get("organization")
            else payload["name"]
        )
        repo = self.existing(kind, repo_id)
        with repo.lock:
            shutil.rmtree(repo.path)
        self.reply(200, {})

    def do_route_validate_yaml(self) -> None:
        content = json.loads(self.body())["content"]
        match = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            self.reply(400, {"errors": [{"message": str(error)}], "warnings": []})
            return
        self.reply(200, {"errors": [], "warnings": []})

    # -- uploads --------------------------------------------------------------------------
    def do_route_preupload(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        store = self.existing(kind, repo)
        head = store.resolve(unquote(rev))
        current = store.tree(head) if head else {}
        files = []
        for item in json.loads(self.body())["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (
                item["path"].endswith(LFS_SUFFIXES)
                or item["size"] >= LFS_MIN_SIZE
                or b"\0" in sample
            )
            entry = current.get(item["path"])
            oid = None if entry is None else (entry.lfs_oid or entry.blob)
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self.reply(200, {"files": files, "commitOid": head})

    def do_route_lfs_batch(self, kind: str | None, repo: str) -> None:
        self.writer()
        kind = kind or "models"
        store = self.existing(kind, repo)
        request = json.loads(self.body())
        if request.get("operation") != "upload" or "basic" not in request.get(
            "transfers", ["basic"]
        ):
            raise GitStoreError(400, "this server supports only the basic upload transfer")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not store.has_lfs(obj["oid"], obj["size"]):
                href = f"{self.base_url()}/_lfs/{kind}/{repo}/{obj['oid']}"
                answer["actions"] = {
                    "upload": {"href": href, "header": {}},
                    "verify": {"href": f"{href}/verify", "header": {}},
                }
            objects.append(answer)
        self.reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def do_route_lfs_upload(self, kind: str, repo: str, oid: str) -> None:
        store = self.existing(kind, repo)
        self.body_read = True
        store.store_lfs(oid, self.rfile, int(self.headers.get("Content-Length") or 0))
        self.reply(200, {})

    def do_route_lfs_verify(self, kind: str, repo: str, oid: str) -> None:
        store = self.existing(kind, repo)
        claim = json.loads(self.body())
        if not store.has_lfs(oid, claim.get("size")):
            raise GitStoreError(404, f"LFS object {oid} of size {claim.get('size')} is not stored")
        self.reply(200, {})

    def do_route_commit(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        store = self.existing(kind, repo)
        header, files, lfs_files, deletions = {}, {}, {}, []
        for line in self.body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                oid = value["oid"]
                if not store.has_lfs(oid):
                    raise GitStoreError(
                        422,
                        f"LFS object {oid} for {value['path']} was never uploaded; upload it first",
                    )
                lfs_files[value["path"]] = (oid, store.lfs_path(oid).stat().st_size)
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
            else:
                raise GitStoreError(400, f"unsupported commit operation {item['key']!r}")
        branch = unquote(rev)
        if store.resolve(f"refs/heads/{branch}") is None:
            raise GitStoreError(404, f"branch {branch} not found", "RevisionNotFound")
        oid = store.commit(
            branch,
            header.get("summary", "commit"),
            files,
            lfs_files,
            deletions,
            header.get("parentCommit"),
            header.get("description", ""),
        )
        self.fault("commit", "after")
        prefix = "" if kind == "models" else f"{kind}/"
        self.reply(
            200,
            {
                "commitUrl": f"{self.base_url()}/{prefix}{repo}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
            },
        )

    # -- refs -----------------------------------------------------------------------------
    def do_route_create_tag(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        tag = json.loads(self.body())["tag"]
        self.existing(kind, repo).create_ref(f"refs/tags/{tag}", unquote(rev))
        self.reply(200, {})

    def do_route_delete_tag(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        self.existing(kind, repo).delete_ref(f"refs/tags/{unquote(rev)}")
        self.reply(200, {})

    def do_route_create_branch(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        payload = json.loads(self.body() or b"{}")
        self.existing(kind, repo).create_ref(
            f"refs/heads/{unquote(rev)}", payload.get("startingPoint") or "main"
        )
        self.reply(200, {})

    def do_route_delete_branch(self, kind: str, repo: str, rev: str) -> None:
        self.writer()
        self.existing(kind, repo).delete_ref(f"refs/heads/{unquote(rev)}")
        self.reply(200, {})

    # -- test control ---------------------------------------------------------------------
    def do_route_stats(self) -> None:
        self.writer()
        with self.state.lock:
            self.reply(
                200,
                {
                    "received_bytes": dict(self.state.received),
                    "requests": dict(self.state.requests),
                },
            )

    def do_route_faults(self) -> None:
        self.writer()
        with self.state.lock:
            self.state.faults = json.loads(self.body())
        self.reply(200, {"armed": len(self.state.faults)})


H = HubHandler
ROUTES = [
    ("GET", r"/api/whoami(-v2)?", H.do_route_whoami),
    ("POST", r"/api/repos/create", H.do_route_create_repo),
    ("DELETE", r"/api/repos/delete", H.do_route_delete_repo),
    ("POST", r"/api/validate-yaml", H.do_route_validate_yaml),
    ("POST", rf"/api/(?P<kind>{TYPES})/{REPO}/preupload/(?P<rev>[^/]+)", H.do_route_preupload),
    (
        "POST",
        rf"/(?:(?P<kind>datasets|spaces)/)?{REPO}\.git/info/lfs/objects/batch",
        H.do_route_lfs_batch,
    ),
    ("PUT", rf"/_lfs/(?P<kind>{TYPES})/{REPO}/(?P<oid>[0-9a-f]{{64}})", H.do_route_lfs_upload),
    (
        "POST",
        rf"/_lfs/(?P<kind>{TYPES})/{REPO}/(?P<oid>[0-9a-f]{{64}})/verify",
        H.do_route_lfs_verify,
    ),
    ("POST", rf"/api/(?P<kind>{TYPES})/{REPO}/commit/(?P<rev>[^/]+)", H.do_route_commit),
    ("POST", rf"/api/(?P<kind>{TYPES})/{REPO}/tag/(?P<rev>[^/]+)", H.do_route_create_tag),
    ("DELETE", rf"/api/(?P<kind>{TYPES})/{REPO}/tag/(?P<rev>[^/]+)", H.do_route_delete_tag),
    ("POST", rf"/api/(?P<kind>{TYPES})/{REPO}/branch/(?P<rev>[^/]+)", H.do_route_create_branch),
    ("DELETE", rf"/api/(?P<kind>{TYPES})/{REPO}/branch/(?P<rev>[^/]+)", H.do_route_delete_branch),
    ("POST", r"/_hubserver/faults", H.do_route_faults),
    ("GET", r"/_hubserver/stats", H.do_route_stats),
]


def olah_path(path: str) -> str:
    """The request path to send to olah.

    olah 0.5.4 answers repo info without a revision (``/api/datasets/org/name``, which
    datasets' push_to_hub calls) by asking huggingface.co for the latest commit, even in
    offline mode, so it reports 401 RepoNotFound for local repos; ask for ``main`` instead.
    """
    split = urlsplit(path)
    if re.fullmatch(rf"/api/(?:{TYPES})/[^/]+/[^/]+", split.path):
        return f"{split.path}/revision/main" + (f"?{split.query}" if split.query else "")
    return path


def make_server(
    host: str,
    port: int,
    root: Path,
    tokens: dict[str, str],
    olah: tuple[str, int] | None,
    fired_log: Path | None = None,
) -> ThreadingHTTPServer:
    """A ready-to-serve write server over the repositories under `root`."""
    handler = type(
        "BoundHubHandler", (HubHandler,), {"state": HubState(root, tokens, olah, fired_log)}
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
