"""registry.lora.canonical: every FLUX format to one canonical LoRA, rejections, fingerprint."""

from __future__ import annotations

import json

import pytest
import torch
from flux_fixtures import (
    bfl_control_state,
    control_lora_layers,
    delta,
    fal_kontext_state,
    flux_lora,
    full_coverage_lora,
    max_delta_error,
    partial_names,
    random_layers,
    tiny_flux_base,
    top_level_names,
)

from registry.lora import conversion
from registry.lora.base_models import flux1_dev, match_base
from registry.lora.canonical import canonicalise, detect_architecture, fingerprint, fingerprint_features
from registry.lora.errors import RejectedFile
from registry.lora.fingerprint import signs
from registry.lora.formats import FORMATS, save_lora, to_format

TE = "text_encoder.text_model.encoder.layers"
Q = "transformer.transformer_blocks.0.attn.to_q"


def as_float(layers):
    return {n: (a.float(), b.float()) for n, (a, b) in layers.items()}


def check(state, fmt, expected, *, tol=1e-6, metadata=None):
    """Canonicalise ``state`` and check format, architecture, dtype and ΔW against ``expected``."""
    lora = canonicalise(state, metadata or {})
    assert lora.format == fmt
    assert lora.architecture == "flux"
    assert max_delta_error(as_float(expected), lora.layers) < tol
    for a, b in lora.layers.values():
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
    return lora


def is_flux1(lora):
    return match_base(lora.shapes(), [tiny_flux_base(), flux1_dev()]) is flux1_dev()


@pytest.fixture(scope="module")
def partial():
    """Blocks 0 and 7 (all 14 layers each) and single block 3 (all 6 layers), rank 16."""
    return flux_lora(partial_names(), 16, seed=1)


@pytest.fixture(scope="module")
def attention_only():
    """Attention projections of a few blocks, rank 4."""
    return flux_lora(partial_names((2, 11), (0, 37), attention_only=True), 4, seed=2)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "xlabs"])
def test_each_format_round_trips(partial, fmt):
    lora = check(to_format(partial, fmt), fmt, partial)
    assert lora.rank == 16 and is_flux1(lora)
    assert lora.shapes() == {n: (b.shape[0], a.shape[1]) for n, (a, b) in partial.items()}


def test_xlabs(attention_only):
    state = to_format(attention_only, "xlabs")  # XLabs: double-block attention + single q/k/v
    assert "double_blocks.2.processor.qkv_lora1.down.weight" in state
    assert "single_blocks.37.processor.qkv_lora.up.weight" in state
    assert is_flux1(check(state, "xlabs", attention_only))
    with pytest.raises(ValueError, match="cannot be written"):
        to_format(flux_lora(["transformer_blocks.0.ff.net.2"]), "xlabs")


def test_peft_without_prefix_and_lora_dot_down_variants(partial):
    state = to_format(partial, "diffusers")
    check({k.removeprefix("transformer."): v for k, v in state.items()}, "peft", partial)
    dotted = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
              for k, v in state.items()}
    check(dotted, "diffusers", partial)


def test_peft_adapter_metadata_scale(partial):
    state = to_format(partial, "diffusers")
    state = {k: v * 2 if ".lora_B." in k else v for k, v in state.items()}  # lora_alpha / r = 1/2
    config = {"transformer.r": 16, "transformer.lora_alpha": 8, "transformer.rank_pattern": {}}
    check(state, "diffusers", partial, metadata={"lora_adapter_metadata": json.dumps(config)})


def test_bfl_names_with_peft_suffixes_without_prefix(attention_only):
    state = to_format(attention_only, "bfl_peft")
    state = {k.removeprefix("diffusion_model."): v for k, v in state.items()}
    assert "double_blocks.2.img_attn.qkv.lora_A.weight" in state
    check(state, "bfl_peft", attention_only)


