"""The model: a base loaded in 4-bit NF4 through bitsandbytes, with LoRA adapters from peft on top.

Only LoRA weights train, in fp32. Every other weight stays as loaded: linear layers in NF4 with
double-quantized constants, embeddings and norms in the 16-bit compute dtype (fp32 on CPU), never upcast.
"""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from qlora_kit.architectures import family_of, frozen_modules_pattern
from qlora_kit.architectures.shape import moe_shape, names_peft_takes_for_experts
from qlora_kit.errors import UserError
from qlora_kit.model.experts import (
    EXPERT_WEIGHTS,
    adapter_config,
    expert_weight_keys,
    expert_weight_names,
    experts_in_4bit,
    is_experts,
    with_experts_lora,
)
from qlora_kit.plan.recipes import Recipe, rank_of_experts, target_names
from qlora_kit.probe.sources import (
    adapter_in,
    check_adapter_folder,
    lora_layers,
    model_weights,
    read_model_config,
    text_config,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device_and_dtype(
    precision: str = "auto", gpu: int = 0, config: dict | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA GPU `gpu` (this rank's, when distributed) if present, else CPU; compute dtype bf16 where supported,
    fp16 on older GPUs (fp32 for a family whose activations overflow fp16: config is the base's config.json), fp32
    on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu)
        if precision == "auto":
            overflows = config is not None and getattr(family_of(text_config(config)), "fp16_overflows", False)
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32" if overflows else "fp16"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError(f"{torch.cuda.get_device_name(0)} does not support bf16.", hint="Use --precision fp16.")
        return device, DTYPES[precision]
    if precision == "fp16":
        raise UserError(
            "fp16 training needs a CUDA GPU, and none is visible.", hint="Use --precision fp32 (or bf16) on CPU."
        )
    return torch.device("cpu"), DTYPES["fp32" if precision == "auto" else precision]


@contextmanager
def code_needs_trust(folder: Path):
    """Turn transformers' refusal to run a model folder's own code (a ValueError naming trust_remote_code) into
    one sentence: which folder, and the flag that allows it."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(
            f"{folder} ships its own Python code (its config names it in auto_map), and qlora-kit runs a "
            "model's code only when you allow it.",
            hint="Read the .py files in that folder; if you trust them, add --trust-remote-code.",
        ) from None


def load_tokenizer(folder: Path, trust_remote_code: bool = False, chat_template_kwargs: str = ""):
    """The model's tokenizer, with a pad token (the eos token when the model defines none) and the chat template's
    variables set as chat_template_kwargs says. Code shipped with a model runs only with trust_remote_code."""
    from transformers import AutoTokenizer

    with code_needs_trust(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    variables = parse_template_variables(chat_template_kwargs)
    if variables:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"chat_template_kwargs sets {', '.join(variables)}, but this model has no chat template.",
                hint="Drop chat_template_kwargs (--chat-template-kwargs).",
            )
        tokenizer.chat_template = with_variables_set(tokenizer.chat_template, variables)
    return tokenizer


def with_variables_set(template: str, variables: dict) -> str:
    """The chat template with variables set at its start: so the adapter's saved copy renders prompts as training
    did everywhere (generate, chat, a GGUF's template). "{%-" strips nothing; the template's own text follows."""
    return "".join(f"{{%- set {key} = {json.dumps(value)} %}}" for key, value in variables.items()) + template


def parse_template_variables(text: str) -> dict:
    """KEY=VALUE[,KEY=VALUE] as template variables: true/false as booleans, numbers as numbers, else text."""
    variables = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, equals, value = (s.strip() for s in part.partition("="))
        if not equals or not key.isidentifier():
            raise UserError(
                f"chat_template_kwargs: {part!r} is not KEY=VALUE.",
                hint="For example: --chat-template-kwargs enable_thinking=false",
            )
        if value.lower() in ("true", "false"):
            variables[key] = value.lower() == "true"
        else:
            variables[key] = json.loads(value) if re.fullmatch(r"-?\d+(\.\d+)?", value) else value
    return variables


def load_base_4bit(
    folder: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, shardable: bool = False
):
    """Load a causal LM with its linear layers quantized to NF4 with double quantization. shardable stores the
    packed 4-bit values in tensors of the compute dtype (same bytes), so FSDP can shard them with the rest."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = read_model_config(folder)
    family = family_of(config)
    if shardable and moe_shape(text_config(config)):
        raise UserError(
            f"{folder} is a mixture-of-experts model, whose 4-bit experts FSDP cannot shard yet.",
            hint="Train it with parallel ddp (each GPU holds the whole model), or on one GPU.",
        )
    # A linear router (Gemma 4's) stays 16-bit like the other families' parameter routers
    kept_16bit = [f".*{module}" for module in family.towers + family.routers] if family else []
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantizes the absmax constants too: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
        # A multimodal checkpoint's vision tower stays as it is: text training never runs it, nor adapts it.
        # transformers matches these from the start of a module's path, as regular expressions: hence the ".*"
        llm_int8_skip_modules=[*kept_16bit, "lm_head"] if kept_16bit else None,
    )
    mxfp4 = stored_in_mxfp4(config)
    try:
        with code_needs_trust(folder), experts_in_4bit(from_mxfp4=mxfp4):
            # An MXFP4 checkpoint (gpt-oss) is read as 16-bit, expert tensor by expert tensor, and packed to NF4
            extra = {"config": without_quantization(folder, trust_remote_code)} if mxfp4 else {}
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                quantization_config=quantization,
                dtype=dtype,
                device_map={"": device},
                trust_remote_code=trust_remote_code,
                **extra,
            )
    except (ValueError, KeyError) as e:
        raise UserError(
            f"{folder} could not be loaded as a causal language model: {e}",
            hint="qlora-kit fine-tunes decoder-only text models (Llama, Gemma, Qwen, Mistral, Phi ...).",
        ) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def stored_in_mxfp4(config: dict) -> bool:
    """Whether a checkpoint holds its experts in MXFP4 (gpt-oss as published)."""
    stored = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    return stored.get("quant_method") == "mxfp4"


def dequantized_on_load(folder: Path) -> dict:
    """from_pretrained's arguments for a 16-bit load: an MXFP4 checkpoint dequantized by transformers even where its
    MXFP4 kernels would run (PEFT and merging need plain tensors)."""
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)} if stored_in_mxfp4(read_model_config(folder)) else {}


