"""The `qlora-kit` command: one thin function per verb; user mistakes become one sentence and a hint."""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from qlora_kit.errors import UserError

app = typer.Typer(
    help="QLoRA fine-tuning for small GPUs: train a 4-bit base with LoRA and get a small PEFT adapter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's tables cut flag names short on an 80-column terminal
)
console = Console()
errors = Console(stderr=True)


def _quiet_libraries() -> None:
    # Library progress bars and advisories would bury our own output; errors still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|activation_checkpointing|use_cache).*")
    # peft's advice is to library authors (fan_in_fan_out, merging into 4-bit weights): qlora-kit handles each case
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft(\.|$)")
    # peft 0.21 checks rank_pattern against target_modules only: an expert's rank (a target parameter) is applied
    warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")


NAME = typer.Option(
    None, "--name", help="Run name: the run goes to runs/NAME (letters, digits, . _ -).", show_default=False
)
RESUME = typer.Option(
    False, "--resume", help="Continue the run in --out from its last good checkpoint, exactly where it stopped."
)
OVERWRITE = typer.Option(
    False, "--overwrite", help="Start again in a run folder that holds a run, deleting that run's files."
)
REPORT_TO = typer.Option(
    None,
    "--report-to",
    metavar="TRACKER[,TRACKER]",
    help="Also log each step to tensorboard, wandb, trackio or mlflow "
    '(each an extra: pip install "qlora-kit[wandb]"); several: --report-to tensorboard,wandb.',
)
REVISION = typer.Option(
    None, "--revision", help="A branch, tag or commit of a hub --model; the same as MODEL@REVISION."
)
GPUS = typer.Option(
    1, "--gpus", min=1, help="Train data parallel on this many GPUs (one process each, through torchrun)."
)
TRUST_REMOTE_CODE = typer.Option(
    False,
    "--trust-remote-code",
    help="Allow a model's own Python code (from its folder or the hub) to run. Off by default: only for sources you trust.",
)
VRAM_LIMIT = typer.Option(
    None,
    "--vram-limit",
    help="Use at most this many GB of the GPU, e.g. to leave room for other "
    "programs: the run is planned for that much and torch is held to it.",
)
PLAIN = typer.Option(False, "--plain", help="Print a compact line every few steps instead of the live dashboard.")
QUIET = typer.Option(False, "--quiet", help="Print nothing but the final summary (and errors).")
JSON = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")
DATA_HELP = (
    "Training data: a .jsonl (or .json, .parquet, .csv) file of examples in one format: text, prompt/completion, "
    "alpaca, chat messages or sharegpt conversations; or a hub dataset, ORG/NAME (its --data-split) or "
    "ORG/NAME:FILE.jsonl."
)
DOES_NOT_FIT = 3  # plan's exit status when the run would not fit (1 is an error, 2 a usage mistake)


def _show(as_json: bool, value) -> None:
    """Print a plan or probe: its to_dict() as JSON for scripts, else its rich rendering for people."""
    if as_json:
        print(json.dumps(value.to_dict(), indent=2))
    else:
        console.print(value.render())


def _run_console(plain: bool, quiet: bool) -> tuple[Console, str]:
    """The console a run prints to and its dashboard mode: live, plain lines, or silent until the summary."""
    if quiet:
        return Console(quiet=True), "quiet"
    return console, "plain" if plain else "auto"


def with_recipe_flags(only: tuple[str, ...] | None = None):
    """Give a command a flag for each Recipe setting (or only those named), made from the field's name, type, help
    line, choices and aliases, so a new setting needs no edit here. The command receives the flags given as its
    `settings` parameter, a dict, and lists them in --help where that parameter stands."""
    from qlora_kit.plan.recipes import Recipe, setting_type

    fields = [f for f in dataclasses.fields(Recipe) if only is None or f.name in only]

    def flag(f: dataclasses.Field) -> inspect.Parameter:
        name = "--" + f.name.replace("_", "-")
        names = [f"{name}/--no-{name[2:]}" if setting_type(f) is bool else name, *f.metadata["aliases"]]
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        default = f" [default: {shown}]" if f.default is not None else ""
        option = typer.Option(
            None,
            *names,
            help=f.metadata["help"][0].upper() + f.metadata["help"][1:] + "." + default,
            show_default=False,
        )
        # Choices as an Enum, which typer offers as click.Choice: a wrong value is a usage error listing the right ones.
        kind = (
            enum.Enum(f.name, {c: c for c in f.metadata["choices"]}, type=str)
            if f.metadata["choices"]
            else setting_type(f)
        )
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])

    def old_flag(f: dataclasses.Field) -> inspect.Parameter:
        return inspect.Parameter(
            f"{f.name}_old_flag",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[setting_type(f)],
            default=typer.Option(None, f.metadata["old_flag"], hidden=True),
        )

    def decorate(command):
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        at = [p.name for p in own].index("settings")
        flags = [flag(f) for f in fields] + [old_flag(f) for f in fields if f.metadata["old_flag"]]
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at] + flags + own[at + 1 :]]

        @functools.wraps(command)
        def with_settings(**given):
            settings = {}
            for f in fields:
                value, old = given.pop(f.name), given.pop(f"{f.name}_old_flag", None)
                if old is not None:
                    errors.print(
                        f"{f.metadata['old_flag'].split('/')[0]} is now --{f.name.replace('_', '-')}; the old name "
                        "still works.",
                        style="yellow",
                    )
                    value = old if value is None else value
                if value is not None:
                    settings[f.name] = getattr(value, "value", value)
            return command(**given, settings=settings)

        with_settings.__signature__ = inspect.Signature(parameters)  # what typer reads the options from
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings

    return decorate


