"""Tiny random models of real architectures and a ~300-token tokenizer, built in seconds with no hub.

The tests build them through conftest.py's fixtures; `.ci/installed_smoke.sh` runs this file to get a model folder
for the installed wheel to train: python tests/tiny_models.py FOLDER [llama|gemma|gemma2|gemma3_text|gemma3|gemma4_text|gemma4|olmo3|qwen2|qwen3|qwen3_moe|gpt_oss|qwen3_5_text|qwen3_next|lfm2|smollm3|phi3|phi4_mini]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a pirate sails the sea and sings a song",
    "one two three four five six seven eight nine ten",
    "what is the capital of france? the capital is paris.",
    "hello world, this is a tiny tokenizer for tests",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer of ~300 tokens with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(kind: str, vocab_size: int, **changes):
    """2-layer configs of real architectures, small enough to train on CPU in seconds; changes: other sizes."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        Olmo3Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    common = (
        dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.2,
        )
        | changes
    )
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "gemma":
        return GemmaConfig(**common, head_dim=16)
    if kind == "gemma2":
        return Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    if kind == "qwen2":  # attention biases and tied embeddings, as Qwen2.5-0.5B has
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":  # q/k norms, an explicit head_dim, tied embeddings (Qwen3-0.6B to 4B)
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if kind == "smollm3":  # 4 layers: the 4th has no rotary embedding (NoPE), as every 4th in SmolLM3-3B
        return SmolLM3Config(**common | {"num_hidden_layers": 4} | changes, tie_word_embeddings=True)
    if kind == "gemma3_text":  # 6 layers: 5 within a sliding window of 4 tokens, then 1 full, as Gemma 3's 5:1
        return Gemma3TextConfig(
            **common | {"num_hidden_layers": 6} | changes, head_dim=16, sliding_window=4, query_pre_attn_scalar=16
        )
    if kind == "olmo3":  # 4 layers: 3 within a sliding window of 4 tokens, then 1 full with YaRN, as OLMo 3 7B's
        yarn = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0)
        return Olmo3Config(
            **common | {"num_hidden_layers": 4} | changes,
            sliding_window=4,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=yarn,
        )
    if kind == "phi3":  # fused qkv and gate_up projections
        return Phi3Config(**common, tie_word_embeddings=False)
    if kind == "phi4_mini":  # Phi-3's layout, 3/4 of each head rotated, LongRoPE (its short factors up to 256 tokens)
        rotated = 16 * 3 // 4 // 2
        longrope = dict(
            type="longrope",
            short_factor=[1.0 + 0.3 * i for i in range(rotated)],
            long_factor=[2.0 + i for i in range(rotated)],
        )
        return Phi3Config(
            **common | {"max_position_embeddings": 1024} | changes,
            tie_word_embeddings=True,
            partial_rotary_factor=0.75,
            original_max_position_embeddings=256,
            rope_scaling=longrope,
        )
    if kind == "qwen3_moe":  # 8 experts of width 32, 2 a token, in every layer (Qwen3-30B-A3B: 128, 8 a token)
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **dict(
                head_dim=16,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                tie_word_embeddings=False,
            )
            | common
        )
    if (
        kind == "gpt_oss"
    ):  # 8 experts, 2 a token, biased and clamped; attention sinks, sliding window on every 2nd layer
        from transformers import GptOssConfig

        return GptOssConfig(
            **common | {"intermediate_size": 32} | changes,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            tie_word_embeddings=False,
        )
    if kind == "qwen3_5_text":  # 4 layers: 3 of Gated DeltaNet linear attention, then 1 of gated softmax attention
        from transformers import Qwen3_5TextConfig

        return Qwen3_5TextConfig(
            **dict(
                head_dim=16,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                tie_word_embeddings=True,
            )
            | common
            | {"num_hidden_layers": 4}
            | changes
        )
    if kind == "qwen3_next":  # Qwen3.5's 4 layers with 8 experts of width 32 (2 a token) and a shared expert in each
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(
            **dict(
                head_dim=16,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                tie_word_embeddings=False,
            )
            | common
            | {"num_hidden_layers": 4}
            | changes
        )
    if kind == "lfm2":  # 4 layers: short convolutions in the 1st and 3rd, attention in the others (LFM2: 10 and 6)
        from transformers import Lfm2Config

        return Lfm2Config(
            **dict(
                full_attn_idxs=[1, 3],
                block_multiple_of=32,
                layer_types=["conv", "full_attention", "conv", "full_attention"],
            )
            | common
            | {"num_hidden_layers": 4}
            | changes
        )
    if kind == "gemma4_text":  # Gemma 4 26B-A4B's layout: 5 sliding-window layers then a full one whose heads are twice
        # as wide over 1 KV head, its keys serving as values; a dense MLP beside 8 experts (2 a token) in every layer
        from transformers import Gemma4TextConfig

        return Gemma4TextConfig(
            **dict(
                head_dim=16,
                global_head_dim=32,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                enable_moe_block=True,
                num_experts=8,
                top_k_experts=2,
                moe_intermediate_size=32,
                sliding_window=4,
                final_logit_softcapping=30.0,
                hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=vocab_size,
            )
            | common
            | dict(num_hidden_layers=6, intermediate_size=48)
            | changes
        )
    if kind == "gemma4":  # the gemma4_text model above beside a 2-layer Gemma 4 vision tower, as the hub's checkpoints
        from transformers import Gemma4Config, Gemma4VisionConfig

        vision = Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,
            position_embedding_size=16,
        )
        ends = dict(
            boi_token_id=vocab_size - 5,
            eoi_token_id=vocab_size - 4,
            image_token_id=vocab_size - 3,
            video_token_id=vocab_size - 2,
            boa_token_id=None,
            eoa_token_index=None,
            audio_token_id=None,
        )
        return Gemma4Config(
            text_config=tiny_config("gemma4_text", vocab_size, **changes).to_dict(),
            vision_config=vision.to_dict(),
            **ends,
        )
    if kind == "gemma3":  # Gemma 3 4B-27B's class: the gemma3_text model above beside a 2-layer SigLIP vision tower
        from transformers import Gemma3Config, SiglipVisionConfig

        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_use_head=False,
        )
        # Image tokens at the vocabulary's end, which the test texts never reach (transformers treats them specially)
        return Gemma3Config(
            text_config=tiny_config("gemma3_text", vocab_size, **changes).to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=vocab_size - 3,
            eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1,
        )
    raise ValueError(kind)


