"""Gated fusion vs diffusers' own unfused multi-adapter path vs the base: one denoising step, and switching.

    PYTHONPATH=. .venv/bin/python benchmarks/fusion.py --json

Two transformers, both real diffusers ``FluxTransformer2DModel``s with random weights:

* ``demo``: the tiny demo FLUX (``pipelines.world.tiny_flux.build_transformer``; width 64, 16 image
  tokens of a 32x32 image, 32 text tokens), batch ``--demo-batch``;
* ``slice``: a FLUX.1-width slice (1 double + 1 single block, width 3072, MLP 12288) with
  ``--image-tokens`` image and ``--text-tokens`` text tokens, batch 1 (``--double-blocks 19
  --single-blocks 38 --image-tokens 4096`` is the whole FLUX.1-dev transformer at 1024 px).

``--device`` / ``--dtype`` (default: the CPU in float32; ``--device cuda`` runs bfloat16, as
``autolora generate`` runs FLUX.1-dev there): on a GPU every timed call ends with ``torch.cuda.synchronize``.

Each gets k = 3 random rank-16 LoRAs on every block linear.  Timed in one process, on three copies
of the transformer that share their weight tensors: ``gated`` (``GatedFusion``, the global LoRA on,
gate parameters random as if trained), ``linear`` (the same wrappers in linear mode), ``diffusers``
(``load_lora_weights(adapter_name=...)`` x3 + ``set_adapters([...], [1, 1, 1])``, not fused) and
``base``.  A step is one transformer forward under ``torch.inference_mode``.  Every variant runs once
to warm up, then ``--repeats`` rounds with the order rotated each round; medians are reported.
``linear`` is checked against ``diffusers`` (max abs difference of the outputs) so both do the same math.

Switching: three new LoRA files (diffusers format, safetensors, in a temp dir) replace the active
three; ours = read the files with safetensors + ``set_loras`` (global LoRA recomputed), diffusers =
``load_lora_weights`` x3 + ``set_adapters`` (deleting the old adapters afterwards is timed apart,
``diffusers_delete_s``).  Rounds alternate between two sets of files so each is a real switch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fusion import GatedFusion, block_linear_names  # noqa: E402
from models.torch_device import pick_device, pick_dtype  # noqa: E402
from pipelines.world.tiny_flux import MAX_SEQ_LEN, TEXT_DIM, build_transformer  # noqa: E402

TARGETS = {"slice_gated_vs_diffusers": 1.15, "slice_gated_vs_base": 1.35, "switch_ours_vs_diffusers": 0.1}


def share_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are the original's tensors (no extra weight memory)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, k, generator=gen) / k ** 0.5, torch.randn(d, rank, generator=gen) * 0.05)
            for n, (d, k) in shapes.items()}


def diffusers_keys(lora: dict) -> dict[str, torch.Tensor]:
    out = {}
    for path, (a, b) in lora.items():
        out[f"transformer.{path}.lora_A.weight"] = a.contiguous()
        out[f"transformer.{path}.lora_B.weight"] = b.contiguous()
    return out


def read_lora(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A diffusers-format file (as written above) -> {module path: (A, B)}."""
    state = load_file(path)
    return {key[len("transformer."):-len(".lora_A.weight")]: (a, state[key.replace("lora_A", "lora_B")])
            for key, a in state.items() if key.endswith(".lora_A.weight")}