def test_kohya_uses_fused_bfl_names_and_alpha(partial):
    state = to_format(partial, "kohya", alpha=8.0)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (48, 3072)
    assert state["lora_unet_single_blocks_3_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 64)
    assert float(state["lora_unet_double_blocks_0_img_mlp_0.alpha"]) == 8.0
    check(state, "kohya", partial)


def test_partial_fused_groups_and_mixed_ranks():
    ranks = {
        "transformer_blocks.4.attn.to_q": 4,  # no to_v
        "transformer_blocks.4.attn.to_k": 8,
        "single_transformer_blocks.9.attn.to_q": 12,  # no to_k, no proj_mlp
        "single_transformer_blocks.9.attn.to_v": 2,
        "transformer_blocks.4.ff.net.2": 6,
    }
    layers = random_layers({n: flux1_dev().layer_shapes[n] for n in ranks}, ranks, seed=3)
    for fmt in ("kohya", "comfyui", "bfl_peft"):
        lora = check(to_format(layers, fmt), fmt, layers)
        assert {n: a.shape[0] for n, (a, _) in lora.layers.items()} == ranks  # no zero padding


def test_top_level_layers_including_swapped_final_norm():
    layers = flux_lora(top_level_names(), 4, seed=4)
    for fmt in ("kohya", "comfyui", "bfl_peft", "onetrainer", "diffusers"):
        check(to_format(layers, fmt), fmt, layers)
    raw = to_format(layers, "bfl_peft")
    raw = raw["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"]
    b = layers["norm_out.linear"][1]
    assert torch.equal(raw[:3072], b[3072:]) and torch.equal(raw[3072:], b[:3072])


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "onetrainer", "comfyui"])
def test_text_encoder_layers(fmt):
    layers = flux_lora(["transformer_blocks.1.attn.to_q"], 4, seed=5)
    te = {f"{TE}.0.self_attn.q_proj": (768, 768), f"{TE}.3.mlp.fc1": (3072, 768)}
    layers |= random_layers(te, 4, seed=6)
    lora = check(to_format(layers, fmt, alpha=None if fmt == "diffusers" else 2.0), fmt, layers)
    assert is_flux1(lora)  # text-encoder layers do not stop base matching


def test_full_coverage_kohya_equals_diffusers():
    layers = full_coverage_lora(rank=4)
    assert len(layers) == 19 * 14 + 38 * 6
    kohya = check(to_format(layers, "kohya"), "kohya", layers)
    diffusers = check(to_format(layers, "diffusers"), "diffusers", layers)
    assert len(kohya.layers) == 494 and not kohya.notes and is_flux1(kohya)
    assert fingerprint(kohya) == fingerprint(diffusers)


def test_kohya_and_diffusers_of_same_delta_agree(partial):
    kohya = canonicalise(to_format(partial, "kohya", alpha=10.0), {})  # B stored x1.6, read x0.625
    diffusers = canonicalise(to_format(partial, "diffusers"), {})
    want = delta(diffusers.layers["transformer_blocks.0.attn.to_q"])
    got = delta(kohya.layers["transformer_blocks.0.attn.to_q"])
    assert float((want - got).norm() / want.norm()) < 1e-6
    assert max_delta_error(kohya.layers, diffusers.layers) < 1e-6
    assert fingerprint(kohya) == fingerprint(diffusers)


def test_fingerprint_is_factorisation_invariant_and_discriminates(partial):
    base = canonicalise(to_format(partial, "diffusers"), {})
    gen = torch.Generator().manual_seed(7)
    mixed = {}
    for name, (a, b) in base.layers.items():
        r = a.shape[0]
        noise = torch.randn(r, r, generator=gen, dtype=torch.float64)
        m = torch.eye(r, dtype=torch.float64) + 0.1 * noise  # well conditioned
        mixed[name] = ((torch.linalg.inv(m) @ a.double()).float(), (b.double() @ m).float())
    assert fingerprint(canonicalise(to_format(mixed, "diffusers"), {})) == fingerprint(base)
    other = flux_lora(partial_names(), 16, seed=99)
    scaled = {n: (a, b * 1.01) for n, (a, b) in partial.items()}
    fewer = dict(list(partial.items())[1:])
    prints = {fingerprint(base)}
    for x in (other, scaled, fewer):
        prints.add(fingerprint(canonicalise(to_format(x, "diffusers"), {})))
    assert len(prints) == 4 and all(len(p) == 64 for p in prints)


def test_fingerprint_norm_is_close_to_the_exact_norm(partial):
    lora = canonicalise(to_format(partial, "diffusers"), {})
    exact = sum(float(delta(f).pow(2).sum()) for f in lora.layers.values()) ** 0.5
    log_norm, _ = fingerprint_features(lora)
    assert abs(10**log_norm / exact - 1) < 0.2  # an unbiased probe estimate of ||ΔW||


