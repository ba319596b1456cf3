"""`qlora-kit eval`: loss and perplexity on held-out data, the base model beside base + adapter.

The examples are read, rendered and masked exactly as training does (data/dataset.py), and the loss is the training
loop's own (objectives/sft.py), so an eval loss here equals the eval loss a run reports on the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from qlora_kit.adapter.folder import load_with_adapter, run_settings
from qlora_kit.data import dataset as data
from qlora_kit.errors import UserError
from qlora_kit.plan.recipes import Recipe


@dataclass
class EvalResult:
    data: str
    examples: int
    tokens: int  # tokens the loss is taken on
    base_loss: float
    adapter_loss: float | None  # None when no adapter was given

    def to_dict(self) -> dict:
        return {
            **self.__dict__,
            "base_perplexity": perplexity(self.base_loss),
            "adapter_perplexity": None if self.adapter_loss is None else perplexity(self.adapter_loss),
        }

    def render(self) -> Table:
        table = Table(title=f"{self.data}: {self.examples:,} examples, loss on {self.tokens:,} tokens")
        for column in ("model", "loss", "perplexity"):
            table.add_column(column, justify="left" if column == "model" else "right")
        table.add_row("base", f"{self.base_loss:.4f}", f"{perplexity(self.base_loss):,.2f}")
        if self.adapter_loss is not None:
            change = 100 * (perplexity(self.adapter_loss) / perplexity(self.base_loss) - 1)
            table.add_row(
                "base + adapter", f"{self.adapter_loss:.4f}", f"{perplexity(self.adapter_loss):,.2f} ({change:+.1f}%)"
            )
        return table


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def run_eval(
    source: str | None,
    adapter_dir: Path | None,
    data_path: Path,
    seq_len: int | None = None,
    micro_batch: int = 4,
    train_on_inputs: bool | None = None,
    trust_remote_code: bool = False,
) -> EvalResult:
    """Evaluate the 4-bit base, and base + adapter when given, on every example of data_path. seq_len and
    train_on_inputs default to the adapter's run (recipe.yaml beside it), else 512 and off."""
    from qlora_kit.objectives.sft import evaluate

    run = run_settings(adapter_dir)
    recipe = Recipe(
        seq_len=seq_len or run.get("seq_len", 512),
        micro_batch=micro_batch,
        train_on_inputs=run.get("train_on_inputs", False) if train_on_inputs is None else train_on_inputs,
    )
    loaded = data.read_records(data_path, can_skip=False)
    if loaded.format in data.PREFERENCE_FORMATS:
        raise UserError(
            f"{data_path} holds preference pairs; `qlora-kit eval` measures the loss on answers to learn.",
            hint="A --method dpo/orpo run reports reward accuracy on held-out pairs: train with "
            "--eval-data PAIRS or --eval-fraction, and read eval_reward_accuracy in its metrics.",
        )
    model, tokenizer = load_with_adapter(source, adapter_dir, trust_remote_code=trust_remote_code)
    examples = data.tokenize(loaded.records, tokenizer, recipe.seq_len, recipe.train_on_inputs)
    tokens = data.learned_tokens(examples)
    pad_id, device = tokenizer.pad_token_id, model.device
    if adapter_dir is None:
        return EvalResult(
            str(data_path), len(examples), tokens, evaluate(model, examples, recipe.micro_batch, pad_id, device), None
        )
    adapted = evaluate(model, examples, recipe.micro_batch, pad_id, device)
    with model.disable_adapter():
        base = evaluate(model, examples, recipe.micro_batch, pad_id, device)
    return EvalResult(str(data_path), len(examples), tokens, base, adapted)
