"""Training data: a file of examples -> token ids and labels -> padded micro-batches.

Formats, detected per file (or forced with --format), each normalised to one of three shapes:
  text        {"text": ...}                                   -> loss on every token
  completion  {"prompt": ..., "completion": ...}              -> loss on the completion
  alpaca      {"instruction", "input", "output"}              -> a chat: user = instruction (+ input)
  chat        {"messages": [{"role", "content"}, ...]}        -> loss on every assistant turn (the last one only
                                                                 when the template rewrites earlier turns: Qwen3)
  sharegpt    {"conversations": [{"from", "value"}, ...]}     -> a chat: human/gpt/system
Chats render with the tokenizer's chat template, or FALLBACK_TEMPLATE when it has none.

Preference data (for --method dpo or orpo) pairs a better and a worse answer to one prompt:
  preference       {"prompt", "chosen", "rejected"}, all strings  -> two completions of the prompt
  preference_chat  {"prompt" or "messages": [turns], "chosen", "rejected"}, answers as strings or [assistant turns]
                   (TRL's conversational form)                    -> two chats; loss on the answer's turns only
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import threading
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from qlora_kit.errors import UserError
from qlora_kit.plan.choose import percentile
from qlora_kit.probe.sources import cache_dir
from qlora_kit.text import shown_path

IGNORE = -100  # label value that the loss skips
FORMATS = ("text", "completion", "alpaca", "chat", "sharegpt", "preference", "preference_chat")
PREFERENCE_FORMATS = ("preference", "preference_chat")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# For tokenizers without a chat template: plain, readable turns, closed by the end-of-sequence token.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
SHOWN_PROBLEMS = 5
TOKENIZED_VERSION = 2  # raise when tokenization changes, so cached tables from older code are not reused
PARALLEL_FROM = 2000  # examples: below this, starting tokenizer processes costs more than it saves
NEVER = 2**31 - 1  # first_label of an example with no learned token
KEEP_TOKENIZED = 8  # cached tokenized tables kept


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    position_ids: list[int] | None = None  # packed examples only: positions restart at 0 for each packed example

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferencePair:
    """One prompt with a better (chosen) and a worse (rejected) answer, each a whole Example, prompt included."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None  # DPO's precomputed reference log-probs of (chosen, rejected)

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class Records:
    """A data file read and normalised: records as text / completion / chat, and what was skipped."""

    path: Path
    format: str
    records: list[dict]
    skipped: list[str]  # "line N: what is wrong", when bad lines were skipped
    where: list[str] = field(default_factory=list)  # each record's place in the file ("line N", "row N", "item N")


def detect_format(record: dict) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "chosen" in record or "rejected" in record:
        conversational = "messages" in record or any(
            isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected")
        )
        return "preference_chat" if conversational else "preference"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def read_records(
    path: str | Path,
    format: str = "auto",
    skip_bad_lines: bool = False,
    flag: str = "--data",
    can_skip: bool = True,
    split: str = "train",
    config: str | None = None,
) -> Records:
    """Read a .jsonl, .json, .parquet or .csv file, check every example, and normalise it; bad lines are listed.
    flag: the option that named the file, for the hints; can_skip: whether the command has --skip-bad-lines. A hub
    dataset (org/name, org/name:file.jsonl) is fetched first; split and config choose its part (hub.dataset_file)."""
    from qlora_kit.probe.hub import dataset_file, is_dataset_name
    from qlora_kit.probe.sources import path_exists

    path = Path(path)
    if not path_exists(path) and is_dataset_name(str(path)):
        path = dataset_file(str(path), split, config)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a data file.", hint=f"Pass a .jsonl file with {flag}.")
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO, /dev/stdin: endless or read-once, never a data set
        kind = (
            "a pipe (FIFO)"
            if path.is_fifo()
            else "a device"
            if path.is_char_device() or path.is_block_device()
            else "not a regular file"
        )
        raise UserError(
            f"{path} is {kind}, not a data file: training reads its data more than once.",
            hint=f"Save the data to a .jsonl file and pass that with {flag}.",
        )
    if not path.is_file():
        raise UserError(f"Data file {path} does not exist.", hint=f"Pass a .jsonl file with {flag}.")
    if format not in ("auto", *FORMATS):
        raise UserError(f"Unknown data format {format}.", hint=f"Use one of: auto, {', '.join(FORMATS)}.")
    records, places, problems, file_format = [], [], [], None if format == "auto" else format
    for where, raw in _raw_items(path, problems):
        if not isinstance(raw, dict):
            problems.append(f"{where}: a JSON {type(raw).__name__}, not an object")
            continue
        found = detect_format(raw)
        if found is None:
            problems.append(
                f"{where}: no known fields (has: {', '.join(raw) or 'none'}); "
                "expected text, prompt/completion, instruction/output, messages or conversations"
            )
            continue
        if file_format is None:
            file_format, first = found, where
        elif found != file_format:
            problems.append(
                f"{where}: looks like {found}, but the file is {file_format}"
                + (
                    ""
                    if format != "auto"
                    else f" (from {first}); formats are mixed within the file: give each its own file"
                )
            )
            continue
        try:
            records.append(_normalise(raw, file_format))
            places.append(where)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    if problems and not skip_bad_lines:
        shown = "; ".join(problems[:SHOWN_PROBLEMS]) + (
            f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        )
        raise UserError(
            f"{path} has {len(problems)} bad example{'s' * (len(problems) > 1)}: {shown}.",
            hint=("Fix them, or pass --skip-bad-lines to train on the rest. " if can_skip else "Fix them: ")
            + f"`qlora-kit data check {shown_path(path)}` lists each.",
        )
    if not records:
        raise UserError(
            f"Data file {path} has no examples" + (" left after skipping bad lines." if problems else "."),
            hint='Write one JSON object per line, e.g. {"text": "..."}.',
        )
    return Records(path, file_format, records, problems, places)