def saves_plain_tensors(model) -> None:
    """Forget the MXFP4 decoding a 16-bit load went through: transformers 5.23 reverses it on save, writing the plain
    experts under their MXFP4 names (`*_blocks`), which a later load drops."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            conversion
            for conversion in conversions
            if not any(
                type(operation).__name__ == "Mxfp4Dequantize" for operation in getattr(conversion, "operations", [])
            )
        ]


def without_quantization(folder: Path, trust_remote_code: bool = False):
    """The model's config with the checkpoint's quantization_config dropped (transformers refuses a second one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    for part in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(part, "quantization_config"):
            del part.quantization_config
    return config


def attach_lora(model, recipe: Recipe):
    """Freeze the base, enable gradient checkpointing, and add trainable fp32 LoRA weights: fresh ones, or those of
    the adapter the recipe starts from."""
    for param in model.parameters():
        param.requires_grad_(False)
    if recipe.gradient_checkpointing:
        set_checkpointing(model, offload=recipe.activation_offload, uncheckpointed_layers=recipe.uncheckpointed_layers)
    model = start_from_adapter(model, recipe) if recipe.init_adapter else add_fresh_lora(model, recipe)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # optimizer updates of bf16 LoRA weights would round away
    return model


def add_fresh_lora(model, recipe: Recipe):
    """LoRA weights as peft initialises them (B zero, so training starts from the base)."""
    from peft import LoraConfig, get_peft_model

    if recipe.lora_init in ("pissa", "olora"):
        raise UserError(
            f"lora_init {recipe.lora_init} moves the main directions of each weight out of the base and into "
            "the adapter; a 4-bit base would have to be quantized again, and the adapter would then no longer "
            "fit the original base model.",
            hint="Use lora_init loftq, which starts from the 4-bit base as it is, or default.",
        )
    names = target_names(recipe.target_modules)
    expert_rank = rank_of_experts(
        recipe, moe_shape(model.config.get_text_config().to_dict()).get("experts_per_token", 1)
    )
    experts = [name for name in expert_weight_names(model) if names == "all-linear" or name in names]
    if experts and (recipe.dropout or recipe.use_dora):
        setting = "LoRA dropout" if recipe.dropout else "DoRA"
        raise UserError(
            f"{setting} cannot be used on a mixture-of-experts model's experts: PEFT adapts their weights as "
            "parameters, not as layers with an input to drop out or a magnitude per output.",
            hint=f"Set {'dropout 0' if recipe.dropout else 'use_dora false'}, or adapt the attention layers "
            "alone (target_modules attention).",
        )
    layers = present_in(model, names, allow_none=bool(experts))
    if experts:
        # Named, not "all-linear": PEFT reads a MoE model's "all-linear" (and the names gate, gate_proj, up_proj,
        # down_proj) as transformers 4's per-expert layers, and adds the router with a doubled rank on gate_up_proj;
        # a shared expert's layers of those names are frozen for that reason, in the families it does that for
        taken = names_peft_takes_for_experts(model.config.get_text_config().to_dict())
        layers = [
            name for name in (linear_layer_names(model) if names == "all-linear" else layers) if name not in taken
        ]
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=layers,
        target_parameters=experts or None,  # each expert's weights; the router is a parameter too, and stays frozen
        # each expert at its own rank, its update scaled as the other layers' (alpha / rank, or / sqrt(rank)); keyed
        # "experts.down_proj", since a bare "down_proj" would give a dense MLP's down_proj (Gemma 4) that rank too
        rank_pattern={key: expert_rank for key in expert_weight_keys(model, experts)},
        alpha_pattern={
            key: recipe.alpha * (expert_rank / recipe.rank) ** (0.5 if recipe.use_rslora else 1)
            for key in expert_weight_keys(model, experts)
        },
        exclude_modules=frozen_modules_pattern(model),  # a vision tower has its q_proj, fc1 ... too; a router its proj
        use_rslora=recipe.use_rslora,
        use_dora=recipe.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, with_experts_lora(config) if experts else config)
    except ValueError as e:
        raise UserError(
            f"LoRA could not be attached: {e}", hint="Check target_modules against the model's layer names."
        ) from None
    if recipe.lora_init == "loftq":
        start_as_the_rounding_error(model)
    return model


