"""The testbed model: a small OLMoE (transformers ``OlmoeForCausalLM``) and the shipped checkpoint's loader."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

# Shapes of the shipped model ("full") and of the CPU smoke run of the training script ("smoke").
# Full: 64 fine-grained experts, top-8, softmax without top-k renormalisation — OLMoE-1B-7B's routing rule at
# a size whose fp32 weights stay under 16 MB.
SIZES: dict[str, dict[str, int]] = {
    "full": {
        "hidden_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
    },
    "smoke": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 8,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
}


def testbed_config(tokenizer: PreTrainedTokenizerFast, size: str = "full") -> OlmoeConfig:
    """``OlmoeConfig`` of the testbed for ``tokenizer``'s vocabulary (``size``: ``"full"`` or ``"smoke"``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    return OlmoeConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        norm_topk_prob=False,
        # The load-balancing loss is added during training (the script asks for router logits per forward);
        # the shipped config leaves output_router_logits off so plain forwards stay plain.
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )


def checkpoint_path() -> Path:
    """Folder of the shipped checkpoint (config, safetensors weights, tokenizer, generation config)."""
    return Path(__file__).resolve().parent / "checkpoint"


def load_testbed(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[OlmoeForCausalLM, PreTrainedTokenizerFast]:
    """The trained testbed model (in eval mode) and its tokenizer, loaded with ``from_pretrained`` from
    :func:`checkpoint_path`."""
    folder = checkpoint_path()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no testbed checkpoint in {folder}; train one with scripts/train_testbed.py")
    model = OlmoeForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model, tokenizer
