"""In-process fake of the Hugging Face Hub HTTP API, so tests can push and download with the real
`huggingface_hub` client (2.4) against 127.0.0.1 instead of mocking it.

Endpoints (model repos with "namespace/name" ids; every upload is "regular", never LFS/Xet):
  POST /api/repos/create                        create_repo (409 + {"url"} when it exists, like the Hub)
  POST /api/models/{id}/branch/{branch}         create_branch (409 when it exists)
  GET  /api/models/{id}/refs                    list_repo_refs
  POST /api/models/{id}/preupload/{branch}      first step of create_commit / upload_file / upload_folder
  POST /api/models/{id}/commit/{branch}         NDJSON: header, file (base64), deletedFile, deletedFolder;
                                                ?create_pr=1 commits to a new refs/pr/N branched off {branch}
  GET  /api/models/{id}[/revision/{rev}]        model_info / repo_info / repo_exists / revision_exists
  GET  /api/models/{id}/tree/{rev}[/{path}]     list_repo_tree / list_repo_files
  HEAD|GET /{id}/resolve/{rev}/{path}           hf_hub_download / get_hf_file_metadata / file_exists
  GET  /api/whoami-v2; POST /api/validate-yaml (sent when a README.md is uploaded);
  GET  /api/agent-harnesses (fetched once per process to build the User-Agent)

How the client retries 408/429/500/502/503/504 (Xet disabled, as use_fake_hub() and env() do):
  commit, create_repo, create_branch, refs, model_info, whoami: never retried, so fail_next(kind)
    once makes the call raise HfHubHTTPError. (With Xet on, upload_folder retries its commit 5 times.)
  preupload, tree: 5 retries with 1+2+4+8+8 s sleeps, so times=6 and ~23 s are needed to fail.
  resolve: get_hf_file_metadata / file_exists: one HEAD, no retry. hf_hub_download: one HEAD, then
    (file not cached) 1 + 5 retries: 7 failures raise LocalEntryNotFoundError; a cached file is
    returned silently instead. Its GET is not retried.
  A status the client never retries (e.g. 501) fails at the first attempt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

KINDS = {"create_repo", "create_branch", "refs", "preupload", "commit", "model_info", "tree", "resolve", "whoami",
         "validate_yaml", "agent_harnesses"}
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_NO_HARNESSES = {"standardEnvVars": [], "harnesses": {}}


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1: the Hub's ETag and preupload "oid" of a regular file (the client compares it)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]]  # oldest commit first


class HubError(Exception):
    """An error answered like the Hub: JSON {"error": ...} plus the X-Error-* headers the client maps."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}

    def response(self):
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message, **self.extra}, self.status, headers)


