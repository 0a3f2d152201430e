"""Source sensors: new LoRA files in a watched local folder → ingest runs."""


import os
from pathlib import Path

import dagster as dg

from assets_defs.jobs import ingest_job
from pipelines.sources.local import changed_files

WATCH_DIR_ENV = "AUTOLORA_WATCH_DIR"


@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED)
def local_folder_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Watches ``$AUTOLORA_WATCH_DIR`` (default ``./loras``) and requests one ingest run per batch
    of new or changed files."""
    folder = Path(os.environ.get(WATCH_DIR_ENV, "loras"))
    paths, cursor = changed_files(folder, context.cursor)
    if not paths:
        return dg.SensorResult(skip_reason=f"no new LoRA files in {folder}", cursor=cursor)
    run_config = {"ops": {"ingested_loras": {"config": {"paths": paths}}}}
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=cursor, run_config=run_config)], cursor=cursor)
