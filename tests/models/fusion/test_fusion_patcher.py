"""GatedFusion on a real diffusers FluxTransformer2DModel (the tiny demo FLUX) against diffusers/peft."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file
from torch import nn

from models.fusion import FusedLinear, GatedFusion, block_linear_names
from models.fusion import branches as branches_module
from models.fusion.global_lora import global_lora
from pipelines.world.tiny_flux import MAX_SEQ_LEN, TEXT_DIM, base_layer_shapes, build_tiny_flux

ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj")


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return build_tiny_flux(0)


@pytest.fixture(scope="module")
def inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    batch, tokens = 2, 16
    return dict(hidden_states=torch.randn(batch, tokens, 32, generator=gen),
                encoder_hidden_states=torch.randn(batch, MAX_SEQ_LEN, TEXT_DIM, generator=gen),
                pooled_projections=torch.randn(batch, TEXT_DIM, generator=gen),
                timestep=torch.tensor([0.3, 0.7]), img_ids=torch.randn(tokens, 3),
                txt_ids=torch.zeros(MAX_SEQ_LEN, 3), return_dict=False)


def _run(transformer: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def _lora(shapes: dict[str, tuple[int, int]], names: list[str], rank: int, seed: int, scale: float = 0.3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, shapes[n][1], generator=gen) * scale / shapes[n][1] ** 0.5,
                torch.randn(shapes[n][0], rank, generator=gen) * scale) for n in names}


def _names(pipe: FluxPipeline, suffixes: tuple[str, ...] | None = None) -> list[str]:
    names = block_linear_names(pipe.transformer)
    return names if suffixes is None else [n for n in names if n.endswith(suffixes)]


def _diffusers_dict(lora: dict) -> dict[str, torch.Tensor]:
    out = {}
    for path, (a, b) in lora.items():
        out[f"transformer.{path}.lora_A.weight"] = a.contiguous()
        out[f"transformer.{path}.lora_B.weight"] = b.contiguous()
    return out


def _peft_output(pipe: FluxPipeline, loras: list[dict], weights: list[float], inputs: dict) -> torch.Tensor:
    """The same LoRAs through diffusers' own loader (peft, unfused adapters, set_adapters weights)."""
    other = copy.copy(pipe)
    other.transformer = copy.deepcopy(pipe.transformer)
    other.register_modules(transformer=other.transformer)
    names = [f"a{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        other.load_lora_weights(_diffusers_dict(lora), adapter_name=name)
    other.set_adapters(names, weights)
    return _run(other.transformer, inputs)


@pytest.fixture
def transformer(pipe: FluxPipeline) -> nn.Module:
    return copy.deepcopy(pipe.transformer)


def test_attach_without_lora_is_bit_identical_and_detach_restores(pipe, transformer, inputs) -> None:
    base = _run(transformer, inputs)
    originals = {n: transformer.get_submodule(n) for n in block_linear_names(transformer)}
    fusion = GatedFusion(transformer)
    assert set(fusion.layers) == set(originals) and len(originals) == 2 * 14 + 2 * 6
    assert all(isinstance(transformer.get_submodule(n), FusedLinear) for n in originals)
    assert torch.equal(_run(transformer, inputs), base)
    fusion.set_loras([_lora(base_layer_shapes(pipe), list(originals), 4, 0)])
    assert not torch.allclose(_run(transformer, inputs), base, atol=1e-3)
    fusion.clear()
    assert torch.equal(_run(transformer, inputs), base)
    fusion.set_loras([_lora(base_layer_shapes(pipe), list(originals), 4, 1)])
    fusion.detach()
    assert all(transformer.get_submodule(n) is m for n, m in originals.items())
    assert set(transformer.state_dict()) == set(pipe.transformer.state_dict())
    torch.testing.assert_close(_run(transformer, inputs), base, rtol=0, atol=0)


def test_linear_mode_equals_diffusers_peft(pipe, transformer, inputs) -> None:
    shapes = base_layer_shapes(pipe)
    loras = [_lora(shapes, _names(pipe), 4, 0),
             _lora(shapes, _names(pipe, ATTN), 8, 1),               # attention only
             _lora(shapes, _names(pipe, ("proj_mlp", "ff.net.2", "proj_out")), 2, 2)]
    fusion = GatedFusion(transformer, mode="linear")
    for chosen, weights in (([loras[0]], [1.0]), (loras, [1.0, 0.5, 1.5])):
        fusion.set_loras(chosen, weights=weights)
        want = _peft_output(pipe, chosen, weights, inputs)
        got = _run(transformer, inputs)
        assert (want - _run(pipe.transformer, inputs)).abs().max() > 1e-2  # the LoRAs matter
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_untrained_gated_equals_linear_and_partial_coverage(pipe, transformer, inputs) -> None:
    shapes = base_layer_shapes(pipe)
    partial = _lora(shapes, [n for n in _names(pipe) if n.startswith("single_transformer_blocks.1.")], 4, 3)
    loras = [_lora(shapes, _names(pipe, ATTN), 4, 0), partial]
    fusion = GatedFusion(transformer)
    fusion.set_loras(loras)  # gated with the global LoRA: switched off at init (w_g = 0)
    gated = _run(transformer, inputs)
    fusion.mode = "linear"
    torch.testing.assert_close(gated, _run(transformer, inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated, _peft_output(pipe, loras, [1.0, 1.0], inputs), rtol=1e-4, atol=1e-5)
    # a layer no LoRA covers carries no branch; one covered by the partial LoRA alone carries it + global
    assert fusion.layers["transformer_blocks.0.ff.net.2"].n_loras == 0
    layer = fusion.layers["single_transformer_blocks.1.proj_mlp"]
    assert (layer.n_loras, layer.has_global) == (1, True)
    with pytest.raises(KeyError):
        fusion.set_loras([{"x_embedder": partial["single_transformer_blocks.1.proj_mlp"]}])


def _randomise_gates(fusion: GatedFusion, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    fusion.load_gate_state_dict({k: torch.randn(v.shape, generator=gen) * 0.5 + (2.0 if k.endswith("w_o") else 0.0)
                                 for k, v in fusion.gate_state_dict().items()})


def test_swap_in_place_equals_fresh_attach_and_gate_checkpoint(pipe, inputs, tmp_path: Path) -> None:
    shapes = base_layer_shapes(pipe)
    first = [_lora(shapes, _names(pipe), 8, s) for s in (0, 1, 2)]
    second = [_lora(shapes, _names(pipe), 8, s) for s in (3, 4, 5)]
    second[2] = {n: (a[:5], b[:, :5]) for n, (a, b) in second[2].items()}  # a lower rank: same padding
    t1 = copy.deepcopy(pipe.transformer)
    swapped = GatedFusion(t1)
    _randomise_gates(swapped, 0)
    save_file(swapped.gate_state_dict(), tmp_path / "gates.safetensors")
    swapped.set_loras(first)
    before = _run(t1, inputs)
    ptrs = {n: layer.branches.a.data_ptr() for n, layer in swapped.layers.items()}
    assert swapped.set_loras(second) == len(ptrs)  # every layer filled its buffers in place
    assert all(layer.branches.a.data_ptr() == ptrs[n] for n, layer in swapped.layers.items())
    got = _run(t1, inputs)
    t2 = copy.deepcopy(pipe.transformer)
    fresh = GatedFusion(t2)
    fresh.load_gate_state_dict(load_file(tmp_path / "gates.safetensors"))
    fresh.set_loras(second)
    assert torch.equal(got, _run(t2, inputs))
    assert not torch.allclose(got, before)
    with pytest.raises(KeyError):
        fresh.load_gate_state_dict({"nope.w_x": torch.zeros(3)})


@pytest.mark.parametrize("direct", [True, False])
def test_training_reaches_gates_only(pipe, transformer, inputs, direct: bool, monkeypatch) -> None:
    if not direct:  # branch statistics from the moments of B (the path of real-width layers)
        monkeypatch.setattr(branches_module, "DIRECT_STATS", 0)
    shapes = base_layer_shapes(pipe)
    fusion = GatedFusion(transformer, _names(pipe, ATTN), time_features=4)
    _randomise_gates(fusion, 1)
    with torch.inference_mode():  # buffers made under inference_mode must still serve training
        fusion.set_loras([_lora(shapes, _names(pipe, ATTN), 4, s) for s in (0, 1)])
        fast = transformer(**inputs)[0]
    torch.testing.assert_close(fast, _run(transformer, inputs), rtol=0, atol=0)
    fusion.prepare_training()
    out = transformer(**inputs)[0]
    out.square().mean().backward()
    gates = {id(p) for p in fusion.gate_parameters()}
    for name, p in transformer.named_parameters():
        if id(p) in gates:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    layer = fusion.layers["transformer_blocks.0.attn.to_q"]
    assert not layer.branches.a.requires_grad and layer.gate.time_proj.weight.grad.abs().sum() > 0
    assert fusion.shared.features.shape == (2, 4)  # read from the forward's timestep by the hook
    with torch.no_grad():
        other_t = transformer(**{**inputs, "timestep": torch.tensor([0.9, 0.1])})[0]
    assert not torch.allclose(other_t, out.detach())
    torch.testing.assert_close(out.detach(), fast, rtol=1e-5, atol=1e-6)  # autograd path = in-place path


def test_real_width_layer() -> None:
    """A FLUX.1-width ff projection (3072 -> 12288) with three rank-16 LoRAs and the global LoRA."""
    holder = nn.Module()
    holder.transformer_blocks = nn.ModuleList([nn.Module()])
    holder.transformer_blocks[0].proj = nn.Linear(3072, 12288)
    torch.manual_seed(0)
    loras = [{"transformer_blocks.0.proj": (torch.randn(16, 3072) * 0.02, torch.randn(12288, 16) * 0.02)}
             for _ in range(3)]
    h = torch.randn(1, 8, 3072)
    base = holder.transformer_blocks[0].proj(h).detach()
    fusion = GatedFusion(holder)
    fusion.set_loras(loras, rank_global=4)
    with torch.no_grad():
        got = holder.transformer_blocks[0].proj(h)
    want = base + sum(h @ a.T @ b.T for lora in loras for a, b in lora.values())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layer = fusion.layers["transformer_blocks.0.proj"]
    assert layer.branches.b.shape == (12288, 4, 16) and layer.has_global
    a_g, b_g = global_lora([lo["transformer_blocks.0.proj"] for lo in loras], 4)  # packed last, rank 4 of 16
    torch.testing.assert_close(layer.branches.b[:, 3, :4] @ layer.branches.a[48:52], b_g @ a_g)
    assert not layer.branches.a[52:].any()
