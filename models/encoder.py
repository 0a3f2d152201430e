"""The LoRA-weight encoder: a LoRA's factors -> one unit vector in the text encoder's space.

Layer tokens come from :mod:`models.encoder_tokens` (``W_t^T B (A Q)``, never ``B A``); learned
layer-identity embeddings mark where each token comes from; transformer blocks mix the tokens of
the layers the LoRA adapts (absent layers are masked keys, so any coverage and any rank work); a
CLS token or a masked mean pools; a linear head maps to ``embed_dim`` and the result is
L2-normalised. ``logit_scale`` is the contrastive temperature (learned and clamped, or fixed).

Built in invariances: the embedding depends on each layer only through ``B A`` (so ``B -> B M``,
``A -> M^-1 A`` changes nothing), and with ``normalise_scale`` a LoRA at any strength embeds the
same (each layer's responses are divided by their RMS; the layer's RMS relative to the LoRA's is a
feature). :meth:`EncoderConfig.paper` keeps the authors' design for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from models.encoder_tokens import LayerSpec, LayerTokenizer, LoRA, module_type
from models.safetensors_bytes import save_file

__all__ = ["EncoderConfig", "LayerSpec", "LoRAWeightEncoder", "module_type"]

FORMAT = "autolora.lora_weight_encoder/1"
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of :class:`LoRAWeightEncoder`."""

    width: int = 256
    depth: int = 2                  # transformer blocks (0: none; then pool="mean")
    heads: int = 8
    ff_mult: int = 4
    probes: int = 4                 # probe vectors q per layer (or per module type)
    probe_dim: int = 64             # values each probe's response is projected to
    probe_sharing: str = "type"     # "type": probes shared per module type; "layer": per layer
    attention: str = "bidirectional"  # or "causal"
    pool: str = "cls"               # or "mean" (masked mean over present layers)
    normalise_scale: bool = True    # divide responses by their RMS; strength-invariant
    learn_temperature: bool = True
    temperature: float = 0.07       # initial (or fixed) softmax temperature
    require_all_layers: bool = False
    embed_dim: int = 384            # the embedding's dimension (the stored weight vectors')
    text_dim: int = 0               # the text encoder's, when not embed_dim (e.g. 64 or 768 for a CLIP)
    dropout: float = 0.0            # augmentation regularises; dropout cost ~15% of a CPU step

    def __post_init__(self) -> None:
        if self.attention not in ("bidirectional", "causal"):
            raise ValueError(f"attention must be 'bidirectional' or 'causal', not {self.attention!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {self.pool!r}")
        if self.depth == 0 and self.pool == "cls":
            raise ValueError("depth 0 needs pool='mean' (a CLS token without blocks sees nothing)")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    @classmethod
    def ours(cls, **changes: Any) -> EncoderConfig:
        """This project's design (the defaults), with optional changes."""
        return dataclasses.replace(cls(), **changes)

    @classmethod
    def paper(cls, **changes: Any) -> EncoderConfig:
        """The AutoLoRA authors' design: one probe per layer, projection to width 768, 2 causal
        transformer layers, mean pool, raw scale, fixed temperature, every layer required."""
        base = cls(width=768, depth=2, heads=12, probes=1, probe_dim=768, probe_sharing="layer",
                   attention="causal", pool="mean", normalise_scale=False,
                   learn_temperature=False, require_all_layers=True, dropout=0.0)
        return dataclasses.replace(base, **changes)

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


