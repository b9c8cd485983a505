"""A recording stand-in for `huggingface_hub.HfApi`: repos held in memory, every call recorded.

It answers with huggingface_hub's own types (RepoFile, CommitInfo) and errors (HfHubHTTPError
with a real httpx response), so the code under test sees what the real client returns.
"""

import hashlib
import itertools
from pathlib import Path
from types import SimpleNamespace

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoFile

LFS_SUFFIXES = (".safetensors",)  # as the Hub's default .gitattributes stores them
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def http_error(status: int, message: str) -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(message, response=response)


class FakeHub:
    def __init__(self, user: str = "me"):
        self.user = user
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}, "heads": {}}
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.fail: dict[str, Exception] = {}  # method name -> what it raises
        self._oids = (hashlib.sha1(str(i).encode()).hexdigest() for i in itertools.count())

    def _record(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def _branch(self, repo_id: str, revision: str | None) -> dict:
        return self.repos[repo_id]["branches"][revision or "main"]

    def seed(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A repo that already exists, with these files on main."""
        self.repos[repo_id] = {"private": False, "branches": {"main": {".gitattributes": GITATTRIBUTES, **files}},
                               "heads": {"main": next(self._oids)}}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **_):
        self._record("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type)
        if repo_id.split("/")[0] != self.user:
            raise http_error(403, f"You don't have the rights to create a model under the namespace "
                                  f"\"{repo_id.split('/')[0]}\"")
        if repo_id not in self.repos:
            self.seed(repo_id, {})
            self.repos[repo_id]["private"] = bool(private)
        elif not exist_ok:
            raise http_error(409, "You already created this model repo")
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, exist_ok=False, repo_type=None, **_):
        self._record("create_branch", repo_id=repo_id, branch=branch, exist_ok=exist_ok)
        repo = self.repos[repo_id]
        if branch not in repo["branches"]:
            repo["branches"][branch] = dict(repo["branches"]["main"])
            repo["heads"][branch] = repo["heads"]["main"]

    def list_repo_tree(self, repo_id, *, revision=None, recursive=False, repo_type=None, **_):
        self._record("list_repo_tree", repo_id=repo_id, revision=revision, recursive=recursive)
        return [RepoFile(path=path, size=len(data), oid=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                         lfs={"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                         if path.endswith(LFS_SUFFIXES) else None)
                for path, data in sorted(self._branch(repo_id, revision).items())]

    def repo_info(self, repo_id, *, revision=None, repo_type=None, **_):
        self._record("repo_info", repo_id=repo_id, revision=revision)
        return SimpleNamespace(id=repo_id, sha=self.repos[repo_id]["heads"][revision or "main"])

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, revision=None,
                      repo_type=None, **_):
        operations = list(operations)
        self._record("create_commit", repo_id=repo_id, revision=revision, commit_message=commit_message)
        assert operations, "the real client would make no commit; the caller should not ask for an empty one"
        added = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                 for op in operations if isinstance(op, CommitOperationAdd)}
        deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        branch = self._branch(repo_id, revision)
        for path in deleted:
            del branch[path]
        branch.update(added)
        oid = next(self._oids)
        self.repos[repo_id]["heads"][revision or "main"] = oid
        self.commits.append({"repo_id": repo_id, "revision": revision, "message": commit_message,
                             "description": commit_description, "added": added, "deleted": deleted})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=oid)