# --- the fast path: diffusers' converter skipped where it would return its input unchanged ----
def test_diffusers_keeps_exactly_what_diffusers_returns_unchanged(partial):
    from diffusers import FluxPipeline

    te = random_layers({f"{TE}.0.self_attn.q_proj": (768, 768)}, 4, seed=5)
    kept = {
        "diffusers": to_format(partial | te, "diffusers"),
        "peft": {k.removeprefix("transformer."): v for k, v in to_format(partial, "diffusers").items()},
        "bfl_peft": to_format(partial, "bfl_peft"),
    }
    for name, state in kept.items():
        assert conversion.diffusers_keeps(state), name
        out, alphas = FluxPipeline.lora_state_dict(dict(state), return_alphas=True)
        assert not alphas and out.keys() == state.keys(), name
        assert all(out[k] is v or torch.equal(out[k], v) for k, v in state.items()), name
    converted = {fmt: to_format(partial, fmt) for fmt in ("kohya", "comfyui", "onetrainer")}
    converted["diffusers+alpha"] = to_format(partial, "diffusers", alpha=8.0)
    converted["fal_kontext"] = fal_kontext_state(partial)
    for name, state in converted.items():
        assert not conversion.diffusers_keeps(state), name


@pytest.mark.parametrize("fmt", ["diffusers", "bfl_peft"])
def test_fast_path_equals_the_checked_conversion(partial, monkeypatch, fmt):
    state = to_format({n: (a.bfloat16(), b.bfloat16()) for n, (a, b) in partial.items()}, fmt)
    fast = canonicalise(state, {})
    monkeypatch.setattr(conversion, "diffusers_keeps", lambda keys: False)
    checked = canonicalise(state, {})
    assert fast.layers.keys() == checked.layers.keys() and fast.notes == checked.notes == []
    for name, (a, b) in fast.layers.items():
        assert torch.equal(a, checked.layers[name][0]) and torch.equal(b, checked.layers[name][1])
    assert fingerprint(fast) == fingerprint(checked)


def test_factors_keep_the_file_dtype_and_layers_are_float32_copies(partial):
    state = to_format({n: (a.bfloat16(), b.bfloat16()) for n, (a, b) in partial.items()},
                      "diffusers")
    before = {k: v.clone() for k, v in state.items()}
    lora = canonicalise(state, {})
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in lora.factors.values())
    inputs = {t.untyped_storage().data_ptr() for t in state.values()}
    ptrs = [t.untyped_storage().data_ptr() for f in lora.layers.values() for t in f]
    assert len(set(ptrs)) == len(ptrs) and not inputs & set(ptrs)  # memory of their own
    for name, (a, b) in lora.layers.items():
        assert torch.equal(a, lora.factors[name][0].float())
        assert torch.equal(b, lora.factors[name][1].float())
    lora.layers[Q.removeprefix("transformer.")][0].add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in state.items())


def _invisible_row(n: int) -> torch.Tensor:
    """A non-zero length-``n`` vector orthogonal to the fingerprint's input probes X_n (two rows
    of X_n with the same signs, taken with opposite signs), and one for output probes U_n."""
    x = signs(n, 16)
    rows = {}
    for cols, kind in ((slice(0, 8), "x"), (slice(8, 16), "u")):
        seen: dict[tuple, int] = {}
        for i, pattern in enumerate(map(tuple, x[:, cols].tolist())):
            if pattern in seen:
                v = torch.zeros(n)
                v[seen[pattern]], v[i] = 1.0, -1.0
                rows[kind] = v
                break
            seen[pattern] = i
    return rows["x"], rows["u"]


def test_exactly_zero_components_are_dropped_and_only_those():
    names = partial_names((1,), (), attention_only=True)[:4]
    layers = flux_lora(names, 4, seed=11)
    (n0, n1, n2, n3) = names
    a, b = layers[n0]
    layers[n0] = (torch.cat([a[:2], torch.zeros(1, a.shape[1]), a[3:]]), b)  # A row 2 zero
    a, b = layers[n1]
    layers[n1] = (a, torch.cat([torch.zeros(b.shape[0], 1), b[:, 1:]], dim=1))  # B column 0 zero
    a, b = layers[n2]
    layers[n2] = (a, torch.zeros_like(b))  # the whole layer is zero
    a, b = layers[n3]
    ax_zero, ub_zero = _invisible_row(a.shape[1])[0], _invisible_row(b.shape[0])[1]
    layers[n3] = (torch.cat([ax_zero[None], a[1:]]), torch.cat([ub_zero[:, None], b[:, 1:]], 1))
    lora = canonicalise(to_format(layers, "diffusers"), {})
    assert {n: a.shape[0] for n, (a, _) in lora.factors.items()} == {n0: 3, n1: 3, n3: 4}
    assert max_delta_error({n: layers[n] for n in (n0, n1, n3)}, lora.layers) < 1e-6
    a, b = layers[n0]
    keep = [0, 1, 3]
    trimmed = {n0: (a[keep], b[:, keep]), n1: (layers[n1][0][1:], layers[n1][1][:, 1:]),
               n3: layers[n3]}
    assert fingerprint(canonicalise(to_format(trimmed, "diffusers"), {})) == fingerprint(lora)


