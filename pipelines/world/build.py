"""``autolora world build``: the demo world — a tiny FLUX base trained here, a LoRA zoo trained on
it with diffusers + peft, sample renders and cards — deterministic from one seed and cached.

Layout of ``OUT/<size>-seed<seed>/``: ``base/`` (``FluxPipeline.save_pretrained``),
``base_model.json`` (layer names/shapes for the registry), ``loras/`` and ``heldout_loras/``
(LoRA files + sidecars only, as a local LoRA folder), ``hub/<name>/`` (Hub-style repos),
``readout/`` (the attribute read-out that evaluates renders, see ``evaluate.py``),
``captioner/`` (the tiny Qwen2-VL that captions renders, served by vLLM; trained in a second
process while the base trains on one core), ``world.json`` (the manifest; its presence with the
same key makes a rebuild a no-op).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models.torch_threads import one_torch_thread
from pipelines.world.themes import broad_mix, make_themes, make_twins
from pipelines.world.zoo_train import manifest_entry, train_zoo

DEMO_BASE_NAME = "autolora-demo-flux"
WORLD_VERSION = 3  # bump when the recipe changes: invalidates cached worlds (v3: held-out twins)
BASE_VERSION = 2  # bump when the read-out or base recipe changes: invalidates the cached base too
CAPTIONER_STEPS = {"micro": 0, "default": 1000}  # 0: random weights (tests need the server, not the words)


@dataclass(frozen=True)
class WorldSize:
    train: int
    heldout: int
    base_images: int
    base_steps: int
    lora_images: int
    lora_steps: int
    max_renders: int
    twins: int  # held-out themes that get 1-2 more independently trained LoRAs


SIZES = {
    "micro": WorldSize(train=6, heldout=3, base_images=512, base_steps=60, lora_images=16, lora_steps=15,
                       max_renders=2, twins=1),
    "default": WorldSize(train=60, heldout=20, base_images=6000, base_steps=3000, lora_images=48,
                         lora_steps=100, max_renders=3, twins=6),
}


def world_key(size: str, seed: int) -> str:
    recipe = json.dumps({"v": WORLD_VERSION, "size": asdict(SIZES[size]), "seed": seed}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _train_base(root: Path, spec: WorldSize, seed: int, progress: bool) -> Path:
    from pipelines.world.train_base import train_base

    base = root / "base"
    if (base / "model_index.json").is_file():
        return base
    images, captions, _ = broad_mix(spec.base_images, seed)
    tmp = root / "base.partial"
    train_base(images, captions, steps=spec.base_steps, seed=seed, out_dir=tmp, progress=progress)
    tmp.rename(base)
    return base


def base_key(size: str, seed: int) -> str:
    """What the read-out and the base depend on: a recipe change elsewhere keeps them."""
    spec = SIZES[size]
    recipe = {"v": BASE_VERSION, "images": spec.base_images, "steps": spec.base_steps, "seed": seed}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


_BASE_STAGE = ("readout", "base", "base.key", "captioner")


def _reset_if_stale(root: Path, key: str, stage_key: str) -> None:
    """Resume a partial build of this recipe; wipe one left by another recipe (``recipe.key``),
    keeping its read-out and base when their own key (``base.key``) still matches."""
    marker, base_marker = root / "recipe.key", root / "base.key"
    if root.exists() and not (marker.is_file() and marker.read_text() == key):
        keep = base_marker.is_file() and base_marker.read_text() == stage_key
        for child in root.iterdir():
            if not (keep and child.name in _BASE_STAGE):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    base_marker.write_text(stage_key)
    marker.write_text(key)


def _train_readout(root: Path, seed: int) -> Path:
    """The attribute read-out used to evaluate this world's renders (``readout/``)."""
    from pipelines.world.readout import META, Readout

    folder = root / "readout"
    if not (folder / META).is_file():
        Readout.train(seed=seed).save(folder)
    return folder


