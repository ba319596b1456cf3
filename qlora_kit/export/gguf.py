"""`qlora-kit export`: an adapter as GGUF, the format llama.cpp, Ollama and LM Studio read.

Two forms. `--format gguf-adapter` writes the LoRA A and B matrices under llama.cpp's tensor names
(`blk.N.attn_q.weight.lora_a`) with `general.type = adapter`, `adapter.type = lora` and the alpha: llama.cpp
(`--lora`) and Ollama (`ADAPTER` in a Modelfile) add it to any GGUF of the same base, quantized ones included, so a
few MB travel instead of a whole model. `--format gguf` streams the base's weights with the adapter's change added
into one standalone GGUF, tokenizer and chat template inside. Both are written with the `gguf` package (llama.cpp's
own Python library); k-quants come from llama.cpp's quantizer.

llama.cpp stores some weights differently from transformers, and both forms follow it: for Llama and Mistral the
rows of the query and key projections are reordered (llama.cpp rotates interleaved pairs of dimensions,
transformers the two halves), in the merged weights and in the adapter's B, which makes those rows; A is untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.adapter.folder import base_source_for, check_adapter_on_base, corrects_nf4_rounding, tokenizer_folder
from qlora_kit.architectures import Family, gguf_family
from qlora_kit.architectures.fused_experts import experts_change
from qlora_kit.architectures.shape import moe_shape
from qlora_kit.errors import UserError
from qlora_kit.files import staged_file
from qlora_kit.model.load import nf4_rounded
from qlora_kit.probe.sources import (
    PEFT_PREFIX,
    check_adapter_folder,
    gguf_file_of,
    language_model_name,
    lora_layers,
    model_weights,
    read_adapter_config,
    read_model_config,
    resolve_model,
    text_config,
)


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a query or key projection's output rows from transformers' rotary layout (each head's first half,
    then its second half) to llama.cpp's Llama layout (pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rotary_heads(config: dict) -> dict[str, int]:
    """The heads of the projections whose rows interleave_rotary_rows reorders: queries, and keys (fewer under GQA)."""
    return {
        "q_proj": config["num_attention_heads"],
        "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"],
    }


def run_name_of(adapter_dir: Path) -> str:
    """runs/NAME/adapter -> NAME; any other adapter folder -> its own name."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.parent.name if adapter_dir.name == "adapter" else adapter_dir.name


EXPORT_HINT = "Nothing was left there. Free some space (or choose another --out) and export again."


def gguf_alpha(adapter_config: dict) -> float:
    """The alpha llama.cpp needs to scale by alpha / rank as peft did: rsLoRA scales by alpha / sqrt(rank)."""
    alpha, rank = float(adapter_config["lora_alpha"]), int(adapter_config["r"])
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def check_plain_lora(adapter_config: dict, adapter_dir: Path, merged: bool = False) -> None:
    """GGUF adapters hold A and B with one rank and alpha: refuse what they cannot carry (a merged export takes DoRA)."""
    if corrects_nf4_rounding(adapter_dir) and not merged:
        raise UserError(
            f"{adapter_dir} started as LoftQ: it corrects NF4's rounding of each weight, so it belongs on "
            "the 4-bit base it was trained on, which a GGUF base does not hold.",
            hint="Export it merged instead (--format gguf): the adapter is added to each weight as NF4 rounds it.",
        )
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir} is a {adapter_config['peft_type']} adapter; GGUF adapters are LoRA only.")
    if adapter_config.get("use_dora") and not merged:
        raise UserError(
            f"{adapter_dir} is a DoRA adapter, which llama.cpp cannot load as an adapter.",
            hint="Export it merged instead: --format gguf.",
        )
    if adapter_config.get("target_parameters") and not merged:
        raise UserError(
            f"{adapter_dir} adapts a mixture of experts' weights, which llama.cpp cannot apply as an adapter.",
            hint="Export it merged instead: --format gguf.",
        )
    patterns = {**(adapter_config.get("rank_pattern") or {}), **(adapter_config.get("alpha_pattern") or {})}
    weights = {key.rsplit(".", 1)[-1] for key in patterns}  # an experts weight's key is "experts.down_proj"
    if weights - set(adapter_config.get("target_parameters") or ()) or (patterns and not merged):
        raise UserError(
            f"{adapter_dir} gives some layers their own rank or alpha, which a GGUF adapter cannot hold.",
            hint="Export it merged instead: --format gguf.",
        )


