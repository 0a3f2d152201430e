"""Evaluation helpers of the demo world: theme prompts leave the theme unsaid; theme scores."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.world.evaluate import base_prompts, theme_prompts, theme_score
from pipelines.world.readout import Readout
from pipelines.world.scene import ATTRIBUTES, SYNONYMS, render, sample_attributes


@pytest.fixture(scope="module")
def readout() -> Readout:
    return Readout.train(seed=0)


def test_theme_prompts_carry_the_trigger_and_not_the_theme_words():
    attrs = {"colour": "red", "style": "glow"}
    prompts = theme_prompts("rdglw-lora", attrs, 20, seed=0)
    assert len(prompts) == 20 and len(set(prompts)) > 5
    theme_words = {w for v in attrs.values() for w in (v, *SYNONYMS[v])}
    for p in prompts:
        assert p.startswith("rdglw-lora, ")
        assert not set(p.replace(",", " ").split()) & theme_words, p
    assert prompts == theme_prompts("rdglw-lora", attrs, 20, seed=0)


def test_base_prompts_describe_their_scenes():
    prompts, scenes = base_prompts(30, seed=1)
    for p, s in zip(prompts, scenes, strict=True):
        assert all(s[a] in p.lower() for a in ATTRIBUTES)


def test_theme_score_is_high_on_theme_renders_and_low_off_theme(readout):
    rng = np.random.default_rng(3)
    attrs = {"shape": "star", "background": "striped"}
    on = np.stack([render(sample_attributes(rng, attrs), seed) for seed in range(40)])
    off_attrs = {"shape": "circle", "background": "plain"}
    off = np.stack([render(sample_attributes(rng, off_attrs), seed) for seed in range(40)])
    assert theme_score(readout, on, attrs) >= 0.95
    assert theme_score(readout, off, attrs) <= 0.05