class LoRAWeightEncoder(nn.Module):
    """Embeds LoRAs (``{module path: (A [r,k], B [d,r])}``) into ``config.embed_dim``."""

    def __init__(self, layers: Sequence[LayerSpec], config: EncoderConfig | None = None) -> None:
        super().__init__()
        config = config or EncoderConfig.ours()
        self.config = config
        self.layers = [LayerSpec(s.name, int(s.d_out), int(s.d_in)) for s in layers]
        width = config.width
        self.tokenizer = LayerTokenizer(self.layers, config.probes, config.probe_dim,
                                        config.probe_sharing, config.normalise_scale)
        token_dim = self.tokenizer.token_dim
        self.token_in: nn.Module = nn.Identity() if token_dim == width else nn.Linear(token_dim, width)
        self.norm_feature = nn.Linear(1, width) if config.normalise_scale else None
        self.layer_embed = nn.Parameter(torch.randn(len(self.layers), width) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02) if config.pool == "cls" else None
        # depth 0: no blocks; with a mean pool the encoder is then linear in each module type's
        # summed layer tokens (before its output norm and head)
        self.blocks: nn.TransformerEncoder | None = None
        if config.depth:
            block = nn.TransformerEncoderLayer(width, config.heads, config.ff_mult * width,
                                               config.dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.embed_dim)
        # a text encoder of another width (a pipeline's CLIP) gets a learned linear map into the
        # embedding space, as CLIP's own towers have; the text encoder itself stays frozen
        self.text_proj: nn.Linear | None = None
        if config.text_dim and config.text_dim != config.embed_dim:
            self.text_proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
            nn.init.orthogonal_(self.text_proj.weight)
        init = torch.tensor(math.log(1.0 / config.temperature))
        if config.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.last_unknown: list[list[str]] = []  # per LoRA of the last call: layers ignored
        self.version = ""
        self.extra: dict[str, Any] = {}

    def temperature_scale(self) -> Tensor:
        """``exp(logit_scale)``, the logits' multiplier, clamped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def project_text(self, text: Tensor) -> Tensor:
        """Text-encoder vectors ``[N, text_dim]`` as unit vectors in the embedding space (unchanged
        when the text encoder's width is the embedding's)."""
        if self.text_proj is None:
            return text
        return F.normalize(self.text_proj(text.to(self.text_proj.weight.dtype)), dim=-1)

    def layer_probes(self) -> dict[str, Tensor]:
        """``{layer name: Q^T [P, k]}``: the probes whose responses :meth:`forward` may be given."""
        return self.tokenizer.layer_probes()

    def num_parameters(self) -> int:
        """Number of learned weights."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, loras: Sequence[LoRA], helper: Executor | None = None,
                responses: Sequence[Mapping[str, Tensor]] | None = None) -> Tensor:
        """Unit embeddings ``[N, embed_dim]`` of ``loras``; layers not in the encoder's list (or
        of another shape) are ignored and recorded in :attr:`last_unknown`. ``helper``: an executor
        whose thread may share the layer tokens' work once free; ``responses``: the layers'
        responses to :meth:`layer_probes`, made by the caller (both: :meth:`LayerTokenizer.forward`)."""
        batch = self.tokenizer(loras, helper=helper, responses=responses)
        self.last_unknown = batch.unknown
        present = batch.present
        if self.config.require_all_layers:
            self._check_complete(present)
        # layers no LoRA of the batch adapts are left out: masked keys change nothing (exact)
        cols = present.any(dim=0).nonzero().flatten()
        if len(cols) == 0 and self.cls is None:  # nothing to attend to: zero vectors
            return batch.tokens.new_zeros(len(loras), self.config.embed_dim)
        if len(cols) < present.shape[1]:
            present = present[:, cols]
        x = self.token_in(batch.tokens[:, cols]) + self.layer_embed[cols]
        if self.norm_feature is not None:
            x = x + self.norm_feature(batch.log_rel_norm[:, cols].unsqueeze(-1))
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(loras), -1, -1), x], dim=1)
            present = torch.cat([present.new_ones(len(loras), 1), present], dim=1)
        empty = ~present.any(dim=1)  # nothing known adapted (only possible without CLS)
        if self.blocks is None:
            h = x
        elif self.config.attention == "causal":
            h = self.blocks(x, mask=self._causal_mask(present))
        else:  # an all-masked row would give NaN: let an empty LoRA attend to its own padding
            h = self.blocks(x, src_key_padding_mask=~present & ~empty.unsqueeze(1))
        if self.cls is not None:
            pooled = h[:, 0]
        else:
            weights = present.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out = F.normalize(self.head(self.out_norm(pooled)), dim=-1)
        return out.masked_fill(empty.unsqueeze(1), 0.0)

    @torch.no_grad()
    def embed(self, loras: Sequence[LoRA], batch_size: int = 16) -> Tensor:
        """Inference: :meth:`forward` in eval mode, ``batch_size`` LoRAs at a time."""
        was_training = self.training
        self.eval()
        try:
            parts, unknown = [], []
            for start in range(0, len(loras), batch_size):
                parts.append(self(loras[start:start + batch_size]))
                unknown.extend(self.last_unknown)
            self.last_unknown = unknown
            return torch.cat(parts) if parts else torch.zeros(0, self.config.embed_dim)
        finally:
            self.train(was_training)

    def _check_complete(self, present: Tensor) -> None:
        for j in range(present.shape[0]):
            missing = [self.layers[i].name for i in (~present[j]).nonzero().flatten().tolist()]
            if missing:
                raise ValueError(
                    f"LoRA {j} of the batch lacks {len(missing)} of the encoder's {len(self.layers)} "
                    f"layers and this configuration requires every layer (require_all_layers): "
                    + ", ".join(missing))

    def _causal_mask(self, present: Tensor) -> Tensor:
        """``[N*heads, L, L]`` True where attention is blocked: later or absent keys, except a
        token's own key (so no row is empty)."""
        n, length = present.shape
        later = torch.ones(length, length, dtype=torch.bool, device=present.device).triu(1)
        blocked = later.unsqueeze(0) | ~present.unsqueeze(1)
        blocked &= ~torch.eye(length, dtype=torch.bool, device=present.device)
        return blocked.repeat_interleave(self.config.heads, dim=0)

    def save(self, path: str | os.PathLike, version: str, extra: dict[str, Any] | None = None) -> None:
        """Write weights + config, layer list, ``version`` and ``extra`` (JSON) to a safetensors file."""
        metadata = {
            "format": FORMAT,
            "config": self.config.to_json(),
            "layers": json.dumps([[s.name, s.d_out, s.d_in] for s in self.layers]),
            "version": version,
            "extra": json.dumps(extra or {}, sort_keys=True),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.fspath(path), metadata=metadata)
        self.version, self.extra = version, dict(extra or {})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LoRAWeightEncoder:
        """Read a file written by :meth:`save` (no pickle); the encoder is in eval mode and
        carries ``.version`` and ``.extra``."""
        with safe_open(os.fspath(path), "pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not a LoRA-weight encoder file ({metadata.get('format')!r})")
            state = {key: f.get_tensor(key) for key in f.keys()}
        layers = [LayerSpec(name, d, k) for name, d, k in json.loads(metadata["layers"])]
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            encoder = cls(layers, EncoderConfig.from_json(metadata["config"]))
        encoder.load_state_dict(state, strict=True, assign=True)
        encoder.version = metadata.get("version", "")
        encoder.extra = json.loads(metadata.get("extra", "{}"))
        return encoder.to(device).eval()
