"""The registry at scale: ingest throughput at 0 and 10k rows, cold and warm search at 100k rows.

    .venv/bin/python benchmarks/scale.py --json [--workdir DIR]

1. ingest: 2,000 generated FLUX.1-dev LoRAs (real layer names and shapes, rank 2, a few
   attention layers each, diffusers format, distinct names) are ingested in two batches of 1,000,
   each by a fresh process timing ``Registry.add``: the first into an empty registry, the
   second once the registry holds ~10,000 rows (the first 1,000 plus ~8,000 synthetic rows
   appended in bulk to the ``loras`` and ``files`` tables, then ``maintain()``).
2. search: the registry grows to 100,000 rows (synthetic: random unit vectors, distinct search
   texts) and ``maintain()`` builds its full-text and vector indexes; then ``autolora search``
   runs in new processes with the registry's files dropped from the OS page cache (wall time
   and peak RSS of the process; median of ``--cold-runs``), one more reports where the time of
   a cold search goes, and this process times the same hybrid search warm (p50 over ~100 prompts).

Prints one JSON object (``--json``) or one line per number.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from search import drop_page_cache, fill, run_measured  # noqa: E402  (benchmarks/search.py)

from registry import Registry  # noqa: E402
from registry.store.schema import TEXT_DIM  # noqa: E402

WORDS = ("ember glow neon city pencil sketch ocean wave forest mist pixel art anime portrait "
         "watercolor oil painting cyberpunk retro film grain studio light castle dragon robot "
         "flower garden winter snow desert sunset night rain gothic baroque minimal line comic "
         "vintage photo cinematic fog marble statue glass crystal metal rust paper cut origami "
         "clay felt lego voxel isometric map tarot card stained ink wash charcoal chalk").split()


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def make_loras(folder: Path, count: int, seed: int) -> None:
    """``count`` small FLUX.1-dev LoRAs (rank 2, the attention projections of one or two double
    blocks) in diffusers format, each with its own weights and a name of a few words."""
    import torch

    from registry.lora.base_models import flux1_dev
    from registry.lora.formats import save_lora

    shapes = flux1_dev().layer_shapes
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        blocks = rng.choice(19, size=int(rng.integers(1, 3)), replace=False)
        layers = {}
        for block in blocks:
            for proj in ("to_q", "to_k", "to_v"):
                name = f"transformer_blocks.{block}.attn.{proj}"
                d, k = shapes[name]
                layers[name] = (torch.randn(2, k, generator=gen, dtype=torch.float32).to(torch.float16) * 0.01,
                                torch.randn(d, 2, generator=gen, dtype=torch.float32).to(torch.float16) * 0.01)
        save_lora(folder / f"lora_{seed}_{i:05d}.safetensors", layers, "diffusers",
                  metadata={"ss_output_name": f"{words(rng, 3)} {seed}-{i}"})


def fill_files(reg: Registry, start_id: int, count: int, seed: int) -> None:
    """One ``files`` row per synthetic LoRA row (what ingest would have recorded for it)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    schema = reg.files.schema
    ids = range(start_id, start_id + count)
    columns = {
        "path": pa.array([f"/synthetic/lora-{i:08d}.safetensors" for i in ids]),
        "sha256": pa.array([rng.bytes(32).hex() for _ in ids]),
        "lora_id": pa.array([f"lora-{i:08d}" for i in ids]),
        "format": pa.array(["diffusers"] * count),
        "size_bytes": pa.array(rng.integers(10**6, 10**9, count), type=pa.int64()),
        "mtime_ns": pa.array(rng.integers(10**18, 2 * 10**18, count), type=pa.int64()),
        "inode": pa.array(rng.integers(1, 10**9, count), type=pa.int64()),
        "seen_at": pa.array([datetime.now(timezone.utc)] * count, type=schema.field("seen_at").type),
    }
    arrays = [columns[f.name] if f.name in columns else pa.nulls(count, f.type) for f in schema]
    reg.files.add(pa.Table.from_arrays(arrays, schema=schema))


