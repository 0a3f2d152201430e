"""Processes that create the same new registry at the same moment all get it (LanceDB tables and
their key marks are made by whichever comes first; the others must not fail on it)."""

from __future__ import annotations

import multiprocessing as mp
import traceback


def _open_when_released(root: str, barrier, results) -> None:
    try:
        from registry import Registry

        barrier.wait(timeout=60)
        reg = Registry.open(root)
        results.put(("ok", len(reg)))
    except Exception:  # noqa: BLE001  reported to the test, whatever it is
        results.put(("error", traceback.format_exc()[-4000:]))


def test_processes_creating_one_registry_at_once_all_open_it(tmp_path):
    ctx = mp.get_context("spawn")  # a fresh interpreter each, as separate CLI runs are
    for attempt in range(3):
        root, processes = tmp_path / f"registry-{attempt}", 4
        barrier, results = ctx.Barrier(processes), ctx.Queue()
        workers = [ctx.Process(target=_open_when_released, args=(str(root), barrier, results))
                   for _ in range(processes)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert [o for o in outcomes if o[0] != "ok"] == [], outcomes
        assert outcomes == [("ok", 0)] * processes
