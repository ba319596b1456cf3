"""An Ollama Modelfile for an exported GGUF: the chat template translated to Ollama's Go template, stop tokens, and
the system prompt the training data used.

Ollama formats prompts with Go templates, not the Jinja chat templates transformers uses. Rather than parse Jinja,
the model's own template is rendered on marker conversations, and the text around each turn is read off: what opens
and closes a user turn, an answer, a system prompt, what comes before the first turn when there is no system prompt
(often a default one), and what opens the model's answer. Those pieces are written as a Go template, and kept only
if they rebuild the Jinja template's output exactly for every conversation shape tried.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.files import staged_file

SYSTEM, USER, ANSWER, USER_2 = "QKSYSTEMQK", "QKUSER1QK", "QKANSWER1QK", "QKUSER2QK"  # marker contents


@dataclass(frozen=True)
class ChatTurns:
    """A chat template as the text around each turn."""

    preamble: str  # before the first turn when no system prompt is given
    system: tuple[str, str] | None  # around a system prompt; None when the template takes none
    user: tuple[str, str]
    answer: tuple[str, str]  # around an answer already given
    answer_opening: str  # what add_generation_prompt adds: it opens the model's answer
    closing: str = ""  # what ends a conversation given whole (no answer to generate), as Phi-3's end-of-sequence
    system_in_first_turn: bool = False  # no system turn: system sits inside the first user turn, before its text

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The prompt these pieces make, as the Go template would: to check them against the Jinja template."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        folded = self.system_in_first_turn and system is not None
        own_turn = system is not None and self.system is not None and not folded
        text = self.system[0] + system + self.system[1] if own_turn else self.preamble
        for m in messages:
            if m["role"] == "user":
                opening = self.user[0] + (self.system[0] + system + self.system[1] if folded else "")
                folded = False
                text += opening + m["content"] + self.user[1]
            elif m["role"] == "assistant":
                text += self.answer[0] + m["content"] + self.answer[1]
        return text + (self.answer_opening if add_generation_prompt else self.closing)


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.index(end)]


def chat_turns(tokenizer) -> ChatTurns | None:
    """The pieces of tokenizer's chat template, or None when they do not rebuild it (a template with logic beyond
    fixed text around each turn, or none at all)."""

    def render(messages, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    user, answer = {"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}
    try:
        one, prompted = render([user]), render([user], True)
        shared = os.path.commonprefix([one, prompted])
        opening, closing = prompted[len(shared) :], one[len(shared) :]
        answered = render([user, answer]).removesuffix(closing)
        two = render([user, answer, {"role": "user", "content": USER_2}])
        user_close = shared[shared.index(USER) + len(USER) :]
        answer_close = answered[answered.index(ANSWER) + len(ANSWER) :]
        user_open = between(two, ANSWER, USER_2).removeprefix(answer_close)
        answer_open = between(two, USER, ANSWER).removeprefix(user_close)
        preamble = one[: one.index(USER)].removesuffix(user_open)
        folded = False
        try:
            with_system = render([{"role": "system", "content": SYSTEM}, user])
            system_text = with_system[: with_system.index(USER)].removesuffix(user_open)
            if with_system.startswith(preamble + user_open):  # Gemma's: no system turn, it opens the first user turn
                folded, system_text = True, with_system[len(preamble + user_open) : with_system.index(USER)]
            system = (system_text[: system_text.index(SYSTEM)], system_text[system_text.index(SYSTEM) + len(SYSTEM) :])
        except Exception:  # noqa: BLE001 - templates without a system role raise, or drop it
            system = None
    except Exception:  # noqa: BLE001 - no chat template, or one that does not place contents as given
        return None
    turns = ChatTurns(
        preamble,
        system,
        (user_open, user_close),
        (answer_open, answer_close),
        opening,
        closing,
        system_in_first_turn=folded,
    )
    return turns if rebuilds(turns, render) else None


def rebuilds(turns: ChatTurns, render) -> bool:
    """Whether the pieces make exactly what the Jinja template makes, for conversations of every shape."""
    user, answer = {"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}
    user_2, answer_2 = {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then this."}
    shapes = [[user], [user, answer], [user, answer, user_2], [user, answer, user_2, answer_2]]
    if turns.system:
        shapes += [[{"role": "system", "content": "Be brief."}, *shape] for shape in shapes]
    try:
        return all(
            turns.render(shape, prompt) == render(shape, prompt)
            for shape in shapes
            for prompt in (False, True)
            if not (prompt and shape[-1]["role"] == "assistant")
        )
    except Exception:  # noqa: BLE001 - the template refuses a shape (say, turns that must alternate)
        return False


def go_text(text: str) -> str:
    """Text placed literally in a Go template: its own braces would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(turns: ChatTurns, bos_token: str | None = None) -> str:
    """Ollama's TEMPLATE for these pieces: .System and .Messages as Ollama passes them. A bos_token is left out of the
    start: the model's GGUF has llama.cpp add it, and it must not come twice."""
    preamble, system_open = (
        piece.removeprefix(bos_token) if bos_token else piece
        for piece in (turns.preamble, turns.system[0] if turns.system else "")
    )
    answer_open, answer_close = (go_text(piece) for piece in turns.answer)
    user_open = go_text(turns.user[0])
    if turns.system and turns.system_in_first_turn:  # the system prompt goes into the first user turn, once
        system = go_text(preamble) + "{{ $system := .System }}"
        user_open += (
            "{{ if $system }}"
            + go_text(turns.system[0])
            + "{{ $system }}"
            + go_text(turns.system[1])
            + '{{ $system = "" }}{{ end }}'
        )
    elif turns.system:
        system = (
            "{{ if .System }}"
            + go_text(system_open)
            + "{{ .System }}"
            + go_text(turns.system[1])
            + "{{ else }}"
            + go_text(preamble)
            + "{{ end }}"
        )
    else:
        system = go_text(preamble)
    return (
        system
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "user" }}'
        + user_open
        + "{{ .Content }}"
        + go_text(turns.user[1])
        + "{{ if $last }}"
        + go_text(turns.answer_opening)
        + "{{ end }}"
        + '{{ else if eq .Role "assistant" }}'
        + answer_open
        + "{{ .Content }}"
        + "{{ if not $last }}"
        + answer_close
        + "{{ end }}"
        + "{{ end }}{{ end }}"
    )


