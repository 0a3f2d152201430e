"""Registry vector search vs exact numpy top-k over the same vectors, in one run.

    .venv/bin/python benchmarks/search.py --rows 100000 --json

Builds a registry of N synthetic LoRA rows whose 384-d text vectors come from a clustered
distribution (like real sentence embeddings), lets the registry build its own indexes
(``Registry.ensure_indexes``), then times ``Registry.search_by_vector`` against exact cosine
top-k in numpy and reports recall@10 against the exact answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.store.schema import TEXT_DIM  # noqa: E402
from registry import Registry  # noqa: E402


def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 2048) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        out[start:stop] += 0.6 * rng.standard_normal((stop - start, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def fill(reg: Registry, vectors: np.ndarray, batch: int = 100_000) -> None:
    """Append synthetic rows column-wise (fast), in batches like a bulk ingest."""
    import pyarrow as pa

    schema = reg.loras.schema
    now = datetime.now(timezone.utc)
    for start in range(0, len(vectors), batch):
        ids = range(start, min(len(vectors), start + batch))
        n = len(ids)
        columns = {
            "lora_id": pa.array([f"lora-{i:08d}" for i in ids]),
            "name": pa.array([f"synthetic {i}" for i in ids]),
            "base_model": pa.array(["FLUX.1-dev"] * n),
            "search_text": pa.array([f"synthetic lora {i}" for i in ids]),
            "text_vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[start:start + n].reshape(-1)), TEXT_DIM),
            "added_at": pa.array([now] * n, type=schema.field("added_at").type),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema]
        reg.loras.add(pa.Table.from_arrays(arrays, schema=schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    vectors = clustered_vectors(args.rows, TEXT_DIM, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, args.rows, args.queries)] + 0.3 * rng.standard_normal(
        (args.queries, TEXT_DIM)).astype(np.float32) / np.sqrt(TEXT_DIM) * 4
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry.open(Path(tmp) / "registry")
        t0 = time.perf_counter()
        fill(reg, vectors)
        reg.ensure_indexes()
        build_s = time.perf_counter() - t0
        for q in queries[:5]:  # warm caches
            reg.search_by_vector(q, args.k)
        ours, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = reg.search_by_vector(q, args.k)
            ours.append(time.perf_counter() - t)
            found.append({h.lora_id for h in hits})
        exact, recalls = [], []
        for q, got in zip(queries, found):
            t = time.perf_counter()
            scores = vectors @ q
            top = np.argpartition(-scores, args.k)[: args.k]
            top = top[np.argsort(-scores[top])]
            exact.append(time.perf_counter() - t)
            recalls.append(len(got & {f"lora-{i:08d}" for i in top}) / args.k)
        index = sorted(reg._indexed_vectors()) or "flat"
    result = {
        "rows": args.rows, "p50_ms": 1e3 * float(np.percentile(ours, 50)),
        "p99_ms": 1e3 * float(np.percentile(ours, 99)), "exact_p50_ms": 1e3 * float(np.percentile(exact, 50)),
        "recall_at_10": float(np.mean(recalls)), "index": index,
        "build_s": build_s,
    }
    result["ratio_vs_exact"] = result["p50_ms"] / result["exact_p50_ms"]
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
