"""A local stand-in for the Hugging Face hub's API, enough for huggingface_hub's own client (pointed at it through
HF_ENDPOINT, or its constants in-process): model and dataset info with file sizes, trees, file metadata (HEAD) and
bytes (GET, with Range for a continued download), gated and missing repos answered as the hub answers them; and
uploads as the client makes them without Xet (HF_HUB_DISABLE_XET=1): repo creation, preupload, the LFS batch API
with basic transfers (an object already stored needs no upload), and commits. Writing needs the token
`hub.write_token`.

    with HubStandIn() as hub:
        hub.add_model("org/tiny", folder)         # every file under folder, at one commit
        hub.gated.add("org/tiny")                # 401 GatedRepo for files without a token
        hub.requests                             # (method, path, Range header) of each request
        hub.commits                              # what each push (create_commit, LFS upload) changed
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from pathlib import Path


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"commit": sha, "files": {name: bytes}, "branches": {...}}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.stall_after: dict[str, int] = {}  # file name -> bytes sent before the server stops sending (a cut)
        self.lfs: dict[str, bytes] = {}  # uploaded large files by sha256
        self.commits: list[tuple[str, list[str]]] = []  # (repo, files added or changed) of each commit pushed
        self.private: dict[str, bool] = {}
        self.failing_commits = 0  # commits answered 503 (after their large files were uploaded): a push cut short
        self.write_token = "hf_writer"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_model(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, {**files, **(extra or {})})

    def add_dataset(self, repo_id: str, files: dict[str, bytes]) -> str:
        return self.add_repo(repo_id, files, "datasets")

    def add_repo(self, repo_id: str, files: dict[str, bytes], kind: str = "models") -> str:
        commit = hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
        self.repos[f"{kind}/{repo_id}"] = {"commit": commit, "files": files, "branches": {"main": commit}}
        return commit

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def fail(self, status: int, code: str, message: str = "") -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message or code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def repo_and_commit(self, repo_id: str, revision: str | None):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self.fail(401, "RepoNotFound", "Repository not found")
                    return None, None
                commit = repo["branches"].get(revision or "main") or (revision if revision == repo["commit"] else None)
                if commit is None:
                    self.fail(404, "RevisionNotFound", "Invalid rev id")
                    return repo, None
                return repo, commit

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_PUT(self):  # the bytes of an LFS object, where the batch answer said to send them
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                hub.requests.append(("PUT", path, None))
                hub.lfs[path.rsplit("/", 1)[1]] = self.body()
                self.send_bytes(b"", "text/plain", True)

            def do_POST(self):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                hub.requests.append(("POST", path, None))
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    self.create_repo(json.loads(self.body()))
                elif path == "/api/validate-yaml":  # the client checks a README's front matter before a commit
                    self.body()
                    self.send_bytes(b'{"errors": [], "warnings": []}', "application/json", True)
                elif path.endswith(".git/info/lfs/objects/batch"):
                    self.lfs_batch(json.loads(self.body()))
                elif len(parts) > 5 and parts[4] in ("preupload", "commit"):
                    if not self.may_write():
                        return
                    kind, repo_id = parts[1], f"{parts[2]}/{parts[3]}"
                    if parts[4] == "preupload":
                        self.preupload(json.loads(self.body()))
                    elif hub.failing_commits:
                        hub.failing_commits -= 1
                        self.body()
                        self.fail(503, "", "Service Unavailable")
                    else:
                        self.commit(f"{kind}/{repo_id}", self.body())
                else:
                    self.paths_info(parts)

            def may_write(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.write_token}":
                    self.fail(401, "", "Invalid credentials in Authorization header")
                    return False
                return True

            def create_repo(self, asked: dict) -> None:
                if not self.may_write():
                    return
                key = f"{asked.get('type') or 'model'}s/{asked['organization']}/{asked['name']}"
                url = json.dumps({"url": f"{hub.url}/{key}"}).encode()
                if key in hub.repos:  # the hub's 409 carries the url too; the client reads it with exist_ok
                    self.send_response(409)
                    self.send_header("X-Error-Message", "You already created this model repo")
                    self.send_header("Content-Length", str(len(url)))
                    self.end_headers()
                    self.wfile.write(url)
                    return
                hub.add_repo(f"{asked['organization']}/{asked['name']}", {}, key.split("/")[0])
                hub.private[key] = asked.get("visibility") == "private" or bool(asked.get("private"))
                self.send_bytes(url, "application/json", True)

            def preupload(self, asked: dict) -> None:
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs"
                        if f["path"].endswith((".safetensors", ".gguf")) or f["size"] > 10 * 2**20
                        else "regular",
                        "shouldIgnore": False,
                    }
                    for f in asked["files"]
                ]
                self.send_bytes(json.dumps({"files": modes}).encode(), "application/json", True)

            def lfs_batch(self, asked: dict) -> None:  # objects the store already holds need no upload: a resume
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "authenticated": True,
                        **(
                            {}
                            if o["oid"] in hub.lfs
                            else {"actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                        ),
                    }
                    for o in asked["objects"]
                ]
                self.send_bytes(
                    json.dumps({"transfer": "basic", "objects": objects}).encode(), "application/vnd.git-lfs+json", True
                )

            def commit(self, key: str, payload: bytes) -> None:
                import base64

                repo = hub.repos[key]
                files = dict(repo["files"])
                for line in payload.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        files[value["path"]] = hub.lfs[value["oid"]]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                hub.commits.append(
                    (
                        key,
                        sorted(
                            set(files) - set(repo["files"])
                            | {n for n in files if n in repo["files"] and files[n] != repo["files"][n]}
                        ),
                    )
                )
                commit = hub.add_repo(key.split("/", 1)[1], files, key.split("/")[0])
                answer = {"commitUrl": f"{hub.url}/{key}/commit/{commit}", "commitOid": commit}
                self.send_bytes(json.dumps(answer).encode(), "application/json", True)

            def paths_info(self, parts: list[str]) -> None:  # which of the given paths exist, as the tree lists them
                form = urllib.parse.parse_qs(self.body().decode())
                repo, commit = self.repo_and_commit(f"{parts[1]}/{parts[2]}/{parts[3]}", parts[5])
                if commit is None:
                    return
                asked = form.get("paths", [])
                entries = [e for e in self.tree(repo, "", recursive=True) if e["path"] in asked]
                self.send_bytes(json.dumps(entries).encode(), "application/json", True)

            def tree(self, repo: dict, under: str, recursive: bool) -> list[dict]:
                entries, folders = [], set()
                for name, data in repo["files"].items():
                    if under and not name.startswith(under + "/"):
                        continue
                    rest = name[len(under) + 1 :] if under else name
                    if "/" in rest and not recursive:
                        folders.add((under + "/" if under else "") + rest.split("/")[0])
                        continue
                    if recursive:
                        parent = name.rsplit("/", 1)[0] if "/" in name else ""
                        while parent and parent != under:
                            folders.add(parent)
                            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
                    entries.append(
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    )
                return [
                    {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)
                ] + entries

            def answer(self, body: bool) -> None:
                url = urllib.parse.urlparse(self.path)
                path = urllib.parse.unquote(url.path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[0] == "api" and parts[1:2] in (["models"], ["datasets"]):
                    kind, repo_id, rest = parts[1], "/".join(parts[2:4]), parts[4:]
                    revision = rest[1] if rest[:1] in (["revision"], ["tree"]) and len(rest) > 1 else None
                    repo, commit = self.repo_and_commit(f"{kind}/{repo_id}", revision)
                    if commit is None:
                        return
                    if rest[:1] == ["tree"]:
                        recursive = "recursive=true" in url.query.lower() or "recursive=1" in url.query
                        listed = self.tree(repo, "/".join(rest[2:]), recursive)
                        self.send_bytes(json.dumps(listed).encode(), "application/json", body)
                        return
                    siblings = [{"rfilename": name, "size": len(data)} for name, data in repo["files"].items()]
                    info = {
                        "id": repo_id,
                        "sha": commit,
                        "siblings": siblings,
                        "private": False,
                        "gated": "manual" if repo_id in hub.gated else False,
                        "lastModified": "2026-01-01T00:00:00.000Z",
                    }
                    self.send_bytes(json.dumps(info).encode(), "application/json", body)
                    return
                kind = "datasets" if parts[0] == "datasets" else "models"
                parts = parts[1:] if kind == "datasets" else parts
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    repo, commit = self.repo_and_commit(f"{kind}/{repo_id}", revision)
                    if commit is None:
                        return
                    if repo_id in hub.gated and not self.headers.get("Authorization"):
                        self.fail(401, "GatedRepo", f"Access to {kind[:-1]} {repo_id} is restricted.")
                        return
                    if name not in repo["files"]:
                        self.fail(404, "EntryNotFound", "Entry not found")
                        return
                    self.send_file(name, repo["files"][name], commit, body)
                else:
                    self.fail(404, "RepoNotFound")

            def send_bytes(self, data: bytes, kind: str, body: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def send_file(self, name: str, data: bytes, commit: str, body: bool) -> None:
                start = 0
                asked = self.headers.get("Range")
                if asked and asked.startswith("bytes="):
                    start = int(asked[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                stall = hub.stall_after.get(name)
                if stall is not None and start < stall:  # send up to the cut, then hang as a dead network would
                    self.wfile.write(data[start:stall])
                    self.wfile.flush()
                    time.sleep(3600)
                self.wfile.write(data[start:])

        return Handler