def _raw_items(path: Path, problems: list[str]):
    """(where, parsed JSON) for each example: lines of a .jsonl, or items of a .json array. Blank lines are fine."""
    if path.suffix in (".parquet", ".csv"):
        yield from _table_rows(path)
        return
    if path.suffix == ".json":
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(
                f"{path} is not valid JSON: {e}.", hint="A .json file must hold one array of objects."
            ) from None
        except RecursionError:
            raise UserError(
                f"{path} is nested too deeply to be training data.", hint="A .json file must hold one array of objects."
            ) from None
        if not isinstance(items, list):
            raise UserError(
                f"{path} holds a JSON {type(items).__name__}, not an array of examples.", hint="Use [{...}, {...}]."
            )
        yield from ((f"item {i}", item) for i, item in enumerate(items, start=1))
        return
    with path.open("rb") as lines:  # line by line: a large file is never in memory as raw bytes too
        for number, line in enumerate(lines, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"line {number}: not UTF-8 text (byte {e.start + 1})")
                continue
            try:
                yield f"line {number}", json.loads(text)
            except json.JSONDecodeError as e:
                trailing = " (a trailing comma?)" if text[: e.pos].rstrip().endswith(",") else ""
                problems.append(
                    f"line {number}: not valid JSON, {e.msg} at column {e.colno}{trailing}: {_near(text, e.pos)}"
                )
            except RecursionError:  # the parser recurses once per level of nesting
                problems.append(
                    f"line {number}: nested too deeply (lists or objects inside each other) to be an example"
                )


def _near(text: str, position: int, width: int = 20) -> str:
    """The text around a position, the position marked with <<here>>, on one line: where to look in a long line."""
    before, after = text[max(0, position - width) : position], text[position : position + width].rstrip("\r\n")
    start = "…" if position > width else ""
    end = "…" if len(text.rstrip()) > position + width else ""
    return (start + before + "<<here>>" + after + end).replace("\n", " ")


def _table_rows(path: Path):
    """Rows of a parquet or csv file, read through `datasets` (memory-mapped Arrow, cached), as (where, dict)."""
    from datasets import load_dataset

    try:
        table = load_dataset(path.suffix[1:], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for a malformed file; the user needs the sentence
        raise UserError(
            f"{path} could not be read as {path.suffix[1:]}: {e}", hint="Check the file, or convert it to .jsonl."
        ) from None
    for i, row in enumerate(table, start=1):
        yield f"row {i}", row


def _text(raw: dict, key: str, *, required: bool = True) -> str:
    value = raw.get(key)
    if value is None and not required:  # an absent optional field, or an empty csv cell
        value = ""
    if value is None:
        raise ValueError(f"missing `{key}`")
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"`{key}` is empty")
    return value


