"""Attribute read-out: measure every world attribute back from any image.

Hand-made, pose-invariant features feed a small MLP with one linear head per attribute:
- a 16x16 crop of the chroma and grey maps, centred on the chroma-weighted centroid and scaled
  by the object's radius of gyration (shape and style, invariant to position and scale);
- a chroma-weighted hue histogram and mean colour (colour);
- the low-frequency Fourier magnitudes of the grey background, object masked out (background).
It is trained on fresh renders plus degraded copies (blur, down/up-sampling, colour jitter,
noise) so that it stays reliable on the outputs of a small diffusion model. Weights are stored
as safetensors plus a JSON sidecar (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from pipelines.world.scene import ATTRIBUTES, render, sample_attributes

WEIGHTS, META = "readout.safetensors", "readout.json"
CROP, SPAN, FREQS, HUE_BINS = 16, 2.0, 9, 12


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """(N,H,W,3) uint8 (or float in [0,1]) -> (N,3,size,size) float in [0,1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    if arr.dtype == np.uint8:
        x = x / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def degrade(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random blur or down/up-sampling, colour jitter and Gaussian noise on a [0,1] batch."""
    n, s = x.shape[0], strength

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + (blurred - x) * (u(n, 1, 1, 1) * 0.8 * s).clamp(max=1)
    h, w = x.shape[-2:]
    low = F.interpolate(F.avg_pool2d(x, 2), size=(h, w), mode="bilinear", align_corners=False)
    x = torch.where(u(n, 1, 1, 1) < 0.3 * s, low, x)
    x = x * (1 + (u(n, 3, 1, 1) - 0.5) * 0.3 * s) + (u(n, 3, 1, 1) - 0.5) * 0.1 * s
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (1 + (u(n, 1, 1, 1) - 0.5) * 0.4 * s)
    x = x + torch.randn(x.shape, generator=gen) * u(n, 1, 1, 1) * 0.15 * s
    return x.clamp(0, 1)


def features(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) in [0,1] -> (N, D) pose-invariant shape/style, colour and background features."""
    n, _, h, w = x.shape
    chroma = x.amax(1) - x.amin(1)
    grey = x.mean(1)
    wt = (chroma - 0.25).clamp(min=0) ** 2 + 1e-6  # object weight; ignores noise-level chroma
    wsum = wt.sum((1, 2))
    ys, xs = torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5
    cx, cy = (wt.sum(1) * xs).sum(1) / wsum, (wt.sum(2) * ys).sum(1) / wsum
    dist2 = (xs[None, None] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2
    rg = ((wt * dist2).sum((1, 2)) / wsum).sqrt().clamp(min=1.0)
    lin = torch.linspace(-1, 1, CROP)
    gx = (cx[:, None] + SPAN * rg[:, None] * lin) / w * 2 - 1
    gy = (cy[:, None] + SPAN * rg[:, None] * lin) / h * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, CROP, CROP), gy[:, :, None].expand(n, CROP, CROP)], -1)
    crop = F.grid_sample(torch.stack([chroma, grey], 1), grid, padding_mode="border", align_corners=False)
    # colour: hue histogram (linear binning) and mean colour, both weighted like the centroid
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    pos = (torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) + math.pi) / (2 * math.pi) * HUE_BINS
    lo = pos.floor()
    frac, lo = (pos - lo).flatten(1), lo.long().flatten(1) % HUE_BINS
    hist = torch.zeros(n, HUE_BINS)
    hist.scatter_add_(1, lo, wt.flatten(1) * (1 - frac)).scatter_add_(1, (lo + 1) % HUE_BINS, wt.flatten(1) * frac)
    mean_rgb = (x * wt[:, None]).sum((2, 3)) / wsum[:, None]
    # background: Fourier magnitudes of the grey level with the object masked out
    bg_w = 1 - (chroma * 4).clamp(max=1)
    grey_mean = (grey * bg_w).sum((1, 2)) / bg_w.sum((1, 2)).clamp(min=1)
    spec = torch.fft.rfft2((grey - grey_mean[:, None, None]) * bg_w).abs() / math.sqrt(h * w)
    spec = torch.cat([spec[:, :FREQS, :FREQS], spec[:, -(FREQS - 1) :, :FREQS]], 1).flatten(1)
    extra = torch.stack([rg / h, grey_mean], 1)
    return torch.cat([crop.flatten(1), hist / wsum[:, None], mean_rgb, torch.log1p(4 * spec), extra], 1)


N_FEATURES = features(torch.zeros(1, 3, 32, 32)).shape[1]