def test_fal_kontext_and_bfl_control():
    control = control_lora_layers(rank=2)
    lora = check(bfl_control_state(control), "bfl_control", control, tol=1e-3)
    assert lora.shapes()["x_embedder"] == (3072, 128)  # image + control channels
    assert any("non-LoRA" in n for n in lora.notes)  # the q/k norm scales are not part of ΔW
    assert any("disagreed" in n for n in lora.notes)  # diffusers swaps lora_A's halves of norm_out
    others = {n: s for n, s in lora.shapes().items() if n != "x_embedder"}
    assert match_base(others, [flux1_dev()]) is flux1_dev()
    blocks = {n: f for n, f in control.items() if "blocks." in n or n == "proj_out"}
    assert is_flux1(check(fal_kontext_state(blocks), "fal_kontext", blocks, tol=1e-3))
    few = {n: f for n, f in blocks.items() if n.startswith("transformer_blocks.3.")}
    lora = check(fal_kontext_state(few), "fal_kontext", few, tol=1e-3)
    assert any("diffusers: KeyError" in n for n in lora.notes)  # diffusers needs full coverage


def test_tiny_flux_architecture_uses_shape_derived_splits():
    tiny = tiny_flux_base()
    layers = random_layers(dict(tiny.layer_shapes), 2, seed=8)
    for fmt in ("kohya", "bfl_peft", "diffusers", "onetrainer"):
        lora = check(to_format(layers, fmt), fmt, layers)
        assert match_base(lora.shapes(), [flux1_dev(), tiny]) is tiny


def test_saved_file_round_trip(tmp_path, attention_only):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path / "x.safetensors"
    save_lora(path, attention_only, "kohya", metadata={"ss_base_model_version": "flux1"}, alpha=1.0)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    check(load_file(str(path)), "kohya", attention_only, metadata=metadata)


