"""Ingest of real-shaped FLUX.1-dev LoRAs, one per file format, vs the floor of reading + hashing.

    .venv/bin/python benchmarks/ingest.py --json                 # every format
    .venv/bin/python benchmarks/ingest.py --format kohya         # one format
    .venv/bin/python benchmarks/ingest.py --format kohya --profile 40   # + cProfile, to stderr

For each format the writers produce (``registry.lora.formats.FORMATS``: diffusers, kohya,
comfyui, xlabs, onetrainer, bfl_peft) a rank-16 LoRA on FLUX.1-dev's 19 double and 38 single
blocks (names and shapes from ``registry.lora.base_models.flux1_dev()``), bfloat16, is written
with ``registry.lora.formats.save_lora`` into a temp dir, shaped as files of that format are in
the wild:

* diffusers, onetrainer (trained on the diffusers model): every one of the 494 linear layers of
  the blocks has its own rank-16 A and B (~172 MB);
* kohya, comfyui, bfl_peft (trained on the original BFL model): every one of the 304 BFL modules
  of the blocks (fused ``qkv``, ``linear1``, ...) has one rank-16 A and B (~153 MB);
* xlabs: XLabs adapts attention only (``processor.qkv_lora1/2``, ``proj_lora1/2`` of the double
  blocks, ``qkv_lora`` = q/k/v and ``proj_lora`` = ``linear2`` of the single blocks), so its
  LoRA covers exactly what XLabs can name, again one rank-16 A and B per (fused) module
  (~60 MB).

Then, per format:

* ``floor_s``: median time of ``registry.hashing.sha256_file`` over the file, page cache warm
  (the least any ingest must do: read every byte and hash it; through a memory map, the fastest
  read here, so ingest's own mapped read is not measured against a slower ``read()`` floor);
* ``ingest_s``: median time of ``Registry.add([file])`` into a fresh registry per repetition
  that already holds one other LoRA of the same format and shape (so of the same size, as LoRAs
  of one trainer and recipe are: the size look-up finds it, and the tables are not empty).
  The registry is opened and that LoRA added before the clock starts; everything ``add``
  does is timed (hashing, validation, canonicalisation, fingerprint, blob copy, text embedding,
  LanceDB writes, index creation). Before timing, one warm-up ``add`` of a *different*, small
  LoRA of the same format into a throwaway registry loads the MiniLM text encoder, diffusers
  (and its converter for the format) and the built-in base-model descriptions, which are
  one-time per-process costs. The line vectors the process keeps (``registry.text``) are dropped
  before each timed add, so its LoRA's text is embedded each time, as a new LoRA's would be.
  The files are synced to disk before the first measure (``os.sync``): a user's LoRAs were written
  long before they are added, and the write-back of 300 MB just written otherwise lands in the
  timed adds (probed XLabs: 2.75 and 3.04 unsynced, 2.53 and 2.56 synced, the same code).

* ``copy_s``: median time of the blob store's own staging of the same file into an empty store
  (``BlobStore.stage``: the sha256 and the ``O_DIRECT`` copy, pipelined, as ingest runs it beside
  inspection), timed right after each ingest, page cache warm: the least an ingest that keeps a
  copy of every file must do on this disk (when it is much above ``floor_s``, the disk, not the
  registry, sets the pace). ``copy_ratio`` (the median of ``ingest / copy``) is what the registry
  adds on top of storing the bytes.

``--folder N`` also times what users mostly do, one ``add`` of a folder of N LoRAs of the format
(``folder_ingest_s`` against ``folder_floor_s``, hashing the N files; ``folder_ratio``): the LanceDB
writes of a folder are batched, so the fixed cost of an add is shared.

``--with-encoder`` adds the weight channel: every registry (the warm-up one too) gets an active
LoRA-weight encoder for FLUX.1-dev (untrained: the cost does not depend on the weights) before
the clock starts, so each timed ``add`` also embeds the LoRA from its weights. ``--encoder-design``
picks it: ``learned`` (default: learned probes, two transformer blocks, what ``autolora train
encoder`` trains without ``--probes-from``) or ``probed`` (one fixed probe per layer, no blocks:
what ``--probes-from`` and the demo train).

``ratio`` is the median of ``ingest / floor`` over the repetitions, each an ingest timed right
after a floor (the machine's speed drifts by tens of percent over minutes); the target is <= 2 (<= 2.5 with the embedding). An ``add`` also has a fixed cost (~0.04 s
on the 2-core dev VM: two LanceDB lookups before and one after inspection, the text embedding,
two merge-inserts), which weighs most on the smallest file, XLabs'. Also reported: ``ingest_cpu_s`` and
``floor_cpu_s``, the medians of the process CPU time (all threads) of the same runs. On a
machine shared with other CPU-bound work, the overlapped threads of an ingest get less than a
core each, so wall times there track CPU time; ``load`` is ``os.getloadavg()`` before and after.
``--json`` prints only ``{"formats": {"kohya": {"ingest_s", "floor_s", "ratio", ...}, ...},
"load": {...}}``.
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

from registry import Registry  # noqa: E402
from registry.hashing import sha256_file  # noqa: E402
from registry.text import forget_line_vectors  # noqa: E402
from registry.lora.base_models import flux1_dev  # noqa: E402
from registry.store.blobstore import BlobStore  # noqa: E402
from registry.lora.formats import FORMATS, get, save_lora  # noqa: E402
from registry.lora.formats.names import BFL_BLOCKS  # noqa: E402

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]


def module_groups(fmt: str, double: range, single: range) -> list[tuple[str, ...]]:
    """Canonical layer names per LoRA module of a file of format ``fmt`` (several = fused): the
    format writer's fused modules (BFL's for kohya/comfyui/bfl_peft, XLabs' attention
    processors), else one module per layer of the BFL blocks."""
    tables = get(fmt).writer.fused or {
        kind: {p: (p,) for parts in table.values() for p in parts}
        for kind, table in BFL_BLOCKS.items()}
    groups = [tuple(f"transformer_blocks.{i}.{p}" for p in parts)
              for i in double for parts in tables["double_blocks"].values()]
    groups += [tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
               for i in single for parts in tables["single_blocks"].values()]
    return groups


def build_layers(groups: list[tuple[str, ...]], rank: int, dtype: torch.dtype,
                 seed: int) -> Layers:
    """One random ``(A [r,k], B [d,r])`` per module, ΔW entries ~1e-4 (like a trained LoRA);
    the parts of a fused module share A and split B's rows, as a fused file stores them."""
    shapes = flux1_dev().layer_shapes
    gen = torch.Generator().manual_seed(seed)
    layers: Layers = {}
    for parts in groups:
        k = shapes[parts[0]][1]
        a = (torch.randn(rank, k, generator=gen) / k**0.5 * 0.1).to(dtype)
        for part in parts:
            b = torch.randn(shapes[part][0], rank, generator=gen) * 0.01
            layers[part] = (a, b.to(dtype))
    return layers