def tensor_name_map(architecture: Family, config: dict):
    """The gguf package's map from transformers' weight names to llama.cpp's, for this architecture and depth."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.gguf_name)
    return gguf.get_tensor_name_map(arch, config["num_hidden_layers"])


def adapter_tensors_for_gguf(lora: dict[str, torch.Tensor], config: dict, architecture: Family) -> dict:
    """The adapter's A and B matrices under llama.cpp's names (`blk.0.attn_q.weight.lora_a`), in llama.cpp's layout."""
    names = tensor_name_map(architecture, config)
    heads = rotary_heads(config)
    tensors = {}
    for key, tensor in lora.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(
                f"The adapter holds {key}, which is not a LoRA A or B matrix.",
                hint="Only LoRA on linear layers exports to a GGUF adapter; export it merged: --format gguf.",
            )
        gguf_name = names.get_name(language_model_name(module) + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise UserError(
                f"llama.cpp has no tensor for {module}, which this adapter trains.",
                hint="Export it merged instead: --format gguf.",
            )
        tensor = tensor.float()
        projection = module.rsplit(".", 1)[-1]
        if part == "B.weight" and architecture.rotary_rows_interleaved and projection in heads:
            tensor = interleave_rotary_rows(tensor, heads[projection])
        if architecture.gguf_lora:
            tensor = architecture.gguf_lora(language_model_name(module), part[0].lower(), tensor, config)
        tensors[f"{gguf_name}.lora_{part[0].lower()}"] = tensor.contiguous()
    return tensors


def export_gguf_adapter(adapter_dir: Path, out: Path, source: str | None = None, say=lambda sentence: None) -> Path:
    """Write adapter_dir's LoRA weights as a GGUF adapter at out (a .gguf file); returns out. say(sentence) hears a
    note about the base (one chosen with --model that is not quite the one trained on)."""
    import gguf
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    adapter_config = read_adapter_config(adapter_dir)
    check_plain_lora(adapter_config, adapter_dir)
    base = resolve_model(source or base_source_for(adapter_dir))
    config = text_config(read_model_config(base))
    architecture = gguf_family(config)
    note = check_adapter_on_base(adapter_dir, base, chosen=source is not None)
    if note:
        say(note)
    tensors = adapter_tensors_for_gguf(load_file(adapter_dir / "adapter_model.safetensors"), config, architecture)
    with staged_file(out, EXPORT_HINT) as staging:
        writer = gguf.GGUFWriter(staging, architecture.gguf_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(adapter_config))
        writer.add_name(run_name_of(adapter_dir))
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        write_out(writer)
    return Path(out)


def write_out(writer) -> None:
    """Write a GGUFWriter's header, metadata and tensors, in the order the format has them, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# The merged GGUF: base + adapter folded into one standalone model, with the tokenizer and chat template inside.

TENSOR_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # written by the gguf package itself
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


@dataclass(frozen=True)
class LoraUpdate:
    """One adapted weight's LoRA matrices (and DoRA magnitudes); the change they make is made only when that weight
    is written, so a large model's changes never sit in RAM together."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: each output row's learned norm
    on_nf4_rounding: bool = False  # LoftQ: B @ A corrects the weight as NF4 rounds it, so it is added to that

    def applied_to(self, weight: torch.Tensor) -> torch.Tensor:
        """weight + scale * B @ A, in fp32; with DoRA, each row then rescaled to its learned magnitude."""
        weight = nf4_rounded(weight) if self.on_nf4_rounding else weight
        merged = weight.float() + self.scale * (self.b.float() @ self.a.float())
        if self.magnitude is None:
            return merged
        return merged * (self.magnitude.float() / merged.norm(dim=1)).unsqueeze(1)


def lora_updates(adapter_dir: Path) -> dict[str, LoraUpdate]:
    """The adapter's updates by the base weight's name (model.layers.0.mlp.up_proj.weight)."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    check_plain_lora(config, adapter_dir, merged=True)
    scale = gguf_alpha(config) / int(config["r"])
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    loftq = corrects_nf4_rounding(adapter_dir)
    return {
        layer + ".weight": LoraUpdate(
            lora[a_key], lora[b_key], scale, lora.get(a_key.replace(".lora_A.weight", ".lora_magnitude_vector")), loftq
        )
        for layer, (a_key, b_key) in lora_layers(lora).items()
    }


WRITE_BUFFER_BYTES = 256 * 2**20  # the gguf package's SpooledTemporaryFile keeps this much in memory


def merged_export_ram(folder: Path) -> int:
    """Bytes of RAM a merged export needs at its peak: the largest weight as loaded, in fp32, with its adapter change
    and its converted copy, plus the write buffer (the weights are read one at a time)."""
    from safetensors import safe_open

    largest = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as weights:
            largest = max([largest, *(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())])
    return largest * 4 * 3 + WRITE_BUFFER_BYTES


def check_ram_for_export(folder: Path) -> int:
    """Refuse an export that would not fit in the RAM available now; returns its peak."""
    from qlora_kit.probe.hardware import check_ram_available

    needed = merged_export_ram(folder)
    check_ram_available(
        needed,
        "Exporting",
        what=" at its peak",
        hint="Close other programs, or export the adapter alone (--format gguf-adapter): it reads no base weights.",
    )
    return needed


def rope_frequency_factors(base: Path) -> torch.Tensor | None:
    """Llama 3.1's rotary scaling as llama.cpp applies it (the rope_freqs tensor): what each rotary frequency is
    divided by, computed by transformers' own code; None for a model without it."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(base)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim = 2 * len(scaled)
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return plain / scaled


def write_model_metadata(writer, config: dict, file_type: int, family: Family) -> None:
    """The hyperparameters llama.cpp reads for the base's architecture; what llama.cpp would compute differently
    from transformers is refused."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope)  # rotary per layer type (Gemma 3): the full-attention layers' is the base
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", *family.rope_scalings):
        raise UserError(
            f"This model scales its rotary embeddings ({rope.get('rope_type') or rope.get('type')}), which the "
            "merged GGUF export does not write yet.",
            hint="Export the adapter instead (--format gguf-adapter) and use it on a GGUF of the base.",
        )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rotated = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))  # Phi-4-mini: 3/4 of a head
    values = dict(
        context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"],
        block_count=config["num_hidden_layers"],
        feed_forward_length=config["intermediate_size"],
        head_count=heads,
        head_count_kv=config.get("num_key_value_heads") or heads,
        key_length=head_dim,
        value_length=head_dim,
        rope_freq_base=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
        rope_dimension_count=int(head_dim * rotated),
        layer_norm_rms_eps=config.get("rms_norm_eps"),
        vocab_size=config["vocab_size"],
        file_type=file_type,
    )
    for key, value in (values | (family.gguf_overrides(config) if family.gguf_overrides else {})).items():
        getattr(writer, f"add_{key}")(value)  # GGUFWriter.add_context_length ...
    if family.gguf_metadata:
        family.gguf_metadata(writer, config)


def copy_tokenizer_from_gguf(writer, gguf_file: Path) -> list[str]:
    """A base that came as a GGUF keeps its tokenizer exactly as llama.cpp already reads it; returns its tokens."""
    import gguf

    fields = gguf.GGUFReader(gguf_file).fields
    for field in fields.values():
        if field.name.startswith("tokenizer."):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type)
    return fields["tokenizer.ggml.tokens"].contents()


def name_llama_cpp_loads(name: str, tokens: list[str]) -> str:
    """The model name to write: llama.cpp marks Phi-3's special tokens by the model's name, and refuses to load a
    model named phi3 or phi-3 whose vocabulary lacks them."""
    if any(kind in name.lower() for kind in ("phi3", "phi-3")) and not {"<unk>", "<s>", "</s>", "<|endoftext|>"} <= set(
        tokens
    ):
        return name.lower().replace("phi-3", "phi 3").replace("phi3", "phi 3")
    return name


# The regular expressions byte-level BPE tokenizers split text with before merging, by llama.cpp's name for them.
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3.x: digits in threes
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # Qwen2 and 2.5: digits one by one
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",  # tiktoken's o200k_base (Phi-4-mini, gpt-oss): words split at case changes
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging, read from tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PATTERNS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise UserError(
        "This tokenizer splits text in a way qlora-kit cannot name for llama.cpp yet.",
        hint="Export the adapter instead (--format gguf-adapter) and use it on a GGUF of the base.",
    )


def write_tokenizer(writer, tokenizer_folder: Path, vocab_size: int) -> list[str]:
    """The tokenizer in tokenizer.json as llama.cpp reads it: byte-level BPE (Llama 3, Qwen2, SmolLM2) as its "gpt2"
    model with merges; SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3) as its "llama"
    model, where merges follow token scores. gguf.SpecialVocab adds the special tokens and the chat template.
    Returns the tokens by id."""
    import gguf

    tokenizer_json = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise UserError(
            f"The merged GGUF export handles BPE tokenizers; this one is {model.get('type')}.",
            hint="Export the adapter instead (--format gguf-adapter) and use it on a GGUF of the base.",
        )
    sentencepiece = bool(model.get("byte_fallback"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in model["vocab"].items():
        byte = sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        tokens[token_id], types[token_id] = token, gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] >= vocab_size:
            continue  # a token the model has no embedding for (some tokenizer classes add one when loaded)
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if sentencepiece:
        if model.get("unk_token") in model["vocab"]:
            types[model["vocab"][model["unk_token"]]] = gguf.TokenType.UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # SentencePiece merges the pair whose result scores highest; converted to tokenizer.json, a token's id
        # follows its score, and the merges follow the ids.
        writer.add_token_scores([-float(token_id) for token_id in range(vocab_size)])
        writer.add_add_space_prefix(adds_space_prefix(tokenizer_json))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_folder, load_merges=not sentencepiece, n_vocab=vocab_size)
    special.add_special_token.update(special_tokens_added(tokenizer_folder))
    special.add_to_gguf(writer)
    return tokens


def special_tokens_added(tokenizer_folder: Path) -> dict[str, bool]:
    """Whether transformers' tokenizer puts a beginning- and an end-of-sequence token around a text, so that
    llama.cpp does the same (left unsaid, llama.cpp decides by the tokenizer's kind)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return {
        "bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
    }


def adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Llama 2, Mistral) or not (Gemma)."""

    def steps(part):
        part = part or {}
        return part.get("normalizers") or part.get("pretokenizers") or [part]

    prepends = [step for step in steps(tokenizer_json.get("normalizer")) if step.get("type") == "Prepend"]
    metaspace = [step for step in steps(tokenizer_json.get("pre_tokenizer")) if step.get("type") == "Metaspace"]
    return bool(prepends) or any(step.get("prepend_scheme", "always") != "never" for step in metaspace)


def as_tensor_type(weight: torch.Tensor, tensor_type: str):
    """(numpy data, GGML type) for one weight: vectors stay F32 as llama.cpp keeps them; rows that do not divide into
    Q8_0's 32-value blocks stay F16."""
    import gguf

    data = weight.float().numpy()
    kind = tensor_type if data.ndim == 2 else "f32"
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        kind = "f16"
    qtype = getattr(gguf.GGMLQuantizationType, TENSOR_TYPES[kind])
    if kind == "f32":
        return data, None
    if kind == "f16":
        return data.astype("float16"), None
    return gguf.quants.quantize(data, qtype), qtype


@dataclass
class Merged:
    """What a merged GGUF is made of."""

    name: str
    base: Path
    config: dict
    architecture: Family
    updates: dict[str, LoraUpdate]
    tokenizer_folder: Path
    source_gguf: Path | None  # the GGUF the base came as, whose tokenizer fields are copied exactly


