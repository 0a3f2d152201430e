"""LoRA-weight encoder: invariances, any rank/coverage, masking, paper config, save/load, size."""

import json

import pytest
import torch

from models.encoder import EncoderConfig, LayerSpec, LoRAWeightEncoder, module_type
from models.lora_augment import reparametrise, rescale

W = 16  # width of the small base the tests use


def small_specs() -> list[LayerSpec]:
    specs = []
    for i in range(2):
        p = f"transformer_blocks.{i}."
        specs += [LayerSpec(p + "attn.to_q", W, W), LayerSpec(p + "attn.to_k", W, W),
                  LayerSpec(p + "attn.to_out.0", W, W), LayerSpec(p + "ff.net.0.proj", 4 * W, W),
                  LayerSpec(p + "ff.net.2", W, 4 * W)]
    for i in range(2):
        p = f"single_transformer_blocks.{i}."
        specs += [LayerSpec(p + "attn.to_q", W, W), LayerSpec(p + "proj_mlp", 4 * W, W),
                  LayerSpec(p + "proj_out", W, 5 * W)]
    return specs


def random_lora(specs, rank, gen, names=None):
    chosen = [s for s in specs if names is None or s.name in names]
    return {s.name: (torch.randn(rank, s.d_in, generator=gen), torch.randn(s.d_out, rank, generator=gen))
            for s in chosen}


def make(config=None, seed=0):
    torch.manual_seed(seed)
    return LoRAWeightEncoder(small_specs(), config or EncoderConfig.ours(width=32, depth=2, heads=4,
                                                                        probe_dim=8)).eval()


def test_module_type_replaces_block_indices_only():
    assert module_type("transformer_blocks.3.attn.to_q") == "transformer_blocks.*.attn.to_q"
    assert module_type("transformer_blocks.12.ff.net.0.proj") == "transformer_blocks.*.ff.net.0.proj"
    assert module_type("single_transformer_blocks.7.proj_mlp") == "single_transformer_blocks.*.proj_mlp"
    assert module_type("transformer_blocks.0.attn.to_out.0") == "transformer_blocks.*.attn.to_out.0"
    assert module_type("x_embedder") == "x_embedder"


def test_projection_is_shared_per_module_type():
    enc = make()
    assert len(enc.tokenizer.proj) == 8  # 5 double + 3 single module types, not 16 layers


def test_embedding_is_invariant_to_factor_reparametrisation():
    enc, gen = make(), torch.Generator().manual_seed(1)
    lora = random_lora(enc.layers, 6, gen)
    moved = {n: reparametrise(a, b, gen) for n, (a, b) in lora.items()}
    assert not torch.allclose(moved["transformer_blocks.0.attn.to_q"][1], lora["transformer_blocks.0.attn.to_q"][1])
    with torch.no_grad():
        e1, e2 = enc([lora]), enc([moved])
    torch.testing.assert_close(e1, e2, atol=2e-5, rtol=0)


def test_embedding_is_invariant_to_strength_with_ours_and_not_paper_scale():
    gen = torch.Generator().manual_seed(2)
    enc = make()
    lora = random_lora(enc.layers, 4, gen)
    with torch.no_grad():
        torch.testing.assert_close(enc([lora]), enc([rescale(lora, 0.5)]), atol=2e-5, rtol=0)
    raw = make(EncoderConfig.ours(width=32, depth=2, heads=4, probe_dim=8, normalise_scale=False))
    with torch.no_grad():
        assert (raw([lora]) - raw([rescale(lora, 0.1)])).abs().max() > 1e-3


def test_any_rank_and_coverage_in_one_batch_matches_encoding_alone():
    enc, gen = make(), torch.Generator().manual_seed(3)
    names = [s.name for s in enc.layers]
    loras = [random_lora(enc.layers, 1, gen), random_lora(enc.layers, 128, gen, names[:3]),
             random_lora(enc.layers, 7, gen, [n for n in names if n.startswith("single")]),
             {**random_lora(enc.layers, 2, gen, names[:5]), **random_lora(enc.layers, 9, gen, names[5:])}]
    with torch.no_grad():
        batch = enc(loras)
        alone = torch.cat([enc([lo]) for lo in loras])
    assert batch.shape == (4, 384)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=0)


