"""Write one zoo LoRA the way people find them: a file in some format with kohya metadata or not,
sample renders with their prompts, a card sidecar (local folder) and a Hub-style repo."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from pipelines.world.themes import Theme
from registry.lora.formats import save_lora

Layers = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def kohya_metadata(theme: Theme, rank: int, captions: Sequence[str], base_name: str) -> dict[str, str]:
    """``ss_*`` keys as kohya's sd-scripts writes them (a subset)."""
    tags: dict[str, int] = {}
    for text in captions:
        for tag in (t.strip() for t in text.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return {
        "ss_output_name": theme.name, "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_base_model_version": "flux1", "ss_sd_model_name": base_name,
        "ss_tag_frequency": json.dumps({f"10_{theme.trigger}": tags}),
        "modelspec.architecture": "flux-1-dev/lora", "modelspec.title": theme.name,
        "modelspec.trigger_phrase": theme.trigger,
    }


def _save_png(image: np.ndarray, path: Path, prompt: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", prompt)
    Image.fromarray(image).save(path, pnginfo=info)


def write_local(folder: Path, theme: Theme, layers: Layers, fmt: str, renders: np.ndarray,
                prompts: Sequence[str], metadata: Mapping[str, str] | None, base_name: str) -> Path:
    """``folder/NAME.safetensors`` + ``NAME.json`` card + ``NAME.preview-i.png`` renders.
    The LoRA file is written last, atomically: its presence marks the entry complete."""
    folder.mkdir(parents=True, exist_ok=True)
    card = {"name": theme.name.replace("-", " "), "trigger_words": [theme.trigger],
            "description": f"{' '.join(theme.words)} LoRA for {base_name}", "base_model": base_name,
            "tags": list(theme.words), "renders": []}
    for i, (image, prompt) in enumerate(zip(renders, prompts)):
        image_name = f"{theme.name}.preview-{i}.png"
        _save_png(image, folder / image_name, prompt)
        card["renders"].append({"image": image_name, "prompt": prompt})
    (folder / f"{theme.name}.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    target = folder / f"{theme.name}.safetensors"
    tmp = folder / f".{theme.name}.tmp"
    save_lora(tmp, layers, fmt, metadata=dict(metadata or {}))
    os.replace(tmp, target)
    return target


def write_hub_repo(repo: Path, theme: Theme, layers: Layers, local_card: Path, base_name: str) -> Path:
    """A Hub-style model repo: ``pytorch_lora_weights.safetensors`` (diffusers format), a README
    model card with YAML front matter, and the sample images."""
    card = json.loads(local_card.read_text(encoding="utf-8"))
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "images").mkdir(parents=True)
    widgets = []
    for i, render in enumerate(card["renders"]):
        shutil.copy(local_card.parent / render["image"], repo / "images" / f"sample-{i}.png")
        widgets.append(f"- text: {json.dumps(render['prompt'])}\n  output:\n    url: images/sample-{i}.png")
    save_lora(repo / "pytorch_lora_weights.safetensors", layers, "diffusers")
    front = "\n".join(["---", f"base_model: {base_name}", "library_name: diffusers", "license: mit",
                       "tags:", "- text-to-image", "- lora", "- flux", f"instance_prompt: {theme.trigger}",
                       "widget:", *widgets, "---"])
    body = (f"\n# {card['name']}\n\n{card['description']}\n\nTrigger word: `{theme.trigger}`\n\n"
            "```python\nfrom diffusers import FluxPipeline\npipe = FluxPipeline.from_pretrained(BASE)\n"
            f"pipe.load_lora_weights('{repo.name}')\n```\n")
    (repo / "README.md").write_text(front + body, encoding="utf-8")
    return repo