def _normalise(raw: dict, format: str) -> dict:
    """One record as {"text"}, {"prompt", "completion"} or {"messages"}; ValueError says what is wrong."""
    if format == "text":
        return {"text": _text(raw, "text")}
    if format == "completion":
        return {"prompt": _text(raw, "prompt"), "completion": _text(raw, "completion")}
    if format == "alpaca":
        instruction, extra = _text(raw, "instruction"), _text(raw, "input", required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": _text(raw, "output")}]}
    if format in PREFERENCE_FORMATS:
        return _preference(raw, format)
    messages = _turns(raw, "messages" if format == "chat" else "conversations")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn, so nothing to learn")
    return {"messages": messages}


def _preference(raw: dict, format: str) -> dict:
    """A preference record as {"prompt", "chosen", "rejected"} strings, or with format preference_chat as
    {"messages": prompt turns, "chosen": turns, "rejected": turns}."""
    for side in ("chosen", "rejected"):
        if raw.get(side) is None:
            raise ValueError(f"missing `{side}`: a preference example needs a chosen and a rejected answer")
    if format == "preference":
        record = {"prompt": _text(raw, "prompt"), "chosen": _text(raw, "chosen"), "rejected": _text(raw, "rejected")}
    else:
        key = "messages" if "messages" in raw else "prompt"
        prompt = raw.get(key)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        record = {"messages": _turns({key: prompt}, key)}
        for side in ("chosen", "rejected"):
            answer = raw[side]
            record[side] = _turns(
                {side: [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer}, side
            )
            if not any(m["role"] == "assistant" for m in record[side]):
                raise ValueError(f"`{side}` has no assistant turn")
    if record["chosen"] == record["rejected"]:
        raise ValueError("`chosen` and `rejected` are the same answer, so there is no preference to learn")
    return record


def _turns(raw: dict, key: str) -> list[dict]:
    """raw[key] as checked {"role", "content"} turns (sharegpt's conversations as {"from", "value"} turns)."""
    role_key, content_key = ("from", "value") if key == "conversations" else ("role", "content")
    turns = raw.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"`{key}` must be a non-empty list" if turns is not None else f"missing `{key}`")
    where = "" if key in ("messages", "conversations") else f" of `{key}`"
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} must be an object with `{role_key}` and `{content_key}`")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"turn {i} needs a string `{role_key}` and a string `{content_key}`")
        known = SHAREGPT_ROLES if key == "conversations" else ROLES
        if role not in known:
            raise ValueError(f"turn {i}{where} has unknown role '{role}' (known: {', '.join(sorted(known))})")
        if not content.strip():
            raise ValueError(f"turn {i}{where} has empty `{content_key}`")
        messages.append({"role": SHAREGPT_ROLES[role] if key == "conversations" else role, "content": content})
    return messages


def tokenize(
    records: list[dict],
    tokenizer,
    seq_len: int,
    train_on_inputs: bool = False,
    drop_long: bool = False,
    cache_key: str | None = None,
) -> TokenizedExamples:
    """Token ids and labels for every record, truncated to seq_len tokens (or dropped, with drop_long); loss on
    completions and assistant turns only, unless train_on_inputs. With a cache_key, the tokenized table is kept on
    disk and memory-mapped, and a later run with the same file and tokenizer skips tokenizing."""
    examples = TokenizedExamples.of(tokenized_table(records, tokenizer, cache_key), seq_len, train_on_inputs, drop_long)
    if not examples:
        raise UserError(
            "No example has any token left to learn from after truncation.",
            hint="Raise --seq-len, or check that completions and assistant replies are not empty.",
        )
    return examples


def cache_key(loaded: Records, tokenizer) -> str:
    """What the tokenized table depends on: this file's version, its format, the tokenizer and this code."""
    stat = loaded.path.stat()
    parts = [
        TOKENIZED_VERSION,
        str(loaded.path.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        loaded.format,
        len(loaded.records),
        len(loaded.skipped),
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        len(tokenizer),
        tokenizer.eos_token_id,
        getattr(tokenizer, "chat_template", None),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def tokenized_table(records: list[dict], tokenizer, key: str | None = None):
    """An Arrow table (datasets) of every record's untruncated input_ids and labels as int32, with its length and
    the index of its first learned label. Tokenized in several processes for large files; cached under key."""
    import datasets

    folder = cache_dir() / "tokenized" / key if key else None
    if folder and (folder / "dataset_info.json").exists():
        return datasets.load_from_disk(str(folder))  # memory-mapped: pages in as examples are drawn
    workers = min(os.cpu_count() or 1, 8) if len(records) >= PARALLEL_FROM else None
    ids = datasets.Sequence(datasets.Value("int32"))
    # A preference pair keeps its chosen answer in input_ids and labels, its rejected one beside; length and
    # first_label are the pair's: the longer side, the later first learned token.
    pairs = bool(records) and "chosen" in records[0]
    features = datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "length": datasets.Value("int32"),
            "first_label": datasets.Value("int32"),
            **({"rejected_ids": ids, "rejected_labels": ids} if pairs else {}),
        }
    )
    if workers is None:  # small files tokenize in moments: no progress bars
        datasets.disable_progress_bars()
    try:
        source = datasets.Dataset.from_list(records)
        with ctrl_c_stops_only_this_process():
            table = source.map(
                _tokenize_batch,
                batched=True,
                num_proc=workers,
                remove_columns=source.column_names,
                features=features,
                fn_kwargs={"tokenizer": tokenizer},
                desc="Tokenizing",
                new_fingerprint=key or uuid.uuid4().hex,
            )
        return _save_to_cache(table, folder) if folder else table
    finally:
        datasets.enable_progress_bars()