def grow(reg: Registry, start_id: int, count: int, seed: int) -> None:
    """Append ``count`` synthetic rows (random unit vectors, distinct texts) to loras and files."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, TEXT_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = {i: f"{words(rng, 4)} synthetic {i}" for i in range(start_id, start_id + count)}
    fill(reg, vectors, start_id=start_id, texts=texts.__getitem__)
    fill_files(reg, start_id, count, seed)


def timed_ingest(registry: Path, folder: Path) -> dict:
    """Ingest ``folder`` in a fresh process; the seconds ``Registry.add`` took, and its report."""
    code = ("import json, sys, time; from registry import Registry; reg = Registry.open(sys.argv[1]); "
            "t = time.perf_counter(); r = reg.add([sys.argv[2]]); s = time.perf_counter() - t; "
            "print(json.dumps({'seconds': s, 'added': len(r.added), 'rejected': len(r.rejected), "
            "'duplicates': len(r.duplicates), 'rows': len(reg)}))")
    out = subprocess.run([sys.executable, "-c", code, str(registry), str(folder)], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["added"] != len(list(folder.iterdir())):
        raise SystemExit(f"ingest of {folder} added {result['added']}: {result}")
    return result


BREAKDOWN = """
import json, sys, time
t0 = time.perf_counter()
from pipelines import cli
from registry import Registry
t1 = time.perf_counter()
reg = Registry.open(sys.argv[1], create=False)
t2 = time.perf_counter()
reg._searcher.warm()
from models.text_encoder import default_text_encoder
encoder = default_text_encoder()
t3 = time.perf_counter()
vector = encoder.encode([sys.argv[2]])
t4 = time.perf_counter()
reg._searcher.warm(wait=True)
t5 = time.perf_counter()
hits = reg.search(sys.argv[2], k=5)
t6 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "encoder_load_s": t3 - t2, "embed_s": t4 - t3,
                  "index_wait_s": t5 - t4, "search_s": t6 - t5, "total_s": t6 - t0}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the LoRA files here and reuse them (default: a temp dir)")
    parser.add_argument("--files", type=int, default=1000, help="LoRA files per ingest batch")
    parser.add_argument("--at", type=int, default=10_000, help="rows before the second ingest batch")
    parser.add_argument("--search-rows", type=int, default=100_000)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    result: dict = {"load_avg_1m_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        first, second = work / "loras_a", work / "loras_b"
        for folder, seed in ((first, 1), (second, 2)):
            if not folder.is_dir() or len(list(folder.iterdir())) != args.files:
                make_loras(folder, args.files, seed)
        root = Path(tmp) / "registry"

        run = timed_ingest(root, first)
        result["ingest_first_fps"] = args.files / run["seconds"]
        reg = Registry.open(root)
        grow(reg, 10**7, args.at - len(reg) - args.files, seed=3)
        reg.maintain()
        result["rows_before_second_batch"] = len(reg)
        run = timed_ingest(root, second)
        result["ingest_at_10k_fps"] = args.files / run["seconds"]
        result["ingest_per_file_ratio"] = result["ingest_first_fps"] / result["ingest_at_10k_fps"]

        t = time.perf_counter()
        grow(reg, 2 * 10**7, args.search_rows - len(reg), seed=4)
        report = reg.maintain()
        result["search_rows"] = len(reg)
        result["maintain_100k_s"] = time.perf_counter() - t
        if report.yielded:
            raise SystemExit(f"maintain yielded: {report.yielded}")
        result["indexes"] = sorted(f"{i.columns[0]}:{i.index_type}" for i in reg.loras.list_indices())

        rng = np.random.default_rng(5)
        prompts = [words(rng, 3) for _ in range(args.queries + 1)]
        colds, rss = [], []
        for i in range(args.cold_runs):
            drop_page_cache(root)
            seconds, peak, out = run_measured([sys.executable, "-m", "pipelines.cli", "search", prompts[i],
                                               "--registry", str(root), "-k", "5", "--json"], cwd=ROOT)
            assert len(json.loads(out)) == 5, out
            colds.append(seconds)
            rss.append(peak)
        result["cold_search_s"] = float(np.median(colds))
        result["cold_search_runs_s"] = [round(s, 3) for s in colds]
        result["peak_rss_mb"] = max(rss)
        drop_page_cache(root)
        _, _, out = run_measured([sys.executable, "-c", BREAKDOWN, str(root), prompts[-1]], cwd=ROOT)
        result["cold_breakdown_s"] = {k: round(v, 3) for k, v in json.loads(out).items()}

        warm = Registry.open(root, create=False)
        warm.search(prompts[0], k=5)  # opens the table, loads the indexes and the text model
        times = []
        for prompt in prompts[1:]:
            t = time.perf_counter()
            warm.search(prompt, k=5)
            times.append(time.perf_counter() - t)
        result["warm_search_p50_ms"] = 1e3 * float(np.percentile(times, 50))
        result["warm_search_p99_ms"] = 1e3 * float(np.percentile(times, 99))
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
