"""Text vectors of tag-heavy LoRAs: ours (each distinct line embedded once, recent lines kept)
against embedding every document's lines as they come, in the same process.

    .venv/bin/python benchmarks/text_vectors.py --json [--loras 256] [--tags 30] [--vocabulary 70]

Community LoRAs trained with kohya carry their training tags (``ss_tag_frequency``); each tag is
a line of the search document (``registry.text``), and a folder's LoRAs share most of them. Two
measures on ``--loras`` generated LoRAs, each named on its own with ``--tags`` tags drawn from a
shared vocabulary of ``--vocabulary`` tags and one sample prompt:

* documents: ``embed_documents`` over batches of 64 documents (as ingest writes its rows) against
  the same documents with every line of every document embedded (what ingest did before), and
  the largest difference between the two sets of vectors;
* ingest: ``Registry.add`` of a folder of those LoRAs (small FLUX.1-dev LoRAs in diffusers format,
  the tags in their header) into a fresh registry, with the process keeping recent line vectors
  (``registry.text.LINES_KEPT``) and with it keeping none, alternated, median of ``--reps``.

Prints ``{"documents": {"lines", "distinct_lines", "naive_s", "ours_s", "speedup", "max_abs_diff"},
"ingest": {"files_per_s", "files_per_s_none_kept", "speedup"}}`` with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import registry.text as text  # noqa: E402
from registry import Registry  # noqa: E402

BATCH = 64  # rows per ingest flush (Registry.add's default batch_size)


def tagged_documents(count: int, tags: int, vocabulary: int, seed: int = 0) -> list[tuple[str, dict[str, int]]]:
    """``(name, {tag: frequency})`` of ``count`` LoRAs sharing a vocabulary of tags."""
    rng = np.random.default_rng(seed)
    kinds = ("style", "costume", "scenery", "pose", "quality")
    words = [f"tag {i} {kinds[i % len(kinds)]}" for i in range(vocabulary)]
    return [(f"character style number {i}",
             {str(t): int(rng.integers(1, 50)) for t in rng.choice(words, tags, replace=False)}) for i in range(count)]


def naive(documents: list[str]) -> list[list[float] | None]:
    """Every line of every document embedded, duplicates included (ingest before this change)."""
    lines = [text.document_texts(d) for d in documents]
    vectors = text._encode([t for ls in lines for t in ls])
    out, start = [], 0
    for ls in lines:
        mean = vectors[start:start + len(ls)].mean(axis=0)
        start += len(ls)
        out.append((mean / np.linalg.norm(mean)).tolist())
    return out


def bench_documents(loras: list[tuple[str, dict[str, int]]]) -> dict:
    documents = ["\n".join([name, *tags, f"a portrait of {name}, masterpiece"]) for name, tags in loras]
    batches = [documents[i:i + BATCH] for i in range(0, len(documents), BATCH)]
    text.embed_documents(documents[:1])  # the encoder loaded outside the clocks
    t = time.perf_counter()
    theirs = [v for batch in batches for v in naive(batch)]
    naive_s = time.perf_counter() - t
    text.forget_line_vectors()
    t = time.perf_counter()
    ours = [v for batch in batches for v in text.embed_documents(batch)]
    ours_s = time.perf_counter() - t
    lines = [t for d in documents for t in text.document_texts(d)]
    return {"lines": len(lines), "distinct_lines": len(set(lines)), "naive_s": round(naive_s, 3),
            "ours_s": round(ours_s, 3), "speedup": round(naive_s / ours_s, 2),
            "max_abs_diff": float(np.abs(np.asarray(theirs) - np.asarray(ours)).max())}


def write_loras(folder: Path, loras: list[tuple[str, dict[str, int]]]) -> None:
    import torch

    from registry.lora.base_models import flux1_dev
    from registry.lora.formats import save_lora

    shapes, gen = flux1_dev().layer_shapes, torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for i, (name, tags) in enumerate(loras):
        layers = {}
        for proj in ("to_q", "to_k", "to_v"):
            d, k = shapes[f"transformer_blocks.{i % 19}.attn.{proj}"]
            layers[f"transformer_blocks.{i % 19}.attn.{proj}"] = ((torch.randn(2, k, generator=gen) * 0.01).half(),
                                                                 (torch.randn(d, 2, generator=gen) * 0.01).half())
        save_lora(folder / f"lora_{i:05d}.safetensors", layers, "diffusers",
                  metadata={"ss_output_name": name, "ss_tag_frequency": json.dumps({"img": tags})})


def bench_ingest(loras: list[tuple[str, dict[str, int]]], reps: int, tmp: Path) -> dict:
    folder = tmp / "loras"
    write_loras(folder, loras)
    Registry.open(tmp / "warm").add([next(folder.iterdir())])  # diffusers and the text encoder loaded
    kept, runs = text.LINES_KEPT, {True: [], False: []}
    try:
        for i in range(2 * reps):
            keep = i % 2 == 0
            text.LINES_KEPT = kept if keep else 0
            text.forget_line_vectors()
            reg = Registry.open(tmp / f"registry-{i}")
            t = time.perf_counter()
            report = reg.add([folder])
            runs[keep].append(len(loras) / (time.perf_counter() - t))
            assert len(report.added) == len(loras), report.to_dict()
            shutil.rmtree(tmp / f"registry-{i}")
    finally:
        text.LINES_KEPT = kept
    ours, none_kept = statistics.median(runs[True]), statistics.median(runs[False])
    return {"files_per_s": round(ours, 1), "files_per_s_none_kept": round(none_kept, 1),
            "speedup": round(ours / none_kept, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=256)
    parser.add_argument("--tags", type=int, default=30, help="tags per LoRA")
    parser.add_argument("--vocabulary", type=int, default=70, help="distinct tags the LoRAs draw from")
    parser.add_argument("--reps", type=int, default=2, help="ingests of the folder per setting")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    loras = tagged_documents(args.loras, args.tags, args.vocabulary)
    result = {"documents": bench_documents(loras)}
    with tempfile.TemporaryDirectory(prefix="autolora-bench-text-") as tmp:
        result["ingest"] = bench_ingest(loras, args.reps, Path(tmp))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
