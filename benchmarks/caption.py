"""Captioning benchmark: vLLM server start time and peak RSS, caption latency/throughput by concurrency,
and, for a trained world captioner, attribute accuracy and agreement with transformers' greedy generate.

    PYTHONPATH=. .venv/bin/python benchmarks/caption.py [--trained [--steps 1000] | --model-dir DIR] [--n 48]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from pipelines.caption import Captioner
from pipelines.vllm_server import vllm_server
from pipelines.world.captioner import attribute_accuracy, build_captioner, build_random_captioner, make_image_processor
from pipelines.world.themes import broad_mix


def _group_rss(pid: int) -> int:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trained", action="store_true", help="train the world captioner (else random weights)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=48, help="images per concurrency level")
    ap.add_argument("--model-dir", type=Path, help="a trained captioner folder to serve (skips building)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    t0 = time.perf_counter()
    if args.model_dir:
        folder, args.trained = args.model_dir, True
    elif args.trained:
        import torch

        torch.set_num_threads(1)
        folder = build_captioner(tmp / "captioner", seed=0, train_steps=args.steps)
    else:
        folder = build_random_captioner(tmp / "captioner", seed=0)
    print(f"model built in {time.perf_counter() - t0:.1f} s ({'trained' if args.trained else 'random'})")
    images, _, attrs = broad_mix(args.n, seed=987)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    peak, stop = [0], threading.Event()
    t0 = time.perf_counter()
    with vllm_server(folder) as srv:
        print(f"server ready in {time.perf_counter() - t0:.1f} s, RSS {_group_rss(srv.pid) / 2**30:.2f} GiB")

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _group_rss(srv.pid))
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        texts = None
        for conc in (1, 2, 4, 8):
            with Captioner(srv.base_url, srv.model, concurrency=conc, max_tokens=24) as cap:
                cap.caption(pngs[:2])  # warm-up
                t = time.perf_counter()
                caps = cap.caption(pngs)
                dt = time.perf_counter() - t
            print(f"concurrency {conc}: {len(pngs) / dt:.1f} images/s, mean latency {dt / len(pngs) * conc:.3f} s")
            texts = [c.text for c in caps]
        stop.set()
        print(f"peak server RSS {peak[0] / 2**30:.2f} GiB")
    if args.trained:
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

        from pipelines.world.captioner_train import generate_captions

        model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
        ref = generate_captions(model, AutoTokenizer.from_pretrained(folder), make_image_processor(), images)
        same = np.mean([a == b for a, b in zip(ref, texts, strict=True)])
        print(f"vLLM accuracy {attribute_accuracy(texts, attrs)}")
        print(f"transformers accuracy {attribute_accuracy(ref, attrs)}; identical captions: {same:.3f}")


if __name__ == "__main__":
    main()
