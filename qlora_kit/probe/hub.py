"""The Hugging Face hub as a user meets it: which files of a model repo a fine-tune needs, fetching exactly those
into the Hugging Face cache (free disk checked first, progress shown, an interrupted download continued), a
model's config.json alone for `plan`, hub datasets as data files, and one sentence with the fix for a gated,
missing or unreachable repo.

A hub id may name a revision after an `@` (`Qwen/Qwen3-8B@main`, a tag or a commit), as everywhere a model is named.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError

# What transformers reads to load a causal LM and its tokenizer, at the top of the repo. Weights come separately:
# every top-level *.safetensors but Mistral's consolidated copy; never original/ or metal/ (Llama 3 and gpt-oss keep
# a second copy of the weights there) nor .bin/.pt/.gguf duplicates.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "*.tiktoken",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors.index.json", *TOKENIZER_FILES)
CHAT_TEMPLATES_FOLDER = "additional_chat_templates/"  # transformers 5 reads named templates from there
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "base_model.json")  # and the tokenizer's
LOCAL = {"model": "model folder", "dataset": "data file", "adapter": "adapter folder"}  # what to pass instead


@dataclass(frozen=True)
class HubRepo:
    """A hub id, the revision asked for (None: the repo's default branch), and whether it is a model or a dataset."""

    repo_id: str
    revision: str | None = None
    kind: str = "model"  # or "dataset", "adapter" (a model repo holding a PEFT adapter)

    @property
    def repo_type(self) -> str:
        """The hub's repo type: adapters live in model repos."""
        return "dataset" if self.kind == "dataset" else "model"

    @classmethod
    def parse(cls, name: str, kind: str = "model") -> HubRepo:
        """`org/name` or `org/name@revision`, refused in one sentence when the hub would not take it as an id."""
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        repo_id, _, revision = name.partition("@")
        try:
            validate_repo_id(repo_id)
        except HFValidationError:  # "a--b/c", "a/b.": the shape of a hub id, but not one the hub allows
            raise UserError(
                f"No {kind} found at {name}, and it is not a valid hub id.",
                hint=f"Pass a local {LOCAL[kind]}, or a hub id "
                f"such as {'google/gemma-2b' if kind == 'model' else 'org/name'}.",
            ) from None
        return cls(repo_id, revision or None, kind)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def files_a_model_needs(files: list[str], repo: str = "this repo", trust_remote_code: bool = False) -> list[str]:
    """The files of a model repo (its listing) that loading it for fine-tuning reads; a UserError when the repo has
    no weights qlora-kit can read."""
    top = [name for name in files if "/" not in name]
    weights = [name for name in top if name.endswith(".safetensors") and not name.startswith("consolidated")]
    if not weights:
        if any(name.endswith(PICKLED_WEIGHTS) for name in top):
            raise UserError(
                f"{repo} keeps its weights only as pickled PyTorch files, which can run code when loaded; "
                "qlora-kit reads safetensors.",
                hint="Look for a safetensors copy of the model on the hub (often under the same name with "
                "a -safetensors suffix or in a refs/pr/N revision), or convert it where you trust it.",
            )
        raise UserError(
            f"{repo} holds no .safetensors weights at its top level, so it is not a model transformers "
            "can load as it is.",
            hint="Check that it is the model itself, not a GGUF or an adapter repo.",
        )
    wanted = [
        name
        for name in top
        if any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)
        or (trust_remote_code and name.endswith(".py"))
    ]
    templates = [name for name in files if name.startswith(CHAT_TEMPLATES_FOLDER) and name.endswith(".jinja")]
    return sorted({*weights, *wanted, *templates})


def _hub_errors():
    from huggingface_hub import errors

    return errors


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()  # HF_HUB_OFFLINE, as the hub client read it