@app.command()
@with_recipe_flags()
def train(
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run folder, e.g. runs/my-run (must not hold a run, unless --resume or --overwrite)."
    ),
    name: Optional[str] = NAME,
    settings: dict = None,
    resume: bool = RESUME,
    allow_changed_data: bool = typer.Option(
        False,
        "--allow-changed-data",
        help="With --resume: go on although the data file's content changed since the checkpoint.",
    ),
    overwrite: bool = OVERWRITE,
    force: bool = typer.Option(
        False, "--force", help="Start a CPU run although its plan says it does not fit in free RAM."
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    gpus: int = GPUS,
    vram_limit: Optional[float] = VRAM_LIMIT,
    report_to: Optional[list[str]] = REPORT_TO,
    revision: Optional[str] = REVISION,
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="Recipe to start from: a shipped one (4gb ... 24gb, cpu) or a YAML file; flags override it.",
    ),
    plain: bool = PLAIN,
    quiet: bool = QUIET,
) -> None:
    """Fine-tune a 4-bit base model with LoRA. Writes runs/NAME/adapter; --resume continues a stopped run."""
    from qlora_kit.plan.recipes import Recipe, load_recipe, with_overrides
    from qlora_kit.train.run import RunOptions, run_training
    from qlora_kit.train.run_folder import recipe_of_run
    from qlora_kit.train.trackers import parse_report_to

    trackers = parse_report_to(report_to)
    if resume and settings.get("init_adapter"):
        raise UserError(
            "--from-adapter starts a new run from an adapter's weights; --resume continues this run from "
            "its own checkpoints.",
            hint="Use one: --resume with only --out, or --from-adapter with a new --out.",
        )
    _launch_if_several(gpus)
    out = _run_dir(out, name)
    base = load_recipe(recipe) if recipe else recipe_of_run(out) if resume else Recipe()
    if revision:
        settings["model"] = _at_revision(settings.get("model") or base.model, revision)
    run_console, mode = _run_console(plain, quiet)
    summary = run_training(
        with_overrides(base, **settings),
        out,
        run_console,
        RunOptions(
            display=mode,
            resume=resume,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            allow_changed_data=allow_changed_data,
            force=force,
            vram_limit=vram_limit,
            report_to=trackers,
        ),
    )
    print_summary(summary)


def print_summary(summary) -> None:
    """The end-of-run table: steps, time, tokens, losses, peak memory against the plan, and the adapter. A run
    stopped by a signal exits with 128 + its number (130 for Ctrl-C, 143 for SIGTERM), as shells expect."""
    from qlora_kit.train.dashboard import print_summary as print_table

    if summary.rank == 0:
        print_table(console, summary, summary.info)
    if summary.stopped_by:
        raise typer.Exit(128 + summary.stopped_by)


def _launch_if_several(gpus: int) -> None:
    """With --gpus N > 1 (and not yet under torchrun), re-run this command as N torchrun processes."""
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        from qlora_kit.train.distributed import launch, without_gpus_flag

        launch(gpus, without_gpus_flag(sys.argv[1:]))


def _run_dir(out: Optional[Path], name: Optional[str], default: str | None = None) -> Path:
    """--out as given, or runs/NAME for --name (a plain name: it cannot point outside runs/)."""
    from qlora_kit.train.run_folder import named_run_dir, next_free_run_dir

    if out and name:
        raise UserError("--out and --name both say where the run goes.", hint="Pass one of them.")
    if out:
        return out
    if name:
        return named_run_dir(name)
    if default:
        return next_free_run_dir(Path("runs"), default)
    raise UserError("Say where the run goes.", hint="Pass --out runs/my-run, or --name my-run.")


