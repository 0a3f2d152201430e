"""The procedural demo world: renders, captions, synonyms and themes."""

from __future__ import annotations

import itertools
import time
from collections import Counter

import numpy as np
import pytest

from pipelines.world.scene import ATTRIBUTES, SYNONYMS, caption, prompt_words, render, sample_attributes
from pipelines.world.themes import all_attr_sets, broad_mix, make_themes, theme_images

ALL_VALUES = [v for values in ATTRIBUTES.values() for v in values]
ALL_SYNONYMS = [s for v in ALL_VALUES for s in SYNONYMS[v]]


def _words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(":", " ").split())


def test_attribute_space_is_big_enough() -> None:
    assert len(ATTRIBUTES) >= 4 and all(len(v) >= 4 for v in ATTRIBUTES.values())
    assert len(set(ALL_VALUES)) == len(ALL_VALUES)
    assert len(all_attr_sets()) >= 80 + 40


def test_synonyms_are_disjoint_from_canonical_words() -> None:
    assert set(SYNONYMS) == set(ALL_VALUES)
    assert len(set(ALL_SYNONYMS)) == len(ALL_SYNONYMS)
    for value in ALL_VALUES:
        assert len(SYNONYMS[value]) >= 2
        assert prompt_words(value) == (value, *SYNONYMS[value])
    for syn, value in itertools.product(ALL_SYNONYMS, ALL_VALUES):
        assert value not in syn and syn not in value, (syn, value)
    for a, b in itertools.permutations(ALL_SYNONYMS, 2):
        assert a not in b, (a, b)


def test_render_is_deterministic_and_varies() -> None:
    attrs = {"shape": "star", "colour": "red", "background": "striped", "style": "glow"}
    a, b = render(attrs, seed=3), render(attrs, seed=3)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(attrs, seed=4))
    assert render(attrs, seed=3, size=48).shape == (48, 48, 3)


def test_every_attribute_value_changes_the_image() -> None:
    base = {"shape": "circle", "colour": "red", "background": "plain", "style": "flat"}
    ref = render(base, seed=11).astype(int)
    for attr, values in ATTRIBUTES.items():
        for value in values:
            if value != base[attr]:
                diff = np.abs(render({**base, attr: value}, seed=11).astype(int) - ref).mean()
                assert diff > 1.5, (attr, value, diff)


def test_all_combinations_render() -> None:
    for k, combo in enumerate(itertools.product(*ATTRIBUTES.values())):
        img = render(dict(zip(ATTRIBUTES, combo, strict=True)), seed=k)
        assert img.shape == (32, 32, 3) and img.std() > 5


def test_sampling_is_independent_and_respects_fixed() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_attributes(rng) for _ in range(2400)]
    for attr, values in ATTRIBUTES.items():
        counts = Counter(d[attr] for d in draws)
        expected = len(draws) / len(values)
        assert set(counts) == set(values)
        assert all(abs(c - expected) < 0.25 * expected for c in counts.values())
    pairs = Counter((d["shape"], d["colour"]) for d in draws)
    assert len(pairs) == len(ATTRIBUTES["shape"]) * len(ATTRIBUTES["colour"])
    fixed = [sample_attributes(rng, {"style": "outline"}) for _ in range(50)]
    assert all(d["style"] == "outline" for d in fixed)
    with pytest.raises(ValueError):
        sample_attributes(rng, {"style": "cubist"})


def test_captions_use_canonical_words_unless_asked() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        attrs = sample_attributes(rng)
        words = _words(caption(attrs, rng))
        assert set(attrs.values()) <= words
        assert not words & set(ALL_SYNONYMS)
        syn_words = _words(caption(attrs, rng, use_synonyms=True))
        assert not syn_words & set(ALL_VALUES)
        assert all(syn_words & set(SYNONYMS[v]) for v in attrs.values())
        omitted = _words(caption(attrs, rng, omit=("colour", "style")))
        assert attrs["colour"] not in omitted and attrs["style"] not in omitted
        assert attrs["shape"] in omitted and attrs["background"] in omitted
    assert len({caption(attrs, rng) for _ in range(40)}) >= 3  # several templates


