"""A minimal, stdlib-only, Hugging Face Hub-compatible HTTP server for tests.

The project's own copy (it started from a reference implementation). Implements just enough of
the Hub HTTP protocol for the *real* `huggingface_hub` client (checked with 2.4.0) to:

  create_repo / delete_repo / repo_exists / model_info / list_repo_files / list_repo_tree /
  get_paths_info / list_repo_refs / list_repo_commits / upload_file / upload_folder /
  create_commit (regular + LFS "basic" transfer) / create_branch / hf_hub_download / snapshot_download

Content-addressed: every blob is stored under <root>/objects/<sha256>. Non-LFS files are
identified by their git blob sha1 (what the Hub returns as ETag), LFS files by sha256.
Commits are immutable JSON records; refs map branch -> commit sha.

Fault injection (for robustness tests), controlled by POST /__faults JSON (replaces the set):
  {"corrupt": ["path/in/repo"], "corrupt_upload": ["path"], "truncate": ["path"] or {"path": times},
   "status": {"path": 503},
   "fail": [{"match": "/resolve/", "method": "GET", "status": 503, "times": 2}]}
corrupt = flip one byte but keep Content-Length and ETag (simulates a bad mirror/CDN)
corrupt_upload = ["path"]: a regular (non-LFS) file committed to that path is stored with one
          byte flipped (the remote then holds other bytes than were sent)
truncate = advertise full size but send half, then close (client must detect size mismatch);
           a list truncates every download of the file, a mapping only the first `times`
status = answer every download of the file with this status (a 404 is a file gone missing)
fail = answer any request whose URL path contains `match` (and whose method is `method`, if
       given) with `status`, `times` times (every time if absent): a 503 for N requests, then
       success. Each rule counts its `hits`.
GET /__faults returns the set as it is now (counts left, hits), so a test can see a fault fire.

Run: python hub_server.py --host 127.0.0.1 --port 0 --root DIR   (prints "LISTENING <port>")
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_THRESHOLD = int(os.environ.get("MINIHUB_LFS_THRESHOLD", str(1024 * 1024)))  # bytes; >= goes to LFS
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class Store:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "objects"), exist_ok=True)
        self.lock = threading.RLock()
        self.state_path = os.path.join(root, "state.json")
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.repos = json.load(f)
        else:
            self.repos = {}  # key "type:org/name" -> {"refs": {}, "commits": {}, "private": bool, "created": ts}
        self.faults: dict = {}

    def set_faults(self, faults: dict) -> None:
        with self.lock:
            self.faults = faults
            for rule in faults.get("fail", []):
                rule.setdefault("hits", 0)

    def injected_status(self, method: str, path: str) -> int | None:
        """The status a `fail` rule answers this request with (counting it down), else None."""
        with self.lock:
            for rule in self.faults.get("fail", []):
                if rule["match"] not in path or rule.get("method", method) != method:
                    continue
                if rule.get("times") is not None:
                    if rule["times"] <= 0:
                        continue
                    rule["times"] -= 1
                rule["hits"] += 1
                return int(rule["status"])
        return None

    def take_truncation(self, path: str) -> bool:
        """Whether this download of `path` is cut short (a mapping counts its uses down)."""
        with self.lock:
            truncate = self.faults.get("truncate", [])
            if isinstance(truncate, dict):
                if truncate.get(path, 0) <= 0:
                    return False
                truncate[path] -= 1
                return True
            return path in truncate

    # -- persistence (atomic) --
    def _save(self):
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.repos, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def obj_path(self, sha256: str) -> str:
        return os.path.join(self.root, "objects", sha256)

    def put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.obj_path(sha)
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".obj.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def has_object(self, sha256: str) -> bool:
        return os.path.exists(self.obj_path(sha256))

    # -- repos --
    def key(self, rtype: str, repo_id: str) -> str:
        return f"{rtype}:{repo_id}"

    def get(self, rtype, repo_id):
        return self.repos.get(self.key(rtype, repo_id))

    def create(self, rtype, repo_id, private=False):
        with self.lock:
            k = self.key(rtype, repo_id)
            if k in self.repos:
                return False
            self.repos[k] = {"refs": {}, "commits": {}, "private": private, "created": time.time()}
            ga = b"".join(
                f"*.{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in ("safetensors", "bin", "h5")
            )
            self._commit(self.repos[k], "main", "initial commit", [("file", ".gitattributes", ga)], None)
            self._save()
            return True

    def delete(self, rtype, repo_id):
        with self.lock:
            ok = self.repos.pop(self.key(rtype, repo_id), None) is not None
            self._save()
            return ok

    def resolve(self, repo, rev):
        rev = urllib.parse.unquote(rev)
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if rev.startswith("refs/heads/") and rev[11:] in repo["refs"]:
            return repo["refs"][rev[11:]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo["commits"]:
            return rev
        return None

    def _commit(self, repo, branch, summary, ops, parent_expected):
        """ops: list of (kind, path, payload). Returns new sha or raises ValueError."""
        parent = repo["refs"].get(branch)
        if parent_expected and parent and not parent.startswith(parent_expected):
            raise PermissionError(f"parent commit mismatch: head is {parent}")
        files = dict(repo["commits"][parent]["files"]) if parent else {}
        for kind, path, payload in ops:
            if ".." in path.split("/") or path.startswith("/"):
                raise ValueError(f"invalid path {path!r}")
            if kind == "file":
                sha256 = self.put_object(payload)
                files[path] = {"sha256": sha256, "size": len(payload), "lfs": False, "oid": git_blob_sha1(payload)}
            elif kind == "lfsFile":
                sha256, size = payload
                if not self.has_object(sha256):
                    raise ValueError(f"LFS object {sha256} for {path} was never uploaded")
                if os.path.getsize(self.obj_path(sha256)) != size:
                    raise ValueError(f"LFS object {sha256} size mismatch")
                ptr = lfs_pointer(sha256, size)
                files[path] = {
                    "sha256": sha256,
                    "size": size,
                    "lfs": True,
                    "oid": git_blob_sha1(ptr),
                    "pointerSize": len(ptr),
                }
            elif kind == "deletedFile":
                files.pop(path, None)
            elif kind == "deletedFolder":
                pre = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(pre)]:
                    files.pop(p)
        body = json.dumps({"parent": parent, "files": files, "summary": summary, "t": time.time()}, sort_keys=True)
        sha = hashlib.sha1(body.encode()).hexdigest()
        repo["commits"][sha] = {
            "parent": parent,
            "files": files,
            "summary": summary,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        repo["refs"][branch] = sha
        return sha

    def create_branch(self, repo, branch, start):
        """Point a new branch at commit `start`; False if the branch exists."""
        with self.lock:
            if branch in repo["refs"]:
                return False
            repo["refs"][branch] = start
            self._save()
            return True

    def commit(self, repo, branch, summary, ops, parent_expected):
        with self.lock:
            sha = self._commit(repo, branch, summary, ops, parent_expected)
            self._save()
            return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minihub/0.1"
    store: Store = None  # set by main
    token: str | None = None

    def log_message(self, fmt, *args):
        if os.environ.get("MINIHUB_LOG"):
            sys.stderr.write("minihub: " + fmt % args + "\n")

    # -- helpers --
    @property
    def base(self):
        return f"http://{self.headers.get('Host')}"

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def send(self, status, obj=None, headers=None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
        self.send_response(status)
        if raw is None and obj is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def err(self, status, code, msg, headers=None, head=False):
        h = {"X-Error-Code": code, "X-Error-Message": msg, **(headers or {})}
        self.send(status, {"error": msg}, h, head=head)

    def authorized_write(self) -> bool:
        if self.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.token}"

    def parse_repo(self, parts):
        """parts: path segments after /api/ or root. Returns (rtype, repo_id, rest)."""
        rtype = "model"
        if parts and parts[0] in REPO_TYPES:
            rtype, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 2:
            return rtype, f"{parts[0]}/{parts[1]}", parts[2:]
        return rtype, None, parts

    def validate_yaml(self):
        """README.md metadata check the client runs before committing a model card.

        Structural only (stdlib, no YAML parser): a front matter block opened and closed by
        `---` lines, with `key: value` lines inside.
        """
        content = json.loads(self.body() or b"{}").get("content", "")
        lines = content.splitlines()
        errors = []
        if lines[:1] == ["---"]:
            try:
                end = lines.index("---", 1)
            except ValueError:
                errors.append({"message": "unterminated YAML front matter"})
            else:
                top = [ln for ln in lines[1:end] if ln and not ln.startswith((" ", "-", "#"))]
                errors += [{"message": f"not a mapping entry: {ln!r}"} for ln in top if ":" not in ln]
        if errors:
            return self.send(400, {"errors": errors, "warnings": []})
        return self.send(200, {"errors": [], "warnings": []})

    # -- dispatch --
    def do_HEAD(self):
        self.route("HEAD")

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method):
        try:
            self._route(method)
        except BrokenPipeError:
            pass
        except Exception as e:  # pragma: no cover
            import traceback

            traceback.print_exc()
            self.err(500, "InternalError", f"{type(e).__name__}: {e}")

    def _route(self, method):
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        head = method == "HEAD"
        if not parts:
            return self.send(200, {"minihub": True}, head=head)
        if parts[0] == "__health":
            return self.send(200, {"ok": True}, head=head)
        if parts[0] == "__faults" and method == "POST":
            self.store.set_faults(json.loads(self.body() or b"{}"))
            return self.send(200, self.store.faults)
        if parts[0] == "__faults" and method == "GET":
            with self.store.lock:
                return self.send(200, self.store.faults)
        injected = self.store.injected_status(method, url.path)
        if injected is not None:
            self.body()  # read what was sent, so the connection stays usable
            return self.err(injected, "Injected", "injected failure", head=head)
        if parts[0] == "__lfs_upload" and method == "PUT":
            return self.lfs_put(parts[1])
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self.validate_yaml()
        if parts[0] == "api":
            return self.api(method, parts[1:], q, head)
        # git-lfs batch: /{prefix}{org}/{name}.git/info/lfs/objects/batch
        if method == "POST" and len(parts) >= 5 and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            p = parts[:-4]
            p[-1] = p[-1][:-4] if p[-1].endswith(".git") else p[-1]
            rtype, repo_id, _ = self.parse_repo(p)
            return self.lfs_batch(rtype, repo_id)
        # file resolve: /{prefix}{org}/{name}/resolve/{rev}/{path...}
        rtype, repo_id, rest = self.parse_repo(parts)
        if repo_id and rest and rest[0] == "resolve" and len(rest) >= 3 and method in ("GET", "HEAD"):
            return self.resolve_file(rtype, repo_id, rest[1], "/".join(rest[2:]), head)
        return self.err(404, "NotFound", f"no route for {method} {url.path}", head=head)

    # -- /api --
    def api(self, method, parts, q, head):
        if parts == ["whoami-v2"]:
            if self.headers.get("Authorization") is None:
                return self.err(401, "Unauthorized", "Invalid credentials in Authorization header")
            return self.send(
                200,
                {
                    "type": "user",
                    "name": "local",
                    "fullname": "Local",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
                },
            )
        if parts[:2] == ["repos", "create"] and method == "POST":
            if not self.authorized_write():
                return self.err(401, "Unauthorized", "Invalid credentials")
            d = json.loads(self.body() or b"{}")
            rtype = d.get("type") or "model"
            repo_id = f"{d.get('organization') or 'local'}/{d['name']}"
            private = bool(d.get("private")) or d.get("visibility") == "private"
            if not self.store.create(rtype, repo_id, private):
                # the real Hub also returns "url" on 409; create_repo(exist_ok=True) reads it
                return self.send(
                    409,
                    {"error": "You already created this model repo", "url": f"{self.base}/{PREFIX[rtype]}{repo_id}"},
                    {"X-Error-Code": "Conflict", "X-Error-Message": "You already created this model repo"},
                )
            return self.send(200, {"url": f"{self.base}/{PREFIX[rtype]}{repo_id}", "name": repo_id, "id": repo_id})
        if parts[:2] == ["repos", "delete"] and method == "DELETE":
            if not self.authorized_write():
                return self.err(401, "Unauthorized", "Invalid credentials")
            d = json.loads(self.body() or b"{}")
            rtype = d.get("type") or "model"
            repo_id = f"{d.get('organization') or 'local'}/{d['name']}"
            if not self.store.delete(rtype, repo_id):
                return self.err(404, "RepoNotFound", "Repository not found")
            return self.send(200, {})
        if not parts or parts[0] not in REPO_TYPES:
            return self.err(404, "NotFound", "unknown api route", head=head)
        rtype, repo_id, rest = self.parse_repo(parts)
        repo = self.store.get(rtype, repo_id) if repo_id else None
        if repo is None:
            return self.err(401, "RepoNotFound", "Repository not found", head=head)  # the Hub answers 401 here
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) > 1 else "main"
            return self.repo_info(rtype, repo_id, repo, rev, q, head)
        op = rest[0]
        if op == "tree" and len(rest) >= 2:
            return self.tree(repo, rest[1], "/".join(rest[2:]), q)
        if op == "paths-info" and method == "POST":
            return self.paths_info(repo, rest[1])
        if op == "refs":
            return self.send(
                200,
                {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo["refs"].items()
                    ],
                    "converts": [],
                    "tags": [],
                },
            )
        if op == "commits" and len(rest) >= 2:
            sha = self.store.resolve(repo, rest[1])
            out = []
            while sha:
                c = repo["commits"][sha]
                out.append(
                    {"id": sha, "title": c["summary"], "message": "", "authors": [{"user": "local"}], "date": c["date"]}
                )
                sha = c["parent"]
            return self.send(200, out)
        if op == "preupload" and method == "POST":
            return self.preupload(repo, rest[1] if len(rest) > 1 else "main")
        if op == "branch" and len(rest) >= 2 and method == "POST":
            return self.create_branch(repo, "/".join(rest[1:]))
        if op == "commit" and method == "POST":
            return self.commit(rtype, repo_id, repo, rest[1] if len(rest) > 1 else "main")
        return self.err(404, "NotFound", f"unknown api op {op}", head=head)

    def repo_info(self, rtype, repo_id, repo, rev, q, head):
        sha = self.store.resolve(repo, rev)
        if sha is None:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        c = repo["commits"][sha]
        blobs = q.get("blobs", ["false"])[0].lower() == "true"
        sib = []
        for p, f in sorted(c["files"].items()):
            s = {"rfilename": p}
            if blobs:
                s.update({"size": f["size"], "blobId": f["oid"]})
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": f["pointerSize"]}
            sib.append(s)
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["created"]))
        info = {
            "_id": sha[:24],
            "id": repo_id,
            "sha": sha,
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": sib,
            "lastModified": c["date"],
            "createdAt": created,
            "author": repo_id.split("/")[0],
        }
        if rtype == "model":
            info["modelId"] = repo_id
        return self.send(200, info, head=head)

    def _entry(self, path, f):
        e = {"type": "file", "oid": f["oid"], "size": f["size"], "path": path}
        if f["lfs"]:
            e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointerSize"]}
        return e

    def tree(self, repo, rev, sub, q):
        sha = self.store.resolve(repo, rev)
        if sha is None:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = q.get("recursive", ["false"])[0].lower() == "true"
        files = repo["commits"][sha]["files"]
        pre = (sub.strip("/") + "/") if sub.strip("/") else ""
        out, dirs = [], set()
        for p, f in sorted(files.items()):
            if not p.startswith(pre):
                continue
            rel = p[len(pre) :]
            if "/" in rel:
                segs = rel.split("/")
                for i in range(1, len(segs) if recursive else 2):
                    dirs.add(pre + "/".join(segs[:i]))
                if not recursive:
                    continue
            out.append(self._entry(p, f))
        if pre and not out and not dirs:
            return self.err(404, "EntryNotFound", f"{sub} does not exist")
        out += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        return self.send(200, out, {"X-Repo-Commit": sha})

    def paths_info(self, repo, rev):
        sha = self.store.resolve(repo, rev)
        if sha is None:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        raw = self.body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(raw).get("paths", [])
        else:
            paths = urllib.parse.parse_qs(raw.decode()).get("paths", [])
        files = repo["commits"][sha]["files"]
        out = []
        for p in paths:
            if p in files:
                out.append(self._entry(p, files[p]))
            elif any(k.startswith(p.rstrip("/") + "/") for k in files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return self.send(200, out)

    def preupload(self, repo, rev):
        if not self.authorized_write():
            return self.err(401, "Unauthorized", "Invalid credentials")
        d = json.loads(self.body())
        sha = self.store.resolve(repo, rev)
        files = repo["commits"][sha]["files"] if sha else {}
        out = []
        for f in d.get("files", []):
            mode = "lfs" if f["size"] >= LFS_THRESHOLD else "regular"
            cur = files.get(f["path"])
            out.append(
                {"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": cur["oid"] if cur else None}
            )
        return self.send(200, {"files": out, "commitOid": sha})

    def lfs_batch(self, rtype, repo_id):
        repo = self.store.get(rtype, repo_id) if repo_id else None
        if repo is None:
            return self.err(404, "RepoNotFound", "Repository not found")
        if not self.authorized_write():
            return self.err(401, "Unauthorized", "Invalid credentials")
        d = json.loads(self.body())
        objs = []
        for o in d.get("objects", []):
            e = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not self.store.has_object(o["oid"]):
                e["actions"] = {
                    "upload": {"href": f"{self.base}/__lfs_upload/{o['oid']}?size={o['size']}", "header": {}}
                }
            objs.append(e)
        return self.send(200, {"transfer": "basic", "objects": objs}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid):
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self.err(400, "BadRequest", "sha256 mismatch: uploaded content does not match oid")
        self.store.put_object(data)
        return self.send(200, {})

    def create_branch(self, repo, branch):
        if not self.authorized_write():
            return self.err(401, "Unauthorized", "Invalid credentials")
        start = json.loads(self.body() or b"{}").get("startingPoint") or "main"
        sha = self.store.resolve(repo, start)
        if sha is None:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {start}")
        if not self.store.create_branch(repo, branch, sha):
            return self.err(409, "Conflict", f"Reference refs/heads/{branch} already exists")
        return self.send(200, {})

    def commit(self, rtype, repo_id, repo, rev):
        if not self.authorized_write():
            return self.err(401, "Unauthorized", "Invalid credentials")
        branch = urllib.parse.unquote(rev)
        if branch not in repo["refs"]:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        ops, header = [], {}
        for line in self.body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            k, v = item["key"], item["value"]
            if k == "header":
                header = v
            elif k == "file":
                if v.get("encoding") != "base64":
                    return self.err(400, "BadRequest", "only base64 encoding is supported")
                content = base64.b64decode(v["content"])
                if v["path"] in self.store.faults.get("corrupt_upload", []) and content:
                    content = bytes([content[0] ^ 1]) + content[1:]  # stored as if mangled on the way in
                ops.append(("file", v["path"], content))
            elif k == "lfsFile":
                ops.append(("lfsFile", v["path"], (v["oid"], int(v["size"]))))
            elif k in ("deletedFile", "deletedFolder"):
                ops.append((k, v["path"], None))
            else:
                return self.err(400, "BadRequest", f"unsupported commit op {k}")
        try:
            sha = self.store.commit(repo, branch, header.get("summary", ""), ops, header.get("parentCommit"))
        except PermissionError as e:
            return self.err(412, "PreconditionFailed", str(e))
        except ValueError as e:
            return self.err(400, "BadRequest", str(e))
        return self.send(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.base}/{PREFIX[rtype]}{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )

    def resolve_file(self, rtype, repo_id, rev, path, head):
        repo = self.store.get(rtype, repo_id)
        if repo is None:
            return self.err(401, "RepoNotFound", "Repository not found", head=head)
        sha = self.store.resolve(repo, rev)
        if sha is None:
            return self.err(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        f = repo["commits"][sha]["files"].get(path)
        if f is None:
            return self.err(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha}, head=head)
        faults = self.store.faults
        if path in faults.get("status", {}):
            return self.err(int(faults["status"][path]), "Injected", "injected failure", head=head)
        etag = f["sha256"] if f["lfs"] else f["oid"]
        hdrs = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f["lfs"]:
            hdrs.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(f["size"])})
        with open(self.store.obj_path(f["sha256"]), "rb") as fh:
            data = fh.read()
        if path in faults.get("corrupt", []):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        status, start = 200, 0
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                hdrs["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        if head:
            self.send_response(200)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(f["size"]))
            self.end_headers()
            return
        if self.store.take_truncation(path):
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send(status, raw=data, headers=hdrs)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--root", required=True)
    ap.add_argument("--token", default=None, help="if set, writes require 'Authorization: Bearer <token>'")
    a = ap.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("minihub only binds to loopback")
    Handler.store = Store(a.root)
    Handler.token = a.token
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    print(f"LISTENING {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