def test_depth_zero_pools_the_layer_tokens_without_blocks():
    config = EncoderConfig.ours(width=32, depth=0, heads=4, probe_dim=8, pool="mean")
    enc, gen = make(config), torch.Generator().manual_seed(5)
    assert enc.blocks is None
    names = [s.name for s in enc.layers]
    loras = [random_lora(enc.layers, 2, gen, names[:4]), random_lora(enc.layers, 5, gen), {}]
    with torch.no_grad():
        batch = enc(loras)
        alone = torch.cat([enc([lo]) for lo in loras])
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=0)  # any rank and coverage
    assert torch.isfinite(batch).all() and batch[2].abs().max() == 0  # nothing adapted: zeros
    with pytest.raises(ValueError, match="pool='mean'"):
        EncoderConfig.ours(depth=0)


def test_absent_zero_rank_and_unknown_layers_all_count_as_missing():
    enc, gen = make(), torch.Generator().manual_seed(4)
    names = [s.name for s in enc.layers]
    lora = random_lora(enc.layers, 3, gen, names[:6])
    zero_rank = {**lora, names[7]: (torch.zeros(0, W), torch.zeros(W, 0))}
    with_unknown = {**lora, "text_encoder.foo": (torch.randn(2, 8), torch.randn(8, 2)),
                    names[8]: (torch.randn(2, 3), torch.randn(5, 2))}  # known name, wrong shape
    with torch.no_grad():
        ref = enc([lora])
        torch.testing.assert_close(enc([zero_rank]), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(enc([with_unknown]), ref, atol=1e-6, rtol=0)
    assert enc.last_unknown == [["text_encoder.foo", names[8]]]
    other = random_lora(enc.layers, 3, gen, names[6:7])
    with torch.no_grad():  # a present layer does change it
        assert (enc([{**lora, **other}]) - ref).abs().max() > 1e-4


def test_a_lora_with_no_known_layer_gives_a_finite_vector():
    for config in (EncoderConfig.ours(width=32, depth=1, heads=4, probe_dim=8),
                   EncoderConfig.ours(width=32, depth=1, heads=4, probe_dim=8, pool="mean"),
                   EncoderConfig.ours(width=32, depth=1, heads=4, probe_dim=8, pool="mean",
                                      attention="causal")):
        with torch.no_grad():
            out = make(config)([{"unknown.layer": (torch.randn(1, 3), torch.randn(3, 1))}, {}])
        assert torch.isfinite(out).all()


def test_paper_config_requires_every_layer_and_names_the_missing():
    config = EncoderConfig.paper(width=32, probe_dim=32, heads=4)
    assert (config.probes, config.attention, config.pool, config.learn_temperature) == (1, "causal", "mean", False)
    enc, gen = make(config), torch.Generator().manual_seed(5)
    full = random_lora(enc.layers, 4, gen)
    with torch.no_grad():
        assert torch.isfinite(enc([full])).all()
    partial = {k: v for k, v in full.items() if k != "single_transformer_blocks.1.proj_mlp"}
    with pytest.raises(ValueError, match=r"lacks 1 .*single_transformer_blocks\.1\.proj_mlp"):
        enc([partial])
    assert enc.logit_scale.requires_grad is False
    # per-layer probes: one set per layer of each type
    assert enc.tokenizer.probe[enc.tokenizer.type_keys["transformer_blocks.*.attn.to_q"]].shape == (2, W, 1)


def test_causal_attention_with_partial_coverage_matches_encoding_alone():
    gen = torch.Generator().manual_seed(6)
    causal = make(EncoderConfig.ours(width=32, depth=2, heads=4, probe_dim=8, attention="causal",
                                     pool="mean"))
    names = [s.name for s in causal.layers]
    loras = [random_lora(causal.layers, 3, gen, names[4:]), random_lora(causal.layers, 2, gen, names[:2])]
    with torch.no_grad():
        batch = causal(loras)
        alone = torch.cat([causal([lo]) for lo in loras])
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=0)