def bare_pipeline(transformer: nn.Module) -> FluxPipeline:
    """A FluxPipeline holding only the transformer: enough for ``load_lora_weights``/``set_adapters``."""
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA), so a timer measures the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each fn: one warm-up each, then rounds in rotated order."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for name in names:
        fns[name]()
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            synchronize()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def flux_inputs(batch: int, grid: tuple[int, int], channels: int, text_tokens: int, text_dim: int,
                pooled_dim: int, seed: int = 0, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    inputs = dict(hidden_states=torch.randn(batch, grid[0] * grid[1], channels, generator=gen),
                  encoder_hidden_states=torch.randn(batch, text_tokens, text_dim, generator=gen),
                  pooled_projections=torch.randn(batch, pooled_dim, generator=gen),
                  timestep=torch.full((batch,), 0.5))
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    return dict(inputs, img_ids=img_ids.to(device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                return_dict=False)


def bench(transformer: nn.Module, inputs: dict, args: argparse.Namespace, inner: int, tmp: Path,
          label: str) -> tuple[dict, dict]:
    """Step times (gated, linear, diffusers, base) and switch times for one transformer."""
    transformer.eval().requires_grad_(False)
    names = block_linear_names(transformer)
    shapes = {n: (transformer.get_submodule(n).out_features, transformer.get_submodule(n).in_features)
              for n in names}
    loras = [random_lora(shapes, args.rank, seed) for seed in range(args.k)]
    ours, theirs = share_copy(transformer), share_copy(transformer)
    fusion = GatedFusion(ours)
    gen = torch.Generator().manual_seed(0)
    fusion.load_gate_state_dict({k: torch.randn(v.shape, generator=gen) * 0.1 + (2.0 if k.endswith("w_o") else 0.0)
                                 for k, v in fusion.gate_state_dict().items()})  # as if trained
    fusion.set_loras(loras, use_global=True, rank_global=args.rank_global)
    pipe = bare_pipeline(theirs)
    adapters = [f"init{i}" for i in range(args.k)]
    for name, lora in zip(adapters, loras):
        pipe.load_lora_weights(diffusers_keys(lora), adapter_name=name)
    pipe.set_adapters(adapters, [1.0] * args.k)

    def step(module: nn.Module, mode: str | None = None) -> Callable[[], object]:
        def run() -> object:
            if mode is not None:
                fusion.mode = mode
            with torch.inference_mode():
                return module(**inputs)
        return run

    fns = {"gated": step(ours, "gated"), "linear": step(ours, "linear"), "diffusers": step(theirs),
           "base": step(transformer)}
    check = (fns["linear"]()[0] - fns["diffusers"]()[0]).abs().max().item()
    print(f"[{label}] linear vs diffusers max |diff| {check:.2e}; timing ...", file=sys.stderr, flush=True)
    steps: dict = {}
    medians = {} if args.switch_only else time_interleaved(fns, args.repeats, inner)
    steps.update({f"{k}_ms": round(v * 1000, 3) for k, v in medians.items()})
    if medians:
        steps.update(gated_vs_diffusers=round(medians["gated"] / medians["diffusers"], 3),
                     gated_vs_base=round(medians["gated"] / medians["base"], 3),
                     diffusers_vs_base=round(medians["diffusers"] / medians["base"], 3),
                     linear_vs_diffusers=round(medians["linear"] / medians["diffusers"], 3))
    steps["linear_max_abs_diff_vs_diffusers"] = check

    # switching: two sets of three files on disk, alternated
    sets = []
    for s in range(2):
        paths = []
        for i in range(args.k):
            path = tmp / f"{label}_set{s}_{i}.safetensors"
            save_file(diffusers_keys(random_lora(shapes, args.rank, 100 + 10 * s + i)), path)
            paths.append(path)
        sets.append(paths)
    ours_s, read_s, theirs_s, delete_s = [], [], [], []
    for rep in range(args.repeats + 1):
        paths = sets[rep % 2]
        synchronize()
        start = time.perf_counter()
        new_loras = [read_lora(p) for p in paths]
        read_t = time.perf_counter() - start
        fusion.set_loras(new_loras, use_global=True, rank_global=args.rank_global)
        synchronize()
        ours_t = time.perf_counter() - start
        new = [f"r{rep}_{i}" for i in range(args.k)]
        start = time.perf_counter()
        for name, path in zip(new, paths):
            pipe.load_lora_weights(path, adapter_name=name)
        pipe.set_adapters(new, [1.0] * args.k)
        synchronize()
        theirs_t = time.perf_counter() - start
        start = time.perf_counter()
        pipe.delete_adapters(adapters)
        synchronize()
        delete_t = time.perf_counter() - start
        adapters = new
        if rep:  # the first round warms up
            ours_s.append(ours_t)
            read_s.append(read_t)
            theirs_s.append(theirs_t)
            delete_s.append(delete_t)
    after = (fns["linear"]()[0] - fns["diffusers"]()[0]).abs().max().item()
    med = statistics.median
    switch = dict(ours_s=round(med(ours_s), 4), ours_read_files_s=round(med(read_s), 4),
                  diffusers_s=round(med(theirs_s), 4),
                  ratio=round(med(ours_s) / med(theirs_s), 4), diffusers_delete_s=round(med(delete_s), 4),
                  linear_max_abs_diff_vs_diffusers_after=after)
    fusion.detach()
    return steps, switch


def slice_transformer(double_blocks: int = 1, single_blocks: int = 1, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer config with ``double_blocks`` + ``single_blocks`` blocks (19 + 38: all
    of it), random weights, built on ``device`` (12 B parameters initialise in seconds on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(num_layers=double_blocks, num_single_layers=single_blocks,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, in_channels=64, guidance_embeds=False)
    return model.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rank-global", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=512, help="slice: a 16 x (n/16) token grid")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--demo-batch", type=int, default=4)
    parser.add_argument("--demo-inner", type=int, default=20, help="demo steps per timed sample")
    parser.add_argument("--double-blocks", type=int, default=1, help="slice: FLUX.1-dev has 19")
    parser.add_argument("--single-blocks", type=int, default=1, help="slice: FLUX.1-dev has 38")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on the cpu, bfloat16 on a GPU), float32, "
                                                        "bfloat16, float16")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-slice", action="store_true")
    parser.add_argument("--switch-only", action="store_true", help="time switching only (no step timing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result: dict = {"config": dict(vars(args), torch=torch.__version__, dtype=str(dtype), gpu=gpu,
                                   load_before=os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_demo:
            demo_inputs = flux_inputs(args.demo_batch, (4, 4), 32, MAX_SEQ_LEN, TEXT_DIM, TEXT_DIM, device=device,
                                      dtype=dtype)
            result["demo"], result["switch_demo"] = bench(build_transformer(0).to(device, dtype), demo_inputs, args,
                                                          args.demo_inner, Path(tmp), "demo")
        if not args.skip_slice:
            grid = (16, args.image_tokens // 16)
            inputs = flux_inputs(1, grid, 64, args.text_tokens, 4096, 768, device=device, dtype=dtype)
            model = slice_transformer(args.double_blocks, args.single_blocks, device, dtype)
            result["slice"], result["switch"] = bench(model, inputs, args, 1, Path(tmp), "slice")
    result["config"]["load_after"] = os.getloadavg()
    if "slice" in result and not args.switch_only:
        got = {"slice_gated_vs_diffusers": result["slice"]["gated_vs_diffusers"],
               "slice_gated_vs_base": result["slice"]["gated_vs_base"],
               "switch_ours_vs_diffusers": result["switch"]["ratio"]}
        result["targets"] = {k: {"target": f"<= {TARGETS[k]}", "measured": v, "met": v <= TARGETS[k]}
                             for k, v in got.items()}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
