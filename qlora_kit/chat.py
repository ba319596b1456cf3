"""Talking to adapters: `qlora-kit chat` (interactive, replies streamed as they come) and `generate` (one prompt or a
file of them, with --compare to put the base model's answers beside the adapters'). The 4-bit base is loaded once
and adapters are switched by name.

Commands inside the chat: /reset, /system TEXT, /adapter NAME, /base, /adapters, /help, /quit (or Ctrl-D).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rich.console import Console

from qlora_kit.adapter import Sampling, answering_with, generate_replies, generate_reply
from qlora_kit.errors import UserError

HELP = ("/reset forgets the conversation - /system TEXT sets the system prompt (/system alone clears it) - "
        "/adapter NAME switches adapter - /base answers without one - /adapters lists them - /quit")


def run_chat(model, tokenizer, names: list[str], console: Console, sampling: Sampling, read_line=None,
             system: str | None = None) -> list[dict]:
    """The chat loop until /quit or end of input; returns the conversation (for tests and transcripts)."""
    read_line = read_line or (lambda: console.input("[bold cyan]you>[/] "))
    messages: list[dict] = []
    active = names[0] if names else None
    console.print(f"Chatting with {'adapter ' + active if active else 'the base model'}. {HELP}", highlight=False)
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            break
        if not line:
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


def stream_reply(model, tokenizer, messages: list[dict], sampling: Sampling, console: Console, adapter: str | None = None) -> str:
    """Generate with `adapter` (None: the base model) on a worker thread and print the text as it arrives; returns
    the whole reply."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work() -> None:
        try:
            with answering_with(model, adapter):
                result["reply"] = generate_reply(model, tokenizer, messages, sampling, streamer)
        except BaseException as e:  # surfaced on the main thread below; the streamer must still end
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    console.print("[bold green]model>[/] ", end="")
    for piece in streamer:
        console.print(piece, end="", markup=False, highlight=False)
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
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg}).", hint='Write one {"prompt": "..."} per line.') from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path} line {number}: no non-empty `prompt` string.", hint='Write one {"prompt": "..."} per line.')
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"{path} holds no prompts.", hint='Write one {"prompt": "..."} per line.')
    return prompts


def answer_all(model, tokenizer, prompts: list[str], columns: list[str | None], sampling: Sampling, chat: bool = True,
               batch_size: int = 8) -> list[dict]:
    """Every prompt answered by every column: an adapter's name, or None for the base model, batch_size prompts
    at a time. The base is loaded once; switching adapters is peft's set_adapter."""
    requests = [[{"role": "user", "content": p}] if chat else p for p in prompts]
    rows = [{"prompt": prompt, "replies": {}} for prompt in prompts]
    for name in columns:
        with answering_with(model, name):
            for start in range(0, len(requests), batch_size):
                replies = generate_replies(model, tokenizer, requests[start:start + batch_size], sampling)
                for row, reply in zip(rows[start:start + batch_size], replies):
                    row["replies"][name or "base"] = reply
    return rows


def answers_table(rows: list[dict]):
    from rich.table import Table

    table = Table(show_lines=True)
    table.add_column("prompt", style="bold", ratio=1)
    for column in rows[0]["replies"]:
        table.add_column(column, ratio=2, style="green" if column != "base" else None)
    for row in rows:
        table.add_row(row["prompt"], *row["replies"].values())
    return table