def export_merged_gguf(
    adapter_dir: Path | None, out: Path, source: str | None = None, quant: str = "f16", say=lambda sentence: None
) -> Path:
    """Write base + adapter merged as one standalone GGUF at out, with the tokenizer and chat template inside (with
    no adapter_dir, the base alone, to carry GGUF adapters); quant is a tensor type the gguf package writes (f32, f16,
    bf16, q8_0) or a k-quant llama.cpp makes from the f16 file. say(sentence) hears the RAM the export needs at its
    peak, before it starts."""
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        check_adapter_folder(adapter_dir)
    if quant not in TENSOR_TYPES and quant not in K_QUANTS:
        raise UserError(f"Unknown --quant {quant}.", hint=f"Use one of: {', '.join([*TENSOR_TYPES, *K_QUANTS])}.")
    chosen, source = source is not None, source or base_source_for(adapter_dir)
    base = resolve_model(source)
    config = text_config(read_model_config(base))
    architecture = gguf_family(config)
    note = check_adapter_on_base(adapter_dir, base, chosen) if adapter_dir else None
    if note:
        say(note)
    updates = lora_updates(adapter_dir) if adapter_dir else {}
    llama_cpp = llama_cpp_for(quant) if quant in K_QUANTS else None  # before any work: it may not be installed
    say(f"Merging one weight at a time: about {check_ram_for_export(base) / 2**30:.1f} GiB of RAM at the peak.")
    merged = Merged(
        run_name_of(adapter_dir) if adapter_dir else base.name,
        base,
        config,
        architecture,
        updates,
        tokenizer_folder(adapter_dir, base, needs="tokenizer.json"),
        gguf_file_of(source),
    )
    with staged_file(out, EXPORT_HINT) as staging:
        if llama_cpp:  # llama.cpp quantizes from an f16 file, written beside the output and removed after
            f16 = staging.with_name(staging.name + ".f16")
            try:
                write_merged_gguf(f16, merged, "f16")
                quantize_with_llama_cpp(llama_cpp, f16, staging, quant)
            finally:
                f16.unlink(missing_ok=True)
        else:
            write_merged_gguf(staging, merged, quant)
    return Path(out)