def _at_revision(model: str | None, revision: str | None) -> str | None:
    """--model with --revision, spelled as the rest of qlora-kit (and recipe.yaml) names a revision: MODEL@REVISION."""
    from qlora_kit.probe.sources import hub_id_of, path_exists

    if not revision:
        return model
    if not model:
        raise UserError(
            "--revision names a revision of the --model, and no --model was given.", hint="Pass --model ORG/NAME."
        )
    if "@" in model:
        raise UserError(
            f"--model {model} names a revision already, and --revision names {revision}.", hint="Pass one of them."
        )
    if path_exists(Path(model).expanduser()) or not hub_id_of(model):
        raise UserError(
            f"--revision applies to a model on the hub, and {model} is not a hub id.",
            hint="Drop --revision, or pass the model as ORG/NAME.",
        )
    return f"{model}@{revision}"


def _adapters_in(value):
    """--adapter runs/NAME means the adapter that run wrote, runs/NAME/adapter."""
    from qlora_kit.probe.sources import adapter_in

    return value if value is None else [adapter_in(v) for v in value] if isinstance(value, list) else adapter_in(value)


ADAPTERS = typer.Option(
    None,
    "--adapter",
    "-a",
    callback=_adapters_in,
    help="Adapter folder, e.g. runs/NAME/adapter (or the run, runs/NAME); repeat it to load several on one base.",
)
BASE_MODEL = typer.Option(None, "--model", "-m", help="Base model; defaults to the one the adapter was trained on.")


def _sampling_options(temperature: float, top_p: float):
    """--temperature and --top-p with a command's own defaults (greedy for generate, varied for chat)."""
    return (
        typer.Option(temperature, "--temperature", min=0.0, help="0 = greedy (repeatable); higher = more varied."),
        typer.Option(
            top_p,
            "--top-p",
            min=0.0,
            max=1.0,
            help="Sample only from the most likely tokens holding this much probability.",
        ),
    )


def _check_adapters(adapters: Optional[list[Path]]) -> None:
    """Say at once when an --adapter is missing or incomplete, before the seconds that loading libraries takes."""
    from qlora_kit.probe.sources import check_adapter_folder

    for adapter in adapters or []:
        check_adapter_folder(adapter)