class _Net(nn.Module):
    def __init__(self, heads: Mapping[str, int], hidden: int = 192) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(N_FEATURES))
        self.register_buffer("sigma", torch.ones(N_FEATURES))
        self.trunk = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, k) for a, k in heads.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk((feats - self.mu) / self.sigma)
        return {a: head(h) for a, head in self.heads.items()}


def _world_batch(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    attrs = [sample_attributes(rng) for _ in range(n)]
    return np.stack([render(a, int(rng.integers(2**31)), size) for a in attrs]), attrs


def _fit(net: _Net, feats: torch.Tensor, labels: Mapping[str, torch.Tensor], epochs: int, gen: torch.Generator) -> None:
    """Minibatch AdamW with a one-cycle schedule on the summed per-attribute cross-entropies."""
    batch = 256
    per_epoch = max(feats.shape[0] // batch, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * per_epoch, pct_start=0.15)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(feats.shape[0], generator=gen)
        for k in range(per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            out = net(feats[idx])
            loss = sum(F.cross_entropy(out[a], labels[a][idx]) for a in out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


class Readout:
    """Per-attribute classifier for world images; ``predict`` returns canonical values."""

    def __init__(self, net: _Net, size: int, values: Mapping[str, Sequence[str]], hidden: int) -> None:
        self.net, self.size, self.hidden = net.eval(), size, hidden
        self.values = {a: tuple(v) for a, v in values.items()}

    @classmethod
    def train(
        cls, seed: int = 0, n: int = 4000, size: int = 32, *, copies: int = 2, epochs: int = 12, hidden: int = 192
    ) -> Readout:
        """Train on ``n`` fresh renders and ``copies`` degraded copies of each (~9 s of one core)."""
        rng = np.random.default_rng([seed, 0x5EAD])
        images, attrs = _world_batch(rng, n, size)
        x = _to_tensor(images, size)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            feats = torch.cat([features(x)] + [features(degrade(x, gen)) for _ in range(copies)])
        labels = {a: torch.tensor([vals.index(t[a]) for t in attrs]) for a, vals in ATTRIBUTES.items()}
        labels = {a: y.repeat(copies + 1) for a, y in labels.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Net({a: len(v) for a, v in ATTRIBUTES.items()}, hidden)
        net.mu.copy_(feats.mean(0))
        net.sigma.copy_(feats.std(0).clamp(min=1e-3))
        _fit(net, feats, labels, epochs, gen)
        return cls(net, size, ATTRIBUTES, hidden)

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Attribute -> (N, n_values) class probabilities, columns in ``self.values`` order."""
        x = _to_tensor(images, self.size)
        parts: dict[str, list[np.ndarray]] = {a: [] for a in self.values}
        for start in range(0, x.shape[0], 1024):
            out = self.net(features(x[start : start + 1024]))
            for a in parts:
                parts[a].append(out[a].softmax(-1).numpy())
        return {a: np.concatenate(p) if p else np.zeros((0, len(self.values[a]))) for a, p in parts.items()}

    def predict(self, images: np.ndarray) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image."""
        proba = self.predict_proba(images)
        n = next(iter(proba.values())).shape[0]
        best = {a: p.argmax(-1) for a, p in proba.items()}
        return [{a: self.values[a][int(best[a][i])] for a in self.values} for i in range(n)]

    def save(self, path: str | Path) -> Path:
        """Write ``readout.safetensors`` and ``readout.json`` into the directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        meta = {
            "size": self.size,
            "hidden": self.hidden,
            "n_features": N_FEATURES,
            "values": {a: list(v) for a, v in self.values.items()},
        }
        (path / META).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Readout:
        """Load a read-out written by :meth:`save`."""
        path = Path(path)
        meta = json.loads((path / META).read_text())
        if meta.get("n_features") != N_FEATURES:
            raise ValueError(f"read-out at {path} was saved with other features; retrain it")
        values = {a: tuple(v) for a, v in meta["values"].items()}
        net = _Net({a: len(v) for a, v in values.items()}, int(meta["hidden"]))
        net.load_state_dict(load_file(str(path / WEIGHTS)))
        return cls(net, int(meta["size"]), values, int(meta["hidden"]))


def accuracy(readout: Readout, images: np.ndarray, attrs_list: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy of ``readout`` against ground-truth attributes."""
    preds = readout.predict(images)
    return {
        a: float(np.mean([p[a] == t[a] for p, t in zip(preds, attrs_list, strict=True)])) if preds else float("nan")
        for a in readout.values
    }
