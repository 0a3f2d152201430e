"""Every fusion method on the tiny random FLUX: it changes the output, and the base is clean afterwards."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from models.fusion import block_linear_names
from pipelines.fusion_methods import METHODS, GatedSession, GateSet, get
from pipelines.fusion_methods.base import transformer_state
from pipelines.fusion_methods.klora import select_layers
from pipelines.world.tiny_flux import MAX_SEQ_LEN, TEXT_DIM, build_tiny_flux


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    torch.set_num_threads(1)
    return build_tiny_flux(0)


@pytest.fixture(scope="module")
def inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 16, 32, generator=gen),
                encoder_hidden_states=torch.randn(2, MAX_SEQ_LEN, TEXT_DIM, generator=gen),
                pooled_projections=torch.randn(2, TEXT_DIM, generator=gen), timestep=torch.tensor([0.3, 0.7]),
                img_ids=torch.randn(16, 3), txt_ids=torch.zeros(MAX_SEQ_LEN, 3), return_dict=False)


def make_lora(pipe: FluxPipeline, suffixes: tuple[str, ...], rank: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in block_linear_names(pipe.transformer):
        if name.endswith(suffixes):
            lin = pipe.transformer.get_submodule(name)
            out[name] = (torch.randn(rank, lin.in_features, generator=gen) * 0.3 / lin.in_features ** 0.5,
                         torch.randn(lin.out_features, rank, generator=gen) * 0.3)
    return out


@pytest.fixture(scope="module")
def loras(pipe: FluxPipeline) -> list[dict]:
    return [make_lora(pipe, ("to_q", "to_v", "ff.net.2", "proj_out"), 4, 1),
            make_lora(pipe, ("to_k", "to_v", "to_out.0", "proj_mlp"), 2, 2),
            make_lora(pipe, ("to_q", "add_k_proj"), 8, 3)]


def run(pipe: FluxPipeline, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("k", [2, 3])
def test_method_changes_output_and_leaves_base_clean(pipe, inputs, loras, name, k):
    before, ref = transformer_state(pipe), run(pipe, inputs)
    with get(name).apply(pipe, loras[:k]) as p:
        assert p is pipe
        fused = run(pipe, inputs)
    after = transformer_state(pipe)
    assert after["types"] == before["types"]
    assert all(torch.equal(before["params"][key], v) for key, v in after["params"].items())
    assert not getattr(pipe.transformer, "peft_config", None)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    assert torch.equal(run(pipe, inputs), ref)
    if name == "none":
        assert torch.equal(fused, ref)
    else:
        assert (fused - ref).abs().max() > 1e-4


def test_untrained_gated_equals_linear(pipe, inputs, loras):
    """Untrained gates are plain addition: gated_noglobal == diffusers linear, to float precision."""
    with get("linear").apply(pipe, loras[:2]):
        lin = run(pipe, inputs)
    with get("gated_noglobal").apply(pipe, loras[:2]):
        gated = run(pipe, inputs)
    torch.testing.assert_close(gated, lin, rtol=1e-4, atol=1e-5)


def test_gates_are_used(pipe, inputs, loras):
    session = GatedSession(pipe)
    try:
        state = {key: v.clone() for key, v in session.fusion.gate_state_dict().items()}
    finally:
        session.close()
    for key in state:
        if key.endswith(".b"):
            state[key] -= 3.0  # every gate nearly closed
    with get("gated").apply(pipe, loras[:2]):
        plain = run(pipe, inputs)
    with get("gated").apply(pipe, loras[:2], gates=GateSet(state)):
        closed = run(pipe, inputs)
    ref = run(pipe, inputs)
    assert (closed - ref).abs().mean() < 0.5 * (plain - ref).abs().mean()


def test_session_swaps_in_place(pipe, inputs, loras):
    """An open session serves apply() without re-wrapping: the same wrapper objects before and after."""
    with GatedSession(pipe) as session:
        wrappers = dict(session.fusion.layers)
        with get("gated").apply(pipe, loras[:2]):
            a = run(pipe, inputs)
        with get("gated").apply(pipe, loras[1:3]):
            b = run(pipe, inputs)
        assert all(session.fusion.layers[n] is w for n, w in wrappers.items())
        assert not torch.equal(a, b)
    assert not any(type(m).__name__ == "FusedLinear" for m in pipe.transformer.modules())


def test_klora_selects_one_lora_per_layer(loras):
    composite, winners = select_layers(loras[:2])
    shared = set(loras[0]) & set(loras[1])
    assert shared and set(composite) == set(loras[0]) | set(loras[1])
    for path, i in winners.items():
        assert composite[path] is loras[i][path]
    # a LoRA scaled up 10x in one shared layer only wins that layer
    path = sorted(shared)[0]
    boosted = dict(loras[1])
    boosted[path] = (loras[1][path][0], loras[1][path][1] * 10)
    assert select_layers([loras[0], boosted])[1][path] == 1


def test_get_unknown():
    with pytest.raises(KeyError, match="known"):
        get("nope")