def _explain(error: Exception, repo: HubRepo) -> UserError | None:
    """One sentence and its fix for what the hub answered; None for no answer (offline) or one that is a bug."""
    errors = _hub_errors()
    what = repo.kind
    page = f"https://huggingface.co/{'datasets/' if what == 'dataset' else ''}{repo.repo_id}"
    if isinstance(error, errors.GatedRepoError):
        asked = "your token has not been granted access yet" if _has_token() else "you are not logged in"
        return UserError(
            f"{repo.repo_id} is a gated {what}: its authors ask each user to accept their licence before "
            f"downloading, and {asked}.",
            hint=f"Open {page}, accept the licence with your account, then run `hf auth login` (or set "
            "HF_TOKEN to a read token) and run this again.",
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(
            f"{repo.repo_id} has no revision '{repo.revision}'.",
            hint="Name a branch, tag or commit it has, or leave the @revision out for its default branch.",
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        from qlora_kit.probe.catalog import did_you_mean, model_names

        close = did_you_mean(repo.repo_id, model_names(), cutoff=0.5) if what == "model" else ""
        return UserError(
            f"There is no {what} {repo.repo_id} on the Hugging Face hub that you can see." + close,
            hint=f"Check the name at {page}; a private repo needs `hf auth login` (or HF_TOKEN) with an "
            "account that can read it.",
        )
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return UserError(
            f"{repo} lists a file that the hub then does not serve ({error}).",
            hint="The repo changed while it was read: run the same command again.",
        )
    if unreachable(error):
        return None  # the caller says what the cache holds
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "an error"
        return UserError(
            f"The Hugging Face hub answered {status} for {repo}.",
            hint="It may be down or limiting requests: try again in a few minutes.",
        )
    return None


def unreachable(error: Exception) -> bool:
    """Whether an error from the hub client means no answer came: offline mode, or the network failed."""
    errors = _hub_errors()
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return True
    for name in ("httpx2", "httpx"):  # huggingface_hub 2 speaks through httpx2, 1.x through httpx
        try:
            http = __import__(name)
        except ImportError:
            continue
        if isinstance(error, (http.ConnectError, http.TimeoutException, http.RemoteProtocolError)):
            return True
    return False


def explain_upload_error(error: Exception, repo: HubRepo) -> UserError | None:
    """One sentence for what the hub answered a push: no token or one that may not write there, or as _explain."""
    errors = _hub_errors()
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.HfHubHTTPError) and status in (401, 403):
        why = "your token may not write to it" if _has_token() else "you are not logged in"
        return UserError(
            f"The hub refused the push to {repo.repo_id}: {why}.",
            hint="Run `hf auth login` with a token that has write access (or set HF_TOKEN to one); to push "
            "under an organization, your account must be allowed to write there.",
        )
    if unreachable(error):
        return UserError(
            f"The push to {repo.repo_id} did not reach the hub ({_unreachable_reason(error)}).",
            hint="Run the same command again when the network is back: large files the hub already "
            "holds are not sent again.",
        )
    if isinstance(error, errors.HfHubHTTPError) and not isinstance(error, errors.RepositoryNotFoundError):
        return UserError(
            f"The Hugging Face hub answered {status or 'an error'} to the push to {repo.repo_id}, so "
            "nothing changed there.",
            hint="It may be down or limiting requests: run the same command again in a few minutes; "
            "large files it already holds are not sent again.",
        )
    return _explain(error, repo)


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _unreachable_reason(error: Exception | None) -> str:
    if _offline():
        return "HF_HUB_OFFLINE is set"
    return f"the hub cannot be reached ({type(error).__name__})" if error else "the hub cannot be reached"


@dataclass
class Listing:
    commit: str  # the revision's commit: every file is fetched from it, however the branch moves meanwhile
    sizes: dict[str, int]  # every file of the repo at that commit, in bytes


def list_repo(repo: HubRepo) -> Listing:
    """The files of a repo at a revision, with their sizes (one API call); raises the hub's own errors."""
    from huggingface_hub import HfApi

    ask = HfApi().model_info if repo.repo_type == "model" else HfApi().dataset_info
    info = ask(repo.repo_id, revision=repo.revision, files_metadata=True)
    return Listing(info.sha, {s.rfilename: s.size or 0 for s in info.siblings or []})


def cached_snapshot(repo: HubRepo) -> Path | None:
    """The cached snapshot folder for the revision, if the cache has one; complete or not."""
    storage = _storage(repo)
    revision = repo.revision or "main"
    ref = storage / "refs" / revision
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision
    except OSError:
        return None
    folder = storage / "snapshots" / commit
    return folder if folder.is_dir() else None


def missing_from(folder: Path) -> list[str]:
    """What a cached snapshot lacks for a load: config.json, a tokenizer, or weights (every shard its index names)."""
    import json

    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("the tokenizer files")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            shards = []
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not any(folder.glob("*.safetensors")):
        missing.append("the weights")
    return missing


def download_model(name: str, trust_remote_code: bool = False, console=None) -> Path:
    """A local snapshot folder of a hub model with every file a fine-tune reads: the cached one when it is complete,
    else fetched (only what is needed, free disk checked first, interrupted downloads continued)."""
    return _download(
        HubRepo.parse(name),
        lambda files, repo: files_a_model_needs(files, repo, trust_remote_code),
        missing_from,
        console,
    )


def files_a_tokenizer_needs(files: list[str], trust_remote_code: bool = False) -> list[str]:
    """The files of a model repo that loading its tokenizer and chat template reads: no weights (kilobytes to a few
    MB, where the whole model may be gigabytes)."""
    top = [name for name in files if "/" not in name]
    wanted = [
        name
        for name in top
        if any(fnmatch.fnmatch(name, pattern) for pattern in ("config.json", *TOKENIZER_FILES))
        or (trust_remote_code and name.endswith(".py"))
    ]
    return sorted(
        {*wanted, *(name for name in files if name.startswith(CHAT_TEMPLATES_FOLDER) and name.endswith(".jinja"))}
    )


def missing_tokenizer_from(folder: Path) -> list[str]:
    """What a cached snapshot lacks for loading the tokenizer alone."""
    return [what for what in missing_from(folder) if what in ("config.json", "the tokenizer files")]


def download_tokenizer(name: str, trust_remote_code: bool = False, console=None) -> Path:
    """A local snapshot folder holding a hub model's tokenizer, chat template and config, without its weights."""
    return _download(
        HubRepo.parse(name),
        lambda files, repo: files_a_tokenizer_needs(files, trust_remote_code),
        missing_tokenizer_from,
        console,
    )


def files_an_adapter_needs(files: list[str], repo: str = "this repo") -> list[str]:
    """The files of an adapter repo that loading it reads: its config and safetensors weights, the base it was
    trained on (base_model.json) and the tokenizer and chat template saved beside it."""
    if "adapter_config.json" not in files:
        raise UserError(
            f"{repo} holds no adapter_config.json, so it is not a PEFT adapter.",
            hint="A whole model goes to --model; --adapter takes an adapter's folder or hub repo.",
        )
    if "adapter_model.safetensors" not in files:
        raise UserError(
            f"{repo} keeps its adapter weights only as a pickled file, which can run code when loaded; "
            "qlora-kit reads adapters only as safetensors.",
            hint="Convert it once with PEFT where you trust it: save_pretrained(safe_serialization=True).",
        )
    return [
        name
        for name in files
        if "/" not in name
        and (name in ADAPTER_FILES or any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES))
    ]


