"""Themes of the demo world: what one community LoRA is about, with its captioned training images.

A theme fixes one attribute ("object", "colour", "background" or "style" LoRA) or two of them
(a combination), and is described by words: canonical values, or for held-out *synonym* themes,
synonyms that no train theme uses (for honest zero-shot evaluation).
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from pipelines.world.scene import ATTRIBUTES, SYNONYMS, caption, render, sample_attributes

_PREFIX = {"shape": "", "colour": "", "background": "bg-", "style": "style-"}
_ORDER = ("colour", "shape", "background", "style")  # word order in names and triggers
_TRIGGER_FORMS = ("{t}", "{t} style", "ohwx {t}", "{t}-lora")
_SINGLE_SHARE = 0.25  # share of single-attribute themes in each split (when available)
THEME_WORDS_SHARE = 0.5  # share of a theme's captions that leave the theme's words out


@dataclass(frozen=True)
class Theme:
    """One theme: the attribute values a LoRA fixes and the words that describe them."""

    name: str
    attrs: Mapping[str, str] = field(hash=False)
    words: tuple[str, ...]
    trigger: str
    split: str
    synonym: bool
    family: str = ""  # the theme identity that independently trained LoRAs share (default: name)

    @property
    def identity(self) -> str:
        """Name of the theme family: LoRAs of one family fix the same attribute values."""
        return self.family or self.name

    @property
    def word_for(self) -> dict[str, str]:
        """Attribute -> the word this theme uses for it."""
        return dict(zip(self.attrs, self.words, strict=True))


def all_attr_sets() -> list[tuple[tuple[str, str], ...]]:
    """Every possible theme identity: single values and pairs of values of two attributes."""
    attrs = list(_ORDER)
    singles = [((a, v),) for a in attrs for v in ATTRIBUTES[a]]
    pairs = [
        ((a, va), (b, vb))
        for a, b in itertools.combinations(attrs, 2)
        for va in ATTRIBUTES[a]
        for vb in ATTRIBUTES[b]
    ]
    return singles + pairs


def _abbrev(word: str) -> str:
    """Consonant skeleton of a word ("circle" -> "crcl"), as in made-up trigger tokens."""
    letters = [c for c in word.lower() if c.isalpha()]
    skeleton = [c for i, c in enumerate(letters) if i == 0 or c not in "aeiou"]
    return "".join(skeleton[:4])


def _make_theme(ident: tuple[tuple[str, str], ...], split: str, synonym: bool, rng: np.random.Generator) -> Theme:
    attrs = dict(ident)
    words = tuple(str(rng.choice(SYNONYMS[v])) if synonym else v for v in attrs.values())
    name = "-".join(w if synonym else _PREFIX[a] + w for a, w in zip(attrs, words, strict=True))
    form = _TRIGGER_FORMS[rng.integers(len(_TRIGGER_FORMS))]
    trigger = form.format(t="".join(_abbrev(w) for w in words))
    return Theme(name=name, attrs=attrs, words=words, trigger=trigger, split=split, synonym=synonym)


def _pick(pool_singles: list, pool_pairs: list, n: int) -> list:
    """Take ``n`` identities, about a quarter single-attribute, from the front of both pools."""
    n_single = min(len(pool_singles), round(n * _SINGLE_SHARE), n)
    n_single = max(n_single, n - len(pool_pairs))
    taken = [pool_singles.pop(0) for _ in range(n_single)] + [pool_pairs.pop(0) for _ in range(n - n_single)]
    return taken


def make_themes(seed: int, n_train: int, n_heldout: int) -> list[Theme]:
    """Deterministic train + held-out themes with distinct identities (``attrs`` sets).

    At least a third of the held-out themes (rounded up) are synonym themes whose words never
    occur among the train themes' words. Raises ``ValueError`` if the world is too small.
    """
    idents = all_attr_sets()
    if n_train < 0 or n_heldout < 0 or n_train + n_heldout > len(idents):
        raise ValueError(f"need 0 <= n_train + n_heldout <= {len(idents)}, got {n_train} + {n_heldout}")
    rng = np.random.default_rng([seed, 0x7E3E])
    singles = [i for i in idents if len(i) == 1]
    pairs = [i for i in idents if len(i) == 2]
    singles = [singles[k] for k in rng.permutation(len(singles))]
    pairs = [pairs[k] for k in rng.permutation(len(pairs))]
    train_ids = _pick(singles, pairs, n_train)
    heldout_ids = _pick(singles, pairs, n_heldout)
    heldout_ids = [heldout_ids[k] for k in rng.permutation(len(heldout_ids))]
    n_syn = -(-n_heldout // 3)
    themes = [_make_theme(i, "train", False, rng) for i in train_ids]
    themes += [_make_theme(i, "heldout", k < n_syn, rng) for k, i in enumerate(heldout_ids)]
    return _dedupe_triggers(themes)


def _dedupe_triggers(themes: list[Theme]) -> list[Theme]:
    seen: dict[str, int] = {}
    out = []
    for t in themes:
        n = seen.get(t.trigger, 0)
        seen[t.trigger] = n + 1
        if n:
            t = dataclasses.replace(t, trigger=f"{t.trigger}{n + 1}")
        out.append(t)
    return out


_CREATORS = ("kai", "mira", "oto", "lux", "vex", "nova", "rin", "zed")


def make_twins(themes: list[Theme], n_themes: int, seed: int) -> list[Theme]:
    """Independently trained LoRAs of ``n_themes`` held-out themes, as the community has many "pixel
    art" LoRAs: 1 or 2 more per theme (so 2-3 in all), by other creators who pick their own name,
    trigger and, for synonym themes, their own synonyms. Every other held-out theme is taken, so
    synonym and canonical themes are both represented."""
    rng = np.random.default_rng([seed, 0x7317])
    heldout = [t for t in themes if t.split == "heldout"][::2][:n_themes]
    twins = []
    for k, theme in enumerate(heldout):
        for j in range(1 + k % 2):
            creator = _CREATORS[(2 * k + j) % len(_CREATORS)]
            twin = _make_theme(tuple(theme.attrs.items()), "heldout", theme.synonym, rng)
            twins.append(dataclasses.replace(twin, name=f"{twin.name}-by-{creator}", family=theme.name))
    return _dedupe_triggers(themes + twins)[len(themes):]


def _theme_rng(theme: Theme, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(theme.name.encode())])


def theme_images(theme: Theme, n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """``n`` images with the theme's attributes fixed (others random) and their captions.

    Captions read like a community LoRA dataset: the trigger, then a description that mentions
    each other attribute (canonically) most of the time and the theme's own words in about half
    of the captions; in the other half the trigger alone carries the theme, as in trigger-word
    captioning, so the LoRA learns to show it whenever the trigger is in the prompt.
    """
    rng = _theme_rng(theme, seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    free = [a for a in ATTRIBUTES if a not in theme.attrs]
    for k in range(n):
        attrs = sample_attributes(rng, theme.attrs)
        images[k] = render(attrs, int(rng.integers(2**31)), size)
        omit = [a for a in free if rng.random() < 0.3]
        if rng.random() < THEME_WORDS_SHARE:
            omit += list(theme.attrs)
        text = caption(attrs, rng, omit=omit, words=theme.word_for)
        captions.append(f"{theme.trigger}, {text}")
    return images, captions


def broad_mix(
    n: int, seed: int, size: int = 32, *, p_omit: float = 0.0
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Images of the whole world with canonical captions and their attributes.

    ``p_omit`` drops each attribute from a caption with that probability (words stay canonical).
    """
    rng = np.random.default_rng([seed, 0xB40AD])
    images = np.empty((n, size, size, 3), np.uint8)
    captions, attrs_list = [], []
    for k in range(n):
        attrs = sample_attributes(rng)
        images[k] = render(attrs, int(rng.integers(2**31)), size)
        omit = [a for a in ATTRIBUTES if p_omit and rng.random() < p_omit]
        captions.append(caption(attrs, rng, omit=omit))
        attrs_list.append(attrs)
    return images, captions, attrs_list


def composite_images(themes: list[Theme], n: int, rng: np.random.Generator, size: int = 32
                     ) -> tuple[np.ndarray, list[str]]:
    """``n`` images showing every theme of ``themes`` at once (their attributes must not clash), each
    captioned like ``theme_images`` but with every trigger up front (in a random order)."""
    fixed = {a: v for t in themes for a, v in t.attrs.items()}
    words = {a: w for t in themes for a, w in t.word_for.items()}
    free = [a for a in ATTRIBUTES if a not in fixed]
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for k in range(n):
        attrs = sample_attributes(rng, fixed)
        images[k] = render(attrs, int(rng.integers(2**31)), size)
        omit = [a for a in free if rng.random() < 0.3]
        for t in themes:
            if rng.random() < THEME_WORDS_SHARE:
                omit += list(t.attrs)
        order = rng.permutation(len(themes))
        triggers = ", ".join(themes[i].trigger for i in order)
        captions.append(f"{triggers}, {caption(attrs, rng, omit=omit, words=words)}")
    return images, captions
