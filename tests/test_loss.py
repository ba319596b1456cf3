import pytest
import torch
import torch.nn.functional as F

from qlora_kit.data.dataset import IGNORE
from qlora_kit.objectives.sft import chunked_cross_entropy, default_chunk_tokens


def full_logits_loss(hidden, weight, labels, softcap=None):
    """The plain reference: every logit materialized in fp32, shifted, summed over labelled positions."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def random_case(seed=0, batch=3, seq=11, dim=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :4] = IGNORE  # a masked prompt
    labels[1, -3:] = IGNORE  # right padding
    labels[2, 5] = IGNORE
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_equals_full_logits_in_value_and_gradient(chunk_tokens, softcap):
    hidden, weight, labels = random_case()
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    ours, count = chunked_cross_entropy(h1, weight, labels, chunk_tokens=chunk_tokens, softcap=softcap)
    reference = full_logits_loss(h2, weight, labels, softcap)
    ours.backward()
    reference.backward()
    assert count == int((labels[:, 1:] != IGNORE).sum())
    # float64 inputs; the loss itself runs in fp32 (as in training), hence the tolerance
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(h1.grad[1, -4:] == 0), "padded positions must get no gradient"


def test_chunked_loss_in_bf16_stays_close_to_fp32_reference():
    hidden, weight, labels = random_case(seed=1)
    ours, _ = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_tokens=5)
    reference = full_logits_loss(hidden, weight, labels)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) / reference.item() < 2e-2


def test_all_positions_ignored_gives_zero_loss():
    hidden, weight, labels = random_case()
    loss, count = chunked_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE), chunk_tokens=4)
    assert count == 0 and loss.item() == 0.0


def test_default_chunk_keeps_one_chunk_of_fp32_logits_near_128_mib():
    assert default_chunk_tokens(256_000) == 128  # gemma
    assert default_chunk_tokens(49_152) == 512  # smollm2
    assert default_chunk_tokens(128_256) == 256  # llama-3
    for vocab in (32_000, 151_936, 256_000):
        rows = default_chunk_tokens(vocab)
        assert rows * vocab * 4 <= 2**27