def write_merged_gguf(path: Path, merged: Merged, written_type: str) -> None:
    """Stream the base's weights, each with its adapter change added, into a GGUF at path."""
    import gguf

    writer = gguf.GGUFWriter(
        path, merged.architecture.gguf_name, use_temp_file=True
    )  # each tensor goes to disk as made
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[written_type]
    write_model_metadata(writer, merged.config, int(file_type), merged.architecture)
    if merged.source_gguf:
        tokens = copy_tokenizer_from_gguf(writer, merged.source_gguf)
    else:
        tokens = write_tokenizer(writer, merged.tokenizer_folder, merged.config["vocab_size"])
    writer.add_name(name_llama_cpp_loads(merged.name, tokens))
    factors = rope_frequency_factors(merged.base)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    beside = merged.architecture.gguf_tensors
    for name, values in (beside(merged.config) if beside else {}).items():
        writer.add_tensor(name, values)
    updates = dict(merged.updates)
    for gguf_name, weight in llama_cpp_weights(merged, updates):
        kept_f32 = bool(merged.architecture.gguf_f32) and gguf_name.endswith(merged.architecture.gguf_f32)
        data, qtype = as_tensor_type(weight, "f32" if kept_f32 else written_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    if updates:
        raise UserError(
            f"The adapter changes weights the base model does not have: {', '.join(sorted(updates)[:3])}.",
            hint="Pass the base it was trained on with --model.",
        )
    write_out(writer)


def llama_cpp_weights(merged: Merged, updates: dict):
    """(llama.cpp's name, weight as llama.cpp reads it) for every base weight llama.cpp uses, one at a time, each with
    its adapter change added; updates used are taken out of updates."""
    architecture = merged.architecture
    names = tensor_name_map(architecture, merged.config)
    heads = rotary_heads(merged.config) if architecture.rotary_rows_interleaved else {}
    weights = with_experts_stacked(model_weights(merged.base), merged.config, updates)
    if architecture.gguf_weights:  # a checkpoint whose layout differs from what the tensor name map knows
        weights = architecture.gguf_weights(weights, merged.config, updates)
    for name, weight in weights:
        gguf_name = names.get_name(language_model_name(name), try_suffixes=(".weight", ".bias"))
        if gguf_name is None or (architecture.output_is_embeddings and name == "lm_head.weight"):
            continue  # rotary caches, a vision tower (llama.cpp's mmproj file holds it) and the like; Gemma's tied head
        if name in updates:
            weight = updates.pop(name).applied_to(weight)
        projection = name.rsplit(".", 2)[-2]
        if projection in heads:
            weight = interleave_rotary_rows(weight, heads[projection])
        if architecture.norms_plus_one and name.endswith("norm.weight"):
            weight = weight.float() + 1
        yield gguf_name, architecture.gguf_weight(name, weight, merged.config) if architecture.gguf_weight else weight


EXPERT_WEIGHT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def with_experts_stacked(weights, config: dict, updates: dict):
    """The weights, with each layer's per-expert projections (as checkpoints hold them) stacked into one tensor per
    projection (experts x out x in), as llama.cpp holds them, each expert's adapter change added; updates used up
    are taken out of updates (gate_up_proj's once both its gate and up rows are)."""
    experts = moe_shape(config).get("num_experts", 0)
    waiting: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    rows_used: dict[str, set] = {}
    for name, weight in weights:
        match = EXPERT_WEIGHT.fullmatch(name) if experts else None
        if match is None:
            yield name, weight
            continue
        layer, expert, projection = match[1], int(match[2]), match[3]
        group = waiting.setdefault((layer, projection), {})
        group[expert] = weight
        if len(group) < experts:
            continue
        stack = torch.stack([group[e].float() for e in range(experts)])
        del waiting[(layer, projection)]
        key, change = experts_change(layer, projection, stack, updates)
        if key is not None:
            used = rows_used.setdefault(key, set())
            used.add(projection)
            if projection == "down_proj" or used >= {"gate_proj", "up_proj"}:
                updates.pop(key)
        yield f"{layer}.{projection}.weight", stack + change
    if waiting:
        raise UserError(
            f"The base's checkpoint lacks some experts of {next(iter(waiting))[0]}.",
            hint="Check that every shard of the model is in its folder.",
        )


def llama_cpp_for(quant: str):
    """llama-cpp-python (the [export] extra), whose llama.cpp quantizer makes the k-quants."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--quant {quant} needs llama.cpp's quantizer, which is not installed.",
            hint='Run: pip install "qlora-kit[export]" (pip builds llama.cpp, 6-14 minutes), or export '
            f"--quant f16 and let Ollama quantize it: ollama create NAME --quantize q{quant[1:].upper()} "
            "-f Modelfile.",
        ) from None
    return llama_cpp


def quantize_with_llama_cpp(llama_cpp, f16_file: Path, out: Path, quant: str) -> None:
    """Quantize an f16 GGUF to a k-quant with llama.cpp's own quantizer, its per-tensor report kept off the screen."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    with tempfile.TemporaryFile() as log, c_output_to(log):  # llama.cpp reports every tensor on stderr
        failed = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out).encode(), params) != 0
        log.seek(0)
        said = log.read().decode(errors="replace").strip().splitlines()
    if failed:
        raise UserError(
            f"llama.cpp could not quantize to {quant}: {said[-1] if said else 'no reason given'}.",
            hint="Try --quant q8_0 or f16.",
        )


@contextlib.contextmanager
def c_output_to(file):
    """Send what C code writes to stdout and stderr (file descriptors 1 and 2) to file for the block."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
