"""Runs the real ``olah`` Hub mirror (offline, serving the git mirrors a test built) plus ONE
added route olah lacks: ``GET /api/models``, the Hub's model listing, paged with a ``Link:
<...>; rel="next"`` header as the Hub pages it.

Run with the Python of the venv olah is installed in (``.venv-olah``):
``python olah_server.py CONFIG.toml LISTING.json PAGE_SIZE``. ``LISTING.json``: a list of
``{"id", "sha", "lastModified", "tags"}``; the request counter is at ``GET /_test/count``.
"""

import json
import os
import sys

config_path, listing_path, page_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["OLAH_CONFIG"] = config_path  # olah.server reads it on import (its multi-worker path)
os.environ.setdefault("OLAH_LOG_PATH", os.path.join(os.path.dirname(config_path), "logs"))

import uvicorn  # noqa: E402
from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from olah import server  # noqa: E402

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


async def count(request: Request) -> JSONResponse:
    return JSONResponse(counts)


app = server.app
app.add_api_route("/api/models", list_models, methods=["GET"])
app.add_api_route("/_test/count", count, methods=["GET"])
app.router.routes[:0] = [app.router.routes.pop(), app.router.routes.pop()]  # before olah's catch-alls
port = app.state.app_settings.config.port
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
