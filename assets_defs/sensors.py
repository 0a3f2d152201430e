"""Source sensors: new LoRA files in a watched local folder → ingest runs."""


import json
import os
from pathlib import Path

import dagster as dg

from assets_defs.jobs import ingest_job
from registry.ingest import CANDIDATE_SUFFIXES

WATCH_DIR_ENV = "AUTOLORA_WATCH_DIR"


def new_files(folder: Path, cursor: str | None) -> tuple[list[str], str]:
    """Candidate LoRA files in ``folder`` changed after the cursor (a high-water mark of
    max(mtime, ctime) in ns, plus the paths seen at exactly that instant); returns the new cursor."""
    state = json.loads(cursor) if cursor else {"mark": 0, "at_mark": []}
    mark, at_mark = int(state["mark"]), set(state["at_mark"])
    fresh: list[tuple[int, str]] = []
    for path in folder.rglob("*") if folder.is_dir() else []:
        if path.suffix.lower() not in CANDIDATE_SUFFIXES or not path.is_file():
            continue
        stat = path.stat()
        changed = max(stat.st_mtime_ns, stat.st_ctime_ns)  # ctime catches files moved in with old mtimes
        if changed > mark or (changed == mark and str(path) not in at_mark):
            fresh.append((changed, str(path)))
    if not fresh:
        return [], json.dumps({"mark": mark, "at_mark": sorted(at_mark)})
    new_mark = max(changed for changed, _ in fresh)
    keep = {p for c, p in fresh if c == new_mark} | (at_mark if new_mark == mark else set())
    return sorted(p for _, p in fresh), json.dumps({"mark": new_mark, "at_mark": sorted(keep)})


@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED)
def local_folder_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Watches ``$AUTOLORA_WATCH_DIR`` (default ``./loras``) and requests one ingest run per batch
    of new or changed files."""
    folder = Path(os.environ.get(WATCH_DIR_ENV, "loras"))
    paths, cursor = new_files(folder, context.cursor)
    if not paths:
        return dg.SensorResult(skip_reason=f"no new LoRA files in {folder}", cursor=cursor)
    run_config = {"ops": {"ingested_loras": {"config": {"paths": paths}}}}
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=cursor, run_config=run_config)], cursor=cursor)
