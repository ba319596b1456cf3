"""Mixture-of-experts layers in 4-bit, with LoRA on each expert.

transformers 5 holds a layer's experts as fused 3-D parameters (`gate_up_proj`: experts x out x in, `down_proj`),
which bitsandbytes' 4-bit loading leaves in 16-bit: 90% of Qwen3-30B-A3B's weights. Here each expert's weights
are NF4 with double quantization like the linear layers, quantized as the checkpoint's tensors arrive (a layer's
16-bit tensor lives only until it is packed), and dequantized one expert at a time in forward and again in
backward, so no 16-bit expert copy outlives its matmul. LoRA on the experts is PEFT's own (target_parameters, so
the adapter loads in plain PEFT on a 16-bit model), computed from each expert's low-rank factors instead of
PEFT's whole-stack weight delta. The router stays frozen and 16-bit.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' names, whatever the family


def is_experts(module) -> bool:
    """Whether a module holds a layer's experts as 3-D parameters (transformers' use_experts_implementation)."""
    return hasattr(module, "is_transposed") and any(
        isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).dim() == 3
        for name in EXPERT_WEIGHTS
    )


def expert_weight_names(model) -> list[str]:
    """The expert weights' parameter names (gate_up_proj, down_proj ...), for PEFT's target_parameters; [] for a
    dense model."""
    found = {
        name
        for module in model.modules()
        if is_experts(module)
        for name in EXPERT_WEIGHTS
        if isinstance(getattr(module, name, None), torch.Tensor)
    }
    return sorted(found)


def expert_weight_keys(model, names: list[str]) -> list[str]:
    """Those expert weights as "experts.down_proj", the experts module's name before each: the keys of a rank_pattern
    that match no dense layer of the same name."""
    return sorted(
        {
            f"{path.rsplit('.', 1)[-1]}.{name}"
            for path, module in model.named_modules()
            if is_experts(module)
            for name in names
            if isinstance(getattr(module, name, None), torch.Tensor)
        }
    )


class DequantizedMatmul(torch.autograd.Function):
    """x @ W.T (x @ W for a transposed layout) with W in 4-bit: dequantized in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, packed, state, transposed):
        import bitsandbytes.functional as bnb_functional

        ctx.state, ctx.transposed = state, transposed
        ctx.save_for_backward(packed)
        weight = bnb_functional.dequantize_4bit(packed, state).to(x.dtype)
        return x @ weight if transposed else x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as bnb_functional

        (packed,) = ctx.saved_tensors
        weight = bnb_functional.dequantize_4bit(packed, ctx.state).to(grad.dtype)
        return (grad @ weight.t() if ctx.transposed else grad @ weight), None, None, None