def test_gradients_reach_probes_projections_and_temperature():
    enc, gen = make(), torch.Generator().manual_seed(7)
    enc.train()
    out = enc([random_lora(enc.layers, 3, gen), random_lora(enc.layers, 5, gen)])
    (out.sum() * enc.temperature_scale()).backward()
    key = enc.tokenizer.type_keys["transformer_blocks.*.attn.to_q"]
    assert enc.tokenizer.probe[key].grad.abs().sum() > 0
    assert enc.tokenizer.proj[key].grad.abs().sum() > 0
    assert enc.logit_scale.grad is not None


def test_save_load_round_trip(tmp_path):
    enc, gen = make(seed=3), torch.Generator().manual_seed(8)
    loras = [random_lora(enc.layers, r, gen) for r in (2, 5)]
    path = tmp_path / "enc.safetensors"
    enc.save(path, version="v7", extra={"pool": ["a", "b"], "steps": 10})
    back = LoRAWeightEncoder.load(path)
    assert back.version == "v7" and back.extra == {"pool": ["a", "b"], "steps": 10}
    assert back.config == enc.config and back.layers == enc.layers
    with torch.no_grad():
        assert torch.equal(back(loras), enc(loras))
    with open(path, "rb") as f:  # a plain safetensors file: 8-byte length + JSON header
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    assert json.loads(header["__metadata__"]["config"])["width"] == 32