# --- architecture detection and rejections ----------------------------------------------------
def sd_unet_lora(cross_width: int, te: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Kohya keys of an SD UNet LoRA: one cross-attention to_k plus text-encoder q_proj's."""
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    state = {f"{k}.lora_down.weight": torch.zeros(4, cross_width),
             f"{k}.lora_up.weight": torch.zeros(640, 4), f"{k}.alpha": torch.tensor(4.0)}
    for prefix, width in zip(te, (768, 1280), strict=False):
        q = f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj"
        state |= {f"{q}.lora_down.weight": torch.zeros(4, width),
                  f"{q}.lora_up.weight": torch.zeros(width, 4)}
    return state


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def reject(state, code, metadata=None):
    with pytest.raises(RejectedFile) as info:
        canonicalise(state, metadata or {})
    assert info.value.code == code, info.value
    return info.value


def test_sdxl_is_detected_and_rejected():
    state = sd_unet_lora(2048, ("lora_te1", "lora_te2"))
    assert detect_architecture(shapes(state), {}) == "sdxl"
    assert detect_architecture(shapes(state), {"ss_base_model_version": "flux1"}) == "sdxl"
    error = reject(state, "unsupported_architecture")
    assert "sdxl" in error.reason and "FLUX" in error.reason


def test_other_architectures_detected():
    assert detect_architecture(shapes(sd_unet_lora(768, ("lora_te",))), {}) == "sd1"
    assert detect_architecture(shapes(sd_unet_lora(1024, ("lora_te",))), {}) == "sd2"
    sd3 = {"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": (4, 1536)}
    assert detect_architecture(sd3, {}) == "sd3"
    tiny = tiny_flux_base()
    state = to_format(flux_lora(["transformer_blocks.0.attn.to_q"], 2, base=tiny), "diffusers")
    assert detect_architecture(shapes(state), {}) == "unknown"  # width 32: keys cannot tell
    flux_meta = {"modelspec.architecture": "flux-1-dev/lora"}
    assert detect_architecture(shapes(state), flux_meta) == "flux"
    assert detect_architecture(shapes(state), {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert canonicalise(state, flux_meta).architecture == "flux"
    reject(state, "unknown_architecture")


def test_rejections():
    z = torch.zeros
    reject({}, "not_lora")
    reject({"step": z(1), "foo": z(3)}, "not_lora")
    reject({"double_blocks.0.img_attn.qkv.weight": z(8, 4), "img_in.bias": z(8)}, "full_checkpoint")
    key = "lora_unet_double_blocks_0_img_attn_proj"
    reject({f"{key}.lokr_w1": z(4, 4), f"{key}.lokr_w2": z(4, 4), f"{key}.alpha": z(())}, "lokr")
    reject({f"{key}.hada_w1_a": z(4, 4), f"{key}.hada_w1_b": z(4, 4)}, "loha")
    kohya = to_format(flux_lora(["transformer_blocks.0.attn.to_out.0"], 4), "kohya")
    reject({**kohya, f"{key}.dora_scale": z(3072, 1)}, "dora")
    peft = to_format(flux_lora(["transformer_blocks.0.attn.to_q"], 4), "diffusers")
    reject({**peft, f"{Q}.lora_magnitude_vector": z(3072)}, "dora")
    reject({**peft, f"{Q}.lora_B.weight": z(3072, 3)}, "rank_mismatch")
    reject({**peft, f"{Q}.lora_A.weight": z(4, 3072, 2)}, "rank_mismatch")
    reject({f"{Q}.lora_A.weight": z(4, 3072)}, "unpaired_lora_key")
    reject({**kohya, f"{key}.alpha": z(4)}, "bad_alpha")
    reject({"foo.bar.lora_A.weight": z(4, 10), "foo.bar.lora_B.weight": z(10, 4)},
           "unknown_architecture")
    reject({f"{key}.lora_down.weight": z(4, 3072), f"{key}.lora_up.weight": z(3072, 4)},
           "zero_lora")
    odd = "lora_unet_double_blocks_0_img_attn_foo"
    error = reject({f"{odd}.lora_down.weight": torch.ones(4, 3072),
                    f"{odd}.lora_up.weight": torch.ones(3072, 4)}, "unsupported_layers")
    assert odd in error.reason


def test_rank_zero_module_with_alpha_is_rejected():
    key = "lora_unet_double_blocks_0_img_attn_proj"
    state = {f"{key}.lora_down.weight": torch.zeros(0, 3072),
             f"{key}.lora_up.weight": torch.zeros(3072, 0), f"{key}.alpha": torch.tensor(4.0)}
    with pytest.raises(RejectedFile) as info:
        canonicalise(state, {})
    assert info.value.code == "rank_mismatch"


def test_an_encoders_responses_are_made_in_the_fingerprints_pass():
    """``inputs`` (an encoder's probes by layer): canonicalise also gives each named layer's
    ``(B (A Q))^T`` in float32, for the fused modules of a kohya file (one A shared by q, k, v) and
    a bfloat16 file too; the fingerprint is the same with or without them."""
    ranks = {"transformer_blocks.4.attn.to_q": 4, "transformer_blocks.4.attn.to_k": 4,
             "transformer_blocks.4.attn.to_v": 4, "single_transformer_blocks.9.proj_out": 2}
    shapes = {n: flux1_dev().layer_shapes[n] for n in ranks}
    layers = random_layers(shapes, ranks, seed=5)
    gen = torch.Generator().manual_seed(0)
    probes = {n: torch.randn(2, k, generator=gen) for n, (_, k) in shapes.items()}
    del probes["transformer_blocks.4.attn.to_v"]  # a layer the encoder does not know: none made
    for fmt, dtype in (("kohya", torch.float32), ("diffusers", torch.bfloat16)):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_format(layers, fmt).items()}
        plain = canonicalise(state, {})
        lora = canonicalise(state, {}, inputs={"enc-a": probes})
        assert fingerprint(lora) == fingerprint(plain) and plain.responses == {}
        assert set(lora.responses["enc-a"]) == set(probes)
        for name, q_t in probes.items():
            a, b = (t.double() for t in lora.factors[name])
            expected = ((q_t.double() @ a.T) @ b.T).float()
            got = lora.responses["enc-a"][name]
            assert got.dtype == torch.float32 and got.shape == (2, shapes[name][0])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