def missing_from_adapter(folder: Path) -> list[str]:
    """What a cached adapter snapshot lacks for a load."""
    return [name for name in ADAPTER_FILES[:2] if not (folder / name).is_file()]


def download_adapter(name: str, console=None) -> Path:
    """A local snapshot folder of an adapter repo on the hub (a few MB): the cached one when complete, else fetched."""
    return _download(HubRepo.parse(name, "adapter"), files_an_adapter_needs, missing_from_adapter, console)


def _download(repo: HubRepo, pick, missing, console) -> Path:
    cached = cached_snapshot(repo)
    if cached is not None and not missing(cached):
        return cached
    listing, failure = None, None
    if not _offline():
        try:
            listing = list_repo(repo)
        except Exception as e:
            if not unreachable(e):
                raise _explain(e, repo) or e from None
            failure = e
    if listing is None:
        raise _not_cached(repo, cached, _unreachable_reason(failure), missing)
    return fetch_files(repo, listing, pick(list(listing.sizes), str(repo)), console)


def _not_cached(repo: HubRepo, cached: Path | None, reason: str, missing=missing_from) -> UserError:
    if cached is None:
        have = "is not in the local Hugging Face cache"
    else:
        have = f"is only partly in the local Hugging Face cache (missing {', '.join(missing(cached)[:3])})"
    revision = f" --revision {repo.revision}" if repo.revision else ""
    kind = " --repo-type dataset" if repo.kind == "dataset" else ""
    elsewhere = (
        f"on a machine with network run `hf download {repo.repo_id}{kind}{revision}` and copy "
        "~/.cache/huggingface/hub here"
    )
    fix = f"unset HF_HUB_OFFLINE to download it, or {elsewhere}" if _offline() else elsewhere
    return UserError(f"{repo} {have}, and {reason}.", hint=f"To get it, {fix}; or pass a local {LOCAL[repo.kind]}.")


