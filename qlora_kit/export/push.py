"""`qlora-kit push RUN --repo user/name`: the run's adapter to a model repo on the Hugging Face hub, with a card that
says what made it and how to load it (PEFT, llama.cpp, Ollama).

Only the adapter folder's own files go up by default; GGUF exports and the Modelfile with --gguf, checkpoints
(optimizer state included) only with --checkpoints. A push is one commit; a second push of the same run updates
what changed, and large files the hub already holds (an interrupted push) are not sent again.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.probe.sources import HUB_ID_SHAPE, IDENTITY_FILE

KEPT_BACK = ("README.md",)  # the adapter folder's card: the pushed card replaces it


def adapter_and_run(folder: Path) -> tuple[Path, Path]:
    """(the adapter folder, the folder its run's files are in) for what `push` was given: a run folder, its
    adapter/ folder, or an adapter folder of its own (then it is both)."""
    from qlora_kit.probe.sources import check_adapter_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"No run folder at {folder}.", hint="Pass the folder a run wrote, e.g. runs/NAME (see `ls runs`)."
        )
    if (folder / "adapter_config.json").is_file():
        adapter, run = folder, folder.parent if folder.name == "adapter" else folder
    else:
        adapter, run = folder / "adapter", folder
    check_adapter_folder(adapter)
    return adapter, run


def files_to_push(adapter: Path, run: Path, gguf: bool = False, checkpoints: bool = False) -> dict[str, Path]:
    """{path in the repo: local file}: the adapter folder's own files, and what the flags add from its run."""
    files = {
        p.name: p
        for p in sorted(adapter.iterdir())
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name not in KEPT_BACK
    }
    if gguf:
        exported = sorted(p for p in run.glob("*.gguf") if p.is_file() and not p.is_symlink())
        if not exported:
            raise UserError(
                f"{run} holds no GGUF export to push.",
                hint=f"Export one first: qlora-kit export --adapter {adapter} (or drop --gguf).",
            )
        files |= {p.name: p for p in exported}
        if (run / "Modelfile").is_file() and not (run / "Modelfile").is_symlink():
            files["Modelfile"] = run / "Modelfile"
    if checkpoints:
        saved = sorted(
            p
            for p in (run / "checkpoints").rglob("*")
            if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
        )
        if not saved:
            raise UserError(f"{run} holds no checkpoints to push.", hint="Drop --checkpoints.")
        files |= {p.relative_to(run).as_posix(): p for p in saved}
    return files


def push_card(adapter: Path, run: Path, repo_id: str, pushed: list[str], base: str, local: str | None = None) -> str:
    """The repo's README.md: the adapter's own card (base, data, loss, memory), then how to load it from the hub,
    what plan predicted against what the run measured, the data's fingerprint, and the recipe."""
    import yaml

    from qlora_kit.probe.hub import is_dataset_name
    from qlora_kit.probe.sources import path_exists
    from qlora_kit.train.checkpoint import file_sha256
    from qlora_kit.train.report import load_run, peak_memory

    card = (adapter / "README.md").read_text() if (adapter / "README.md").is_file() else ""
    if local:
        card = card.replace(local, base)
    if "path/to/this/folder" not in card:  # an adapter without qlora-kit's card: say how to load it
        card += (
            f"\n## Use it\n\n```python\nfrom peft import PeftModel\nfrom transformers import "
            f'AutoModelForCausalLM, AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\ntokenizer = AutoTokenizer.from_pretrained('
            f'"{repo_id}")\n```\n'
        )
    card = card.replace("path/to/this/folder", repo_id)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    lines = [""]
    ggufs = [name for name in pushed if name.endswith(".gguf")]
    if "adapter.gguf" in ggufs:
        lines += [
            "With llama.cpp, beside the base model as a GGUF of its own:",
            "",
            "```bash",
            f"hf download {repo_id} adapter.gguf --local-dir .",
            'llama-cli -m BASE.gguf --lora adapter.gguf -p "..."',
            "```",
            "",
        ]
    merged = [name for name in ggufs if name != "adapter.gguf"]
    if merged:
        lines += [
            f"`{merged[0]}` is the base with this adapter merged in: `llama-cli -m {merged[0]}`"
            + (", or `ollama create NAME -f Modelfile` beside it." if "Modelfile" in pushed else "."),
            "",
        ]
    try:
        measured = load_run(run)
        if measured.planned_gib:
            peak, what = peak_memory(measured)
            lines += [
                f"Memory: `qlora-kit plan` predicted {measured.planned_gib:.2f} GiB on {measured.device}; "
                f"the run measured {peak:.2f} GiB ({what}).",
                "",
            ]
    except UserError:
        pass  # a run without metrics: the card says what it can
    data = recipe.get("data")
    trained_on = _fingerprint(run).get("data")
    fingerprint = f"; its fingerprint as `--resume` checks it: `{trained_on}`" if trained_on else ""
    if isinstance(data, str) and Path(data).is_file():
        lines += [f"Data: `{Path(data).name}`, sha256 `{file_sha256(Path(data))[:16]}`{fingerprint}.", ""]
    elif isinstance(data, str) and is_dataset_name(data):
        lines += [f"Data: the hub dataset `{data}`, split `{recipe.get('data_split') or 'train'}`{fingerprint}.", ""]
    if recipe:
        # where things lay on this machine says nothing to a reader, and is not theirs to know
        shown = {
            k: v
            for k, v in recipe.items()
            if v is not None
            and k not in ("model", "data", "eval_data")
            and not (isinstance(v, str) and (Path(v).is_absolute() or path_exists(Path(v))))
        }
        lines += [
            "<details><summary>Recipe</summary>",
            "",
            "```yaml",
            yaml.safe_dump(shown, sort_keys=False).strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return card.rstrip() + "\n" + "\n".join(lines)


def _fingerprint(run: Path) -> dict:
    """The data and base fingerprint the run's last checkpoint records; {} where it has none."""
    from qlora_kit.train.checkpoint import TrainerState, complete_checkpoints

    saved = complete_checkpoints(run)
    try:
        return TrainerState.from_json((saved[-1] / "trainer_state.json").read_text()).fingerprint if saved else {}
    except (OSError, ValueError, TypeError):
        return {}


def hub_base(adapter: Path, named: str | None = None) -> tuple[str, str | None]:
    """(the base's hub id for the pushed files, the local path they name instead, if any): --base when given, else
    what adapter_config.json names if it is a hub id; a base only on this disk is refused, since nobody pulling the
    adapter could load it (and its path would leak this machine's layout)."""
    from qlora_kit.adapter.folder import base_named_by, recorded_base
    from qlora_kit.probe.hub import HubRepo
    from qlora_kit.probe.sources import hub_id_of

    recorded = base_named_by(adapter) or ""
    local = recorded if Path(recorded).is_absolute() else None
    base = named or (None if local else hub_id_of(recorded)) or ((recorded_base(adapter) or {}).get("hub_id"))
    if not base:
        raise UserError(
            f"{adapter} was trained on the local folder {recorded or '(unnamed)'}, which nobody "
            "pulling it from the hub can load.",
            hint="Name the hub model that folder holds with --base ORG/NAME (the card and "
            "adapter_config.json will say it).",
        )
    return HubRepo.parse(base).repo_id, local


def _for_the_hub(path: Path, base: str, local: str | None) -> bytes | None:
    """The bytes to upload in place of an adapter file that names the base by a local path; None: the file as it is."""
    if path.name == "adapter_config.json":
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base
        return json.dumps(config, indent=2).encode()
    if path.name == IDENTITY_FILE:
        try:
            record = json.loads(path.read_text())
        except ValueError:
            return None  # damaged: it goes up as it is, and loading says so wherever it is used
        if isinstance(record, dict):
            record.update(source=base, path=None, **({} if record.get("hub_id") else {"hub_id": base}))
            return json.dumps(record, indent=2).encode()
    return None


def push_run(
    folder: Path,
    repo_id: str,
    private: bool = False,
    gguf: bool = False,
    checkpoints: bool = False,
    base: str | None = None,
    console=None,
) -> str:
    """Upload a run's adapter (and what the flags add) with its card as one commit; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from qlora_kit.probe.hub import HubRepo, explain_upload_error

    if not HUB_ID_SHAPE.match(repo_id.partition("@")[0]):
        raise UserError(
            f"--repo {repo_id!r} is not a hub repo id.",
            hint="Name it USER/NAME or ORG/NAME, e.g. --repo you/pirate-adapter.",
        )
    repo = HubRepo.parse(repo_id)
    if repo.revision:
        raise UserError(
            f"--repo {repo_id} names a revision; a push goes to the repo's main branch.",
            hint="Drop the @ and what follows it.",
        )
    adapter, run = adapter_and_run(folder)
    files = files_to_push(adapter, run, gguf, checkpoints)
    base, local = hub_base(adapter, base)
    card = push_card(adapter, run, repo.repo_id, list(files), base, local)
    operations = [
        CommitOperationAdd(name, _for_the_hub(path, base, local) or str(path)) for name, path in files.items()
    ]
    operations.append(CommitOperationAdd("README.md", card.encode()))
    api = HfApi()
    try:
        api.create_repo(repo.repo_id, private=private, exist_ok=True)
        size = sum(path.stat().st_size for path in files.values())
        if console is not None:
            console.print(
                f"Pushing {len(operations)} files ({size / 2**20:,.1f} MiB) to {repo.repo_id} ...",
                highlight=False,
                markup=False,
            )
        commit = api.create_commit(repo.repo_id, operations, commit_message=f"qlora-kit push of {run.resolve().name}")
    except Exception as e:
        raise explain_upload_error(e, repo) or e from None
    return commit.commit_url
