"""Registry vector search vs exact numpy top-k over the same vectors, warm and cold.

    .venv/bin/python benchmarks/search.py --rows 1000000 --registry /tmp/bench-1m --json

Builds a registry of N synthetic LoRA rows whose 384-d text vectors come from a clustered
distribution (like real sentence embeddings) and lets the registry build its own indexes
(``Registry.maintain``); ``--registry DIR`` keeps it there and reuses it on the next run. Then:

* warm: this process opens the registry, runs a few queries, and times ``search_by_vector`` and
  exact cosine top-k in numpy (recall@10 against the exact answer);
* cold: every file of the table is dropped from the OS page cache (fsync +
  ``POSIX_FADV_DONTNEED``) and a fresh process opens the registry and runs the same queries: its
  first query (which loads the indexes) and its steady p50/p99 are reported apart.

Load average (``os.getloadavg``) is reported beside the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry import Registry  # noqa: E402
from registry.store.schema import TEXT_DIM  # noqa: E402


def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 2048) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (cosine ~0.7 to their centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        out[start:stop] += 0.6 * rng.standard_normal((stop - start, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def queries_near(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Unit query vectors: random rows plus noise of norm ~1.2."""
    rng = np.random.default_rng(seed)
    dim = vectors.shape[1]
    queries = vectors[rng.integers(0, len(vectors), count)] + 0.3 * rng.standard_normal(
        (count, dim)).astype(np.float32) / np.sqrt(dim) * 4
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def fill(reg: Registry, vectors: np.ndarray, batch: int = 100_000, start_id: int = 0,
         texts=None) -> None:
    """Append synthetic LoRA rows column-wise (fast), in batches like a bulk ingest; row ``i``
    is ``lora-{start_id + i:08d}`` with search text ``texts(i)`` (default ``synthetic lora i``)."""
    import pyarrow as pa

    schema = reg.loras.schema
    now = datetime.now(timezone.utc)
    for start in range(0, len(vectors), batch):
        ids = range(start_id + start, start_id + min(len(vectors), start + batch))
        n = len(ids)
        columns = {
            "lora_id": pa.array([f"lora-{i:08d}" for i in ids]),
            "name": pa.array([f"synthetic {i}" for i in ids]),
            "base_model": pa.array(["FLUX.1-dev"] * n),
            "search_text": pa.array([texts(i) if texts else f"synthetic lora {i}" for i in ids]),
            "text_vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[start:start + n].reshape(-1)), TEXT_DIM),
            "added_at": pa.array([now] * n, type=schema.field("added_at").type),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema]
        reg.loras.add(pa.Table.from_arrays(arrays, schema=schema))


def drop_page_cache(root: Path) -> int:
    """Drop every file under ``root`` from the OS page cache; returns the bytes dropped."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


# Runs a command as the grandchild of a small process and reports its own peak RSS: a child's
# ru_maxrss includes the RSS of the process it was forked from (Linux folds the forked copy of
# the parent's memory into it at exec), so this benchmark's own ~GBs would show up.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMEASURED {time.perf_counter() - start} {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Run ``command`` (its first item an executable path); its wall seconds, its peak RSS in MB
    and its stdout. Raises with its stderr if it fails."""
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command} failed ({done.returncode}): {done.stderr[-3000:]}")
    _, seconds, peak_kb = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(peak_kb) / 1024, done.stdout


def percentiles(seconds: list[float]) -> dict:
    return {"p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p99_ms": 1e3 * float(np.percentile(seconds, 99))}


def run_queries(root: Path, queries: np.ndarray, k: int) -> dict:
    """Open the registry (as a search process does), time every query; the first apart."""
    start = time.perf_counter()
    reg = Registry.open(root, create=False)
    opened = time.perf_counter()
    times, found = [], []
    for query in queries:
        t = time.perf_counter()
        hits = reg.search_by_vector(query, k)
        times.append(time.perf_counter() - t)
        found.append([h.lora_id for h in hits])
    return {"open_s": opened - start, "first_query_ms": 1e3 * times[0], **percentiles(times[1:]),
            "found": found}


def recall(found: list[list[str]], exact: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f) & {f"lora-{i:08d}" for i in e}) / len(e) for f, e in zip(found, exact)]))


def build(root: Path, vectors: np.ndarray) -> float | None:
    """Fill and index a registry at ``root`` unless it already holds these rows; build seconds."""
    if root.is_dir() and any(root.iterdir()):
        reg = Registry.open(root, create=False)
        if len(reg) == len(vectors):
            return None
        raise SystemExit(f"{root} holds {len(reg)} rows, not {len(vectors)}: give another --registry")
    start = time.perf_counter()
    reg = Registry.open(root)
    fill(reg, vectors)
    report = reg.maintain()
    if report.yielded:
        raise SystemExit(f"maintain yielded: {report.yielded}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--registry", type=Path, help="build here and keep it (reused when it holds --rows rows)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold fresh-process run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("REGISTRY", "QUERIES_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_queries(Path(args.child[0]), np.load(args.child[1]), args.k)))
        return

    vectors = clustered_vectors(args.rows, TEXT_DIM, seed=0)
    queries = queries_near(vectors, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.registry or Path(tmp) / "registry"
        build_s = build(root, vectors)
        exact, exact_s = [], []
        for query in queries:
            t = time.perf_counter()
            scores = vectors @ query
            top = np.argpartition(-scores, args.k)[: args.k]
            exact.append(top[np.argsort(-scores[top])])
            exact_s.append(time.perf_counter() - t)
        load_before = os.getloadavg()[0]
        warm = run_queries(root, np.concatenate([queries[:5], queries]), args.k)  # 5 to warm up
        warm["found"] = warm["found"][5:]
        result = {
            "rows": args.rows, "queries": args.queries, "build_s": build_s,
            "index": sorted({i.index_type for i in Registry.open(root, create=False).loras.list_indices()
                             if "text_vector" in i.columns}) or "flat",
            "p50_ms": warm["p50_ms"], "p99_ms": warm["p99_ms"], "recall_at_10": recall(warm["found"], exact),
            "exact_p50_ms": percentiles(exact_s)["p50_ms"],
        }
        result["ratio_vs_exact"] = result["p50_ms"] / result["exact_p50_ms"]
        if not args.no_cold:
            np.save(Path(tmp) / "queries.npy", queries)
            dropped = drop_page_cache(root / "lancedb")
            _, peak_mb, out = run_measured(
                [sys.executable, __file__, "--k", str(args.k), "--child", str(root), str(Path(tmp) / "queries.npy")])
            cold = json.loads(out.strip().splitlines()[-1])
            result.update({
                "cold_dropped_mb": dropped / 2**20, "cold_open_s": cold["open_s"],
                "cold_first_query_ms": cold["first_query_ms"], "cold_p50_ms": cold["p50_ms"],
                "cold_p99_ms": cold["p99_ms"], "cold_recall_at_10": recall(cold["found"], exact),
                "cold_peak_rss_mb": peak_mb,
            })
        result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