def test_render_speed() -> None:
    rng = np.random.default_rng(2)
    attrs = [sample_attributes(rng) for _ in range(500)]
    start = time.perf_counter()
    for k, a in enumerate(attrs):
        render(a, seed=k)
    rate = len(attrs) / (time.perf_counter() - start)
    assert rate > 300, f"{rate:.0f} renders/s"  # ~4000/s on an idle core; loose for shared CI


@pytest.mark.parametrize(("n_train", "n_heldout"), [(6, 3), (60, 20)])
def test_theme_counts_and_identity(n_train: int, n_heldout: int) -> None:
    themes = make_themes(0, n_train, n_heldout)
    train = [t for t in themes if t.split == "train"]
    heldout = [t for t in themes if t.split == "heldout"]
    assert (len(train), len(heldout)) == (n_train, n_heldout)
    assert len({t.name for t in themes}) == len(themes)
    assert len({t.trigger for t in themes}) == len(themes)
    identities = [frozenset(t.attrs.items()) for t in themes]
    assert len(set(identities)) == len(themes)
    assert {len(t.attrs) for t in train} == {1, 2}
    assert all(1 <= len(t.attrs) <= 2 and len(t.words) == len(t.attrs) for t in themes)
    synonym = [t for t in heldout if t.synonym]
    assert not any(t.synonym for t in train)
    assert 3 * len(synonym) >= len(heldout) >= 1
    train_text = " ".join(w for t in train for w in (*t.words, t.trigger))
    for t in synonym:
        for attr, word in t.word_for.items():
            assert word in SYNONYMS[t.attrs[attr]]
            assert word not in train_text
    for t in themes:
        if not t.synonym:
            assert t.words == tuple(t.attrs.values())
    assert make_themes(0, n_train, n_heldout) == themes
    assert make_themes(1, n_train, n_heldout) != themes


def test_make_themes_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        make_themes(0, len(all_attr_sets()), 1)
    assert len(make_themes(0, 120, 48)) == len(all_attr_sets())


def test_theme_images_are_captioned_with_trigger_and_theme_words() -> None:
    themes = make_themes(3, 6, 3)
    for theme in themes:
        images, captions = theme_images(theme, 12, seed=5)
        assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
        assert len(captions) == 12
        with_words = 0
        for text in captions:
            assert text.startswith(theme.trigger)
            found = set(theme.words) & _words(text)
            assert found in (set(), set(theme.words)), text  # all of the theme's words, or none
            with_words += bool(found)
        assert 0 < with_words < len(captions)  # trigger-only captions too
        again, _ = theme_images(theme, 12, seed=5)
        assert np.array_equal(images, again)
    synonym = next(t for t in themes if t.synonym)
    _, captions = theme_images(synonym, 20, seed=0)
    assert not any(set(synonym.attrs.values()) & _words(c) for c in captions)


def test_broad_mix_matches_its_captions() -> None:
    images, captions, attrs = broad_mix(50, seed=9, size=24)
    assert images.shape == (50, 24, 24, 3)
    for text, a in zip(captions, attrs, strict=True):
        assert set(a.values()) <= _words(text)
        assert not _words(text) & set(ALL_SYNONYMS)
    again, _, _ = broad_mix(50, seed=9, size=24)
    assert np.array_equal(images, again)


def test_composite_images_show_every_theme_with_every_trigger():
    from pipelines.world.themes import Theme, composite_images

    a = Theme("red", {"colour": "red"}, ("red",), "rd", "train", False)
    b = Theme("style-flat", {"style": "flat"}, ("flat",), "flt style", "train", False)
    images, captions = composite_images([a, b], 6, np.random.default_rng(0))
    assert images.shape == (6, 32, 32, 3) and len(captions) == 6
    assert all(c.startswith(("rd, flt style, ", "flt style, rd, ")) for c in captions)