def start_as_the_rounding_error(model) -> None:
    """LoftQ's start (one alternation, as peft's replace_lora_weights_loftq, which needs CUDA): each adapted 4-bit
    weight Q gets A and B with scale * B @ A the best rank-r approximation of W - Q, W the 16-bit weight."""
    import bitsandbytes.functional as bnb_functional

    adapted = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    for name, original in model_weights(model.get_base_model().name_or_path):
        module = adapted.get(name)
        if module is None:
            continue
        original = original.float()
        quantized = module.base_layer.weight
        rounded = bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
        rank, scale = module.r["default"], module.scaling["default"]
        u, s, v = torch.svd_lowrank(original - rounded, q=min(rank + 8, *original.shape), niter=4)
        root = (s[:rank] / scale).sqrt()
        with torch.no_grad():
            module.lora_B["default"].weight.copy_(u[:, :rank] * root)
            module.lora_A["default"].weight.copy_(root[:, None] * v[:, :rank].T)


def nf4_rounded(weight: torch.Tensor) -> torch.Tensor:
    """weight as the 4-bit base holds it (NF4 with double-quantized constants, as load_base_4bit quantizes), in fp32:
    what a LoftQ adapter's correction was fitted to."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight.float().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    return bnb_functional.dequantize_4bit(packed, state).float()


def present_in(model, names: str | list[str], allow_none: bool = False) -> str | list[str]:
    """The layer names the model has (a preset lists every architecture's), so the adapter's config names only
    those; all of them when none is there, for peft to say so (unless allow_none: experts' weights are targeted)."""
    if isinstance(names, str):
        return names
    layers = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [name for name in names if name in layers] or ([] if allow_none else names)


def linear_layer_names(model) -> list[str]:
    """The names of the linear layers "all-linear" means: every one but the output head's, a tower's and a router's."""
    head = model.get_output_embeddings()
    frozen = frozen_modules_pattern(model)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and module is not head
            and not (frozen and re.fullmatch(frozen, name))
        }
    )