class Experts4bit(torch.nn.Module):
    """Mixed into a transformers experts class (see quantize_experts_on_load): each 3-D expert weight is kept as
    NF4, one quantized block per expert, and its Parameter becomes a zero-stride placeholder of the full shape (no
    memory), which PEFT reads for the LoRA shapes and parameter counts read as the weights' size."""

    def __setattr__(self, name, value):
        if (
            name in EXPERT_WEIGHTS
            and isinstance(value, torch.Tensor)
            and value.dim() == 3
            and value.device.type != "meta"
        ):
            value = self._quantize(name, value)
        super().__setattr__(name, value)

    def _quantize(self, name: str, weights: torch.Tensor) -> torch.nn.Parameter:
        import bitsandbytes.functional as bnb_functional

        packed, states = [], []
        for expert in weights:  # one expert a block, so one can be dequantized alone
            data, state = bnb_functional.quantize_4bit(
                expert.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            packed.append(data)
            states.append(state)
        # Kept outside the module's parameters and buffers: transformers replaces every buffer the checkpoint does not
        # hold once loading ends, and the packed weights would be lost
        self.__dict__.setdefault("packed", {})[name] = (torch.stack(packed), states)
        placeholder = torch.nn.Parameter(
            torch.zeros((), dtype=weights.dtype, device=weights.device).expand(weights.shape), requires_grad=False
        )
        placeholder._is_hf_initialized = True  # transformers would otherwise initialise it as a missing weight
        return placeholder

    def expert_matmul(self, name: str, expert: int, x: torch.Tensor, lora: dict) -> torch.Tensor:
        """x through one expert's weight `name` (4-bit, dequantized for this product only), plus its LoRA."""
        packed, states = self.packed[name]
        out = DequantizedMatmul.apply(x, packed[expert], states[expert], self.is_transposed)
        for lora_a, lora_b, scale, rank in lora.get(name, ()):
            experts = lora_a.shape[0] // rank
            a = lora_a[
                expert * rank : (expert + 1) * rank
            ]  # PEFT's layout: A (rank x experts, in), B (out, rank x experts)
            b = lora_b[:, expert::experts]
            out = out + ((x.to(a.dtype) @ a.t()) @ b.t() * scale).to(out.dtype)
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights, lora: dict | None = None):
        if torch.nn.utils.parametrize.is_parametrized(self):
            raise RuntimeError(
                "A plain PEFT ParamWrapper wraps 4-bit experts, whose LoRA it would not apply: the "
                "adapter's LoraConfig must go through experts.with_experts_lora."
            )
        lora = lora or {}
        tokens, top_k = top_k_index.shape
        chosen = top_k_index.reshape(-1)
        # The (token, slot) pairs sorted by expert: each expert takes one contiguous run of them. Outputs are written
        # to their pair's row and summed over the slots, not added up with index_add_ (whose order varies on CUDA,
        # and an exact resume needs the same sums every time)
        order = torch.argsort(chosen, stable=True)
        counts = torch.bincount(chosen, minlength=self.num_experts)[: self.num_experts].tolist()  # past them: masked
        up_name = "gate_up_proj" if self.has_gate else "up_proj"
        out = hidden_states.new_zeros(tokens * top_k, hidden_states.shape[-1])
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            x = hidden_states[pairs // top_k]
            up = self.expert_matmul(up_name, expert, x, lora)
            if self.has_bias:
                up = up + getattr(self, f"{up_name}_bias")[expert]
            between = self._apply_gate(up) if self.has_gate else self.act_fn(up)
            down = self.expert_matmul("down_proj", expert, between, lora)
            if self.has_bias:
                down = down + self.down_proj_bias[expert]
            if getattr(self, "has_post_expert_norm", False):
                down = self.post_expert_norm(down)
            out[pairs] = down.to(out.dtype)
        weighted = out * top_k_weights.reshape(-1, 1).to(out.dtype)
        return weighted.view(tokens, top_k, -1).sum(dim=1)


@functools.cache
def _four_bit_class(cls: type) -> type:
    return type(f"{cls.__name__}4bit", (Experts4bit, cls), {})


def quantize_experts_on_load(model) -> None:
    """Make every experts module of a model not yet loaded keep its expert weights in NF4 as they arrive."""
    for module in model.modules():
        if is_experts(module) and not isinstance(module, Experts4bit):
            module.__class__ = _four_bit_class(type(module))


@contextmanager
def experts_in_4bit(from_mxfp4: bool = False):
    """While a 4-bit from_pretrained runs, the experts modules quantize their weights as they load: transformers
    calls this step once the model's skeleton exists (on the meta device) and before any weight is read.
    from_mxfp4: the checkpoint holds the experts in MXFP4 (gpt-oss's blocks and scales); transformers' own MXFP4
    dequantization turns each tensor into the compute dtype as it is read, and the experts module packs it to NF4."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    before = Bnb4BitHfQuantizer._process_model_before_weight_loading
    conversions = Bnb4BitHfQuantizer.get_weight_conversions

    def and_the_experts(self, model, *args, **kwargs):
        before(self, model, *args, **kwargs)
        quantize_experts_on_load(model)

    def and_mxfp4(self):
        from transformers.core_model_loading import WeightConverter
        from transformers.integrations.mxfp4 import Mxfp4Dequantize

        stored = {name: [f"{name}_blocks", f"{name}_scales"] for name in ("gate_up_proj", "down_proj")}
        return conversions(self) + [
            WeightConverter(names, name, [Mxfp4Dequantize(self)]) for name, names in stored.items()
        ]

    Bnb4BitHfQuantizer._process_model_before_weight_loading = and_the_experts
    if from_mxfp4:
        Bnb4BitHfQuantizer.get_weight_conversions = and_mxfp4
    try:
        yield
    finally:
        Bnb4BitHfQuantizer._process_model_before_weight_loading = before
        Bnb4BitHfQuantizer.get_weight_conversions = conversions


@functools.cache
def experts_lora_class() -> type:
    """ExpertsLora, made on first use so that importing this module (as every command does) does not import PEFT."""
    from peft.tuners.lora.layer import ParamWrapper

    class ExpertsLora(ParamWrapper):
        """PEFT's LoRA on one 3-D expert weight of a 4-bit experts module. PEFT nests one wrapper per targeted
        weight; the outermost collects every wrapper's factors and hands them to the experts' own forward, which adds
        each expert's low-rank product to its output instead of adding the whole stack's weight delta (experts x out
        x in) to a weight that does not exist in 16-bit here."""

        def forward(self, x, *args, **kwargs):
            layer, lora = self, {}
            while isinstance(layer, ParamWrapper):
                if not layer.disable_adapters:
                    lora[layer.parameter_name] = [
                        (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], layer.r[name])
                        for name in layer.active_adapters
                        if name in layer.lora_A
                    ]
                layer = layer.base_layer
            return layer(x, *args, lora=lora, **kwargs)

    # PEFT 0.21 tells its parameter wrappers from other LoRA layers by class name (to avoid a circular import)
    ExpertsLora.__name__ = "ParamWrapper"
    return ExpertsLora


def with_experts_lora(config):
    """A PEFT LoraConfig whose target_parameters on 4-bit experts are computed by ExpertsLora."""
    config._register_custom_module({Experts4bit: experts_lora_class()})
    return config


def adapter_config(adapter_dir):
    """An adapter folder's LoraConfig, ready for a base whose experts are in 4-bit."""
    from peft import LoraConfig

    return with_experts_lora(LoraConfig.from_pretrained(adapter_dir))


def dequantize_experts(model) -> None:
    """Give every 4-bit experts module its weights back as 16-bit parameters (in the dtype they arrived in), the
    rounding kept, and its own class: for merging an adapter into the base as the adapter saw it."""
    import bitsandbytes.functional as bnb_functional

    for module in model.modules():
        if isinstance(module, Experts4bit):
            packed = module.__dict__.pop("packed")
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, Experts4bit))
            for name, (data, states) in packed.items():
                weights = torch.stack([bnb_functional.dequantize_4bit(d, s) for d, s in zip(data, states)])
                setattr(module, name, torch.nn.Parameter(weights, requires_grad=False))