def save_tiny_model(folder: Path, kind: str, seed: int = 0, tokenizer=None, **changes) -> Path:
    """Write a random tiny model and a tokenizer (the test one by default) as a normal Hugging Face model folder;
    changes: sizes other than tiny_config's."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer), **changes), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1


def to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An experts weight (experts, in, out) as gpt-oss's checkpoints store it: blocks (experts, out, in / 32, 16) of
    two e2m1 codes a byte, scales (experts, out, in / 32) of e8m0 exponents; and the weight those decode to."""
    values = torch.tensor(FP4_VALUES)
    rows = weight.transpose(1, 2).float()
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = (groups / torch.exp2(exponent).unsqueeze(-1)).unsqueeze(-1).sub(values).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    decoded = (values[codes] * torch.exp2(exponent).unsqueeze(-1)).reshape(experts, out, width).transpose(1, 2)
    return blocks, (exponent + 127).to(torch.uint8), decoded.contiguous()


def save_mxfp4_copies(folder: Path, mxfp4: Path, decoded: Path) -> None:
    """From a tiny gpt-oss model folder: the same model with its experts in MXFP4 as the hub's gpt-oss checkpoints,
    and the plain checkpoint of the weights that MXFP4 decodes to."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    weights, stored = load_file(folder / "model.safetensors"), {}
    for copy in (mxfp4, decoded):
        shutil.copytree(folder, copy)
    for name in list(weights):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[f"{name}_blocks"], stored[f"{name}_scales"], weights[name] = to_mxfp4(weights[name])
        else:
            stored[name] = weights[name]
    save_file(stored, mxfp4 / "model.safetensors", metadata={"format": "pt"})
    save_file(weights, decoded / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (mxfp4 / "config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    print(save_tiny_model(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "llama"))