def settings_from_adapter(recipe: Recipe) -> Recipe:
    """recipe with the rank, alpha, layers and variant of the adapter it starts from (recipe.init_adapter); a different value
    set in the recipe or on the command line is refused, since the adapter's weights have its own."""
    if not recipe.init_adapter:
        return recipe
    folder = adapter_in(recipe.init_adapter)
    check_adapter_folder(folder)
    if recipe.lora_init != "default":
        raise UserError(
            f"lora_init {recipe.lora_init} says how a fresh adapter starts; this run starts from {folder}'s weights.",
            hint="Leave lora_init out with --from-adapter.",
        )
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{folder} is a {config['peft_type']} adapter; qlora-kit continues LoRA adapters.",
            hint="Start a fresh run without --from-adapter.",
        )
    targets = config.get("target_modules") or "all-linear"
    # peft saves the layers' names, sometimes with their paths (model.layers.0.mlp.up_proj); the recipe keeps the
    # names (up_proj), which the plan counts per block. The weights are placed by the adapter's own config.
    found = {
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "target_modules": targets
        if isinstance(targets, str)
        else ",".join(sorted({t.rsplit(".", 1)[-1] for t in targets})),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "expert_rank": max((config.get("rank_pattern") or {}).values(), default=0),
    }
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    differ = [
        f"{name} {getattr(recipe, name)!r} (the adapter's: {value!r})"
        for name, value in found.items()
        if getattr(recipe, name) not in (value, defaults[name])
    ]
    if differ:
        raise UserError(
            f"{folder} has its own LoRA settings, and these differ: {', '.join(differ)}.",
            hint="Leave them out: a run started from an adapter takes them from it.",
        )
    return dataclasses.replace(recipe, init_adapter=str(folder), **found)


def start_from_adapter(model, recipe: Recipe):
    """LoRA with the configuration and weights of recipe.init_adapter (its dropout is the recipe's: a training choice)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(recipe.init_adapter)
    config = adapter_config(folder)
    config.lora_dropout, config.inference_mode = recipe.dropout, False
    weights = load_file(folder / "adapter_model.safetensors")
    check_adapter_fits(model, weights, folder, config.base_model_name_or_path)
    model = get_peft_model(model, config)
    loaded = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:
        raise UserError(
            f"{folder} holds weights qlora-kit cannot place: {', '.join(loaded.unexpected_keys[:3])}.",
            hint="Start a fresh run without --from-adapter.",
        )
    return model


def check_adapter_fits(base, weights: dict, folder: Path, made_for: str | None) -> None:
    """Refuse an adapter made for another base model (made_for, as its config names it): every layer it adapts must
    exist here with its shape."""
    hint = (
        f"Train on the base it was made for ({made_for or 'see its adapter_config.json'}) "
        "with --model, or start a fresh run without --from-adapter."
    )
    for name, (a_key, b_key) in lora_layers(weights).items():
        a, b = weights[a_key], weights[b_key]
        try:
            layer = base.get_submodule(name.replace(".base_layer", ""))  # PEFT nests one wrapper per expert weight
        except AttributeError:
            raise UserError(
                f"{folder} adapts {name}, which this base model does not have: it was made for another model.",
                hint=hint,
            ) from None
        if is_experts(layer):
            maps = {
                (w.shape[1], w.shape[2]) if layer.is_transposed else (w.shape[2], w.shape[1])
                for w in (getattr(layer, n, None) for n in EXPERT_WEIGHTS)
                if isinstance(w, torch.Tensor)
            }
            if (a.shape[1], b.shape[0]) not in maps or a.shape[0] % layer.num_experts:
                raise UserError(
                    f"{folder} was made for another base model: its {name} does not fit this model's "
                    f"{layer.num_experts} experts.",
                    hint=hint,
                )
        elif (b.shape[0], a.shape[1]) != (layer.out_features, layer.in_features):
            raise UserError(
                f"{folder} was made for another base model: its {name} maps {a.shape[1]} to {b.shape[0]} "
                f"features, this model's {layer.in_features} to {layer.out_features}.",
                hint=hint,
            )


def set_checkpointing(model, offload: bool = False, uncheckpointed_layers: int = 0) -> None:
    """Checkpoint every decoder layer but the last `uncheckpointed_layers` (non-reentrant); with offload, the saved
    layer inputs of a model on a GPU wait in pinned host RAM (on the CPU they are in host RAM already). The one place
    these settings are applied: at the start of a run, after an out-of-memory step-down, and on resuming."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    on_gpu = next(base.parameters()).device.type == "cuda"
    # Non-reentrant checkpointing needs no requires_grad on the inputs, so embeddings stay frozen as they are.
    base.activation_checkpointing_enable({"use_reentrant": False}, offload=offload and on_gpu)
    # The last layers are the ones left whole: backward reaches them first and frees their activations before
    # any checkpointed layer is recomputed, so the two never add up.
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[max(0, len(layers) - uncheckpointed_layers) :] if uncheckpointed_layers else []:
        layer.gradient_checkpointing = False


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting each 4-bit weight as its unpacked size."""
    return model.get_nb_trainable_parameters()


def lm_parts(model):
    """The decoder stack, the output projection weight and the logit soft-cap the chunked loss needs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return base.get_decoder(), head.weight, softcap


@contextmanager
def no_dropout(model):
    """Dropout off, 4-bit layers left in train mode, for forward passes that must not be random.

    bitsandbytes (0.50, CPUs with AVX512-bf16) repacks a 4-bit weight in place for inference the first time it
    sees an eval-mode forward without gradients, and training on the repacked weight then goes wrong; so
    model.eval() is never used while training, only this.
    """
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    before = [module.training for module in dropouts]  # so a nested use leaves the outer one's dropout off
    model.train()
    for module in dropouts:
        module.eval()
    try:
        yield model
    finally:
        model.train()
        for module, training in zip(dropouts, before):
            module.train(training)


def check_logits_path(model, device: torch.device) -> None:
    """Refuse models whose logits are not `final_hidden @ head.T` (logit scaling, a head bias ...)."""
    decoder, head_weight, softcap = lm_parts(model)
    ids = torch.arange(1, 9, device=device).unsqueeze(0) % head_weight.shape[0]
    with no_dropout(model), torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        ours = (decoder(input_ids=ids).last_hidden_state.to(head_weight.dtype) @ head_weight.t()).float()
        if softcap:
            ours = torch.tanh(ours / softcap) * softcap
    scale = expected.abs().max().clamp(min=1e-6)
    if ((ours - expected).abs().max() / scale) > 1e-2:
        name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        raise UserError(
            f"{name} computes its logits in a way qlora-kit's chunked loss does not reproduce.",
            hint="Please report this model to qlora-kit; Llama, Gemma, Qwen, Mistral and Phi work.",
        )
