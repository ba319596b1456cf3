"""`qlora-kit merge`: fold an adapter into its base and write a standalone model folder that plain transformers loads.

Default: the base is reloaded in 16-bit (on the CPU, after checking RAM) and W + (alpha/r) B A is computed
exactly in that precision. --from-quantized instead merges into the dequantized 4-bit weights the adapter was
trained against: it needs no 16-bit copy of the base, but every weight carries NF4's rounding error. An adapter that
started as LoftQ corrects that rounding, so the weights it adapts are NF4-rounded before it is added either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_kit.adapter.folder import (
    base_source_for,
    check_adapter_on_base,
    corrects_nf4_rounding,
    say_note,
    tokenizer_folder,
)
from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError
from qlora_kit.files import check_not_under_a_file, staged_folder
from qlora_kit.model.experts import dequantize_experts
from qlora_kit.model.load import (
    code_needs_trust,
    dequantized_on_load,
    load_base_4bit,
    load_tokenizer,
    nf4_rounded,
    saves_plain_tensors,
    stored_in_mxfp4,
)
from qlora_kit.probe.hardware import check_ram_available
from qlora_kit.probe.sources import check_adapter_folder, read_model_config, resolve_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge_adapter(
    source: str | None,
    adapter_dir: Path,
    out: Path,
    dtype: str = "bf16",
    from_quantized: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write out/ (safetensors shards, config, tokenizer) holding base + adapter merged; returns out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    if dtype not in DTYPES:
        raise UserError(f"Unknown --dtype {dtype}.", hint=f"Use one of: {', '.join(DTYPES)}.")
    check_new_folder(out)
    folder = resolve_model(source or base_source_for(adapter_dir))
    say_note(check_adapter_on_base(adapter_dir, folder, chosen=source is not None))
    torch_dtype = DTYPES[dtype]
    check_ram_for(folder, torch_dtype)
    cpu = torch.device("cpu")
    if from_quantized:
        base = load_base_4bit(folder, torch_dtype, cpu, trust_remote_code)
        base = base.dequantize()  # the 4-bit weights as the adapter saw them, now plain tensors in torch_dtype
        dequantize_experts(base)
    else:
        with code_needs_trust(folder):
            base = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=torch_dtype,
                device_map={"": cpu},
                trust_remote_code=trust_remote_code,
                **dequantized_on_load(folder),
            )
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    if corrects_nf4_rounding(adapter_dir) and not from_quantized:
        round_adapted_weights(with_adapter)
    merged = with_adapter.merge_and_unload()
    merged.config.use_cache = True  # a merged model is for inference
    saves_plain_tensors(merged)
    tokenizer = load_tokenizer(tokenizer_folder(adapter_dir, folder), trust_remote_code)
    with staged_folder(out) as staging:  # `out` is absent or empty (checked above)
        merged.save_pretrained(staging, max_shard_size="2GB")  # safetensors shards
        tokenizer.save_pretrained(staging)
    return out


def check_new_folder(out: Path) -> None:
    """--out must be a new (or empty) folder: an existing file or folder's content is never replaced by a merge."""
    out = Path(out)
    check_not_under_a_file(out, hint="Choose another --out folder.")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file; merge writes a model folder there.", hint="Choose a new --out folder.")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty.", hint="Choose a new --out folder.")


def round_adapted_weights(model) -> None:
    """Give each adapted 16-bit weight NF4's rounding: a LoftQ adapter corrects exactly that rounding, so added to the
    unrounded weight it would correct an error that is not there."""
    for module in model.modules():
        if hasattr(module, "lora_A"):
            weight = module.base_layer.weight
            weight.data = nf4_rounded(weight.data).to(weight.dtype)


def check_ram_for(folder: Path, dtype: torch.dtype) -> None:
    """Refuse a merge whose 16-bit model would not fit in available RAM (merging happens on the CPU)."""
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )
    parameters = weights / (4 if _stored_as_fp32(folder) else 2)
    config = read_model_config(folder)
    if stored_in_mxfp4(config):  # its files hold the experts at half a byte a weight: count the parameters instead
        parameters = ModelShape.from_config(str(folder), config).parameter_count()
    needed = parameters * torch.finfo(dtype).bits / 8 * 1.2  # 20%: the copy being written
    check_ram_available(
        needed,
        "Merging",
        what=f" for the {str(dtype).removeprefix('torch.')} model",
        hint="Close other programs, or merge on a machine with more RAM; the adapter works unmerged too.",
    )


def _stored_as_fp32(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return (config.get("dtype") or config.get("torch_dtype")) == "float32"