def _json(obj, status=200, headers=None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always drain the request
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, payload = self.hub._dispatch(self.command, self.path, headers, body)
        self.send_response(status)
        for name, value in {**out_headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *args):
        pass


class FakeHub:
    """A Hub on 127.0.0.1 holding model repos in memory; one user (`user`) owns every token.

    `requests` records (method, raw path without query, headers with lower-cased names) of every call.
    """

    def __init__(self, tokens=("hf_fake_token",), user: str = "fake-user"):
        self.tokens, self.user = set(tokens), user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""
        self._faults: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._home: str | None = None
        self._n = 0

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()  # fast stop()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, kind: str, times: int = 1, status: int = 500) -> None:
        """Answer the next `times` requests of `kind` (see KINDS) with `status`; nothing is changed."""
        if kind not in KINDS:
            raise ValueError(f"unknown endpoint kind {kind!r}, expected one of {sorted(KINDS)}")
        with self._lock:
            self._faults.setdefault(kind, []).extend([status] * times)

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """Seed a repo without HTTP; like the Hub, "main" starts with a commit holding .gitattributes."""
        with self._lock:
            initial = self._new_commit("initial commit", {".gitattributes": GITATTRIBUTES})
            self.repos[repo_id] = Repo(private, {"main": [initial]})
            return self.repos[repo_id]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._history(self.repos[repo_id], revision)[-1].files)

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of `branch`, oldest first."""
        with self._lock:
            return list(self.repos[repo_id].branches[branch])

    def is_private(self, repo_id: str) -> bool:
        return self.repos[repo_id].private

    def env(self, token: str | None = None, home: str | os.PathLike | None = None) -> dict[str, str]:
        """Env for a subprocess: subprocess.run(..., env={**os.environ, **hub.env(token=...)}).

        Empty values blank out inherited ones (HF_TOKEN, staging mode...): the client treats "" as unset.
        HF_HOME defaults to a temp dir removed by stop(); HF_TOKEN_PATH is set so no real login is read.
        """
        if home is None:
            home = self._home = self._home or tempfile.mkdtemp(prefix="fake_hub_")
        home = str(home)
        return {
            "HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": home, "HF_HUB_CACHE": os.path.join(home, "hub"), "HF_TOKEN_PATH": os.path.join(home, "token"),
            "HF_TOKEN": token or "", "HUGGING_FACE_HUB_TOKEN": "", "HF_OIDC_RESOURCE": "",
            "HUGGINGFACE_CO_STAGING": "", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }

    def _dispatch(self, method, raw_path, headers, body):
        url = urlsplit(raw_path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]  # split first: revisions arrive as "a%2Fb"
        req = SimpleNamespace(method=method, headers=headers, body=body,
                              query={k: v[-1] for k, v in parse_qs(url.query).items()})
        with self._lock:
            self.requests.append((method, url.path, headers))
            try:
                kind, handler, args = self._route(method, parts)
                if self._faults.get(kind):
                    raise HubError(self._faults[kind].pop(0), "Internal Error - We're working hard to fix this!")
                return handler(self._user(headers), req, *args)
            except HubError as e:
                return e.response()

    def _route(self, method, p):
        match (method, p):
            case ("GET", ["api", "whoami-v2"]):
                return "whoami", self._whoami, ()
            case ("POST", ["api", "repos", "create"]):
                return "create_repo", self._create_repo, ()
            case ("POST", ["api", "validate-yaml"]):
                return "validate_yaml", lambda user, req: _json({"errors": [], "warnings": []}), ()
            case ("GET", ["api", "agent-harnesses"]):
                return "agent_harnesses", lambda user, req: _json(_NO_HARNESSES), ()
            case ("GET", ["api", "models", ns, name]):
                return "model_info", self._model_info, (f"{ns}/{name}", "main")
            case ("GET", ["api", "models", ns, name, "revision", rev]):
                return "model_info", self._model_info, (f"{ns}/{name}", rev)
            case ("GET", ["api", "models", ns, name, "refs"]):
                return "refs", self._refs, (f"{ns}/{name}",)
            case ("GET", ["api", "models", ns, name, "tree", rev, *path]):
                return "tree", self._tree, (f"{ns}/{name}", rev, "/".join(path))
            case ("POST", ["api", "models", ns, name, "preupload", rev]):
                return "preupload", self._preupload, (f"{ns}/{name}", rev)
            case ("POST", ["api", "models", ns, name, "commit", rev]):
                return "commit", self._commit, (f"{ns}/{name}", rev)
            case ("POST", ["api", "models", ns, name, "branch", branch]):
                return "create_branch", self._create_branch, (f"{ns}/{name}", branch)
            case ("GET" | "HEAD", [ns, name, "resolve", rev, *path]) if path:
                return "resolve", self._resolve, (f"{ns}/{name}", rev, "/".join(path))
        raise HubError(404, f"FakeHub has no route for {method} /{'/'.join(p)}")

    def _user(self, headers) -> str | None:
        auth = headers.get("authorization")
        if auth is None:
            return None
        if auth.removeprefix("Bearer ").strip() not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _repo(self, user, repo_id, write=False) -> Repo:
        # Over https the client maps a 401 on a repo URL to RepositoryNotFoundError by URL regex, which
        # cannot match http://127.0.0.1, so say it with X-Error-Code to get the same exception.
        if write and user is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _history(repo: Repo, rev: str, branch_only: bool = False) -> list[Commit]:
        """Commits up to `rev`, a branch name or (unless writing: `branch_only`) a full commit oid."""
        if rev in repo.branches:
            return repo.branches[rev]
        for history in [] if branch_only else repo.branches.values():
            for i, commit in enumerate(history):
                if commit.oid == rev:
                    return history[: i + 1]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, message, files) -> Commit:
        self._n += 1
        return Commit(hashlib.sha1(f"{self._n}:{message}".encode()).hexdigest(), message, files)

    def _whoami(self, user, req):
        if user is None:
            raise HubError(401, "Invalid username or password.")
        token = {"displayName": "fake", "role": "write"}
        return _json({"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                      "fullname": user, "orgs": [], "auth": {"type": "access_token", "accessToken": token}})

    def _create_repo(self, user, req):
        if user is None:
            raise HubError(401, "Invalid username or password.")
        data = json.loads(req.body)
        if data.get("type", "model") != "model":
            raise HubError(400, "FakeHub only hosts model repos")
        repo_id = f"{data.get('organization') or user}/{data['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        self.create_repo(repo_id, private=data.get("visibility") == "private")
        return _json({"url": url, "name": repo_id})

    def _create_branch(self, user, req, repo_id, branch):
        repo = self._repo(user, repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = json.loads(req.body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = list(self._history(repo, start))
        return _json({})

    def _refs(self, user, req, repo_id):
        repo = self._repo(user, repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": h[-1].oid} for b, h in repo.branches.items()]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _preupload(self, user, req, repo_id, branch):
        repo = self._repo(user, repo_id, write=True)
        if set(req.query) - {"create_pr"}:
            raise HubError(400, f"FakeHub does not support {sorted(req.query)}")
        head = self._history(repo, branch, branch_only=True)[-1]
        files = []
        for f in json.loads(req.body)["files"]:
            info = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in head.files:  # lets the client skip unchanged files, like the Hub
                info["oid"] = git_blob_oid(head.files[f["path"]])
            files.append(info)
        return _json({"files": files, "commitOid": head.oid})

    def _commit(self, user, req, repo_id, branch):
        repo = self._repo(user, repo_id, write=True)
        if set(req.query) - {"create_pr"}:
            raise HubError(400, f"FakeHub does not support {sorted(req.query)}")
        history = self._history(repo, branch, branch_only=True)
        pull_request = None
        if req.query.get("create_pr") in ("1", "true", "True"):  # a pull request: a new refs/pr/N off the branch
            pull_request = sum(name.startswith("refs/pr/") for name in repo.branches) + 1
            history = repo.branches[f"refs/pr/{pull_request}"] = list(history)
        items = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not items or items[0]["key"] != "header":
            raise HubError(400, "Missing commit header")
        header = items[0]["value"]
        if header.get("parentCommit") and not history[-1].oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(history[-1].files)  # applied to a copy: a rejected commit changes nothing
        for item in items[1:]:
            key, path = item["key"], item["value"]["path"]
            if key == "file":
                files[path] = base64.b64decode(item["value"]["content"])
            elif key in ("deletedFile", "deletedFolder"):
                folder = path.rstrip("/") + "/" if key == "deletedFolder" else None
                doomed = [p for p in files if p == path or (folder and p.startswith(folder))]
                if not doomed:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"FakeHub does not support {key!r} operations (no LFS)")
        commit = self._new_commit(header["summary"], files)
        history.append(commit)
        url = f"{self.url}/{repo_id}/commit/{commit.oid}"
        pr_url = f"{self.url}/{repo_id}/discussions/{pull_request}" if pull_request else None
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr_url})

    def _model_info(self, user, req, repo_id, rev):
        repo = self._repo(user, repo_id)
        head = self._history(repo, rev)[-1]
        blobs = req.query.get("blobs", "").lower() == "true"
        siblings = [{"rfilename": p, **({"size": len(d), "blobId": git_blob_oid(d)} if blobs else {})}
                    for p, d in sorted(head.files.items())]
        return _json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                      "sha": head.oid, "private": repo.private, "gated": False, "disabled": False,
                      "lastModified": head.date, "createdAt": repo.branches["main"][0].date,
                      "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def _tree(self, user, req, repo_id, rev, path):
        files = self._history(self._repo(user, repo_id), rev)[-1].files
        recursive = req.query.get("recursive", "").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries = {}
        for p, data in files.items():
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for i in range(1, len(rel) if recursive else min(2, len(rel))):
                d = prefix + "/".join(rel[:i])
                entries[d] = {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            if recursive or len(rel) == 1:
                entries[p] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": p}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return _json([entries[k] for k in sorted(entries)])

    def _resolve(self, user, req, repo_id, rev, path):
        commit = self._history(self._repo(user, repo_id), rev)[-1]
        headers = {"X-Repo-Commit": commit.oid}  # also on 404: the client caches the miss under it
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers=headers)
        data = commit.files[path]
        # Regular files only: ETag is the blob sha1; X-Linked-Etag/X-Linked-Size would only be sent for LFS.
        headers.update({"ETag": f'"{git_blob_oid(data)}"', "Content-Type": "application/octet-stream",
                        "Accept-Ranges": "bytes"})
        if req.method == "GET" and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", ""))):
            start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start: end + 1]
        return 200, headers, data


def use_fake_hub(monkeypatch, hub: FakeHub, cache_dir) -> None:
    """Point the already-imported huggingface_hub (and transformers, if loaded) at `hub` for one test.

    Env vars are not enough in-process: huggingface_hub copies them into `constants` at import time, and
    some objects captured the endpoint when built: the default HfApi behind `huggingface_hub.create_repo`,
    `file_exists` & co (also what peft imports), transformers' cached `hf_api()`, HfFileSystem instances.
    HF_HOME is `cache_dir` (downloads under cache_dir/hub); token files live there too, so no stored login
    is seen. HF_TOKEN is unset; get_token() reads the env on each call, so a later setenv applies.
    """
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    home = Path(cache_dir)
    env = hub.env(home=home)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        del env[name]
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    patches = {  # module-level copies made at import time, from the env vars or derived from them
        "ENDPOINT": hub.url, "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home), "HF_HUB_CACHE": env["HF_HUB_CACHE"], "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"], "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(hub.url)})
    monkeypatch.setattr(_detect_agent, "_registry", _NO_HARNESSES)  # no User-Agent registry fetch
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    if (transformers_hub := sys.modules.get("transformers.utils.hub")) is not None:
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    if (hf_fs := sys.modules.get("huggingface_hub.hf_file_system")) is not None:
        monkeypatch.setattr(hf_fs.HfFileSystem, "_cache", {})
    _http.close_session()  # the shared httpx client reads proxy env vars when it is created
