"""The demo world's captioning model: a tiny Qwen2-VL that vLLM can serve.

A real Qwen2-VL checkpoint layout (``config.json``, safetensors weights, tokenizer, image
processor, chat template, generation config) at toy sizes: the text attention head size is 64
(one that vLLM's CPU attention supports) and every width is small. The tokenizer is a byte-level
BPE (as Qwen2's) trained with the ``tokenizers`` library on the world's caption vocabulary.
Images are resized by the Qwen2-VL image processor to 112x112 pixels: 8x8 patches of 14 pixels,
merged 2x2 into 16 image tokens (at 56x56, 4 tokens, shape accuracy was 0.28 after 600 steps).

``build_random_captioner`` saves random weights in seconds (for serving tests);
``build_captioner`` trains the model on the world's renders (see ``captioner_train``).
``parse_caption`` reads attribute values back from caption text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from pipelines.world.scene import ATTRIBUTES, SYNONYMS, caption, sample_attributes
from pipelines.world.themes import broad_mix

PROMPT = "Describe the image."
IMAGE_SIDE = 112  # pixels the processor resizes every image to (8x8 patches -> 16 merged tokens)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")

# Qwen2-VL's chat format, written for this model: no default system turn (shorter sequences);
# content may be a string or OpenAI-style parts (vLLM passes image parts as {"type": "image"}).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def vocabulary_corpus(seed: int = 0, n: int = 600) -> list[str]:
    """Texts covering the world's caption vocabulary: captions of every template, with canonical words
    and with synonyms, and the prompt."""
    _, captions, _ = broad_mix(n, seed, p_omit=0.2)
    rng = np.random.default_rng([seed, 0x5C0])
    synonym_captions = [caption(sample_attributes(rng), rng, use_synonyms=True) for _ in range(n)]
    return [*captions, *synonym_captions, PROMPT]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) whose merges make the corpus' words single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": "<|video_pad|>"},
    )


def make_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor, fixed to ``IMAGE_SIDE``² pixels (32x32 renders are upscaled)."""
    pixels = IMAGE_SIDE * IMAGE_SIDE
    return Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})


def tiny_config(
    tokenizer: PreTrainedTokenizerFast, *, hidden: int = 128, layers: int = 2, vision_depth: int = 4
) -> Qwen2VLConfig:
    """A toy Qwen2-VL config: text and vision attention heads of size 64."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids[PAD],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
    )
    vision = dict(depth=vision_depth, embed_dim=hidden, hidden_size=hidden, num_heads=hidden // 64, mlp_ratio=4)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )


def new_model(seed: int, corpus_seed: int = 0) -> tuple[Qwen2VLForConditionalGeneration, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Qwen2-VL and its tokenizer, deterministic per ``seed``."""
    tokenizer = train_tokenizer(vocabulary_corpus(corpus_seed))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer)).float().eval()
    return model, tokenizer


def save(model: Qwen2VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """Write the model folder that vLLM (and ``AutoProcessor``) loads.

    Weights, config, generation config, tokenizer with the chat template and the image processor,
    each by its ``save_pretrained``. ``Qwen2VLProcessor`` itself cannot be built in an environment
    without torchvision (its video processor needs it; the project venv has none), so its two parts
    are saved side by side plus a ``processor_config.json`` naming the class, which is the layout
    ``Qwen2VLProcessor.save_pretrained`` writes too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    make_image_processor().save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2) + "\n")
    return out_dir


def build_random_captioner(out_dir: Path, seed: int = 0) -> Path:
    """Save an untrained tiny Qwen2-VL (random weights) to ``out_dir``; takes seconds."""
    model, tokenizer = new_model(seed)
    return save(model, tokenizer, out_dir)


def build_captioner(out_dir: Path, seed: int = 0, train_steps: int = 1000, **train_kwargs) -> Path:
    """Train the tiny Qwen2-VL on the world's renders and captions and save it to ``out_dir``.

    Deterministic per ``seed``; ``train_kwargs`` go to ``captioner_train.train`` (batch size,
    learning rate, number of training images).
    """
    from pipelines.world.captioner_train import train

    model, tokenizer = new_model(seed)
    train(model, tokenizer, make_image_processor(), seed=seed, steps=train_steps, **train_kwargs)
    return save(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------- reading captions

_WORD_VALUE = {w: v for values in ATTRIBUTES.values() for v in values for w in (v, *SYNONYMS.get(v, ()))}


def parse_caption(text: str) -> dict[str, str | None]:
    """Attribute values named in ``text`` (canonical words or synonyms); ``None`` where none or several differ."""
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for word in re.findall(r"[a-z]+", text.lower()):
        value = _WORD_VALUE.get(word)
        if value is not None:
            found[next(a for a, vs in ATTRIBUTES.items() if value in vs)].add(value)
    return {a: next(iter(vs)) if len(vs) == 1 else None for a, vs in found.items()}


def attribute_accuracy(captions: Sequence[str], truth: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Share of images whose caption names the true value, per attribute and as ``"mean"``."""
    parsed = [parse_caption(c) for c in captions]
    acc = {a: float(np.mean([p[a] == t[a] for p, t in zip(parsed, truth, strict=True)])) for a in ATTRIBUTES}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc
