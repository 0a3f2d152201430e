"""Runs the real ``olah`` Hub mirror (offline, serving the git mirrors a test built) plus three
routes, each in the Hub's own wire format:

- ``GET /api/models``, the Hub's model listing (olah has none), paged with a ``Link: <...>;
  rel="next"`` header as the Hub pages it;
- ``GET|HEAD /api/models/{org}/{repo}`` (model info without a revision, as ``model_info(id)``,
  ``snapshot_download(id)`` and diffusers' ``from_pretrained(id)`` ask for it) for a repo that is a
  local git mirror. olah 0.5.4 in offline mode resolves that route's "latest commit" from its proxy
  cache only (``get_newest_commit_hf_offline`` reads ``<repos-path>/api/.../meta_head.json``), never
  from its mirrors, so a mirrored repo answers ``401 RepoNotFound`` there while
  ``/api/models/{org}/{repo}/revision/main`` serves it. The Hub answers the revision-less route
  with the default branch's model info, so this route gives olah's own answer for the mirror's
  ``HEAD`` (its default branch, ``main``); any other repo goes to olah's own handler.
- ``GET|HEAD /api/models/{org}/{repo}/tree/{revision}/{path}`` for a path that a mirrored repo's
  revision does not have: the Hub answers ``404`` with ``X-Error-Code: EntryNotFound``
  (``huggingface_hub`` raises ``RemoteEntryNotFoundError``, "if the tree (folder) does not exist"),
  olah 0.5.4 offline answers ``401 RepoNotFound`` (its mirror's ``get_tree`` gives nothing, and its
  fallback only looks in the proxy cache). transformers lists ``additional_chat_templates/`` of
  every tokenizer it loads by Hub id and treats RepoNotFound as fatal, so no tokenizer loads by Hub
  id from olah's mirrors without this. The answer is olah's own ``error_entry_not_found_branch``;
  existing paths, other repos and revisions olah does not know go to olah's handler.

Run with the Python of the venv olah is installed in (``.venv-olah``):
``python olah_server.py CONFIG.toml LISTING.json PAGE_SIZE``. ``LISTING.json``: a list of
``{"id", "sha", "lastModified", "tags"}``; the request counter is at ``GET /_test/count``.
"""

import json
import logging
import os
import sys

config_path, listing_path, page_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["OLAH_CONFIG"] = config_path  # olah.server reads it on import (its multi-worker path)
os.environ.setdefault("OLAH_LOG_PATH", os.path.join(os.path.dirname(config_path), "logs"))

import uvicorn  # noqa: E402
from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from olah import server  # noqa: E402
from olah.errors import error_entry_not_found_branch  # noqa: E402
from olah.server_access import build_repo_ref  # noqa: E402
from olah.server_api_routes import meta_proxy_common, meta_proxy_expanded, tree_proxy_commit_expanded  # noqa: E402
from olah.server_mirror import has_local_mirror, load_local_mirror_payload  # noqa: E402

counts = {"listing_pages": 0}


async def list_models(request: Request) -> JSONResponse:
    """The Hub's ``/api/models``: ``filter`` (tags, all must match), ``sort`` descending,
    ``cursor`` paging with a ``Link`` header."""
    counts["listing_pages"] += 1
    with open(listing_path, encoding="utf-8") as handle:
        models = json.load(handle)
    wanted = request.query_params.getlist("filter")
    models = [m for m in models if all(f in m.get("tags", []) for f in wanted)]
    sort = request.query_params.get("sort")
    if sort:
        models.sort(key=lambda m: m.get(sort) or "", reverse=True)
    start = int(request.query_params.get("cursor") or 0)
    page = models[start:start + page_size]
    full = request.query_params.get("full") in ("True", "true", "1")
    items = [{"_id": m["id"], "id": m["id"], "modelId": m["id"], "likes": 0, "downloads": 0, "private": False,
              "tags": m.get("tags", []), "lastModified": m["lastModified"],
              **({"sha": m["sha"], "createdAt": m["lastModified"]} if full else {})} for m in page]
    headers = {}
    if start + page_size < len(models):
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
        query.append(("cursor", str(start + page_size)))
        from urllib.parse import urlencode

        headers["Link"] = f'<{str(request.base_url).rstrip("/")}/api/models?{urlencode(query)}>; rel="next"'
    return JSONResponse(items, headers=headers)


async def model_info(org: str, repo: str, request: Request):
    """The Hub's ``/api/models/{org}/{repo}``: a local mirror's model info at its default branch
    (olah's own payload, as its ``.../revision/main`` route gives it), else olah's handler."""
    if has_local_mirror(request.app, build_repo_ref("models", org, repo)):
        return await meta_proxy_common(request.app, "models", org, repo, "HEAD", request.method.lower(),
                                       request.headers.get("authorization"))
    return await meta_proxy_expanded("models", org, repo, request)


async def tree(org: str, repo: str, revision: str, path: str, request: Request, recursive: bool = False,
               expand: bool = False):
    """The Hub's ``/api/models/{org}/{repo}/tree/{revision}/{path}``: ``404 EntryNotFound`` when a
    mirrored repo's revision has no such path, else olah's handler."""
    found = load_local_mirror_payload(request.app, build_repo_ref("models", org, repo),
                                      lambda local: local.get_pathinfos(revision, [path]), logging.getLogger("olah"))
    if found == [] and path.strip("/"):  # the revision is in the mirror, the path is not
        return error_entry_not_found_branch(revision, path)
    return await tree_proxy_commit_expanded("models", org, repo, revision, path, request, recursive, expand)


async def count(request: Request) -> JSONResponse:
    return JSONResponse(counts)


app = server.app
olahs = len(app.router.routes)
app.add_api_route("/api/models", list_models, methods=["GET"])
app.add_api_route("/api/models/{org}/{repo}", model_info, methods=["GET", "HEAD"])
app.add_api_route("/api/models/{org}/{repo}/tree/{revision}/{path:path}", tree, methods=["GET", "HEAD"])
app.add_api_route("/_test/count", count, methods=["GET"])
ours = app.router.routes[olahs:]
app.router.routes[:] = ours + app.router.routes[:olahs]  # before olah's catch-alls
port = app.state.app_settings.config.port
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
