"""Attaching to peft-LoRA-wrapped MoE models: LoRA on the attention projections, LoRA on the router weight, and the
merged / unloaded model. References: the unattached peft model, and the merged model (plain transformers)."""

from __future__ import annotations

import copy

import pytest
import torch

import reroute
from reroute.testing import tiny_model

peft = pytest.importorskip("peft")

ATTENTION = r".*\.self_attn\.\w*proj\w*"  # every family's attention projections (MLA's low-rank ones too)
PEFT_FAMILIES = ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def _lora(model: torch.nn.Module, **targets: object) -> torch.nn.Module:
    # init_lora_weights=False: random A and B, so the adapter changes the model (peft's default B = 0 would not)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _offsets(rm: reroute.RoutedModel) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {idx: 3.0 * torch.randn(rm.num_experts, generator=gen) for idx in rm.moe_layers}


def _router_classes(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_lora_on_attention(family, tokens):
    wrapped = _lora(tiny_model(family), target_modules=ATTENTION)
    reference = _logits(wrapped, tokens)
    with wrapped.disable_adapter():
        assert not torch.allclose(_logits(wrapped, tokens), reference)  # the adapter is live
    classes = _router_classes(wrapped)
    merged = copy.deepcopy(wrapped).merge_and_unload()

    rm = reroute.attach(wrapped)
    assert rm.family.model_type == family and rm.moe_layers == reroute.attach(merged).moe_layers
    assert reroute.attach(wrapped.get_base_model()) is rm  # one controller for the wrapper and the model inside
    with pytest.raises(RuntimeError, match="already controlled"):
        reroute.attach(wrapped.base_model)  # peft's LoraModel layer: no second controller on the same routers
    assert torch.equal(_logits(wrapped, tokens), reference)  # zero state: the peft model, bit for bit

    offsets = _offsets(rm)
    rm.set_offsets(offsets)
    steered = _logits(wrapped, tokens)
    assert not torch.allclose(steered, reference)
    reroute.attach(merged).set_offsets(offsets)
    torch.testing.assert_close(steered, _logits(merged, tokens), rtol=1e-4, atol=1e-5)

    rm.detach()
    assert _router_classes(wrapped) == classes
    assert "_reroute_attached" not in wrapped.get_base_model().__dict__
    assert torch.equal(_logits(wrapped, tokens), reference)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize(
    "targets",
    [{"target_modules": ["gate"]}, {"target_modules": [], "target_parameters": ["mlp.gate.weight"]}],
    ids=["modules", "parameters"],
)
def test_lora_on_the_router(family, targets, tokens):
    """peft wraps the router in a ``ParamWrapper`` that adds ``B @ A`` to its weight during the forward; reroute
    controls the router inside (``gate.base_layer``), and its logits include the LoRA update."""
    wrapped = _lora(tiny_model(family), **targets)
    gate = next(m for n, m in wrapped.named_modules() if n.endswith("layers.1.mlp.gate"))
    assert type(gate).__name__ == "ParamWrapper"
    reference = _logits(wrapped, tokens)
    with wrapped.disable_adapter():
        assert not torch.allclose(_logits(wrapped, tokens), reference)
    classes = _router_classes(wrapped)
    merged = copy.deepcopy(wrapped).merge_and_unload()

    rm = reroute.attach(wrapped)
    assert rm.layer(1).router is gate.base_layer
    assert torch.equal(_logits(wrapped, tokens), reference)
    with rm.trace() as trace:
        _logits(wrapped, tokens)
    merged_rm = reroute.attach(merged)
    with merged_rm.trace() as merged_trace:
        _logits(merged, tokens)
    for idx in rm.moe_layers:  # the router logits reroute sees carry the LoRA update
        torch.testing.assert_close(trace.logits(idx), merged_trace.logits(idx), rtol=1e-4, atol=1e-5)

    offsets = _offsets(rm)
    rm.set_offsets(offsets)
    merged_rm.set_offsets(offsets)
    steered = _logits(wrapped, tokens)
    assert not torch.allclose(steered, reference)
    torch.testing.assert_close(steered, _logits(merged, tokens), rtol=1e-4, atol=1e-5)
    rm.detach()
    assert _router_classes(wrapped) == classes
    assert torch.equal(_logits(wrapped, tokens), reference)


def test_merge_and_unload_while_attached(tokens):
    """Merging keeps the router modules, so the routing controller (and its state) carries over to the plain model."""
    wrapped = _lora(tiny_model("olmoe"), target_modules=["q_proj", "v_proj", "gate"])
    rm = reroute.attach(wrapped)
    rm.set_offsets(_offsets(rm))
    steered = _logits(wrapped, tokens)
    plain = wrapped.merge_and_unload()
    assert not isinstance(plain, peft.PeftModel)
    torch.testing.assert_close(_logits(plain, tokens), steered, rtol=1e-4, atol=1e-5)
    assert reroute.attach(plain) is rm
    rm.detach()
    assert "Routed" not in " ".join(type(m).__name__ for m in plain.modules())
    unattached = _logits(plain, tokens)
    fresh = reroute.attach(plain)  # the unwrapped model attaches like any other
    assert fresh is not rm and torch.equal(_logits(plain, tokens), unattached)
    fresh.set_offsets(_offsets(fresh))
    torch.testing.assert_close(_logits(plain, tokens), steered, rtol=1e-4, atol=1e-5)


def test_state_saved_on_the_base_model_loads_onto_its_peft_wrapper(tokens, tmp_path):
    base = tiny_model("qwen3_moe")
    rm = reroute.attach(base)
    rm.set_offsets(_offsets(rm))
    rm.save_pretrained(tmp_path)
    rm.detach()
    wrapped = _lora(tiny_model("qwen3_moe"), target_modules=ATTENTION)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    loaded = reroute.from_pretrained(wrapped, tmp_path)
    assert loaded.model is wrapped
    reroute.from_pretrained(merged, tmp_path)
    torch.testing.assert_close(_logits(wrapped, tokens), _logits(merged, tokens), rtol=1e-4, atol=1e-5)


def test_methods_run_through_the_wrapper(tokens):
    wrapped = _lora(tiny_model("mixtral"), target_modules=ATTENTION)
    rm = reroute.attach(wrapped)
    mask = torch.ones_like(tokens)
    out = reroute.SCMoE(rm, beta=0.5).generate(input_ids=tokens, attention_mask=mask, max_new_tokens=3)
    assert out.shape == (2, tokens.shape[1] + 3)
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    before = [p.detach().clone() for p in lora]
    out = reroute.Rerouter(rm, steps=2, interval=2).generate(input_ids=tokens, attention_mask=mask, max_new_tokens=3)
    assert out.shape == (2, tokens.shape[1] + 3)
    # rerouting learns δ only: the adapter's (trainable) weights neither change nor collect gradients
    assert lora and all(torch.equal(p, b) and p.grad is None for p, b in zip(lora, before))