GENERATE_TEMPERATURE, GENERATE_TOP_P = _sampling_options(0.0, 1.0)
CHAT_TEMPERATURE, CHAT_TOP_P = _sampling_options(0.7, 0.9)


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What to ask the model."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help='Many prompts: a .jsonl file with {"prompt": "..."} per line.'
    ),
    output: Optional[Path] = typer.Option(
        None,
        "--output",
        help="With --file: append each answer to this .jsonl file as "
        "soon as it is made; prompts it already answers are skipped, so an "
        "interrupted run goes on where it stopped.",
    ),
    adapter: Optional[list[Path]] = ADAPTERS,
    model: Optional[str] = BASE_MODEL,
    compare: bool = typer.Option(False, "--compare", help="Also answer with the base model, side by side."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest reply in tokens."),
    temperature: float = GENERATE_TEMPERATURE,
    top_p: float = GENERATE_TOP_P,
    raw: bool = typer.Option(False, help="Send the prompt as plain text instead of through the chat template."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per prompt, as it is answered: the prompt and each model's reply."
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Answer prompts with a base model and its adapters. One prompt, or a file of them, side by side."""
    _check_adapters(adapter)
    from qlora_kit.adapter.folder import Sampling, load_with_adapters
    from qlora_kit.inference.chat import answers_table, read_prompts
    from qlora_kit.text import printable

    if (prompt is None) == (file is None):
        raise UserError(
            "Give either --prompt or --file.", hint='qlora-kit generate --adapter runs/NAME/adapter --prompt "Hello"'
        )
    if output and not file:
        raise UserError(
            "--output keeps the answers to a --file of prompts.", hint="Add --file PROMPTS.jsonl, or drop --output."
        )
    prompts = read_prompts(file) if file else [prompt]
    with console.status("Loading the model in 4-bit ..."):
        lm, tokenizer, names = load_with_adapters(model, adapter or [], trust_remote_code=trust_remote_code)
    columns = ([None] if compare or not names else []) + names
    if output:
        prompts = _not_yet_answered_in(output, prompts, columns)
    sampling = Sampling(temperature, top_p, max_new_tokens)
    rows = _answer_all(lm, tokenizer, prompts, columns, sampling, not raw, output, as_json)
    if as_json or not rows:
        return
    if output:
        console.print(f"Wrote {len(rows)} answers to {printable(output)}.", highlight=False, soft_wrap=True)
    elif len(rows) == 1 and len(columns) == 1:
        console.print(next(iter(rows[0]["replies"].values())), highlight=False, markup=False)
    else:
        console.print(answers_table(rows))


def _not_yet_answered_in(output: Path, prompts: list, columns: list) -> list:
    """The prompts whose answers --output does not hold yet, saying how many it holds."""
    from qlora_kit.inference.chat import answered_in, not_yet_answered
    from qlora_kit.text import printable

    pending = not_yet_answered(prompts, answered_in(output, [name or "base" for name in columns]))
    if len(pending) < len(prompts):
        console.print(
            f"{printable(output)} answers {len(prompts) - len(pending)} of the {len(prompts)} prompts "
            f"already; answering the other {len(pending)}.",
            highlight=False,
        )
    return pending


def _answer_all(lm, tokenizer, prompts, columns, sampling, chat: bool, output: Path | None, as_json: bool) -> list:
    """Every prompt's answers, each appended to output (and printed with as_json) as it is made; Ctrl-C ends
    the command with what was answered kept."""
    from qlora_kit.files import open_for_appending
    from qlora_kit.inference.chat import answer_each, answers_table
    from qlora_kit.text import printable

    rows, sink = [], open_for_appending(output) if output else None
    try:
        with console.status(f"Answering {len(prompts)} prompt{'s' * (len(prompts) != 1)} ...") as status:
            for row in answer_each(lm, tokenizer, prompts, columns, sampling, chat=chat):
                if sink:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()  # an interrupted run keeps every answer it finished
                rows.append(row)
                if as_json:
                    print(json.dumps(row), flush=True)
                status.update(f"Answered {len(rows)} of {len(prompts)} prompts ...")
    except KeyboardInterrupt:
        kept = (
            f"; their answers are in {printable(output)}: run the same command again to answer the rest"
            if output
            else ""
        )
        errors.print(
            f"Stopped after {len(rows)} of {len(prompts)} prompts{kept}.", highlight=False, markup=False, soft_wrap=True
        )
        if rows and not as_json and not output:
            console.print(answers_table(rows))
        raise typer.Exit(130) from None
    finally:
        if sink:
            sink.close()
    return rows


@app.command()
def chat(
    adapter: Optional[list[Path]] = ADAPTERS,
    model: Optional[str] = BASE_MODEL,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt to start with (/system changes it)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest reply in tokens."),
    temperature: float = CHAT_TEMPERATURE,
    top_p: float = CHAT_TOP_P,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Chat with the 4-bit base and its adapters. Replies stream as they are generated."""
    _check_adapters(adapter)
    from qlora_kit.adapter.folder import Sampling, load_with_adapters
    from qlora_kit.inference.chat import run_chat

    with console.status("Loading the model in 4-bit ..."):
        lm, tokenizer, names = load_with_adapters(model, adapter or [], trust_remote_code=trust_remote_code)
    run_chat(lm, tokenizer, names, console, Sampling(temperature, top_p, max_new_tokens), system=system)


@app.command("eval")
def eval_command(
    data: Path = typer.Option(..., "--data", "-d", help="Held-out data, in any format train reads."),
    adapter: Optional[Path] = typer.Option(
        None,
        "--adapter",
        "-a",
        callback=_adapters_in,
        help="Adapter folder (or its run's); without it only the base is evaluated.",
    ),
    model: Optional[str] = BASE_MODEL,
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", min=8, help="Truncate examples to this many tokens [default: the adapter's run, else 512]."
    ),
    micro_batch: int = typer.Option(4, "--micro-batch", min=1, help="Examples per forward pass."),
    train_on_inputs: Optional[bool] = typer.Option(
        None,
        "--train-on-inputs/--no-train-on-inputs",
        show_default=False,
        help="Score prompts and user turns too [default: as the adapter's run did].",
    ),
    as_json: bool = JSON,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Loss and perplexity on held-out data. The base model beside base + adapter, masked as in training."""
    _check_adapters([adapter] if adapter else None)
    from qlora_kit.inference.evaluation import run_eval

    with console.status("Loading the model in 4-bit and evaluating ..."):
        result = run_eval(model, adapter, data, seq_len, micro_batch, train_on_inputs, trust_remote_code)
    _show(as_json, result)


@app.command()
def merge(
    adapter: Path = typer.Option(
        ..., "--adapter", "-a", callback=_adapters_in, help="Adapter folder, e.g. runs/NAME/adapter (or runs/NAME)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="New folder for the merged model (safetensors, config, tokenizer)."
    ),
    model: Optional[str] = BASE_MODEL,
    dtype: str = typer.Option("bf16", "--dtype", help="Precision of the merged weights: bf16, fp16 or fp32."),
    from_quantized: bool = typer.Option(
        False,
        "--from-quantized",
        help="Merge into the dequantized 4-bit base (no 16-bit reload; every weight keeps NF4's rounding error).",
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Fold an adapter into its base model. Writes a standalone model folder that plain transformers loads."""
    _check_adapters([adapter])
    from qlora_kit.export.merge import merge_adapter
    from qlora_kit.text import printable

    with console.status("Merging on the CPU ..."):
        written = merge_adapter(model, adapter, out, dtype, from_quantized, trust_remote_code)
    console.print(
        f'Merged model written to {printable(written)}: AutoModelForCausalLM.from_pretrained("{printable(written)}") '
        "loads it.",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if from_quantized:
        console.print(
            "[yellow]Merged into the dequantized 4-bit weights: it reproduces the model as trained, but every "
            "weight keeps NF4's rounding error (about 4 bits of precision) against the original base.[/]"
        )


class ExportFormat(str, enum.Enum):
    gguf_adapter = "gguf-adapter"
    gguf = "gguf"


@app.command()
def export(
    adapter: Optional[Path] = typer.Option(
        None,
        "--adapter",
        "-a",
        callback=_adapters_in,
        help="Adapter folder, e.g. runs/NAME/adapter (or runs/NAME). Without it, --format gguf --model M exports the base model alone (a base for GGUF adapters).",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="The .gguf file to write [default: beside the adapter: runs/NAME/adapter.gguf, or runs/NAME/NAME-QUANT.gguf merged].",
    ),
    export_format: ExportFormat = typer.Option(
        ExportFormat.gguf_adapter,
        "--format",
        help="gguf-adapter: the LoRA weights alone (a few MB), for llama.cpp --lora, Ollama's ADAPTER and LM Studio on any GGUF of the same base. gguf: base + adapter merged into one standalone model, tokenizer and chat template inside.",
    ),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        help="With --format gguf: f32, f16 (default), bf16 or q8_0 (written here), or q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer, the [export] extra).",
    ),
    ollama: bool = typer.Option(
        False,
        "--ollama",
        help="Also write an Ollama Modelfile beside the file: FROM, ADAPTER, the chat template as a TEMPLATE, stop tokens and the training data's system prompt.",
    ),
    model: Optional[str] = BASE_MODEL,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the .gguf file (and Modelfile) if they exist."),
) -> None:
    """Export an adapter as GGUF, for llama.cpp, Ollama and LM Studio: alone (small, on a GGUF of its base) or merged."""
    from qlora_kit.adapter.folder import base_source_for
    from qlora_kit.export.gguf import run_name_of
    from qlora_kit.export.ollama import model_name
    from qlora_kit.files import check_can_replace, only_writer
    from qlora_kit.probe.sources import resolve_model
    from qlora_kit.text import shown_path

    quant = _check_export_flags(adapter, export_format, model, quant)
    source = model or base_source_for(adapter)
    name = run_name_of(adapter) if adapter else resolve_model(source).name
    merged = export_format is ExportFormat.gguf
    if merged:
        quant = quant or "f16"
        target = out or (adapter.parent if adapter else Path(".")) / f"{name}-{quant}.gguf"
    else:
        target = out or adapter.with_name(adapter.name + ".gguf")
    check_can_replace(target, overwrite)  # before any work: a merged export of a large model takes minutes
    if ollama:
        check_can_replace(target.parent / "Modelfile", overwrite, flag="Modelfile at")
    say = lambda sentence: console.print(sentence, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    with only_writer(target, "exporting to"):
        if merged:
            written, from_, lora = _export_merged(adapter, target, model, quant, say)
        else:
            written, from_, lora = _export_adapter_alone(adapter, target, model, source, say)
        name = model_name(name)  # as `ollama create` takes it
        if not ollama:
            console.print(
                f"  Ollama:     qlora-kit export ... --ollama writes the Modelfile for `ollama create {name}`",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            return
        modelfile, templated = _write_modelfile_beside(written, from_, lora, adapter, source)
    console.print(
        f"  Ollama:     ollama create {name} -f {shown_path(modelfile)}   then   ollama run {name}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if not templated:
        console.print(
            "[yellow]The chat template has logic beyond fixed text around each turn, so the Modelfile has no "
            "TEMPLATE: Ollama reads the template inside the GGUF.[/]",
            highlight=False,
        )


def _check_export_flags(adapter: Path | None, export_format: ExportFormat, model: str | None, quant: str | None):
    """Refuse what export cannot do before any work; returns the quantization asked for, lower-cased."""
    if adapter is None and (export_format is not ExportFormat.gguf or model is None):
        raise UserError(
            "Give the --adapter to export.",
            hint="qlora-kit export --adapter runs/NAME/adapter; or the base "
            "alone: qlora-kit export --format gguf --model BASE.",
        )
    quant = quant.lower() if quant else None
    if quant and export_format is ExportFormat.gguf_adapter:
        raise UserError(
            "--quant applies to --format gguf: an adapter GGUF keeps its LoRA matrices in f32 (a few MB), "
            "and llama.cpp applies them to a base of any quantization.",
            hint=f"Quantize the merged model: --format gguf --quant {quant}.",
        )
    _check_adapters([adapter] if adapter else [])
    return quant


def _export_merged(adapter: Path | None, target: Path, model: str | None, quant: str, say) -> tuple[Path, str, None]:
    """Base and adapter merged into one GGUF (or the base alone); returns it and how a Modelfile names it."""
    from qlora_kit.export.gguf import export_merged_gguf
    from qlora_kit.text import printable, shown_path

    with console.status(f"{'Merging and writing' if adapter else 'Writing'} {target} ..."):
        written = export_merged_gguf(adapter, target, model, quant, say=say)
    console.print(
        f"Wrote {printable(written)} ({written.stat().st_size / 2**20:,.1f} MiB), "
        f"{'base + adapter merged' if adapter else 'the base model'}, with its tokenizer and chat "
        f"template:\n  llama.cpp:  llama-cli -m {shown_path(written)} -cnv",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return written, f"./{written.name}", None


def _export_adapter_alone(adapter: Path, target: Path, model: str | None, source: str, say) -> tuple[Path, str, str]:
    """The LoRA weights alone as a GGUF adapter; returns it and how a Modelfile names the base and the adapter."""
    from qlora_kit.export.gguf import export_gguf_adapter
    from qlora_kit.probe.sources import gguf_file_of, resolve_model
    from qlora_kit.text import printable, shown_path

    with console.status(f"Writing {target} ..."):
        written = export_gguf_adapter(adapter, target, model, say=say)
    base = gguf_file_of(source)  # a GGUF of the base, when qlora-kit knows one
    console.print(
        f"Wrote {printable(written)} ({written.stat().st_size / 2**20:.2f} MiB), a LoRA adapter in GGUF. Use it on "
        f"a GGUF of the same base model, quantized or not:\n  llama.cpp:  llama-cli -m "
        f"{shown_path(base) if base else 'BASE.gguf'} --lora {shown_path(written)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    # Ollama reads FROM relative to the Modelfile; the base's absolute path holds from anywhere.
    return written, str((base or resolve_model(source)).absolute()), f"./{written.name}"


def _write_modelfile_beside(written: Path, from_: str, lora: str | None, adapter: Path | None, source: str):
    """An Ollama Modelfile beside the GGUF written; returns it and whether it holds the chat template."""
    from transformers import AutoTokenizer

    from qlora_kit.adapter.folder import tokenizer_folder
    from qlora_kit.export.ollama import gguf_adds_bos, training_system_prompt, write_modelfile
    from qlora_kit.probe.sources import gguf_file_of, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(adapter, resolve_model(source)))
    system = training_system_prompt(adapter) if adapter else None
    adds_bos = gguf_adds_bos(written if lora is None else gguf_file_of(source))
    return write_modelfile(written.parent, from_, lora, tokenizer, system, adds_bos)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run folder. [default: runs/demo, or the next free runs/demo-N]"
    ),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (fewer = faster, weaker effect)."),
    plain: bool = PLAIN,
) -> None:
    """Offline demo: teach SmolLM2-135M to talk like a pirate. A few minutes on a CPU; then compares answers."""
    from qlora_kit.cli.demo import run_demo

    run_demo(out, steps, console, display="plain" if plain else "auto")


@app.command()
@with_recipe_flags(
    only=(
        "steps",
        "epochs",
        "method",
        "beta",
        "reference",
        "target_modules",
        "use_rslora",
        "use_dora",
        "lora_init",
        "init_adapter",
        "data_split",
        "data_config",
        "chat_template_kwargs",
    )
)
def auto(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Base model: catalogue name, hub id (ORG/NAME or ORG/NAME@REVISION), local folder, .gguf file, or smollm2-135m.",
    ),
    data: Path = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run folder. [default: runs/auto, or the next free runs/auto-N]"
    ),
    name: Optional[str] = NAME,
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out (or --name) from its last good checkpoint, with the settings it chose.",
    ),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    gpus: int = GPUS,
    vram_limit: Optional[float] = VRAM_LIMIT,
    gpu: Optional[str] = typer.Option(
        None,
        "--gpu",
        help="Choose for a catalogued card instead of this machine's: with "
        "--dry-run, to see the choice; on a larger GPU, a run held to that card's memory.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the choice and stop before loading the model."),
    report_to: Optional[list[str]] = REPORT_TO,
    revision: Optional[str] = REVISION,
    plain: bool = PLAIN,
    quiet: bool = QUIET,
    settings: dict = None,
) -> None:
    """Choose settings for this card and data, then train. Probes, plans, picks and tunes a recipe, and explains it."""
    from qlora_kit.cli.auto import run_auto
    from qlora_kit.train.run import RunOptions, run_training
    from qlora_kit.train.run_folder import recipe_of_run
    from qlora_kit.train.trackers import parse_report_to

    trackers = parse_report_to(report_to)
    model = _at_revision(model, revision)
    if not dry_run:
        _launch_if_several(gpus)
    run_console, mode = _run_console(plain, quiet)
    if resume:  # the choice was made and saved when the run started: continue it as it is
        out = _run_dir(out, name)
        print_summary(
            run_training(
                recipe_of_run(out),
                out,
                run_console,
                RunOptions(display=mode, resume=True, trust_remote_code=trust_remote_code, report_to=trackers),
            )
        )
        return
    out = _run_dir(out, name, default="auto")
    summary = run_auto(
        model,
        data,
        out,
        run_console,
        vram_limit=vram_limit,
        gpu=gpu,
        dry_run=dry_run,
        display=mode,
        trust_remote_code=trust_remote_code,
        gpus=gpus,
        report_to=trackers,
        **settings,
    )
    if not dry_run:
        print_summary(summary)


@app.command()
def probe(as_json: bool = JSON) -> None:
    """Show what qlora-kit will train with. GPUs, memory, disk and library versions."""
    from qlora_kit.probe.hardware import probe as probe_machine

    _show(as_json, probe_machine())


@app.command()
@with_recipe_flags(
    only=(
        "method",
        "reference",
        "init_adapter",
        "seq_len",
        "micro_batch",
        "grad_accum",
        "rank",
        "target_modules",
        "use_dora",
        "gradient_checkpointing",
        "uncheckpointed_layers",
        "activation_offload",
        "precision",
        "optimizer",
        "loss_chunk_tokens",
    )
)
def plan(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Catalogue name (gemma-2b), hub id (ORG/NAME[@REVISION]: its config.json alone is fetched), model folder or .gguf file.",
    ),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", help="Recipe whose settings to plan: a shipped one (8gb) or a YAML file."
    ),
    settings: dict = None,
    gpu: Optional[str] = typer.Option(None, "--gpu", help='Plan for a catalogued card, e.g. "RTX 3060" or "T4".'),
    vram: Optional[float] = typer.Option(None, "--vram", help="Plan for a card with this many GB."),
    compare_full: bool = typer.Option(
        False, "--compare-full", help="Also show 16-bit LoRA and full fine-tuning totals."
    ),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Plan per GPU for this many GPUs of that kind."),
    strategy: str = typer.Option(
        "ddp",
        "--strategy",
        help="With --gpus: ddp (a whole model per GPU), fsdp (weights sharded) or fsdp_offload (shards in host RAM).",
    ),
    revision: Optional[str] = REVISION,
    as_json: bool = JSON,
) -> None:
    """Estimate peak memory before loading anything. Per component; says what fits and how to make it fit.
    Exits with 3 when it does not fit, so a script can ask before it trains."""
    from qlora_kit.objectives.preference import check_reference_fits_method
    from qlora_kit.plan.planner import plan_for_layout
    from qlora_kit.plan.recipes import Recipe, load_recipe, with_overrides
    from qlora_kit.probe.hub import download_note
    from qlora_kit.probe.sources import hub_id_of, path_exists

    model = _at_revision(model, revision)
    settings = with_overrides(load_recipe(recipe) if recipe else Recipe(), **settings)
    check_reference_fits_method(settings)
    if settings.init_adapter:  # its rank, layers and variant, read from its config: nothing is loaded
        from qlora_kit.model.load import settings_from_adapter

        settings = settings_from_adapter(settings)
    report = plan_for_layout(model, settings, gpu, vram, gpus, strategy, compare=compare_full)
    hub_id = hub_id_of(model) if not path_exists(Path(model).expanduser()) else None
    note = hub_id and download_note(hub_id)
    if note:
        report.plan.notes.append(note)
    _show(as_json, report)
    if report.plan.verdict == "does not fit":
        raise typer.Exit(DOES_NOT_FIT)