def captioner_folder(root: Path) -> Path:
    return root / "captioner"


def train_captioner(root: Path, size: str, seed: int) -> Path:
    """The world's captioner (``captioner/``), built once: written to a temporary folder, renamed."""
    from pipelines.world.captioner import build_captioner, build_random_captioner

    folder = captioner_folder(root)
    if not (folder / "config.json").is_file():
        tmp = root / "captioner.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with one_torch_thread():
            if CAPTIONER_STEPS[size]:
                build_captioner(tmp, seed=seed, train_steps=CAPTIONER_STEPS[size])
            else:
                build_random_captioner(tmp, seed=seed)
        tmp.rename(folder)
    return folder


def ensure_captioner(root: Path, size: str, seed: int):
    """Start training the captioner in a worker process unless it is built; returns a future
    (or None) to wait on."""
    if (captioner_folder(root) / "config.json").is_file() or not CAPTIONER_STEPS[size]:
        return None  # built, or built in seconds when needed (random weights)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    future = pool.submit(train_captioner, root, size, seed)
    pool.shutdown(wait=False)
    return future


def build_world(out: str | Path, size: str = "default", seed: int = 0, progress: bool = True) -> dict:
    """Build (or reuse) the world; returns the ``world build --json`` contract."""
    from registry.lora.base_models import flux_base_from_folder

    t0 = time.perf_counter()
    spec = SIZES[size]
    key = world_key(size, seed)
    root = Path(out) / f"{size}-seed{seed}"
    manifest_path = root / "world.json"
    if manifest_path.is_file() and (built := json.loads(manifest_path.read_text()))["key"] == key:
        return _contract(built, root, time.perf_counter() - t0)
    _reset_if_stale(root, key, base_key(size, seed))
    captioner = ensure_captioner(root, size, seed)  # on the core the base training leaves idle
    with one_torch_thread():
        _train_readout(root, seed)
        base_dir = _train_base(root, spec, seed, progress)
        if captioner is not None:
            captioner.result()
        base_model = flux_base_from_folder(base_dir, DEMO_BASE_NAME)
        (root / "base_model.json").write_text(base_model.to_json(), encoding="utf-8")
        themes = make_themes(seed, spec.train, spec.heldout)
        themes += make_twins(themes, spec.twins, seed)
        train_zoo(root, base_dir, themes, seed=seed, lora_images=spec.lora_images, lora_steps=spec.lora_steps,
                  max_renders=spec.max_renders, base_name=DEMO_BASE_NAME, progress=progress)
    entries = [manifest_entry(root, index, theme, seed) for index, theme in enumerate(themes)]
    _write_reupload(root, entries)
    manifest = {"key": key, "size": size, "seed": seed, "base_model": DEMO_BASE_NAME, "loras": entries,
                "train": sum(e["split"] == "train" for e in entries),
                "heldout": sum(e["split"] == "heldout" for e in entries),
                "build_seconds": time.perf_counter() - t0}
    manifest_path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return _contract(manifest, root, time.perf_counter() - t0)


def _write_reupload(root: Path, entries: list[dict]) -> None:
    """One train LoRA re-saved in another format, as people re-upload: a fingerprint duplicate."""
    from registry.lora.inspect import load_canonical
    from registry.lora.formats import save_lora

    first = next(e for e in entries if e["split"] == "train")
    lora, _ = load_canonical(root / first["file"])
    fmt = "kohya" if first["format"] != "kohya" else "diffusers"
    save_lora(root / "loras" / f"{first['theme']}-reupload.safetensors", lora.layers, fmt)


def _contract(manifest: dict, root: Path, seconds: float) -> dict:
    return {"base": str(root / "base"), "loras": str(root / "loras"),
            "heldout_loras": str(root / "heldout_loras"), "train": manifest["train"],
            "heldout": manifest["heldout"], "seconds": round(seconds, 3)}