def stop_words(turns: ChatTurns | None, tokenizer) -> list[str]:
    """What ends an answer: the end-of-sequence token, and what closes an answer in the template."""
    words = [tokenizer.eos_token] if tokenizer.eos_token else []
    if turns and turns.answer[1].strip() and turns.answer[1].strip() not in words:
        words.append(turns.answer[1].strip())
    return words


def training_system_prompt(adapter_dir: Path) -> str | None:
    """The system prompt every training conversation began with, when they all shared one."""
    from qlora_kit.data.dataset import read_records
    from qlora_kit.errors import UserError
    from qlora_kit.plan.recipes import load_recipe

    recipe_path = Path(adapter_dir).parent / "recipe.yaml"
    try:
        records = read_records(load_recipe(recipe_path).data, skip_bad_lines=True).records
    except (UserError, OSError):
        return None  # not a run folder, or its data has moved: nothing to say
    prompts = {
        r["messages"][0]["content"] if r.get("messages") and r["messages"][0]["role"] == "system" else None
        for r in records
    }
    return prompts.pop() if len(prompts) == 1 else None


def quoted(text: str) -> str:
    return '"""' + text + '"""'


def gguf_adds_bos(path: Path | None) -> bool:
    """Whether llama.cpp adds the beginning-of-sequence token itself for this GGUF."""
    import gguf

    if path is None or Path(path).suffix != ".gguf":
        return False
    fields = gguf.GGUFReader(path).fields
    if "tokenizer.ggml.add_bos_token" in fields:
        return bool(fields["tokenizer.ggml.add_bos_token"].contents())
    # Left unsaid, llama.cpp adds it for SentencePiece vocabularies and Llama 3's.
    model, pre = (
        fields[key].contents() if key in fields else None for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
    )
    return model == "llama" or pre == "llama-bpe"


def model_name(name: str) -> str:
    """A name `ollama create` accepts for a run's model: lower case letters, digits, `.`, `_` and `-`."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "my-model"


def write_modelfile(
    folder: Path, from_: str, adapter: str | None, tokenizer, system: str | None, adds_bos: bool
) -> tuple[Path, bool]:
    """Write folder/Modelfile; returns it and whether the chat template could be written as a TEMPLATE. adds_bos:
    the GGUF has llama.cpp add the beginning-of-sequence token, so the template must not."""
    turns = chat_turns(tokenizer)
    template = go_template(turns, tokenizer.bos_token if adds_bos else None) if turns else None
    if template and '"""' in template:
        template = None
    lines = ["# Written by qlora-kit export. Create the model: ollama create NAME -f Modelfile", f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template:
        lines.append(f"TEMPLATE {quoted(template)}")
    lines += [f'PARAMETER stop "{word}"' for word in stop_words(turns, tokenizer) if '"' not in word]
    if system and '"""' not in system:
        lines.append(f"SYSTEM {quoted(system)}")
    modelfile = Path(folder) / "Modelfile"
    with staged_file(modelfile) as staging:  # whole or absent, never a link followed
        staging.write_text("\n".join(lines) + "\n")
    return modelfile, template is not None
