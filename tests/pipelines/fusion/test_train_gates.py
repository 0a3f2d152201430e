"""Gate training on the tiny random FLUX: only the gates change, checkpoints round-trip, versions cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.fusion_methods.base import transformer_state
from pipelines.train_gates import AUTHORS_RECIPE, GateRecipe, PoolLora, gate_version, load_gates, train_gates
from pipelines.world.tiny_flux import build_tiny_flux
from tests.pipelines.fusion.test_fusion_methods import make_lora


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return build_tiny_flux(0)


@pytest.fixture(scope="module")
def pool(pipe) -> list[PoolLora]:
    rng = np.random.default_rng(0)
    out = []
    for i, (suffixes, colour) in enumerate([(("to_q", "to_v"), "red"), (("to_k", "proj_mlp"), "blue"),
                                            (("to_out.0", "ff.net.2"), "green")]):
        images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        out.append(PoolLora(f"l{i}", make_lora(pipe, suffixes, 2, i), images, [f"trg{i}, a {colour} circle"] * 4,
                            f"digest{i}"))
    return out


@pytest.mark.parametrize("hinge", [0.0, 1.0])
def test_only_gates_train_and_cache(pipe, pool, tmp_path, hinge):
    before = transformer_state(pipe)
    grads = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    recipe = GateRecipe(steps=3, batch_size=2, hinge=hinge, margin=10.0)
    result = train_gates(pipe, pool, tmp_path, base_id="tiny0", recipe=recipe)
    assert not result.cached and len(result.losses) == 3 and all(np.isfinite(result.losses))
    after = transformer_state(pipe)
    assert after["types"] == before["types"]
    assert all(torch.equal(before["params"][k], v) for k, v in after["params"].items())
    assert grads == {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    state = result.gates.state
    init = {"w_x": 0.0, "w_l": 0.0, "w_c": 0.0, "b": 0.0, "w_o": 2.0, "w_g": 0.0}
    moved = [k for k, v in state.items() if not torch.allclose(v, torch.full_like(v, init[k.rsplit(".", 1)[1]]))]
    assert moved, "training changed no gate parameter"
    # round trip and cache hit
    loaded = load_gates(result.path)
    assert loaded.version == result.version and loaded.meta["pool"] == ["l0", "l1", "l2"]
    assert loaded.state.keys() == state.keys() and all(torch.equal(loaded.state[k], state[k]) for k in state)
    again = train_gates(pipe, pool, tmp_path, base_id="tiny0", recipe=recipe)
    assert again.cached and again.path == result.path and again.losses == result.losses


def test_version_depends_on_pool_and_recipe(pool):
    v = gate_version("b", pool, GateRecipe())
    assert v == gate_version("b", list(reversed(pool)), GateRecipe())
    assert v != gate_version("b", pool[:2], GateRecipe())
    assert v != gate_version("b", pool, GateRecipe(steps=7))
    assert v != gate_version("c", pool, GateRecipe())
    assert v != gate_version("b", pool, GateRecipe(init="authors")) != gate_version("b", pool, AUTHORS_RECIPE)


def test_gates_trained_before_the_init_field_keep_their_version():
    """The recipe's ``init`` came later: at its default it is not hashed, so cached gates stay valid."""
    pool = [PoolLora(f"l{i}", {}, None, [f"trg{i}, a red circle"], f"digest{i}") for i in range(3)]
    assert gate_version("b", pool, GateRecipe()) == "e2b0df8d761b45ba"  # the id before the field existed


def test_authors_recipe_starts_from_their_init_and_trains(pipe, pool, tmp_path):
    from models.fusion.gate import FusionGate

    gate, again = FusionGate(8), FusionGate(8)
    gate.init_as_authors(torch.Generator().manual_seed(3))
    again.init_as_authors(torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(gate.parameters(), again.parameters()))
    assert torch.equal(gate.w_o, torch.ones(8)) and torch.equal(gate.w_g, torch.ones(8))
    assert all(p.std() > 0.3 for p in (gate.w_x, gate.w_l, gate.w_c, gate.b))  # drawn from N(0, 1), not zeros
    recipe = GateRecipe(steps=2, batch_size=2, init="authors", composite=0.0)
    result = train_gates(pipe, pool, tmp_path, base_id="tiny0", recipe=recipe)
    state = result.gates.state
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    w_x = torch.cat([v for k, v in state.items() if k.endswith(".w_x")])
    assert w_x.std() > 0.3  # two small steps from a random start, not from zeros
    with pytest.raises(ValueError, match="unknown gate init"):
        train_gates(pipe, pool, tmp_path, base_id="tiny0", recipe=GateRecipe(init="xavier"))


def test_needs_two_loras(pipe, pool, tmp_path):
    with pytest.raises(ValueError):
        train_gates(pipe, pool[:1], tmp_path, base_id="x")


@pytest.mark.parametrize("variant", [{"composite": 1.0}, {"prompt_triggers": True, "anchor": 5.0}])
def test_recipe_variants_train(pipe, pool, tmp_path, variant):
    from dataclasses import replace

    from pipelines.world.themes import Theme

    attrs = [("colour", "red"), ("style", "flat"), ("background", "dotted")]
    themed = [replace(p, trigger=f"trg{i}", theme=Theme(p.lora_id, dict([attrs[i]]), (attrs[i][1],), f"trg{i}",
                                                         "train", False))
              for i, p in enumerate(pool)]
    result = train_gates(pipe, themed, tmp_path, base_id="tiny0", recipe=GateRecipe(steps=3, batch_size=2, **variant))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    # without themes, composite steps fall back to eq. 10
    plain = train_gates(pipe, pool, tmp_path / "plain", base_id="tiny0", recipe=GateRecipe(steps=2, batch_size=2, **variant))
    assert len(plain.losses) == 2