def fetch_files(repo: HubRepo, listing: Listing, names: list[str], console=None) -> Path:
    """Download `names` of the repo at the listing's commit into the Hugging Face cache; the snapshot folder."""
    from huggingface_hub import constants

    snapshot = _storage(repo) / "snapshots" / listing.commit
    # config.json first: a gated or broken repo is said before gigabytes are fetched
    to_fetch = sorted((n for n in names if not (snapshot / n).is_file()), key=lambda n: (n != "config.json", n))
    check_free_disk(Path(constants.HF_HUB_CACHE), sum(listing.sizes.get(n, 0) for n in to_fetch), repo)
    with DownloadProgress(console, repo, {n: listing.sizes.get(n, 0) for n in to_fetch}) as progress:
        for file in to_fetch:
            progress.start(file)
            try:
                fetch_file(repo, listing.commit, file, progress.bar_class())
            except KeyboardInterrupt:
                progress.console.print(
                    f"Download of {repo} stopped at {file}: the same command continues it.",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
                raise
            except Exception as e:
                if not unreachable(e):
                    raise _explain(e, repo) or e from None
                raise UserError(
                    f"The download of {repo} stopped at {file}: {_unreachable_reason(e)}.",
                    hint="Run the same command again when the network is back: it continues where it stopped.",
                ) from None
            progress.done(file)
    _remember_revision(repo, listing.commit)
    return snapshot


def fetch_file(repo: HubRepo, commit: str, name: str, bar_class=None) -> Path:
    """One file of a repo at a commit into the Hugging Face cache, laid out as its client lays it out (the bytes in
    blobs/ under their etag, snapshots/COMMIT/NAME a link to them). What an interrupted try fetched is kept beside the
    blob and the rest asked for with a Range: the hub client itself starts every file again."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    from qlora_kit.files import only_writer

    storage = _storage(repo)
    link = storage / "snapshots" / commit / name
    if link.is_file():
        return link
    metadata = get_hf_file_metadata(hf_hub_url(repo.repo_id, name, revision=commit, repo_type=repo.repo_type))
    blob = storage / "blobs" / metadata.etag
    if not blob.is_file():
        partial = blob.with_name(blob.name + ".partial")
        with only_writer(partial, "downloading"):
            with open(partial, "ab") as f:
                http_get(
                    metadata.location,
                    f,
                    resume_size=f.tell(),
                    headers=build_hf_headers(),
                    expected_size=metadata.size,
                    tqdm_class=bar_class,
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, blob)
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(blob, link.parent), link)
    except FileExistsError:
        pass  # another process linked it meanwhile
    except OSError:  # a file system without links: a copy, as the hub client makes there
        shutil.copyfile(blob, link)
    return link


def _storage(repo: HubRepo) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo.repo_id, repo_type=repo.repo_type)


def _remember_revision(repo: HubRepo, commit: str) -> None:
    """Point the cache's ref for the revision (main when none was named) at the commit fetched, as the hub client
    does, so the next load finds the snapshot offline by the same name."""
    revision = repo.revision or "main"
    if revision == commit:
        return
    from qlora_kit.files import write_atomically

    ref = _storage(repo) / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(ref, commit)
    except OSError:
        pass  # the files are cached; the next load lists the repo again


def check_free_disk(cache: Path, needed: int, repo: HubRepo) -> None:
    """Refuse a download that would not fit on the disk the cache is on, before the first byte."""
    from qlora_kit.files import free_space

    _, free = free_space(cache)
    margin = 256 * 2**20  # the cache's own small files, and room for the system to keep working
    if needed + margin > free:
        raise UserError(
            f"{repo} needs {needed / 2**30:,.2f} GiB more in {cache}, and that disk has {free / 2**30:,.2f} GiB free.",
            hint="Free space there, or set HF_HOME to a folder on a larger disk and run this again.",
        )


class DownloadProgress:
    """What a download shows: on a terminal, one bar with the file, size, speed and time left; otherwise a plain
    line when it starts and one per file fetched."""

    def __init__(self, console, repo: HubRepo, sizes: dict[str, int]):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.repo, self.sizes = repo, sizes
        self.total = sum(self.sizes.values())
        self.live = self.console.is_terminal and not self.console.quiet
        self.started = time.monotonic()
        self.file_started = self.started
        self.progress = self.task = None

    def __enter__(self) -> DownloadProgress:
        if not self.sizes:
            return self
        self.console.print(
            f"Downloading {self.repo}: {len(self.sizes)} files, {_size(self.total)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        if self.live:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=self.total or None)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.sizes and exc[0] is None:
            seconds = time.monotonic() - self.started
            self.console.print(f"Downloaded {_size(self.total)} in {seconds:,.0f} s", highlight=False)

    def start(self, file: str) -> None:
        self.file_started = time.monotonic()
        if self.progress is not None:
            self.progress.update(self.task, description=file)

    def done(self, file: str) -> None:
        if self.progress is None and file in self.sizes:
            seconds = time.monotonic() - self.file_started
            self.console.print(
                f"  {file}  {_size(self.sizes[file])}  {seconds:,.1f} s", highlight=False, markup=False, soft_wrap=True
            )

    def bar_class(self):
        """A tqdm stand-in for the hub client's byte counts, which moves this display's bar."""
        owner = self

        class Bar:
            def __init__(self, *args, initial: int = 0, **kwargs):
                self.n = initial
                owner._advance(initial)  # what an earlier, interrupted download already fetched

            def update(self, n: int = 1) -> None:
                self.n += n
                owner._advance(n)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

            def close(self) -> None:
                pass

        return Bar

    def _advance(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.advance(self.task, n)


def _size(n: int) -> str:
    """Bytes as the hub and download tools show them (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def fetch_config(name: str) -> dict | None:
    """A hub model's config.json alone (kilobytes: what `plan` needs), from the cache or the hub; None when the hub
    cannot be reached and the cache has none. Gated, missing or unknown revisions are a UserError."""
    from huggingface_hub import hf_hub_download

    from qlora_kit.probe.sources import read_model_config

    repo = HubRepo.parse(name)
    cached = cached_snapshot(repo)
    if cached is not None and (cached / "config.json").is_file():
        return read_model_config(cached)
    if _offline():
        return None
    try:
        # The listing first: it fails at once when the hub cannot be reached, where a file download retries for
        # half a minute; and it says gated or missing before any file is asked for.
        list_repo(repo)
        path = hf_hub_download(repo.repo_id, "config.json", revision=repo.revision)
    except Exception as e:
        if unreachable(e):
            return None
        raise _explain(e, repo) or e from None
    return read_model_config(Path(path).parent)


def download_note(name: str) -> str | None:
    """For `plan`: what training a hub model would download first, from its listing (one API call), or None when
    the cache already holds it or the hub cannot be reached."""
    repo = HubRepo.parse(name)
    cached = cached_snapshot(repo)
    if (cached is not None and not missing_from(cached)) or _offline():
        return None
    try:
        listing = list_repo(repo)
    except Exception as e:
        if unreachable(e):
            return None
        raise _explain(e, repo) or e from None
    needed = files_a_model_needs(list(listing.sizes), str(repo))
    weights = sum(listing.sizes[n] for n in needed if n.endswith(".safetensors"))
    return f"{repo} is not downloaded yet: training fetches {_size(weights)} of weights (and its tokenizer) first."


def is_dataset_name(name: str) -> bool:
    """Whether --data names a hub dataset (`org/name`, `org/name@revision`, `org/name:file.jsonl`) rather than a
    local file: the caller has already found no file of that name."""
    import re

    repo, _, file = str(name).partition(":")
    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", repo))
        and not repo.startswith((".", "~"))
        and Path(repo.split("@")[0]).suffix not in (".jsonl", ".json", ".parquet", ".csv")
        and (not file or "." in file)
    )


def dataset_file(name: str, split: str = "train", config: str | None = None, console=None) -> Path:
    """A local file holding a hub dataset's examples, which the data reader then reads as any file: one file of the
    repo (`org/name:path/file.jsonl`), fetched as it is into the Hugging Face cache; or a split of the dataset
    (`org/name`), loaded by `datasets` and kept as parquet in qlora-kit's cache, named by the data's fingerprint."""
    repo_name, _, file = name.partition(":")
    repo = HubRepo.parse(repo_name, "dataset")
    if file:
        cached = cached_snapshot(repo)
        if cached is not None and (cached / file).is_file():
            return cached / file
        if _offline():
            raise _not_cached(repo, None, _unreachable_reason(None))
        try:
            listing = list_repo(repo)
        except Exception as e:
            if not unreachable(e):
                raise _explain(e, repo) or e from None
            raise _not_cached(repo, None, _unreachable_reason(e)) from None
        if file not in listing.sizes:
            listed = ", ".join(
                sorted(n for n in listing.sizes if n.endswith((".jsonl", ".json", ".parquet", ".csv")))[:6]
            )
            raise UserError(f"The dataset {repo} has no file {file}.", hint=f"Its data files: {listed or 'none'}.")
        return fetch_files(repo, listing, [file], console) / file
    return _dataset_split(repo, split, config, console)


def _dataset_split(repo: HubRepo, split: str, config: str | None, console) -> Path:
    from datasets import exceptions, load_dataset
    from datasets.utils import logging as datasets_logging
    from rich.console import Console

    datasets_logging.disable_progress_bar()  # its bars per split and per file would bury the status line

    from qlora_kit.probe.sources import cache_dir

    console = console or Console(stderr=True)
    hint_flags = "--data-config NAME and --data-split NAME"
    try:
        with console.status(f"Reading the {split} split of the dataset {repo} ..."):
            table = load_dataset(repo.repo_id, config, split=split, revision=repo.revision)
    except exceptions.DatasetNotFoundError as e:
        page = f"https://huggingface.co/datasets/{repo.repo_id}"
        if "gated" in str(e):
            raise UserError(
                f"{repo.repo_id} is a gated dataset: its authors ask each user to accept their terms before "
                "downloading.",
                hint=f"Open {page}, accept them with your account, then run `hf auth login` "
                "(or set HF_TOKEN) and run this again.",
            ) from None
        raise UserError(
            f"There is no dataset {repo} on the Hugging Face hub that you can see (or it is not cached "
            "and the hub cannot be reached).",
            hint=f"Check the name at {page}; a private one needs `hf auth login`.",
        ) from None
    except ValueError as e:  # an unknown split or config, or a config needed and not named: datasets lists the names
        raise UserError(
            f"The dataset {repo}: {str(e).strip().splitlines()[0]}", hint=f"Choose with {hint_flags}."
        ) from None
    except ConnectionError as e:
        raise _not_cached(repo, None, _unreachable_reason(e)) from None
    folder = cache_dir() / "hub-datasets"
    file = folder / f"{repo.repo_id.replace('/', '--')}--{config or 'default'}--{split}--{table._fingerprint}.parquet"
    if not file.is_file():  # written under a private name, then renamed: a kill never leaves half a file
        import tempfile

        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".partial", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                table.to_parquet(f)
            os.replace(staging, file)
        finally:
            Path(staging).unlink(missing_ok=True)
    return file