@app.command()
def report(
    runs: list[Path] = typer.Argument(
        ..., help="One or more run folders, e.g. runs/first runs/second (overlaid in the plot)."
    ),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Also write loss and memory over steps to this PNG (needs matplotlib)."
    ),
) -> None:
    """Summarise finished or running runs, and plot them."""
    from qlora_kit.text import printable
    from qlora_kit.train.report import load_run, png_path, summary_table, write_png

    png = png_path(png) if png else None  # a name it cannot write is refused before the runs are read
    loaded = [load_run(folder) for folder in runs]
    for run in loaded:
        console.print(summary_table(run))
    if png:
        console.print(
            f"Plot written to {printable(write_png(loaded, png))}", highlight=False, markup=False, soft_wrap=True
        )


@app.command()
def push(
    run: Path = typer.Argument(..., help="A run folder, e.g. runs/first (its adapter is what goes up)."),
    repo: str = typer.Option(
        ..., "--repo", help="The hub repo to push to, USER/NAME or ORG/NAME; made if it does not exist."
    ),
    private: bool = typer.Option(False, "--private", help="Make the repo private when it is created."),
    gguf: bool = typer.Option(False, "--gguf", help="Also push the run's GGUF exports and its Ollama Modelfile."),
    checkpoints: bool = typer.Option(
        False, "--checkpoints", help="Also push checkpoints/ (optimizer state included: large)."
    ),
    base: Optional[str] = typer.Option(
        None,
        "--base",
        help="The base's hub id, ORG/NAME, for an adapter trained on a local folder (the card and adapter_config.json name it).",
    ),
) -> None:
    """Upload a run's adapter to the Hugging Face hub with a card (base, data, loss, memory, how to load it). Only the
    adapter folder's own files unless asked; pushing again updates what changed. Needs `hf auth login` (write)."""
    from qlora_kit.export.push import push_run
    from qlora_kit.text import printable

    url = push_run(run, repo, private, gguf, checkpoints, base, console)
    console.print(f"Pushed to {printable(url)}", highlight=False, markup=False, soft_wrap=True)


