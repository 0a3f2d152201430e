"""Training and greedy captioning of the world's tiny Qwen2-VL with transformers (CPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from pipelines.world.captioner import IMAGE_PAD, IM_END, PROMPT
from pipelines.world.themes import broad_mix


def target_caption(attrs: Mapping[str, str]) -> str:
    """The caption the model is taught: the world's first caption template, every attribute named."""
    return f"a {attrs['colour']} {attrs['shape']} on a {attrs['background']} background, {attrs['style']} style"


def prompt_text(tokenizer: PreTrainedTokenizerFast, n_image_tokens: int, prompt: str = PROMPT) -> str:
    """The chat prompt for one image with its image placeholder expanded to ``n_image_tokens``.

    This expansion is what ``Qwen2VLProcessor`` does; it is done here because that class cannot be
    built without torchvision (see ``captioner.save``).
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens, 1)


def encode(
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    images: np.ndarray,
    targets: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of images (N,H,W,3 uint8); with ``targets``, right-padded with ``labels``
    on the answer tokens only, else left-padded prompts for generation."""
    vis = image_processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    merge = image_processor.merge_size**2
    prompts = [prompt_text(tokenizer, int(g.prod()) // merge) for g in vis["image_grid_thw"]]
    if targets is None:
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {**enc, **vis, "mm_token_type_ids": _image_token_types(tokenizer, enc["input_ids"])}
    tokenizer.padding_side = "right"
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([t + IM_END for t in targets], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids, strict=True))
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), length), -100)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for k, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        ids[k, : len(p) + len(a)] = torch.tensor(p + a)
        labels[k, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[k, : len(p) + len(a)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "mm_token_type_ids": _image_token_types(tokenizer, ids),
        **vis,
    }


def _image_token_types(tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor) -> torch.Tensor:
    """1 on image placeholder tokens, 0 elsewhere (what the processor returns as ``mm_token_type_ids``)."""
    return (ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).long()


def train(
    model: Qwen2VLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    *,
    seed: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    n_images: int = 4000,
) -> list[float]:
    """Teach ``model`` to caption ``n_images`` broad-mix renders (AdamW, warm-up + cosine); returns the losses.

    The renders and their attributes come from ``themes.broad_mix``; the taught caption is
    ``target_caption`` of the attributes.
    """
    images, _, attrs = broad_mix(n_images, seed)
    targets = [target_caption(a) for a in attrs]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen).numpy()
        batch = encode(tokenizer, image_processor, images[idx], [targets[i] for i in idx])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate_captions(
    model: Qwen2VLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    images: np.ndarray,
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Greedy captions of images (N,H,W,3 uint8) with transformers' ``generate``."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = encode(tokenizer, image_processor, images[start : start + batch_size])
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out
