"""attach/detach on every family: bit-identity, restoration, output_router_logits, unsupported models."""

from __future__ import annotations

import pytest
import torch
import transformers

import reroute
from reroute.testing import tiny_model


def _forward(model, tokens):
    with torch.no_grad():
        return model(tokens, output_router_logits=True)


def test_identity_logits_router_logits_and_generation(model, tokens):
    reference = _forward(model, tokens)
    generated = model.generate(tokens, max_new_tokens=6, do_sample=False)
    rm = reroute.attach(model)
    rm.set_offsets(torch.zeros(len(rm.layers), rm.num_experts))  # explicit zero state
    attached = _forward(model, tokens)
    assert torch.equal(attached.logits, reference.logits)
    if getattr(reference, "router_logits", None) is not None:  # DeepSeek-V2 records none before 5.24
        assert len(attached.router_logits) == len(reference.router_logits) == len(rm.layers)
        for a, b in zip(attached.router_logits, reference.router_logits):
            assert torch.equal(a, b)
    assert torch.equal(model.generate(tokens, max_new_tokens=6, do_sample=False), generated)


def test_identity_with_padding_and_sampling(model, tokens):
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding on the first row
    torch.manual_seed(1)
    reference = model.generate(tokens, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20)
    with reroute.attach(model):
        torch.manual_seed(1)
        sampled = model.generate(tokens, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(sampled, reference)


def test_detach_restores_original_modules(model, tokens):
    routers = {
        name: (module, type(module), dict(module._forward_hooks), dict(module._forward_pre_hooks))
        for name, module in model.named_modules()
        if "Router" in type(module).__name__
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rm = reroute.attach(model)
    assert all(type(m).__name__.startswith("Routed") for m, *_ in routers.values())
    assert set(model.state_dict()) == set(state)  # no routing state leaks into the model's state_dict
    rm.set_offsets({rm.moe_layers[0]: torch.randn(rm.num_experts)})
    rm.detach()
    for name, (module, cls, hooks, pre_hooks) in routers.items():
        assert dict(model.named_modules())[name] is module
        assert type(module) is cls
        assert "_reroute_layer" not in module.__dict__
        assert dict(module._forward_hooks) == hooks and dict(module._forward_pre_hooks) == pre_hooks
    assert "_reroute_attached" not in model.__dict__
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(RuntimeError, match="detached"):
        rm.set_offsets({rm.moe_layers[0]: torch.zeros(rm.num_experts)})


def test_context_manager_detaches(model):
    cls = type(model.get_submodule(_first_router_name(model)))
    with reroute.attach(model) as rm:
        assert isinstance(rm, reroute.RoutedModel)
        assert type(model.get_submodule(_first_router_name(model))) is not cls
    assert type(model.get_submodule(_first_router_name(model))) is cls


def test_attach_twice_returns_the_same_controller(model):
    rm = reroute.attach(model)
    assert reroute.attach(model) is rm
    rm.detach()
    assert reroute.attach(model) is not rm


def test_router_logits_recording_sees_offsets(model, tokens):
    rm = reroute.attach(model)
    layer = rm.moe_layers[-1]
    offsets = torch.randn(rm.num_experts)
    if getattr(_forward(model, tokens), "router_logits", None) is None:
        pytest.skip("this transformers version records no router logits for this family")
    base = _forward(model, tokens).router_logits[-1]
    rm.set_offsets({layer: offsets})
    shifted = _forward(model, tokens).router_logits[-1]
    # the last MoE layer's input is changed by earlier layers only, which are unchanged
    torch.testing.assert_close(shifted, base + offsets.to(base.dtype))


def test_unsupported_model_names_families():
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(reroute.UnsupportedModelError, match="Mixtral.*register_family"):
        reroute.attach(model)
    with pytest.raises(reroute.UnsupportedModelError, match="transformers model"):
        reroute.attach(torch.nn.Linear(2, 2))


def test_registry_rejects_duplicates_and_lists_families():
    families = reroute.supported_families()
    for key in (
        "olmoe",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "granitemoe",
        "phimoe",
        "glm4_moe",
    ):
        assert key in families
    adapter = reroute.arch.family_for("olmoe")
    with pytest.raises(ValueError, match="already registered"):
        reroute.register_family(adapter)


def test_bf16_identity():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    tokens = torch.randint(3, 96, (2, 6))
    reference = _forward(model, tokens).logits
    with reroute.attach(model):
        assert torch.equal(_forward(model, tokens).logits, reference)


def _first_router_name(model) -> str:
    return next(name for name, m in model.named_modules() if "Router" in type(m).__name__)
