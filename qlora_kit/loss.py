"""Chunked cross-entropy: the loss of a causal LM without full-vocabulary fp32 logits for the whole batch.

Only positions that carry a label are projected to the vocabulary, a chunk of rows at a time; each chunk
runs under activation checkpointing, so backward recomputes its logits instead of keeping them. Peak
memory for the loss is one chunk's logits (chunk x vocab) instead of batch x sequence x vocab, twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_kit.data import IGNORE
from qlora_kit.memory import default_chunk_tokens  # noqa: F401  (the loss's chunk rule lives with the memory model)

def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_tokens: int, softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) token ids, IGNORE where no loss.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]  # (n, dim): padded and prompt positions never reach the vocabulary
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, rows[start:end], lm_head_weight, targets[start:end], softcap,
                                   use_reentrant=False)
    return total, int(targets.numel())


def _chunk_loss(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (rows.to(weight.dtype) @ weight.t()).float()
    if softcap:  # Gemma-2 style final-logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")
