"""A local Hugging Face Hub for tests: the real ``olah`` mirror server (offline mode) serving git
mirrors built here, one git repo per model with a model card, each ``.safetensors`` file as an LFS
pointer and its LFS object under ``.git/lfs/objects`` (so the sha256 olah reports is the content's).
``huggingface_hub`` (and diffusers / transformers / sentence-transformers through it) make every
call. ``tests/pipelines/sources/olah_server.py`` adds the Hub's ``/api/models`` listing (olah has none)
and, in the Hub's wire format, two answers olah 0.5.4's offline mirrors lack: model info without a
revision, and ``404 EntryNotFound`` for a tree path a repo does not have (see there).

olah runs from its own venv (its pins downgrade psutil): ``python3.11 -m venv .venv-olah &&
.venv-olah/bin/pip install olah==0.5.4`` at the repo root, or ``OLAH_PYTHON=/path/to/python``.

Import it as ``from hub_mirror import ...`` after putting ``tests/`` on ``sys.path`` (as the tests
do for ``flux_fixtures``)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[N]))  # N: up to tests/
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

TESTS = Path(__file__).resolve().parent
OLAH_PYTHON = Path(os.environ.get("OLAH_PYTHON", TESTS.parent / ".venv-olah" / "bin" / "python"))
OLAH_SERVER = TESTS / "pipelines" / "sources" / "olah_server.py"
PAGE_SIZE = 2  # listing page size: small, so that huggingface_hub's Link paging is exercised


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git(repo: Path, *args: str, when: str = "2025-01-01T00:00:00") -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def mirror_repo(mirrors: Path, repo_id: str, files: dict[str, bytes], card: str, when: str) -> str:
    """A git mirror of ``repo_id``: README card, each ``.safetensors`` as an LFS pointer + LFS
    object, other files as they are. Returns the commit sha."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text(card, encoding="utf-8")
    for name, data in files.items():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            oid = _sha256(data)
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            target.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        else:
            target.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "upload", when=when)
    return _git(repo, "rev-parse", "HEAD")


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its POSIX path relative to it (as ``mirror_repo`` takes them)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Olah:
    """The olah process, its mirrors and the listing it serves. ``tags``: the tags every repo
    added by :meth:`add` carries in the listing."""

    def __init__(self, root: Path, tags: Sequence[str] = (), page_size: int = PAGE_SIZE) -> None:
        self.root, self.mirrors = root, root / "mirrors"
        self.mirrors.mkdir(parents=True)
        self.tags = list(tags)
        self.listing: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "olah.toml"
        self.config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n[accessibility]\noffline = true\n')
        self.write_listing()
        self._stderr = open(root / "olah.err", "w")
        self.process = subprocess.Popen([str(OLAH_PYTHON), str(OLAH_SERVER), str(self.config),
                                         str(root / "listing.json"), str(page_size)],
                                        stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.time() + 60
        while True:
            try:
                requests.get(f"{self.url}/_test/count", timeout=1)
                break
            except requests.ConnectionError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"olah did not start: {self.log_tail()}")
                time.sleep(0.2)

    def add(self, repo_id: str, files: dict[str, bytes], card_text: str, when: str) -> str:
        """Commit ``files`` (+ the card) to ``repo_id``'s mirror and list it; returns the commit sha."""
        sha = mirror_repo(self.mirrors, repo_id, files, card_text, when)
        self.listing = [m for m in self.listing if m["id"] != repo_id]
        self.listing.append({"id": repo_id, "sha": sha, "lastModified": when + ".000Z", "tags": list(self.tags)})
        self.write_listing()
        return sha

    def write_listing(self) -> None:
        (self.root / "listing.json").write_text(json.dumps(self.listing))

    def listing_pages(self) -> int:
        return requests.get(f"{self.url}/_test/count", timeout=5).json()["listing_pages"]

    def log_tail(self, chars: int = 4000) -> str:
        """The end of olah's stderr and of its log files (``<root>/logs``), for failure messages."""
        parts = [(self.root / "olah.err").read_text(errors="replace")[-chars:]]
        parts += [f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                  for p in sorted((self.root / "logs").glob("*")) if p.is_file()]
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stderr.close()


def require_olah() -> None:
    """Skip the calling test when olah's venv is missing."""
    if not OLAH_PYTHON.exists():
        pytest.skip(f"olah's venv is missing ({OLAH_PYTHON}); see tests/hub_mirror.py's docstring")


@contextmanager
def running_olah(root: Path, tags: Sequence[str] = (), page_size: int = PAGE_SIZE) -> Iterator[Olah]:
    """An :class:`Olah` under ``root`` (skips when olah is not installed), stopped on exit."""
    require_olah()
    server = Olah(root, tags, page_size)
    try:
        yield server
    finally:
        server.stop()
