"""Preference tuning: DPO and ORPO losses on pairs of a chosen and a rejected answer to one prompt.

Both run the chosen and the rejected sequences through the model as one batch and need, per sequence, the summed
log-probability of its answer tokens. That sum is computed a chunk of tokens at a time under activation
checkpointing, as the SFT loss is: full-vocabulary logits never exist for the whole batch.

DPO's reference model is the same 4-bit base with the adapter switched off, run without a graph: one extra forward
pass, never a second copy of the model. A run that starts from an adapter (DPO after SFT, the usual path) is
compared with that adapter instead, loaded a second time, frozen, beside the one that trains: the reference is then
the model the run started as, which costs one more adapter, not a model. ORPO needs no reference.

The reference pass runs in each step (on the fly), or once for every pair before the first step (precomputed: the
plan picks it when that takes fewer forward passes, as in a run of several epochs, or when only it fits). A pair
carries its precomputed values; a pair an out-of-memory step-down cuts shorter loses them and is computed on the fly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qlora_kit.data.dataset import PREFERENCE_FORMATS
from qlora_kit.errors import UserError
from qlora_kit.model.load import lm_parts, no_dropout
from qlora_kit.objectives.sft import final_hidden_states, labelled_token_losses
from qlora_kit.plan.memory import default_chunk_tokens
from qlora_kit.probe.hardware import CPU_SHARE

REFERENCE = "reference"  # the frozen copy of the adapter a DPO run started from


def check_method_fits_data(recipe, data_format: str) -> None:
    """Preference methods need preference data and SFT needs the other kinds; packing and learning the prompt do not
    apply to pairs, nor a reference to methods without one."""
    pairs = data_format in PREFERENCE_FORMATS
    if recipe.method == "sft" and pairs:
        raise UserError(
            f"{recipe.data} holds preference pairs (chosen and rejected answers), which SFT cannot learn from.",
            hint="Add --method dpo (or orpo), or train SFT on the chosen answers as prompt/completion data.",
        )
    if recipe.method != "sft" and not pairs:
        raise UserError(
            f"--method {recipe.method} learns from preference pairs, and {recipe.data} holds {data_format} data.",
            hint='Give each line a prompt (or messages), a "chosen" and a "rejected" answer; or use --method sft.',
        )
    check_reference_fits_method(recipe)
    if pairs and (recipe.packing or recipe.train_on_inputs):
        raise UserError(
            f"--method {recipe.method} compares whole answers to one prompt, so "
            f"{'--packing' if recipe.packing else '--train-on-inputs'} does not apply.",
            hint="Leave it out for preference tuning.",
        )


def check_reference_fits_method(recipe) -> None:
    """Only DPO has a reference, so only DPO takes a say in how it is computed (plan checks this before any data)."""
    if recipe.method != "dpo" and recipe.reference != "auto":
        raise UserError(
            f"--reference {recipe.reference} says how DPO computes its reference, and --method "
            f"{recipe.method} has none.",
            hint="Leave --reference out, or use --method dpo.",
        )


def sequence_log_probs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the summed log-probability of its labelled tokens, and how many there are: two (batch,) tensors.

    hidden: (batch, seq, dim) final hidden states; labels: (batch, seq) token ids, IGNORE where no loss.
    """
    chunks, keep = labelled_token_losses(hidden, lm_head_weight, labels, chunk_tokens, softcap, "none")
    per_token = -torch.cat(chunks) if chunks else hidden.new_zeros(0)
    owner = keep.nonzero()[:, 0]  # which sequence each kept position belongs to
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(
        0, owner, per_token.float()
    )
    return sums, keep.sum(dim=1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair from summed answer log-probs, with the implicit rewards beta * (policy - reference)
    of the chosen and rejected answers."""
    chosen_reward, rejected_reward = beta * (chosen - reference_chosen), beta * (rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's loss per pair: the chosen answer's mean token NLL minus weight * log sigmoid(log odds ratio), from the
    mean token log-probs of each answer (as the paper, eq. 6-7); rewards are weight * those means, as TRL logs."""
    chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = -chosen_mean - weight * F.logsigmoid(log_odds)
    return loss, weight * chosen_mean.detach(), weight * rejected_mean.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler's split at -log 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceLoss(torch.nn.Module):
    """A micro-batch of preference pairs' summed loss as one module, like CausalLMLoss (so DDP and FSDP wrap it the
    same way). Returns (loss sum, pairs, attention mask, sums of the reward statistics)."""

    def __init__(
        self, model, method: str, beta: float, loss_chunk_tokens: int = 0, reference_adapter: str | None = None
    ):
        super().__init__()
        self.model, self.method, self.beta = model, method, beta
        self.chunk_tokens = loss_chunk_tokens or default_chunk_tokens(lm_parts(model)[1].shape[0])
        if method == "dpo" and reference_adapter and REFERENCE not in model.peft_config:
            model.load_adapter(reference_adapter, adapter_name=REFERENCE, is_trainable=False)

    @contextmanager
    def reference_model(self):
        """The model as the run started, without dropout: the adapter it started from, else the base with the
        adapter off."""
        with no_dropout(self.model):
            if REFERENCE not in self.model.peft_config:
                with self.model.disable_adapter():
                    yield
                return
            self.model.set_adapter(REFERENCE, inference_mode=True)
            try:
                yield
            finally:
                self.model.set_adapter("default")  # trainable again, as peft sets the active adapter

    def answer_log_probs(self, pairs, pad_id: int, device):
        decoder, head_weight, softcap = lm_parts(self.model)
        hidden, labels, attention_mask = final_hidden_states(decoder, pairs, pad_id, device)
        sums, counts = sequence_log_probs(hidden, head_weight, labels, chunk_tokens=self.chunk_tokens, softcap=softcap)
        return sums, counts, attention_mask

    def forward(self, pairs, pad_id: int, device):
        sums, counts, attention_mask = self.answer_log_probs(pairs, pad_id, device)
        n = len(pairs)
        if self.method == "dpo":
            references = [pair.reference for pair in pairs]
            if None in references:
                with torch.no_grad(), self.reference_model():  # no graph kept
                    reference, _, _ = self.answer_log_probs(pairs, pad_id, device)
            else:  # precomputed: chosen answers' values, then rejected ones', as the sequences run
                reference = torch.tensor([r[0] for r in references] + [r[1] for r in references], device=sums.device)
            losses, chosen, rejected = dpo_loss(sums[:n], sums[n:], reference[:n], reference[n:], self.beta)
        else:
            losses, chosen, rejected = orpo_loss(sums[:n], sums[n:], counts[:n], counts[n:], self.beta)
        stats = {
            "reward_chosen": chosen.sum(),
            "reward_rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(),
            "reward_accuracy": (chosen > rejected).float().sum(),
        }
        return losses.sum(), n, attention_mask, stats


def reference_log_probs(
    loss: PreferenceLoss, examples, micro_batch: int, pad_id: int, device, advance=lambda n: None
) -> torch.Tensor:
    """Every pair's reference log-probs as a (pairs, 2) float32 tensor of (chosen, rejected), micro_batch pairs at a
    time in order of length, so little is padded; advance(n) after each batch, for a progress bar."""
    values = torch.empty(len(examples), 2)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    with torch.no_grad(), loss.reference_model():
        for start in range(0, len(order), micro_batch):
            CPU_SHARE.use_free_cores(device)
            batch = order[start : start + micro_batch]
            sums, _, _ = loss.answer_log_probs([examples[i] for i in batch], pad_id, device)
            values[batch] = sums.view(2, len(batch)).t().cpu()
            advance(len(batch))
    return values