def read_all(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def flux_encoder(path: Path, design: str = "learned") -> Path:
    """An (untrained) LoRA-weight encoder for FLUX.1-dev, saved at ``path``: our design with
    learned probes (``learned``, what ``autolora train encoder`` trains by default) or with one
    fixed probe per layer and no transformer blocks (``probed``: ``--probes-from``, as the demo)."""
    from models.encoder import EncoderConfig, LoRAWeightEncoder
    from models.encoder_tokens import LayerSpec
    from pipelines.encoder_pool import PROBED

    base = flux1_dev()
    config = EncoderConfig.ours(**PROBED) if design == "probed" else EncoderConfig.ours()
    encoder = LoRAWeightEncoder([LayerSpec(n, d, k) for n, (d, k) in base.layer_shapes.items()], config)
    encoder.save(path, "bench-flux1-dev", {"base_model": base.name})
    return path


def open_registry(root: Path, encoder: Path | None) -> Registry:
    reg = Registry.open(root)  # LanceDB tables created outside the clock
    if encoder is not None:
        reg.register_encoder(encoder)
    return reg


def bench_format(fmt: str, tmp: Path, args: argparse.Namespace, log, encoder: Path | None = None) -> dict:
    """Write the format's LoRA, warm up, then time the floor and ``Registry.add``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    groups = module_groups(fmt, range(19), range(38))
    lora = tmp / f"flux1-dev-{fmt}-r{args.rank}.safetensors"
    layers = build_layers(groups, args.rank, dtype, seed=0)
    save_lora(lora, layers, fmt)
    size = lora.stat().st_size
    log(f"[{fmt}] {len(groups)} modules = {len(layers)} layers, rank {args.rank}, {args.dtype}, "
        f"{size} bytes ({size / 1e6:.1f} MB)")

    # Warm-up: a different, small LoRA (two blocks) of the same format into a throwaway
    # registry loads the text encoder, diffusers' converters and flux1_dev() once, untimed.
    small = tmp / f"warmup-{fmt}.safetensors"
    save_lora(small, build_layers(module_groups(fmt, range(1), range(1)), 4, dtype, seed=1), fmt)
    warm = open_registry(tmp / "warmup-registry", encoder).add([small])
    assert len(warm.added) == 1, warm.to_dict()
    shutil.rmtree(tmp / "warmup-registry")

    # A stored LoRA of the same shape (another seed): the same size, as a registry's others often are
    neighbour = tmp / f"neighbour-{fmt}.safetensors"
    save_lora(neighbour, build_layers(groups, args.rank, dtype, seed=2), fmt)
    assert neighbour.stat().st_size == size, (neighbour.stat().st_size, size)
    os.sync()  # the files just written reach the disk before the clock runs (as a user's LoRAs have)

    # Floor and ingest alternate, so that both see the same state of a machine whose speed
    # drifts (shared host, proactive page reclaim): the ratio is the median of the pairs'.
    sha = sha256_file(lora)
    floors, floor_cpus, ingests, ingest_cpus, copies = [], [], [], [], []
    blobs = BlobStore(tmp / "copy-store")
    for i in range(args.reps):
        root = tmp / f"registry-{i}"
        reg = open_registry(root, encoder)
        assert len(reg.add([neighbour]).added) == 1
        read_all(lora)  # page cache warm for both measures, however the last blob copy went
        t, c = time.perf_counter(), time.process_time()
        assert sha256_file(lora) == sha
        floors.append(time.perf_counter() - t)
        floor_cpus.append(time.process_time() - c)
        forget_line_vectors()  # the same file each time: its text is embedded each time, as a new LoRA's
        t, c = time.perf_counter(), time.process_time()
        report = reg.add([lora])
        ingests.append(time.perf_counter() - t)
        ingest_cpus.append(time.process_time() - c)
        assert len(report.added) == 1, report.to_dict()
        del reg
        shutil.rmtree(root)
        t = time.perf_counter()
        copied, staged = blobs.stage(lora)
        copies.append(time.perf_counter() - t)
        blobs.discard(staged)
        assert copied == sha

    if args.profile:
        root = tmp / "registry-profile"
        reg = open_registry(root, encoder)
        forget_line_vectors()
        profiler = cProfile.Profile()
        profiler.enable()
        reg.add([lora])
        profiler.disable()
        for key in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.profile)
            print(f"[{fmt}] profile by {key}:\n{out.getvalue()}", file=sys.stderr)
        del reg
        shutil.rmtree(root)
    lora.unlink()
    folder = bench_folder(fmt, tmp, args, layers, encoder) if args.folder else {}

    floor_s, ingest_s = statistics.median(floors), statistics.median(ingests)
    ratio = statistics.median(i / f for i, f in zip(ingests, floors))
    copy_s, copy_ratio = statistics.median(copies), statistics.median(i / c for i, c in zip(ingests, copies))
    result = {"ingest_s": round(ingest_s, 4), "floor_s": round(floor_s, 4),
              "ratio": round(ratio, 3), "copy_s": round(copy_s, 4), "copy_ratio": round(copy_ratio, 3),
              "file_mb": round(size / 1e6, 3),
              "ingest_cpu_s": round(statistics.median(ingest_cpus), 4),
              "floor_cpu_s": round(statistics.median(floor_cpus), 4),
              "modules": len(groups), "layers": len(layers),
              "ingest_runs_s": [round(x, 4) for x in ingests],
              "floor_runs_s": [round(x, 4) for x in floors],
              "copy_runs_s": [round(x, 4) for x in copies], **folder}
    log(f"[{fmt}] floor:  {floor_s:.3f} s  (sha256 of the bytes, median of {args.reps}: "
        + ", ".join(f"{x:.3f}" for x in floors) + ")")
    log(f"[{fmt}] ingest: {ingest_s:.3f} s  (Registry.add, median of {args.reps}: "
        + ", ".join(f"{x:.3f}" for x in ingests) + ")")
    log(f"[{fmt}] ratio:  {ratio:.2f}  (median of the pairs'; target <= 2); cpu: ingest "
        f"{result['ingest_cpu_s']:.3f} s, floor {result['floor_cpu_s']:.3f} s (medians)")
    log(f"[{fmt}] copy:   {copy_s:.3f} s  (the blob store's hash + copy alone, median of {args.reps}: "
        + ", ".join(f"{x:.3f}" for x in copies) + f"); ingest / copy {copy_ratio:.2f}")
    if folder:
        log(f"[{fmt}] folder of {args.folder}: {folder['folder_ingest_s']:.3f} s vs floor "
            f"{folder['folder_floor_s']:.3f} s, ratio {folder['folder_ratio']:.2f}")
    return result


def bench_folder(fmt: str, tmp: Path, args: argparse.Namespace, layers: Layers,
                 encoder: Path | None) -> dict:
    """One ``Registry.add([folder])`` of ``args.folder`` different LoRAs of the format (the
    first's factors with every B rescaled: other weights, same shapes, and a header naming each
    as trainers do, so sizes differ by a few bytes as real files' do) against the floor of
    hashing the same files one after another; median of ``args.reps``."""
    folder = tmp / f"folder-{fmt}"
    folder.mkdir()
    for i in range(args.folder):
        save_lora(folder / f"lora-{i}.safetensors",
                  {n: (a, (b.float() * (1.5 + i)).to(b.dtype)) for n, (a, b) in layers.items()}, fmt,
                  metadata={"ss_output_name": f"style-{'v' * 8 * (i + 1)}"})
    files = sorted(folder.iterdir())
    floors, ingests = [], []
    for i in range(args.reps):
        for f in files:
            read_all(f)
        t = time.perf_counter()
        for f in files:
            sha256_file(f)
        floors.append(time.perf_counter() - t)
        root = tmp / f"registry-folder-{i}"
        reg = open_registry(root, encoder)
        forget_line_vectors()
        t = time.perf_counter()
        report = reg.add([folder])
        ingests.append(time.perf_counter() - t)
        assert len(report.added) == len(files), report.to_dict()
        del reg
        shutil.rmtree(root)
    shutil.rmtree(folder)
    floor_s, ingest_s = statistics.median(floors), statistics.median(ingests)
    ratio = statistics.median(i / f for i, f in zip(ingests, floors))
    return {"folder_files": len(files), "folder_ingest_s": round(ingest_s, 4),
            "folder_floor_s": round(floor_s, 4), "folder_ratio": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="all", choices=("all", *FORMATS),
                        help="the file format to benchmark (default: every format)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each measure")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    parser.add_argument("--folder", type=int, default=0, metavar="N",
                        help="also time one add of a folder of N LoRAs of each format (the LanceDB "
                             "writes of a folder are batched, as users' ingests are)")
    parser.add_argument("--encoder-design", choices=("learned", "probed"), default="learned",
                        help="with --with-encoder: learned probes (the default training) or input probes")
    parser.add_argument("--with-encoder", action="store_true",
                        help="each registry has an active LoRA-weight encoder: ingest embeds the weights")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="also cProfile one extra add per format and print the top N "
                             "functions (cumulative and own time) to stderr")
    args = parser.parse_args()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    formats = FORMATS if args.format == "all" else (args.format,)

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="autolora-bench-ingest-") as tmp_dir:
        encoder = (flux_encoder(Path(tmp_dir) / "encoder.safetensors", args.encoder_design)
                   if args.with_encoder else None)
        for fmt in formats:
            results[fmt] = bench_format(fmt, Path(tmp_dir), args, log, encoder)
    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"formats": results, "load": load, "with_encoder": args.with_encoder,
                          "encoder_design": args.encoder_design if args.with_encoder else None}))
        return
    print(f"\n{'format':<11} {'file MB':>8} {'ingest s':>9} {'floor s':>8} {'ratio':>6} {'copy s':>7} "
          f"{'/ copy':>7}")
    for fmt, r in results.items():
        print(f"{fmt:<11} {r['file_mb']:>8.1f} {r['ingest_s']:>9.3f} {r['floor_s']:>8.3f} "
              f"{r['ratio']:>6.2f} {r['copy_s']:>7.3f} {r['copy_ratio']:>7.2f}")
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']} "
          f"on {load['cpus']} CPUs")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