@contextmanager
def ctrl_c_stops_only_this_process():
    """While worker processes tokenize: Ctrl-C reaches the whole process group, but only this process acts on it (its
    pool then ends the workers), so there is one clean KeyboardInterrupt, not one traceback per worker and a
    TimeoutError from the pool's clean-up in its place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    parent, interrupted = os.getpid(), []

    def handle(signum, frame):
        if os.getpid() == parent:  # forked workers inherit this handler, and ignore the signal
            interrupted.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    except BaseException:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_to_cache(table, folder: Path):
    """The table written to folder and memory-mapped back; the in-memory table if the cache cannot be written."""
    import datasets
    import pyarrow

    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    try:
        table.save_to_disk(str(staging))
        staging.rename(folder)  # whole or absent: an interrupted save is never read back
    except OSError:  # a read-only or full cache costs only the reuse, so training goes on from memory
        return table
    _prune(folder.parent, keep=KEEP_TOKENIZED)
    del table
    pyarrow.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise: ~2x the table
    return datasets.load_from_disk(str(folder))


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently written tables, so edited data files do not fill the disk."""
    import shutil

    tables = sorted((f for f in folder.iterdir() if f.is_dir()), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in tables[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    out = {"input_ids": [], "labels": [], "length": [], "first_label": []}
    if "chosen" in batch:
        out.update(rejected_ids=[], rejected_labels=[])
    for record in (dict(zip(batch, values)) for values in zip(*batch.values())):
        if "chosen" in record:
            (ids, labels), (rejected_ids, rejected_labels) = tokenize_preference(record, tokenizer)
            out["rejected_ids"].append(rejected_ids)
            out["rejected_labels"].append(rejected_labels)
            sides = [(ids, labels), (rejected_ids, rejected_labels)]
        else:
            ids, labels = tokenize_record(record, tokenizer)
            sides = [(ids, labels)]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(max(len(side_ids) for side_ids, _ in sides))
        out["first_label"].append(max(_first_label(side_labels) for _, side_labels in sides))
    return out


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if i and label != IGNORE), NEVER)


@dataclass(eq=False)
class TokenizedExamples(Sequence):
    """Tokenized examples kept as int32 Arrow columns (memory-mapped when cached) and turned into an Example only
    when drawn: a large file costs 8 bytes a token, not the ~70 of Python lists of ints."""

    table: object  # datasets.Dataset from tokenized_table
    rows: list[int]  # the table rows in use: truncation and filtering choose them, a split subsets them
    lengths: list[int]  # tokens of each example in use, after truncation
    seq_len: int
    train_on_inputs: bool
    truncated: int = 0  # examples in use that were longer than seq_len and are cut
    references: object = None  # per table row, DPO's precomputed (chosen, rejected) reference log-probs, or NaN

    @classmethod
    def of(cls, table, seq_len: int, train_on_inputs: bool, drop_long: bool) -> TokenizedExamples:
        """The usable rows: those with a learned token within seq_len, and, with drop_long, no longer than seq_len."""
        lengths, firsts = table.data.column("length").to_pylist(), table.data.column("first_label").to_pylist()
        rows = [
            i
            for i, (n, first) in enumerate(zip(lengths, firsts))
            if (1 < min(n, seq_len) if train_on_inputs else first < min(n, seq_len)) and not (drop_long and n > seq_len)
        ]
        return cls(
            table,
            rows,
            [min(lengths[i], seq_len) for i in rows],
            seq_len,
            train_on_inputs,
            truncated=sum(lengths[i] > seq_len for i in rows),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(*index.indices(len(self))))
        row = self.table[self.rows[index]]
        ids = row["input_ids"][: self.seq_len]
        chosen = Example(ids, list(ids) if self.train_on_inputs else row["labels"][: self.seq_len])
        if "rejected_ids" not in row:
            return chosen
        rejected = Example(row["rejected_ids"][: self.seq_len], row["rejected_labels"][: self.seq_len])
        reference = None if self.references is None else tuple(self.references[self.rows[index]].tolist())
        return PreferencePair(chosen, rejected, None if reference is None or math.isnan(reference[0]) else reference)

    def select(self, indices) -> TokenizedExamples:
        """A subset, sharing the table."""
        return replace(self, rows=[self.rows[i] for i in indices], lengths=[self.lengths[i] for i in indices])

    def with_references(self, values: torch.Tensor) -> TokenizedExamples:
        """These pairs carrying their precomputed reference log-probs, values[i] for the i-th; a subset keeps them."""
        references = torch.full((len(self.table), 2), math.nan) if self.references is None else self.references.clone()
        references[self.rows] = values
        return replace(self, references=references)


