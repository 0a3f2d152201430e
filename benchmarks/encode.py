"""LoRA-weight encoder speed on a real-shaped FLUX.1-dev LoRA, vs reading its file.

    .venv/bin/python benchmarks/encode.py --json

Writes a rank-16, full-coverage (all 504 linear layers) FLUX.1-dev LoRA in bf16 to a temp dir in
diffusers key format, then in this process times (median of ``--runs`` after one warm-up):

* ``read_s``: reading the file with ``safetensors.torch.load_file`` (the baseline);
* ``canonical_s``: ``registry.lora.inspect.load_canonical`` (read + canonicalise), for context;
* ``encode_s``: the default encoder's forward on the canonical factors (CPU, no grad);
  ``probed``: the same for the design trained with the base's input directions as probes
  (``--probes-from``, as the demo does: one fixed probe per layer, no transformer blocks);
  ``encode_cpu_s`` the same in process CPU time (a steadier figure on a busy machine).

``ratio`` = encode_s / read_s. Load average is reported beside the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.encoder import EncoderConfig, LayerSpec, LoRAWeightEncoder  # noqa: E402
from pipelines.encoder_pool import PROBED  # noqa: E402
from registry.lora.base_models import flux1_dev  # noqa: E402
from registry.lora.formats import save_lora  # noqa: E402
from registry.lora.inspect import load_canonical  # noqa: E402


def median_time(fn: Callable[[], object], runs: int, clock: Callable[[], float] = time.perf_counter
                ) -> float:
    """Median time of ``fn`` on ``clock`` over ``runs`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        began = clock()
        fn()
        times.append(clock() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    specs = [LayerSpec(n, d, k) for n, (d, k) in flux1_dev().layer_shapes.items()]
    gen = torch.Generator().manual_seed(0)
    layers = {s.name: ((torch.randn(args.rank, s.d_in, generator=gen) / s.d_in ** 0.5).bfloat16(),
                       (torch.randn(s.d_out, args.rank, generator=gen) * 0.01).bfloat16())
              for s in specs}
    torch.manual_seed(0)
    encoder = LoRAWeightEncoder(specs, EncoderConfig.ours()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux_lora.safetensors"
        save_lora(path, layers, "diffusers")
        read_s = median_time(lambda: load_file(str(path)), args.runs)
        canonical_s = median_time(lambda: load_canonical(path), args.runs)
        factors = load_canonical(path)[0].factors
        with torch.no_grad():
            encode_s = median_time(lambda: encoder([factors]), args.runs)
            encode_cpu_s = median_time(lambda: encoder([factors]), args.runs, time.process_time)
            probed = LoRAWeightEncoder(specs, EncoderConfig.ours(**PROBED)).eval()
            probed_s = median_time(lambda: probed([factors]), args.runs)
        size = path.stat().st_size
    result = {
        "params": encoder.num_parameters(), "encode_s": round(encode_s, 4),
        "probed": {"params": probed.num_parameters(), "encode_s": round(probed_s, 4)},
        "read_s": round(read_s, 4), "ratio": round(encode_s / read_s, 2),
        "encode_cpu_s": round(encode_cpu_s, 4), "canonical_s": round(canonical_s, 4), "layers_encoded": len(factors),
        "unknown_layers": len(encoder.last_unknown[0]), "file_mb": round(size / 2**20, 1),
        "rank": args.rank, "threads": args.threads, "load_avg": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>15}: {value}")


if __name__ == "__main__":
    main()
