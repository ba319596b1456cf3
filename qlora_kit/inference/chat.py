"""Talking to adapters: `qlora-kit chat` (interactive, replies streamed as they come) and `generate` (one prompt or a
file of them, with --compare to put the base model's answers beside the adapters'). The 4-bit base is loaded once
and adapters are switched by name.

Commands inside the chat: /reset, /system TEXT, /adapter NAME, /base, /adapters, /help, /quit (or Ctrl-D).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path

from rich.console import Console

from qlora_kit.adapter.folder import Sampling, answering_with, generate_replies, generate_reply
from qlora_kit.errors import UserError
from qlora_kit.files import write_atomically

HELP = (
    "/reset forgets the conversation - /system TEXT sets the system prompt (/system alone clears it) - "
    "/adapter NAME switches adapter - /base answers without one - /adapters lists them - /quit"
)


def run_chat(
    model, tokenizer, names: list[str], console: Console, sampling: Sampling, read_line=None, system: str | None = None
) -> list[dict]:
    """The chat loop until /quit or end of input; returns the conversation (for tests and transcripts)."""
    if read_line is None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line of bytes that are not UTF-8 is asked again, below
    read_line = read_line or (lambda: console.input("[bold cyan]you>[/] "))
    messages: list[dict] = []
    active = names[0] if names else None
    console.print(f"Chatting with {'adapter ' + active if active else 'the base model'}. {HELP}", highlight=False)
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: the session ends
            console.print()
            break
        if not line:
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes
            console.print("[yellow]That line is not UTF-8 text; type it again.[/]")
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                messages = []
                console.print("[dim]Conversation cleared.[/]")
            elif command == "/system":
                system = argument.strip() or None
                console.print(f"[dim]System prompt {'set' if system else 'cleared'}.[/]")
            elif command == "/adapters":
                listed = ", ".join(f"[bold]{n}[/]" if n == active else n for n in names) or "none loaded"
                console.print(f"Adapters: {listed}" + ("" if active else " (now answering with the base model)"))
            elif command == "/base":
                active = None
                console.print("[dim]Answering with the base model, no adapter.[/]")
            elif command == "/adapter" and argument.strip() in names:
                active = argument.strip()
                console.print(f"[dim]Answering with adapter {active}.[/]")
            elif command == "/adapter":
                console.print(f"[red]No adapter named {argument.strip()!r}.[/] Loaded: {', '.join(names) or 'none'}.")
            else:
                console.print(f"[red]Unknown command {command}.[/] {HELP}", highlight=False)
            continue
        messages.append({"role": "user", "content": line})
        turn = ([{"role": "system", "content": system}] if system else []) + messages
        reply = stream_reply(model, tokenizer, turn, sampling, console, adapter=active)
        messages.append({"role": "assistant", "content": reply})
    return messages


def stream_reply(
    model, tokenizer, messages: list[dict], sampling: Sampling, console: Console, adapter: str | None = None
) -> str:
    """Generate with `adapter` (None: the base model) on a worker thread and print the text as it arrives; returns
    the whole reply. Ctrl-C stops this reply (what came so far is kept), not the chat."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}
    stop = threading.Event()

    def work() -> None:
        try:
            with answering_with(model, adapter):
                result["reply"] = generate_reply(model, tokenizer, messages, sampling, streamer, stop=stop)
        except BaseException as e:  # surfaced on the main thread below; the streamer must still end
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    console.print("[bold green]model>[/] ", end="")
    try:
        for piece in streamer:
            console.print(piece, end="", markup=False, highlight=False)
    except KeyboardInterrupt:
        stop.set()  # the worker ends after the token it is making
        worker.join()
        console.print(" [dim](stopped)[/]", end="")
    worker.join()
    console.print()
    if "error" in result:
        raise result["error"]
    return result["reply"]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file: a {"prompt": ...} object or a JSON string per line (blank lines skipped)."""
    if not path.is_file():
        raise UserError(f"Prompt file {path} does not exist.", hint='Write one {"prompt": "..."} per line.')
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {number}: not valid JSON ({e.msg}).", hint='Write one {"prompt": "..."} per line.'
            ) from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(
                f"{path} line {number}: no non-empty `prompt` string.", hint='Write one {"prompt": "..."} per line.'
            )
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"{path} holds no prompts.", hint='Write one {"prompt": "..."} per line.')
    return prompts


def answer_each(
    model,
    tokenizer,
    prompts: list[str],
    columns: list[str | None],
    sampling: Sampling,
    chat: bool = True,
    batch_size: int = 8,
):
    """Each prompt's row, {"prompt", "replies": {column: reply}}, as soon as every column has answered it (batch_size
    prompts at a time), so a long file's answers can be kept as they come. A column is an adapter's name, or None
    for the base model: loaded once, adapters switched by name."""
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        requests = [[{"role": "user", "content": p}] if chat else p for p in batch]
        rows = [{"prompt": prompt, "replies": {}} for prompt in batch]
        for name in columns:
            with answering_with(model, name):
                for row, reply in zip(rows, generate_replies(model, tokenizer, requests, sampling)):
                    row["replies"][name or "base"] = reply
        yield from rows


def answered_in(path: Path, columns: list[str]) -> Counter:
    """The prompts an answers file (generate --output) already holds answers to by these columns, counted (a prompt
    may be asked twice). A torn last line, from a run stopped mid-write, is dropped from the file."""
    if not path.exists():
        return Counter()
    if not path.is_file():
        raise UserError(f"--output {path} is not a file.", hint="Pass a .jsonl file name.")
    text = path.read_bytes().decode("utf-8", errors="replace")
    whole = text[: text.rfind("\n") + 1]
    if whole != text:
        write_atomically(path, whole)
    done = Counter()
    for number, line in enumerate(whole.splitlines(), start=1):
        try:
            row = json.loads(line)
            prompt, replies = row["prompt"], row["replies"]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path} line {number} is not an answer that generate wrote.",
                hint="Pass another --output (generate appends to it and skips the prompts it answers).",
            ) from None
        if sorted(replies) != sorted(columns):
            raise UserError(
                f"{path} holds answers by {', '.join(replies)}, and this run answers with {', '.join(columns)}.",
                hint="Pass another --output for these models.",
            )
        done[prompt] += 1
    return done


def not_yet_answered(prompts: list[str], done: Counter) -> list[str]:
    """The prompts left once those in `done` are taken out, each as many times as it was answered."""
    done, left = Counter(done), []
    for prompt in prompts:
        if done[prompt]:
            done[prompt] -= 1
        else:
            left.append(prompt)
    return left


def answers_table(rows: list[dict]):
    from rich.table import Table

    table = Table(show_lines=True)
    table.add_column("prompt", style="bold", ratio=1)
    for column in rows[0]["replies"]:
        table.add_column(column, ratio=2, style="green" if column != "base" else None)
    for row in rows:
        table.add_row(row["prompt"], *row["replies"].values())
    return table