def same_within(examples: TokenizedExamples) -> list[int]:
    """Which preference pairs (indices into examples) have the same chosen and rejected tokens once cut to seq_len:
    their answers differ only past the cut, so the pair has nothing to teach (its DPO loss is log 2, whatever the
    weights). Only pairs whose two sides are cut to one length are compared, so this reads few rows."""
    import pyarrow.compute as pc

    table = examples.table
    if "rejected_ids" not in table.column_names:
        return []
    chosen = pc.list_value_length(table.data.column("input_ids")).to_pylist()
    rejected = pc.list_value_length(table.data.column("rejected_ids")).to_pylist()
    n = examples.seq_len
    same = []
    for index, row in enumerate(examples.rows):
        if min(chosen[row], n) != min(rejected[row], n):
            continue
        pair = table[row]
        if pair["input_ids"][:n] == pair["rejected_ids"][:n] and pair["labels"][:n] == pair["rejected_labels"][:n]:
            same.append(index)
    return same


def cut_alike(examples: TokenizedExamples, same: list[int], where: list[str]) -> list[str]:
    """The bad-line sentences of the pairs same_within found."""
    return [
        f"{where[examples.rows[i]]}: chosen and rejected are the same within the first {examples.seq_len} tokens"
        for i in same
    ]


def pairs_that_differ(
    examples: TokenizedExamples, loaded: Records, skip_bad_lines: bool
) -> tuple[TokenizedExamples, list[str]]:
    """The examples without the preference pairs that are the same within seq_len (same_within), and those pairs as
    bad lines; without skip_bad_lines, any such pair is refused with its line."""
    same = same_within(examples)
    if not same:
        return examples, []
    problems = cut_alike(examples, same, loaded.where)
    if not skip_bad_lines:
        lines = ", ".join(p.split(":")[0] for p in problems[:SHOWN_PROBLEMS]) + (
            f" and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        )
        raise UserError(
            f"{loaded.path} has {len(same)} preference pair{'s' * (len(same) > 1)} whose chosen and rejected "
            f"answers are the same within the first {examples.seq_len} tokens ({lines}): they differ only "
            "past the cut, so training would learn nothing from them.",
            hint="Raise --seq-len, shorten their prompts, or pass --skip-bad-lines to train on the rest.",
        )
    dropped = set(same)
    kept = examples.select([i for i in range(len(examples)) if i not in dropped])
    if not kept:
        raise UserError(
            f"No pair in {loaded.path} differs within the first {examples.seq_len} tokens.",
            hint="Raise --seq-len, or shorten the prompts.",
        )
    return kept, problems


@dataclass(eq=False)
class PackedExamples(Sequence):
    """Sequences made of several examples each (see pack), assembled when drawn."""

    source: Sequence[Example]
    groups: list[list[int]]  # indices into source, in packing order
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Example:
        ids, labels, positions = [], [], []
        for e in (self.source[i] for i in self.groups[index]):
            ids, labels, positions = (
                ids + e.input_ids,
                labels + [IGNORE] + e.labels[1:],
                positions + list(range(len(e))),
            )
        return Example(ids, labels, positions)


def lengths_of(examples: Sequence[Example]) -> list[int]:
    """Each example's token count, without assembling the examples where their lengths are known."""
    return examples.lengths if hasattr(examples, "lengths") else [len(e) for e in examples]


def tokenize_record(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one normalised record, untruncated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
        return ids, list(ids)
    if "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    return _tokenize_chat(record["messages"], tokenizer)


def tokenize_preference(record: dict, tokenizer) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((input_ids, labels) of prompt + chosen, the same of prompt + rejected): loss on the answers only."""
    if "prompt" in record:
        return tuple(
            tokenize_record({"prompt": record["prompt"], "completion": record[side]}, tokenizer)
            for side in ("chosen", "rejected")
        )
    prompt = list(record["messages"])
    return tuple(
        _tokenize_chat(prompt + list(record[side]), tokenizer, learn_from=len(prompt))
        for side in ("chosen", "rejected")
    )


def _tokenize_chat(messages: list[dict], tokenizer, learn_from: int = 0) -> tuple[list[int], list[int]]:
    """Render the whole chat once, then mark each assistant turn from turn learn_from on: the tokens between the
    conversation rendered up to the turn's generation prompt and the conversation rendered through the turn."""
    full, spans, render = _assistant_spans(messages, tokenizer, learn_from)
    if spans is None:  # a template that renders earlier turns otherwise once later ones follow (Qwen3's)
        spans = _final_turn_span(messages, full, render, learn_from)
        if spans is None:
            return full, list(full)  # no turn to tell apart: learn every token rather than guess
    labels = [IGNORE] * len(full)
    for start, end in spans:
        labels[start:end] = full[start:end]
    return full, labels


def _assistant_spans(messages: list[dict], tokenizer, learn_from: int = 0):
    """(the chat's tokens, the (start, end) of each assistant turn from learn_from on or None when the template
    renders a turn differently once later turns follow, the renderer)."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE

    def render(turns, generation_prompt=False) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            turns, chat_template=template, add_generation_prompt=generation_prompt, tokenize=True
        )
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    full = render(messages)
    if template == FALLBACK_TEMPLATE and tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k < learn_from:
            continue
        before = render(messages[:k], generation_prompt=True) if k else []  # an opening assistant turn: all of it
        through = render(messages[: k + 1])
        if full[: len(through)] != through or through[: len(before)] != before:
            return full, None, render
        spans.append((len(before), len(full) if k == len(messages) - 1 else len(through)))
    return full, spans, render


def _final_turn_span(messages: list[dict], full: list[int], render, learn_from: int):
    """For a template that renders earlier turns otherwise once later ones follow (Qwen3 drops their reasoning and
    gives only the final turn an empty <think> block): the final assistant turn, which the chat holds exactly as
    the model meets it at inference after this history; earlier turns, rendered here as no inference shows them,
    are not learned. None when the chat does not end with an assistant turn after the same history."""
    k = len(messages) - 1
    if k < learn_from or messages[k]["role"] != "assistant":
        return None
    before = render(messages[:k], generation_prompt=True) if k else []
    return [(len(before), len(full))] if full[: len(before)] == before else None


def history_note(records: list[dict], tokenizer) -> str | None:
    """What data check says when the chat template renders earlier turns otherwise once later ones follow: only the
    last assistant turn of each conversation is learned."""
    chat = next(
        (
            r["messages"]
            for r in records
            if "messages" in r and sum(m.get("role") == "assistant" for m in r["messages"]) > 1
        ),
        None,
    )
    if chat is None or _assistant_spans(chat, tokenizer)[1] is not None:
        return None
    return (
        "This chat template renders earlier assistant turns otherwise once later turns follow (as Qwen3's drops "
        "their reasoning): only the last assistant turn of each conversation is learned, as the model meets it."
    )


def variables_set_in(template: str) -> dict[str, str]:
    """The variables with_variables_set put at the template's start, as written there ({"enable_thinking": "false"})."""
    head = re.match(r"(\{%- set \w+ = [^%]* %\})*", template).group(0)
    return dict(re.findall(r"\{%- set (\w+) = ([^%]*) %\}", head))


def thinking_note(tokenizer) -> str | None:
    """What data check says of a chat template with a thinking switch (Qwen3's, SmolLM3's enable_thinking): whether
    it is set, and how to set it."""

    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" not in template:
        return None
    setting = variables_set_in(template).get("enable_thinking")
    if setting:
        return (
            f"Chats render with enable_thinking={setting} (chat_template_kwargs), as the template renders "
            "them then; the adapter's chat template keeps the setting, so inference renders prompts alike."
        )
    return (
        "This chat template has a thinking switch (enable_thinking), not set here: chats render as the template "
        "does by default, with thinking on. To train answers without reasoning, pass --chat-template-kwargs "
        "enable_thinking=false here, to train and to auto (it is kept in the recipe)."
    )


def system_note(records: list[dict], tokenizer) -> str | None:
    """What data check says when the data has system messages and the chat template has no system turn of its own
    (Gemma's folds the system message into the first user turn): where the system message goes."""
    if not any(m.get("role") == "system" for r in records for m in r.get("messages") or ()):
        return None
    system, user = "QKSYSTEMQK", "QKUSERQK"
    try:
        alone = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False)
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - the template raises on a system message; tokenizing says so per line
        return None
    user_opening = alone[: alone.index(user)]
    if system not in rendered:
        return "This chat template leaves system messages out: the data's system messages are not trained on or seen."
    if rendered.startswith(user_opening) and rendered.index(system) < rendered.index(user):
        return (
            "This chat template has no system turn: it puts each system message at the start of the first user "
            "turn, as the example below shows, and inference renders it the same way."
        )
    return None


def pack(examples: Sequence[Example], seq_len: int, seed: int) -> PackedExamples:
    """Concatenate examples, in a seeded random order, into sequences of at most seq_len tokens. Position ids restart
    for each example, which makes transformers' attention block-diagonal (no attention across examples), and the
    first token of each example is not learned, since it would be predicted from the previous example."""
    lengths = lengths_of(examples)
    groups, filled = [[]], [0]
    for i in torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist():
        if filled[-1] and filled[-1] + lengths[i] > seq_len:
            groups.append([])
            filled.append(0)
        groups[-1].append(i)
        filled[-1] += lengths[i]
    return PackedExamples(examples, groups, filled)


def split_off(examples: TokenizedExamples, fraction: float, seed: int) -> tuple[TokenizedExamples, TokenizedExamples]:
    """A seeded random split: (training examples, held-out examples), at least one of each."""
    if len(examples) < 2:
        raise UserError(
            "Holding out an evaluation split needs at least 2 examples.", hint="Drop --eval-fraction, or add data."
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return examples.select(order[held:]), examples.select(order[:held])


def epoch_order(
    lengths: list[int], seed: int, epoch: int, per_step: int = 1, group_by_length: bool = False
) -> list[int]:
    """The order an epoch draws examples in, fixed by (seed, epoch). With group_by_length, each step's per_step
    examples are of similar length (sorted within windows of 64 steps' worth, the steps then shuffled), so little
    is padded; step boundaries follow the stream's position, also when an epoch is not a whole number of steps."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length or per_step < 2:
        return order
    window = 64 * per_step
    order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lengths.__getitem__)]
    head = -epoch * len(lengths) % per_step  # examples the step that straddles into this epoch still needs
    steps = [order[head + k : head + k + per_step] for k in range(0, len(order) - head, per_step)]
    full = [s for s in steps if len(s) == per_step]  # the first and last may be partial: they stay at the ends
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return order[:head] + [i for s in shuffled for i in s] + [i for s in steps if len(s) < per_step for i in s]


def example_stream(
    examples: Sequence[Example], seed: int, per_step: int = 1, group_by_length: bool = False, start: int = 0
):
    """Endless (epoch, example) pairs from stream position `start`, each epoch in epoch_order. The order depends
    only on the position, so a resumed run draws exactly what the interrupted one would have."""
    lengths = lengths_of(examples)
    epoch, offset = divmod(start, len(examples))
    while True:
        for i in epoch_order(lengths, seed, epoch, per_step, group_by_length)[offset:]:
            yield epoch, examples[i]
        epoch, offset = epoch + 1, 0


def learned_tokens(examples) -> int:
    """Tokens the loss is taken on: labelled ones after the first (a first token has nothing to be predicted from)."""
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


def loss_units(examples) -> int:
    """What a step's loss is averaged over: learned tokens, or for preference pairs the pairs."""
    return len(examples) if examples and isinstance(examples[0], PreferencePair) else learned_tokens(examples)


def sides(examples) -> list[Example]:
    """The sequences a micro-batch runs through the model: preference pairs as all chosen answers, then all rejected."""
    if examples and isinstance(examples[0], PreferencePair):
        return [p.chosen for p in examples] + [p.rejected for p in examples]
    return list(examples)


def truncate(examples: list, seq_len: int) -> list:
    """The examples cut to seq_len tokens (used when an out-of-memory step-down shortens sequences)."""

    def cut(e: Example) -> Example:
        return Example(e.input_ids[:seq_len], e.labels[:seq_len], e.position_ids and e.position_ids[:seq_len])

    def cut_pair(p: PreferencePair) -> PreferencePair:  # precomputed reference values hold only for the whole pair
        return PreferencePair(cut(p.chosen), cut(p.rejected), p.reference if len(p) <= seq_len else None)

    return [cut_pair(e) if isinstance(e, PreferencePair) else cut(e) for e in examples]


def collate(chunk: list[Example], pad_id: int):
    """Right-pad to the longest example in the chunk, not to seq_len: (input_ids, attention_mask, labels, position_ids).
    position_ids is None unless the examples are packed; padding then forms its own segment, never attended to.
    Preference pairs give 2 x pairs rows: the chosen answers, then the rejected ones."""
    chunk = sides(chunk)
    width = max(len(e) for e in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    packed = any(e.position_ids is not None for e in chunk)
    position_ids = torch.arange(width).repeat(len(chunk), 1) if packed else None
    for row, e in enumerate(chunk):
        n = len(e)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
        if packed:
            position_ids[row, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
            position_ids[row, n:] = torch.arange(width - n)
    return input_ids, attention_mask, labels, position_ids


def check_report(
    path: str | Path,
    tokenizer=None,
    seq_len: int = 512,
    format: str = "auto",
    split: str = "train",
    config: str | None = None,
):
    """`qlora-kit data check`: format, counts, token-length percentiles and histogram, every bad line, and the first
    example rendered with the tokens the loss is on highlighted. Without a tokenizer, lengths are estimated.
    Returns (the report, [(why `train` would refuse the file, what to do)], empty when it would train on it)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    loaded = read_records(path, format, skip_bad_lines=True, split=split, config=config)
    refusals = (
        [
            (
                f"{len(loaded.skipped)} bad line{'s' * (len(loaded.skipped) > 1)}",
                "fix the lines listed above, or train on the rest with --skip-bad-lines",
            )
        ]
        if loaded.skipped
        else []
    )
    if tokenizer is not None:  # the same cached table training uses: checking a file first makes training start sooner
        tokenized = tokenized_table(loaded.records, tokenizer, cache_key(loaded, tokenizer))
        lengths = tokenized.data.column("length").to_pylist()
        usable = TokenizedExamples.of(tokenized, seq_len, train_on_inputs=False, drop_long=False)
        nothing = len(lengths) - len(usable)
        if nothing == len(lengths):
            refusals.append(
                (
                    f"no example has a token to learn within its first {seq_len}",
                    "raise --seq-len, or check that completions and assistant replies are not empty",
                )
            )
        alike = cut_alike(usable, same_within(usable), loaded.where)
        if alike:
            refusals.append(
                (
                    f"{len(alike)} preference pair{'s' * (len(alike) > 1)} the same within the first {seq_len} tokens",
                    "raise --seq-len or shorten their prompts (or train on the rest with --skip-bad-lines)",
                )
            )
    else:
        lengths = [max(1, len(json.dumps(r)) // 4) for r in loaded.records]
        nothing, alike = 0, []
    duplicates = len(loaded.records) - len({json.dumps(r, sort_keys=True) for r in loaded.records})
    table = Table(title=f"{loaded.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", loaded.format)
    table.add_row(
        "examples",
        f"{len(loaded.records):,}" + (f" ({len(loaded.skipped)} bad lines not counted)" if loaded.skipped else ""),
    )
    table.add_row(
        "tokens per example",
        f"p50 {percentile(lengths, 50)}, p95 {percentile(lengths, 95)}, max {max(lengths)}"
        + ("" if tokenizer else " (estimated: 4 characters a token; pass --model for exact counts)"),
    )
    table.add_row(f"longer than {seq_len}", f"{sum(n > seq_len for n in lengths)} (truncated in training)")
    table.add_row("nothing to learn", f"{nothing} (dropped in training)" if tokenizer else "-")
    table.add_row("duplicates", str(duplicates))
    parts = [table, Text("Token lengths:", style="bold"), _histogram(lengths)]
    bad = loaded.skipped + alike
    if bad:
        parts.append(Text(f"Bad lines ({len(bad)}):", style="bold red"))
        parts += [Text(f"  {problem}", style="red") for problem in bad]
    if tokenizer is not None:
        parts += _as_the_model_sees_it(loaded.records, tokenized[0], tokenizer, seq_len)
    return Group(*parts), refusals


def _as_the_model_sees_it(records: list, first: dict, tokenizer, seq_len: int) -> list:
    """The template's notes (thinking, history, system prompt) and the first example's tokens, those the loss is
    on highlighted."""
    from rich.text import Text

    notes = (thinking_note(tokenizer), history_note(records, tokenizer), system_note(records, tokenizer))
    parts = [Text(note, style="yellow") for note in notes if note]
    parts.append(Text("First example as the model sees it (loss on the bright green tokens):", style="bold"))
    shown_sides = [("", "input_ids", "labels")]
    if "rejected_ids" in first:
        shown_sides = [("Chosen: ", "input_ids", "labels"), ("Rejected: ", "rejected_ids", "rejected_labels")]
    for title, ids_key, labels_key in shown_sides:
        shown = Text(title, style="bold")
        for token, label in zip(first[ids_key][:seq_len], first[labels_key][:seq_len]):
            shown.append(tokenizer.decode([token]), style="bold green" if label != IGNORE else "dim")
        parts.append(shown)
    return parts


def _histogram(lengths: list[int], bins: int = 8, width: int = 40):
    from rich.text import Text

    low, high = min(lengths), max(lengths)
    bins = min(bins, high - low + 1)  # no empty bins narrower than a token
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // step)] += 1
    most = max(counts)
    lines = [
        f"  {low + i * step:>6}-{low + (i + 1) * step - 1:<6} {'█' * round(c / most * width):<{width}} {c}"
        for i, c in enumerate(counts)
        if c or i < bins - 1
    ]
    return Text("\n".join(lines))