def flux1_dev_specs() -> list[LayerSpec]:
    """FLUX.1-dev's linear layers, read off the diffusers model on the meta device (no weights)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True,
                                       axes_dims_rope=(16, 56, 56))
    return [LayerSpec(n, m.out_features, m.in_features)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_default_config_at_flux1_dev_shape_is_small_and_encodes_a_real_shaped_lora():
    specs = flux1_dev_specs()
    assert len(specs) == 504 and ("transformer_blocks.18.ff.net.2", 3072, 12288) in {
        (s.name, s.d_out, s.d_in) for s in specs}
    torch.manual_seed(0)
    enc = LoRAWeightEncoder(specs).eval()
    assert enc.num_parameters() <= 40_000_000
    gen = torch.Generator().manual_seed(0)
    lora = {s.name: (torch.randn(16, s.d_in, generator=gen).bfloat16(),
                     torch.randn(s.d_out, 16, generator=gen).bfloat16()) for s in specs}
    with torch.no_grad():
        out = enc([lora])
    assert out.shape == (1, 384) and torch.isfinite(out).all() and enc.last_unknown == [[]]


def test_fixed_probes_are_set_per_layer_frozen_and_saved(tmp_path):
    cfg = EncoderConfig.ours(width=32, depth=2, heads=4, probe_dim=8, probes=1, probe_sharing="layer")
    encoder = make(cfg)
    name = "transformer_blocks.1.attn.to_q"
    q = torch.linalg.qr(torch.randn(W, 1))[0]
    assert encoder.tokenizer.set_probes({name: q, "not.a.layer": q}) == [name]
    assert not any(p.requires_grad for p in encoder.tokenizer.probe.parameters())
    # the LoRA's response on that layer is now B (A q): rescaling A along q's complement changes nothing
    a, b = torch.randn(2, W), torch.randn(W, 2)
    off = a - (a @ q) @ q.T  # the part of A that q does not see
    same = encoder.embed([{name: (a + 3 * off, b)}])
    torch.testing.assert_close(encoder.embed([{name: (a, b)}]), same)
    encoder.save(tmp_path / "e.safetensors", "v1")
    loaded = LoRAWeightEncoder.load(tmp_path / "e.safetensors")
    torch.testing.assert_close(loaded.embed([{name: (a, b)}]), encoder.embed([{name: (a, b)}]))
    with pytest.raises(ValueError, match="per-layer"):
        make().tokenizer.set_probes({name: q})


def test_bf16_factors_are_multiplied_in_bf16_at_inference_and_match_float32() -> None:
    """A bf16 LoRA (most FLUX files) embeds within bf16 rounding of its float32 copy; with a
    gradient needed (training learned probes) the factors are cast to float32 instead."""
    enc, gen = make(), torch.Generator().manual_seed(11)
    lora32 = random_lora(enc.layers, 4, gen)
    lora16 = {n: (a.bfloat16(), b.bfloat16()) for n, (a, b) in lora32.items()}
    exact = {n: (a.float(), b.float()) for n, (a, b) in lora16.items()}  # the same numbers in float32
    with torch.no_grad():
        fast, ref = enc.tokenizer([lora16]).tokens, enc.tokenizer([exact]).tokens
    assert fast.dtype == torch.float32
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-2
    torch.testing.assert_close(enc.embed([lora16]), enc.embed([exact]), atol=2e-2, rtol=0)
    trained = enc.tokenizer([lora16]).tokens  # grad enabled, learned probes: the float32 path
    torch.testing.assert_close(trained, ref, atol=1e-5, rtol=1e-5)


def test_a_helper_thread_shares_the_layer_tokens_and_changes_nothing():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import models.encoder_tokens as tokens_module

    enc, gen = make(), torch.Generator().manual_seed(5)
    loras = [random_lora(enc.layers, 4, gen), random_lora(enc.layers, 2, gen)]
    with torch.no_grad():
        alone = enc(loras)
    seen, original = set(), tokens_module.LayerTokenizer._responses_t

    def watched(self, *args, **kwargs):
        seen.add(threading.current_thread().name)
        assert not torch.is_grad_enabled()  # the helper runs under the caller's no_grad
        time.sleep(0.005)  # tiny tensors: give the other thread time to take an item
        return original(self, *args, **kwargs)

    tokens_module.LayerTokenizer._responses_t = watched
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="helper") as pool, torch.no_grad():
            for _ in range(5):
                torch.testing.assert_close(enc(loras, helper=pool), alone, rtol=0, atol=0)
            busy = threading.Event()
            pool.submit(busy.wait, 10)  # a helper still busy with other work is not waited for
            torch.testing.assert_close(enc(loras, helper=pool), alone, rtol=0, atol=0)
            busy.set()
    finally:
        tokens_module.LayerTokenizer._responses_t = original
    assert any(name.startswith("helper") for name in seen) and "MainThread" in seen


def test_responses_made_by_the_caller_give_the_same_embedding() -> None:
    """:meth:`layer_probes` + ``responses`` (what inspection makes in its own pass over the factors)
    give the vector the encoder's own pass gives; a type with one layer lacking them is computed
    from the factors; with gradients to learned probes they are ignored (they are constants)."""
    for config in (None, EncoderConfig.ours(width=32, depth=0, pool="mean", probes=1, probe_dim=8,
                                            probe_sharing="layer")):
        enc, gen = make(config), torch.Generator().manual_seed(13)
        lora = random_lora(enc.layers, 4, gen)
        probes = enc.layer_probes()
        assert set(probes) == {s.name for s in enc.layers}
        given = {n: (probes[n] @ a.T) @ b.T for n, (a, b) in lora.items()}
        with torch.no_grad():
            own = enc([lora])
            torch.testing.assert_close(enc([lora], responses=[given]), own, atol=1e-6, rtol=0)
            partial = dict(given)
            del partial["transformer_blocks.0.attn.to_q"]
            torch.testing.assert_close(enc([lora], responses=[partial]), own, atol=1e-6, rtol=0)
            wrong = {n: torch.zeros_like(r) for n, r in given.items()}
            assert not torch.allclose(enc([lora], responses=[wrong]), own)  # they are used
    enc = make()
    d_out = {s.name: s.d_out for s in enc.layers}
    wrong = {n: torch.zeros(enc.tokenizer.probes, d_out[n]) for n in lora}
    trained = enc([lora], responses=[wrong])  # grad enabled, learned probes: from the factors
    torch.testing.assert_close(trained.detach(), enc.embed([lora]), atol=1e-6, rtol=0)
