"""Ingest of one real-shaped FLUX.1-dev LoRA vs the floor of reading + hashing its bytes.

    .venv/bin/python benchmarks/ingest.py --json
    .venv/bin/python benchmarks/ingest.py --profile 40      # + cProfile of one add, to stderr

Builds a rank-16 LoRA on every linear layer of FLUX.1-dev's 19 double and 38 single blocks
(494 layers, names and shapes from ``registry.lora.base_models.flux1_dev()``), bfloat16, written in
the diffusers format with ``registry.lora.formats.save_lora`` into a temp dir (~172 MB). Then:

* ``floor_s``: median time of ``registry.hashing.sha256_file`` over the file, page cache warm
  (the least any ingest must do: read every byte and hash it);
* ``ingest_s``: median time of ``Registry.add([file])`` into a fresh registry per repetition.
  The registry is opened (LanceDB tables created) before the clock starts; everything ``add``
  does is timed (hashing, validation, canonicalisation, fingerprint, blob copy, text embedding,
  LanceDB writes, index creation). Before timing, one warm-up ``add`` of a *different*, small
  LoRA into a throwaway registry loads the MiniLM text encoder, diffusers and FLUX.1-dev's
  base-model description, which are one-time per-process costs.

``ratio = ingest_s / floor_s``; the target is <= 2. ``--json`` prints only the JSON object.
Also reported: ``ingest_cpu_s`` and ``floor_cpu_s``, the medians of the process CPU time (all
threads) of the same runs. On a machine shared with other CPU-bound work, the overlapped
threads of an ingest get less than a core each, so wall times there track CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.lora.base_models import flux1_dev  # noqa: E402
from registry.hashing import sha256_file  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402
from registry import Registry  # noqa: E402

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def build_layers(names: list[str], rank: int, dtype: torch.dtype, seed: int):
    """Random ``(A [r,k], B [d,r])`` per layer, ΔW entries ~1e-4 (like a trained LoRA)."""
    shapes = flux1_dev().layer_shapes
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        d, k = shapes[name]
        a = torch.randn(rank, k, generator=gen) / k**0.5 * 0.1
        b = torch.randn(d, rank, generator=gen) * 0.01
        layers[name] = (a.to(dtype), b.to(dtype))
    return layers


def read_all(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each measure")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="also cProfile one extra add and print the top N functions "
                             "(cumulative and own time) to stderr")
    args = parser.parse_args()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    names = [n for n in flux1_dev().layer_shapes if n.startswith(BLOCKS)]
    with tempfile.TemporaryDirectory(prefix="autolora-bench-ingest-") as tmp_dir:
        tmp = Path(tmp_dir)
        lora = tmp / "flux1-dev-full-r16.safetensors"
        save_lora(lora, build_layers(names, args.rank, dtype, seed=0), "diffusers")
        size = lora.stat().st_size
        log(f"LoRA: {len(names)} layers, rank {args.rank}, {args.dtype}, "
            f"{size} bytes ({size / 1e6:.1f} MB)")

        # Warm-up: a different, small LoRA (two blocks) into a throwaway registry loads the text
        # encoder, diffusers' converters and flux1_dev() once, outside the timed runs.
        small = tmp / "warmup.safetensors"
        few = [n for n in names if n.startswith(("transformer_blocks.0.",
                                                 "single_transformer_blocks.0."))]
        save_lora(small, build_layers(few, 4, dtype, seed=1), "diffusers")
        warm = Registry.open(tmp / "warmup-registry").add([small])
        assert len(warm.added) == 1, warm.to_dict()
        shutil.rmtree(tmp / "warmup-registry")

        read_all(lora)  # page cache warm for both measures
        sha = sha256_file(lora)
        floors, floor_cpus = [], []
        for _ in range(args.reps):
            t, c = time.perf_counter(), time.process_time()
            assert sha256_file(lora) == sha
            floors.append(time.perf_counter() - t)
            floor_cpus.append(time.process_time() - c)

        ingests, ingest_cpus = [], []
        for i in range(args.reps):
            root = tmp / f"registry-{i}"
            reg = Registry.open(root)  # LanceDB tables created outside the clock
            t, c = time.perf_counter(), time.process_time()
            report = reg.add([lora])
            ingests.append(time.perf_counter() - t)
            ingest_cpus.append(time.process_time() - c)
            assert len(report.added) == 1, report.to_dict()
            del reg
            shutil.rmtree(root)
            read_all(lora)  # keep the source in cache however the blob copy went

        if args.profile:
            root = tmp / "registry-profile"
            reg = Registry.open(root)
            profiler = cProfile.Profile()
            profiler.enable()
            reg.add([lora])
            profiler.disable()
            for key in ("cumulative", "tottime"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.profile)
                print(out.getvalue(), file=sys.stderr)

    floor_s, ingest_s = statistics.median(floors), statistics.median(ingests)
    result = {"ingest_s": round(ingest_s, 4), "floor_s": round(floor_s, 4),
              "ratio": round(ingest_s / floor_s, 3), "file_mb": round(size / 1e6, 3),
              "ingest_cpu_s": round(statistics.median(ingest_cpus), 4),
              "floor_cpu_s": round(statistics.median(floor_cpus), 4)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"file:   {size} bytes = {size / 1e6:.3f} MB ({len(names)} layers, "
              f"rank {args.rank}, {args.dtype})")
        print(f"floor:  {floor_s:.3f} s  (sha256 of the bytes, median of {args.reps}: "
              + ", ".join(f"{x:.3f}" for x in floors) + ")")
        print(f"ingest: {ingest_s:.3f} s  (Registry.add, median of {args.reps}: "
              + ", ".join(f"{x:.3f}" for x in ingests) + ")")
        print(f"ratio:  {ingest_s / floor_s:.2f}  (target <= 2)")
        print(f"cpu:    ingest {result['ingest_cpu_s']:.3f} s, floor {result['floor_cpu_s']:.3f} s "
              "(process CPU time, medians)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
