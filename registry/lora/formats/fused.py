"""Writing canonical layers as the fused modules of a BFL-named (or XLabs-named) file.

The exact inverse of reading (:mod:`registry.lora.conversion` splits a fused B by rows): a fused
layer built from parts with their own factors gets ``A = [A_q; A_k; A_v]`` and a block-diagonal
``B`` (rank = sum of part ranks), so ``B A`` stacks the parts' updates exactly; parts sharing one
A (as a LoRA trained on the fused layer has) give that A and the stacked B. Missing parts are
zero blocks (the reader drops all-zero rank components and layers again).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from registry.lora.formats.names import BFL_TOP, SWAPPED_HALVES, BlockNames, Parts, swap_halves

Tensor = torch.Tensor
Group = tuple[str, int, Parts]  # (module in the file, part index, canonical part names)

_BLOCK_RE = {"double_blocks": re.compile(r"^transformer_blocks\.(\d+)\.(.+)$"),
             "single_blocks": re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")}
_TOP_INVERSE = {v: k for k, v in BFL_TOP.items()}


def _group_of(name: str, inverses: Mapping[str, Mapping[str, Group]], top: bool) -> Group | None:
    """The file module that canonical layer ``name`` is part of."""
    for kind, inverse in inverses.items():
        m = _BLOCK_RE[kind].match(name)
        if m and m.group(2) in inverse:
            module, i, parts = inverse[m.group(2)]
            block = name[: m.end(1)]
            return f"{kind}.{m.group(1)}.{module}", i, tuple(f"{block}.{p}" for p in parts)
    if top and name in _TOP_INVERSE:
        return _TOP_INVERSE[name], 0, (name,)
    return None


def _mlp_width(layers: Mapping[str, tuple[Tensor, Tensor]], k: int) -> int:
    """The single blocks' MLP width, read off any layer showing it (diffusers FLUX: 4 x width)."""
    single = _BLOCK_RE["single_blocks"]
    for name, (a, b) in layers.items():
        if single.match(name) and name.endswith(".proj_mlp"):
            return int(b.shape[0])
        if single.match(name) and name.endswith(".proj_out"):
            return int(a.shape[1]) - int(b.shape[0])
    return 4 * k


def fuse(layers: Mapping[str, tuple[Tensor, Tensor]], names: BlockNames, *, top: bool,
         fmt: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Group canonical layers into the fused modules ``names`` (per BFL block kind) of a file;
    ``top``: top-level layers under their BFL names. Layers with no place raise ``ValueError``."""
    inverses = {kind: {p: (module, i, parts) for module, parts in table.items()
                       for i, p in enumerate(parts)} for kind, table in names.items()}
    groups: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    part_names: dict[str, Parts] = {}
    for name, (a, b) in layers.items():
        group = _group_of(name, inverses, top)
        if group is None:
            raise ValueError(f"layer {name!r} cannot be written in the {fmt} format")
        module, index, parts = group
        groups.setdefault(module, {})[index] = (a, b)
        part_names[module] = parts
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module, members in groups.items():
        parts, order = part_names[module], sorted(members)
        if len(parts) == 1:
            a, b = members[0]
            out[module] = (a, swap_halves(b) if parts[0] in SWAPPED_HALVES else b)
            continue
        downs = [members[i][0] for i in order]
        if len(order) == len(parts) and all(torch.equal(downs[0], d) for d in downs[1:]):
            out[module] = (downs[0], torch.cat([members[i][1] for i in order]))  # shared A
            continue
        k = int(downs[0].shape[1])
        missing = {i: _mlp_width(layers, k) if parts[i].endswith("proj_mlp") else k
                   for i in range(len(parts)) if i not in members}
        sizes = [int(members[i][1].shape[0]) if i in members else missing[i]
                 for i in range(len(parts))]
        down = torch.cat(downs)
        up = torch.zeros(sum(sizes), down.shape[0], dtype=members[order[0]][1].dtype)
        col = 0
        for i in order:  # block-diagonal B: part i's rows use only part i's rank columns
            b = members[i][1]
            row = sum(sizes[:i])
            up[row : row + b.shape[0], col : col + b.shape[1]] = b
            col += b.shape[1]
        out[module] = (down, up)
    return out
