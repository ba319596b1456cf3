"""Fused expert weights (experts x in x out, as transformers 5 holds a mixture of experts): what a LoRA adapter on
them changes, one projection at a time, for the exports that write each expert's weights out."""

from __future__ import annotations

import torch


def experts_change(layer: str, projection: str, stack: torch.Tensor, updates: dict):
    """(the update's key, its change to one projection of a layer's experts: experts x out x in), from PEFT's LoRA on
    the fused 3-D weights (gate_up_proj holds gate's rows, then up's; down_proj; "gate_up_proj" itself: all its
    rows): A stacks each expert's rows, B's columns interleave them. (None, 0) where the adapter leaves them alone."""
    experts, out, width = stack.shape
    half = projection in ("gate_proj", "up_proj")
    for key in (f"{layer}.weight", f"{layer}.base_layer.weight"):  # PEFT nests a wrapper per expert weight
        update = updates.get(key)
        if update is None or (update.b.shape[0], update.a.shape[1]) != ((2 * out, width) if half else (out, width)):
            continue
        rank = update.a.shape[0] // experts
        a = update.a.float().reshape(experts, rank, width)
        rows = update.b if not half else update.b[:out] if projection == "gate_proj" else update.b[out:]
        b = rows.float().reshape(out, rank, experts).permute(2, 0, 1)  # experts x out x rank
        return key, update.scale * (b @ a)
    return None, 0.0
