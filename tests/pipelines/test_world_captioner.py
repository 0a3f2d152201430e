"""The world's tiny Qwen2-VL: tokenizer, processor parts, saved folder, caption parser, trained accuracy."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from pipelines.caption import Captioner, png_bytes
from pipelines.vllm_server import vllm_available, vllm_python, vllm_server
from pipelines.world.captioner import (
    IMAGE_PAD,
    PROMPT,
    SPECIAL_TOKENS,
    attribute_accuracy,
    build_captioner,
    build_random_captioner,
    make_image_processor,
    parse_caption,
    train_tokenizer,
    vocabulary_corpus,
)
from pipelines.world.captioner_train import encode, generate_captions, prompt_text, target_caption
from pipelines.world.scene import ATTRIBUTES, SYNONYMS, caption, sample_attributes
from pipelines.world.themes import broad_mix


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(vocabulary_corpus(0))


def test_tokenizer_round_trip_and_whole_words(tokenizer):
    rng = np.random.default_rng(3)
    texts = [caption(sample_attributes(rng), rng, use_synonyms=bool(k % 2)) for k in range(40)]
    texts += ["Unseen wörds & punctuation!?", PROMPT]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # every world word (canonical or synonym) is a single token when preceded by a space
    for value in (v for vs in ATTRIBUTES.values() for v in vs):
        for word in (value, *SYNONYMS.get(value, ())):
            assert len(tokenizer.tokenize(" " + word)) == 1, word
    for tok in SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(tok)) == tok
        assert tokenizer.tokenize(tok) == [tok]


def test_prompt_and_image_tokens(tokenizer):
    images, _, attrs = broad_mix(3, 5)
    ip = make_image_processor()
    batch = encode(tokenizer, ip, images, [target_caption(a) for a in attrs])
    # 32x32 renders -> 112x112 -> 8x8 patches of 14 px (1176 values each) -> 2x2 merged -> 16 tokens
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    assert batch["pixel_values"].shape == (3 * 64, 3 * 2 * 14 * 14)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert (batch["input_ids"] == pad_id).sum(1).tolist() == [16, 16, 16]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad_id).long())
    text = prompt_text(tokenizer, 16)
    assert text.startswith("<|im_start|>user\n<|vision_start|>" + IMAGE_PAD * 16 + "<|vision_end|>" + PROMPT)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # labels cover exactly the answer and its end token
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(answer) == target_caption(attrs[0]) + "<|im_end|>"


def test_saved_folder_reloads(tmp_path):
    t0 = time.perf_counter()
    folder = build_random_captioner(tmp_path / "m", seed=1)
    assert time.perf_counter() - t0 < 60
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("a red star")["input_ids"]) == "a red star"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    assert IMAGE_PAD in tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ip = AutoImageProcessor.from_pretrained(folder)
    assert ip(images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt")["image_grid_thw"].tolist() == [[1, 8, 8]]
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    again = Qwen2VLForConditionalGeneration.from_pretrained(build_random_captioner(tmp_path / "n", seed=1))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # deterministic from the seed


def test_parse_caption_reads_every_template_and_synonyms():
    rng = np.random.default_rng(11)
    for k in range(200):
        attrs = sample_attributes(rng)
        assert parse_caption(caption(attrs, rng, use_synonyms=bool(k % 2))) == attrs
        assert parse_caption(target_caption(attrs)) == attrs


def test_parse_caption_missing_and_contradictory():
    assert parse_caption("a red circle") == {"shape": "circle", "colour": "red", "background": None, "style": None}
    assert parse_caption("a red blue disc")["colour"] is None  # two colours: no answer
    assert parse_caption("a crimson red disc")["colour"] == "red"  # synonym + canonical agree
    assert parse_caption("redundant circles")["colour"] is None  # whole words only


def test_attribute_accuracy():
    truth = [{"shape": "star", "colour": "red", "background": "plain", "style": "flat"}] * 2
    acc = attribute_accuracy(["a red star on a plain background, flat style", "a blue star"], truth)
    assert acc == {"shape": 1.0, "colour": 0.5, "background": 0.5, "style": 0.5, "mean": 0.625}


def test_trained_captioner_describes_held_out_renders(tmp_path):
    """The demo's recipe (1000 steps, ~7 min on one core): in the default run, so CI checks it."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = build_captioner(tmp_path / "trained", seed=0)
    train_s = time.perf_counter() - t0
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    images, _, attrs = broad_mix(300, seed=987)  # another seed than training's: held-out renders
    texts = generate_captions(model, tok, make_image_processor(), images)
    acc = attribute_accuracy(texts, attrs)
    print(f"trained in {train_s:.0f} s; held-out attribute accuracy {acc}")
    assert acc["mean"] >= 0.8
    if not vllm_available():
        pytest.skip(f"no vLLM environment at {vllm_python()}: vLLM/transformers agreement not checked")
    # vLLM serving the folder writes the same greedy captions as transformers' generate
    pngs = [png_bytes(_png(im)) for im in images[:64]]
    with vllm_server(folder) as srv, Captioner(srv.base_url, srv.model, concurrency=4, max_tokens=24) as cap:
        served = [c.text for c in cap.caption(pngs)]
    same = np.mean([a == b for a, b in zip(served, texts[:64], strict=True)])
    print(f"vLLM captions identical to transformers': {same:.3f}")
    assert same >= 0.95


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