data_app = typer.Typer(help="Inspect training data before training on it.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(
        ...,
        help="A .jsonl, .json, .parquet or .csv data file, or a hub dataset: ORG/NAME "
        "(a split of it) or ORG/NAME:FILE.jsonl (one file of it).",
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Tokenize with this model's tokenizer (exact lengths, rendering)."
    ),
    seq_len: int = typer.Option(512, "--seq", "--seq-len", help="Sequence length to check against."),
    data_format: str = typer.Option("auto", "--format", help="auto, text, completion, alpaca, chat or sharegpt."),
    data_split: str = typer.Option("train", "--data-split", help="The split of a hub dataset to check."),
    data_config: Optional[str] = typer.Option(
        None, "--data-config", help="The configuration (subset) of a hub dataset."
    ),
    chat_template_kwargs: str = typer.Option(
        "",
        "--chat-template-kwargs",
        help="Variables for the model's chat template, as train takes them: enable_thinking=false renders Qwen3 and SmolLM3 chats without reasoning.",
    ),
    revision: Optional[str] = REVISION,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Format, counts, token lengths, every bad line, and what the loss is on, for one data file. Exits with 1 when
    `train` would refuse the file (bad lines, or nothing to learn), so scripts can check data before training."""
    from qlora_kit.data.dataset import check_report

    tokenizer = None
    model = _at_revision(model, revision)
    if model:
        from qlora_kit.model.load import load_tokenizer
        from qlora_kit.probe.sources import resolve_model

        # a download shows its own progress; the tokenizer's files only, not gigabytes of weights
        folder = resolve_model(model, trust_remote_code, console, weights=False)
        with console.status(f"Loading the tokenizer of {model} ..."):
            tokenizer = load_tokenizer(folder, trust_remote_code, chat_template_kwargs)
    report, refusals = check_report(file, tokenizer, seq_len, data_format, data_split, data_config)
    console.print(report)
    if refusals:
        raise UserError(
            f"train would refuse {file}: {' and '.join(why for why, _ in refusals)}.",
            hint="; ".join(fix for _, fix in refusals).capitalize() + ".",
        )


recipes_app = typer.Typer(
    help="List the shipped recipes, or show one.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(context: typer.Context) -> None:
    """List the shipped recipes with what each is for."""
    if context.invoked_subcommand:
        return
    from rich.table import Table

    from qlora_kit.plan.recipes import card_recipes, load_recipe, recipe_summary

    table = Table(title="Recipes (qlora-kit recipes show NAME; train --recipe NAME)")
    for column in ("name", "rank", "seq", "micro-batch x accum", "for"):
        table.add_column(column)
    for name, path in card_recipes().items():
        r = load_recipe(path)
        table.add_row(name, str(r.rank), str(r.seq_len), f"{r.micro_batch} x {r.grad_accum}", recipe_summary(path))
    console.print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="A shipped recipe (4gb ... 24gb, cpu) or a YAML file.")) -> None:
    """Print one recipe, comments included: highlighted on a terminal, the file as it is when redirected
    (`qlora-kit recipes show cpu > my.yaml` gives a recipe to edit)."""
    from rich.syntax import Syntax

    from qlora_kit.plan.recipes import find_recipe, load_recipe

    path = find_recipe(name)
    load_recipe(path)  # validate, so a broken file is reported rather than shown
    if not console.is_terminal:
        sys.stdout.write(path.read_text())
        return
    console.print(Syntax(path.read_text(), "yaml", theme="ansi_dark", background_color="default", word_wrap=True))


def main() -> None:
    """Console entry point: run the app, turning UserError into a message and exit code 1 (typer turns Ctrl-C into 130)."""
    _quiet_libraries()
    try:
        app()
    except UserError as e:
        from qlora_kit.text import printable

        errors.print(f"[bold red]Error:[/] {escape(printable(e.message))}", highlight=False, soft_wrap=True)
        if e.hint:
            errors.print(f"[bold]Hint:[/] {escape(printable(e.hint))}", highlight=False, soft_wrap=True)
        sys.exit(1)
