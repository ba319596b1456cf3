"""The loss: what a micro-batch costs the model, for training and for evaluation.

Chunked cross-entropy is the loss of a causal LM without full-vocabulary fp32 logits for the whole batch. Only positions that carry a label are projected to the vocabulary, a chunk of rows at a time; each chunk
runs under activation checkpointing, so backward recomputes its logits instead of keeping them. Peak
memory for the loss is one chunk's logits (chunk x vocab) instead of batch x sequence x vocab, twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_kit.data import dataset as data
from qlora_kit.data.dataset import IGNORE
from qlora_kit.model.load import lm_parts, no_dropout
from qlora_kit.plan.memory import default_chunk_tokens  # the loss's chunk rule lives with the memory model
from qlora_kit.probe.hardware import CPU_SHARE


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) token ids, IGNORE where no loss.
    """
    chunks, labelled = labelled_token_losses(hidden, lm_head_weight, labels, chunk_tokens, softcap, "sum")
    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk in chunks:
        total = total + chunk
    return total, int(labelled.sum())


def labelled_token_losses(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    softcap: float | None,
    reduction: str,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The cross-entropy of each labelled next token, a chunk of rows at a time (reduction "sum": one sum a chunk;
    "none": a value a token, in order), and the (batch, seq - 1) mask of labelled positions. The loss sums them; DPO
    and ORPO add each sequence's up (preference.sequence_log_probs)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    # (n, dim): padded and prompt positions never reach the vocabulary
    rows, targets = hidden[:, :-1][keep], targets[keep]
    chunks = [
        checkpoint(
            _chunk_loss,
            rows[start : start + chunk_tokens],
            lm_head_weight,
            targets[start : start + chunk_tokens],
            softcap,
            reduction,
            use_reentrant=False,
        )
        for start in range(0, rows.shape[0], chunk_tokens)
    ]
    return chunks, keep


def _chunk_loss(
    rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None, reduction: str
) -> torch.Tensor:
    logits = (rows.to(weight.dtype) @ weight.t()).float()
    if softcap:  # Gemma-2 style final-logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction=reduction)


class CausalLMLoss(torch.nn.Module):
    """A micro-batch's summed token loss as one module (decoder, then the chunked loss against the head), so that
    DistributedDataParallel can wrap all a step computes. Returns (loss sum, labelled tokens, attention mask, {}):
    the last, sums of statistics to report, is the preference losses' (preference.PreferenceLoss)."""

    def __init__(self, model, loss_chunk_tokens: int = 0):
        super().__init__()
        self.model = model
        self.chunk_tokens = loss_chunk_tokens or default_chunk_tokens(lm_parts(model)[1].shape[0])

    def forward(self, examples, pad_id: int, device):
        decoder, head_weight, softcap = lm_parts(self.model)
        hidden, labels, attention_mask = final_hidden_states(decoder, examples, pad_id, device)
        loss_sum, count = chunked_cross_entropy(
            hidden, head_weight, labels, chunk_tokens=self.chunk_tokens, softcap=softcap
        )
        return loss_sum, count, attention_mask, {}


def final_hidden_states(decoder, examples, pad_id: int, device):
    """Final hidden states of a micro-batch, with its labels on the device and its attention mask."""
    input_ids, attention_mask, labels, position_ids = data.collate(examples, pad_id)
    if position_ids is not None:  # packed: restarting positions give a block-diagonal mask, so no 2D mask is passed
        position_ids, mask = position_ids.to(device), None
    else:  # no mask at all when nothing is padded lets SDPA take its fast path
        mask = None if attention_mask.all() else attention_mask.to(device)
    # use_cache=False also matters for packing: transformers only reads segments from position_ids without a cache.
    hidden = decoder(
        input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return hidden, labels.to(device), attention_mask


def evaluate(
    model, examples, micro_batch: int, pad_id: int, device, loss_module=None, seq_len: int | None = None
) -> float:
    """Mean token loss on held-out examples (cut to seq_len when given), without gradients or dropout; through the
    training loss_module when given (under FSDP only it gathers the sharded weights)."""
    return evaluate_with_stats(model, examples, micro_batch, pad_id, device, loss_module, seq_len)[0]


def evaluate_with_stats(
    model, examples, micro_batch: int, pad_id: int, device, loss_module=None, seq_len: int | None = None
) -> tuple[float, dict[str, float]]:
    """evaluate's mean loss, and the means of the loss module's statistics (preference rewards) over the examples."""
    loss_module, total, count, sums = loss_module or CausalLMLoss(model), 0.0, 0, {}
    with no_dropout(model), torch.no_grad():
        for start in range(0, len(examples), micro_batch):
            CPU_SHARE.use_free_cores(device)
            batch = examples[start : start + micro_batch]
            loss_sum, n, _, stats = loss_module(data.truncate(batch, seq_len) if seq_len else batch, pad_id, device)
            total, count = total + loss_sum.item(), count + n
            sums = {name: sums.get(name, 0.0) + value.item() for name, value in stats.items()}
    return total / max(count, 1), {name: value / max(len(examples), 1) for name, value in sums.items()}
