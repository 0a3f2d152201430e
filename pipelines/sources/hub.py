"""The Hugging Face Hub as a LoRA source, through ``huggingface_hub`` only.

Discovery lists adapters of a base model (``base_model:adapter:...``) newest-modified first and
stops at the cursor's high-water mark (``lastModified`` plus the repos seen at exactly that
instant, with their commit). Every later read is pinned to the listed commit sha: the card
(``instance_prompt``, ``widget``), file sizes and LFS sha256, and ``hf_hub_download`` (which
resumes an ``.incomplete`` file). ``HF_ENDPOINT`` and ``HF_TOKEN`` apply as usual; an explicit
``endpoint``/``token`` wins. There is no page size: ``list_models`` follows the Hub's own paging.
A failed listing or read (an error status, or the transport errors ``huggingface_hub``'s HTTP
client raises: refused, timed out, cut) is a :class:`SourceError`, never a raw exception.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: HfApi lets its transport errors through
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from pipelines.sources.base import Candidate, Cursor, RemoteFile, Render, SourceError, safe_name
from registry.hashing import sha256_file

FLUX_DEV_ADAPTERS = "base_model:adapter:black-forest-labs/FLUX.1-dev"
_WEIGHT_SUFFIXES = (".safetensors",)
TOKEN_ENV = "HF_TOKEN"  # read by huggingface_hub itself
# refused, timed out or cut connections and undecodable bodies (after huggingface_hub's own retries), and
# HF_HUB_OFFLINE (OfflineModeIsEnabled is a ConnectionError)
_NETWORK_ERRORS = (httpx2.RequestError, ConnectionError)


class HubSource:
    """Hub repos matching ``filter`` (default: LoRAs/adapters of FLUX.1-dev)."""

    superseding_revisions = True  # a repo's new commit replaces its old one

    def __init__(self, *, filter: str = FLUX_DEV_ADAPTERS, endpoint: str | None = None,
                 token: str | bool | None = None, max_models: int | None = None,
                 max_file_bytes: int = 2 << 30, renders_per_model: int = 4, name: str = "hub") -> None:
        self.name, self.filter, self.max_models = name, filter, max_models
        self.endpoint = endpoint or hf_constants.ENDPOINT
        self.token = token
        self.max_file_bytes, self.renders_per_model = max_file_bytes, renders_per_model
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.failures: list[dict] = []  # what the last discover listed but could not read
        self.listed_all: set[tuple[str, None]] | None = None  # every repo, when the last listing was complete

    # ---- discovery ---------------------------------------------------------------------
    def discover(self, cursor: Cursor | None) -> tuple[list[Candidate], Cursor]:
        """Repos modified since ``cursor`` (``{"since": iso time, "at_since": {repo: sha}, "retry": {repo:
        sha}}``). A listed repo whose model info cannot be read (a server error, a timeout, not yet
        readable or gated) goes to :attr:`failures` and to the cursor's ``retry``, never to ``at_since``:
        the next discover reads it again."""
        cursor = cursor or {}
        since = datetime.fromisoformat(cursor["since"]) if cursor.get("since") else None
        at_since: dict[str, str] = dict(cursor.get("at_since", {}))
        listing = []
        try:
            for model in self.api.list_models(filter=self.filter, sort="last_modified", full=True,
                                              limit=self.max_models):
                modified = model.last_modified
                if since is not None and modified is not None and modified < since:
                    break  # sorted newest first: the rest is older than the mark
                if since is not None and modified == since and at_since.get(model.id) == model.sha:
                    continue
                listing.append(model)
        except (HfHubHTTPError, *_NETWORK_ERRORS) as error:
            raise _source_error(error, "listing") from error
        listed = {m.id for m in listing}
        retry = [(repo, sha) for repo, sha in cursor.get("retry", {}).items() if repo not in listed]
        found, unread = self._read([(m.id, m.sha) for m in listing], retry)
        complete = since is None and (self.max_models is None or len(listing) < self.max_models)
        self.listed_all = {(m.id, None) for m in listing} if complete else None
        times = [m.last_modified for m in listing if m.last_modified is not None]
        if not times:
            return found, {"since": cursor.get("since"), "at_since": at_since, "retry": unread}
        newest = max(times)
        top = {m.id: m.sha for m in listing if m.last_modified == newest and m.id not in unread}
        if since is not None and newest == since:
            top = {**at_since, **top}
        return found, {"since": newest.isoformat(), "at_since": top, "retry": unread}

    def _read(self, listed: list[tuple[str, str]], retry: list[tuple[str, str]]
              ) -> tuple[list[Candidate], dict[str, str]]:
        """The candidates of ``listed`` (repo, sha) and of ``retry`` (read at their current commit), and
        the repos that could not be read (each in :attr:`failures`). A repo to retry that is no longer
        listed and not found is dropped, with a failure saying so."""
        self.failures: list[dict] = []
        found, unread = [], {}
        for repo_id, sha in [*listed, *retry]:
            again = (repo_id, sha) in retry
            try:
                found.append(self.candidate(repo_id, None if again else sha))
            except SourceError as error:
                dropped = again and error.code == "vanished"
                if not dropped:
                    unread[repo_id] = sha
                self.failures.append({"key": f"{self.name}:{repo_id}@{sha}", "file": "", "code": error.code,
                                      "reason": f"model info unreadable: {error.reason}", "retry": not dropped})
        return found, unread

    def candidate(self, repo_id: str, sha: str | None) -> Candidate:
        """The candidate for ``repo_id`` at commit ``sha``: weights, card and renders."""
        try:
            info = self.api.model_info(repo_id, revision=sha, files_metadata=True)
            sha = info.sha or sha
            siblings = [s for s in info.siblings or [] if s.rfilename.lower().endswith(_WEIGHT_SUFFIXES)]
            known = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in siblings}
            missing = [name for name, (size, _) in known.items() if size is None]
            if missing:  # a server that left sizes out of model_info: ask paths-info
                for entry in self.api.get_paths_info(repo_id, missing, revision=sha):
                    lfs = getattr(entry, "lfs", None)
                    known[entry.path] = (getattr(entry, "size", None), lfs.sha256 if lfs else None)
        except (HfHubHTTPError, *_NETWORK_ERRORS) as error:
            raise _source_error(error, repo_id) from error
        card = info.card_data.to_dict() if info.card_data is not None else {}
        files = [RemoteFile(name, self._url(repo_id, sha, name), size, lfs_sha)
                 for name, (size, lfs_sha) in sorted(known.items())]
        tags = list(info.tags or [])
        return Candidate(
            source=self.name, id=repo_id, revision=str(sha), name=repo_id.split("/")[-1],
            files=files, trigger_words=_words(card.get("instance_prompt")),
            renders=self._renders(repo_id, sha, card.get("widget")), licence=str(card.get("license") or ""),
            nsfw_level="nsfw" if "not-for-all-audiences" in tags else "",
            base_model=_first(card.get("base_model")), page_url=f"{self.endpoint}/{repo_id}/tree/{sha}",
            tags=[t for t in tags if ":" not in t],
        )

    def _renders(self, repo_id: str, sha: str, widget: object) -> list[Render]:
        renders = []
        for item in widget if isinstance(widget, list) else []:
            output = item.get("output") if isinstance(item, dict) else None
            url = output.get("url") if isinstance(output, dict) else None
            if isinstance(url, str) and url and "://" not in url and ".." not in url.split("/"):
                renders.append(Render(RemoteFile(url, self._url(repo_id, sha, url)), str(item.get("text") or "")))
        return renders[: self.renders_per_model]

    def _url(self, repo_id: str, sha: str, name: str) -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{sha}/{name}"

    # ---- download ----------------------------------------------------------------------
    def fetch(self, candidate: Candidate, file: RemoteFile, dest_dir: Path) -> Path:
        """``hf_hub_download`` at the candidate's commit into ``dest_dir/_hub`` (where a cut
        download resumes), verified against the LFS sha256, then moved to ``dest_dir``."""
        if file.size is not None and file.size > self.max_file_bytes:
            raise SourceError("too_large", f"{file.name}: {file.size} bytes promised > max_file_bytes "
                                            f"{self.max_file_bytes}")
        scratch = Path(dest_dir) / "_hub"
        try:
            got = Path(hf_hub_download(candidate.id, file.name, revision=candidate.revision, local_dir=scratch,
                                       endpoint=self.endpoint, token=self.token))
        except LocalEntryNotFoundError as error:  # no connection
            raise SourceError("network", f"{candidate.id}/{file.name}: {error}") from error
        except (HfHubHTTPError, EntryNotFoundError, *_NETWORK_ERRORS) as error:
            raise _source_error(error, f"{candidate.id}/{file.name}") from error
        except OSError as error:  # e.g. size differs from what the server announced
            raise SourceError("network", f"{candidate.id}/{file.name}: {error}") from error
        size = got.stat().st_size
        if size > self.max_file_bytes:
            got.unlink()
            raise SourceError("too_large", f"{file.name}: {size} bytes > max_file_bytes {self.max_file_bytes}")
        if file.sha256 and sha256_file(got) != file.sha256.lower():
            got.unlink()
            raise SourceError("sha256_mismatch", f"{candidate.id}/{file.name}: content differs from LFS sha256 "
                                                 f"{file.sha256}")
        final = Path(dest_dir) / safe_name(file.name)
        os.replace(got, final)
        return final


def _source_error(error: Exception, what: str) -> SourceError:
    """``network`` for transport errors, ``vanished`` for a repo/revision/file that is gone, else
    ``http``; a 401/403 says which environment variable holds the token."""
    if isinstance(error, _NETWORK_ERRORS):
        return SourceError("network", f"{what}: {type(error).__name__}: {error}")
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403) or isinstance(error, GatedRepoError):
        what = f"{what}: HTTP {status} (set {TOKEN_ENV})"
    gone = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
    code = "vanished" if isinstance(error, gone) and not isinstance(error, GatedRepoError) else "http"
    return SourceError(code, f"{what}: {error}", status)


def _words(value: object) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return []


def _first(value: object) -> str:
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")

