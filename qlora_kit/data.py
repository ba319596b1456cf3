"""Training data: jsonl lines -> token ids and labels -> padded micro-batches.

Each line is a JSON object with either `text` (trained on every token) or `messages` (a chat, rendered with
the tokenizer's chat template; the loss covers the final assistant reply only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.errors import UserError

IGNORE = -100  # label value that the loss skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a jsonl file into records, with the line number in every error."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a data file.", hint="Pass a .jsonl file with --data.")
    if not path.is_file():
        raise UserError(f"Data file {path} does not exist.", hint="Pass a .jsonl file with --data.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read data file {path}: {e}.", hint="The file must be UTF-8 text, one JSON object per line.") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number} is not valid JSON ({e.msg} at column {e.colno}).",
                            hint="Each line must be one JSON object, e.g. {\"text\": \"...\"}.") from None
        _check_record(record, path, number)
        records.append(record)
    if not records:
        raise UserError(f"Data file {path} has no examples.", hint="Write one JSON object per line.")
    return records


def _check_record(record, path: Path, number: int) -> None:
    where = f"{path}, line {number}"
    hint = 'Use {"text": "..."} or {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}.'
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object.", hint=hint)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise UserError(f"{where}: `text` must be a non-empty string.", hint=hint)
        return
    messages = record.get("messages")
    if messages is None:
        raise UserError(f"{where} has neither `text` nor `messages` (keys: {', '.join(record) or 'none'}).", hint=hint)
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` must be a non-empty list.", hint=hint)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserError(f"{where}: message {i + 1} needs a string `role` and a string `content`.", hint=hint)
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply, the text to learn.", hint=hint)


def tokenize(records: list[dict], tokenizer, seq_len: int) -> list[Example]:
    """Token ids and labels for every record, truncated to seq_len tokens."""
    examples = []
    for record in records:
        if "text" in record:
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
        else:
            ids, labels = _tokenize_chat(record["messages"], tokenizer)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if sum(label != IGNORE for label in labels[1:]) > 0:  # an example with nothing to learn is dropped
            examples.append(Example(ids, labels))
    if not examples:
        raise UserError("No example has any token left to learn from after truncation.",
                        hint="Raise --seq-len, or check that assistant replies are not empty.")
    return examples


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("The data uses `messages`, but this model's tokenizer has no chat template.",
                        hint='Use {"text": ...} lines for a base model, or an instruct model.')
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[:len(prompt)] == prompt:
        return full, [IGNORE] * len(prompt) + full[len(prompt):]
    return full, list(full)  # template re-renders earlier turns: fall back to learning every token


def _ids(rendered) -> list[int]:
    # transformers returns a list, or a BatchEncoding when the template yields several fields
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def example_stream(examples: list[Example], generator: torch.Generator):
    """Endless (epoch, example) pairs, reshuffled every epoch with the seeded generator."""
    epoch = 0
    while True:
        for i in torch.randperm(len(examples), generator=generator).tolist():
            yield epoch, examples[i]
        epoch += 1


def truncate(examples: list[Example], seq_len: int) -> list[Example]:
    """The examples cut to seq_len tokens (used when an out-of-memory step-down shortens sequences)."""
    return [Example(e.input_ids[:seq_len], e.labels[:seq_len]) for e in examples]


def collate(chunk: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example in the chunk, not to seq_len: no compute is spent on padding."""
    width = max(len(e.input_ids) for e in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(chunk):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return input_ids, attention_mask, labels
