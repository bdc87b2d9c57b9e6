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


def test_stale_detach_leaves_the_live_attachment_alone(model, tokens):
    """Issue 14 item 14: a stale RoutedModel's detach() after a re-attach removed the live one's mark."""
    stale = reroute.attach(model)
    stale.detach()
    live = reroute.attach(model)
    live.set_offsets({live.moe_layers[0]: 3.0 * torch.randn(live.num_experts)})
    with torch.no_grad():
        steered = model(tokens).logits
    assert stale.detach() is model
    assert live.attached and reroute.attach(model) is live
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, steered)


@pytest.mark.parametrize(
    "call",
    [
        lambda rm: rm.to("cpu"),
        lambda rm: rm.reset(),
        lambda rm: rm.clear_mixing(),
        lambda rm: rm.set_mask(None),
        lambda rm: rm.set_policy(None),
        lambda rm: rm.routing(reroute.RoutingPolicy(rank=2)).__enter__(),
    ],
    ids=["to", "reset", "clear_mixing", "set_mask", "set_policy", "routing"],
)
def test_detached_routed_model_refuses_changes(call):
    """Issue 14 item 16c: ``rm.to()`` on a detached RoutedModel could switch the Triton experts back on."""
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    rm.detach()
    with pytest.raises(RuntimeError, match="detached"):
        call(rm)
    assert not rm.kernels and "_reroute_attached" not in model.__dict__


def test_a_second_thread_forward_during_a_forward_is_a_clear_error(tokens):
    """Issue 14 item 19: the routing state is shared, so a forward from another thread while one runs raises
    (before: it silently used the other thread's state, or failed on its batch layout)."""
    import threading

    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    inside, release = threading.Event(), threading.Event()
    router = rm.layer(rm.moe_layers[0]).router

    def pause(module, args):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(timeout=30)

    handle = router.register_forward_pre_hook(pause)
    worker = threading.Thread(target=lambda: model(tokens))
    worker.start()
    try:
        assert inside.wait(timeout=30)
        with pytest.raises(RuntimeError, match="another thread"):
            model(tokens[:1])
    finally:
        release.set()
        worker.join()
        handle.remove()
    with torch.no_grad():
        model(tokens[:1])  # free again once the other thread's forward is over


@pytest.mark.parametrize("method", ["Rerouter", "C3PO"])
def test_another_thread_between_a_methods_forwards_is_a_clear_error(tokens, method):
    """Issue 14 item 19: between its forwards a method keeps its state on the model (a Rerouter's δ, C3PO's
    re-mixing); a forward (or a setter) from another thread in that moment ran silently on it. Now it raises, and
    works again, on the original routing, once the method's call has returned."""
    import threading

    from transformers import LogitsProcessor, LogitsProcessorList

    from reroute.testing import tiny_tokenizer

    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    with torch.no_grad():
        plain = model(tokens[:1]).logits
    inside, release = threading.Event(), threading.Event()
    seen = {}

    class Pause(LogitsProcessor):  # runs in the decoding loop between two forwards, with the state installed
        def __call__(self, input_ids, scores):
            seen["state"] = rm.has_state()
            inside.set()
            release.wait(timeout=30)
            return scores

    call = dict(max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([Pause()]))
    if method == "Rerouter":
        rerouter = reroute.Rerouter(rm, steps=2, lr=0.3, layers="all")
        run = lambda: rerouter.generate(input_ids=tokens, **call)  # noqa: E731
    else:
        c3po = reroute.C3PO(rm, None, tiny_tokenizer(), surrogate="oracle", critical_layers=1, core_experts=4, steps=2)
        adaptation = c3po.adapt([{"prompt": "w3 w4 w5", "answer": " w9"}])
        run = lambda: c3po.generate(["w3 w4 w5"], adaptation=adaptation, **call)  # noqa: E731
    worker = threading.Thread(target=lambda: seen.update(out=run()))
    worker.start()
    try:
        assert inside.wait(timeout=60) and seen["state"]
        with pytest.raises(RuntimeError, match=f"running {method}.generate in another thread"), torch.no_grad():
            model(tokens[:1])
        with pytest.raises(RuntimeError, match="cannot change its routing state"):
            rm.set_offsets({rm.moe_layers[0]: torch.ones(rm.num_experts)})
        with pytest.raises(RuntimeError, match="cannot detach it"):
            rm.detach()
        with pytest.raises(RuntimeError, match="cannot run SCMoE.generate"):
            reroute.SCMoE(rm).generate(input_ids=tokens[:1], max_new_tokens=1)
    finally:
        release.set()
        worker.join()
    assert isinstance(seen.get("out"), torch.Tensor)  # the worker's call finished
    assert not rm.has_state()  # and cleaned up
    with torch.no_grad():
        assert torch.equal(model(tokens[:1]).logits, plain)


def test_saving_only_the_model_warns_when_routing_state_is_set(model, tmp_path):
    """Issue 14 item 9: ``model.save_pretrained`` dropped the routing state silently."""
    import warnings

    rm = reroute.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "plain")  # nothing set: nothing to lose, no warning
    rm.set_policy(reroute.RoutingPolicy(rank=2))
    with pytest.warns(UserWarning, match="not the routing state"):
        model.save_pretrained(tmp_path / "steered")
    assert (tmp_path / "steered" / "config.json").is_file()
    rm.detach()
    assert "save_pretrained" not in model.__dict__


def test_saving_a_peft_adapter_warns_when_routing_state_is_set(tmp_path):
    """Issue 14 item 9: a peft adapter's save_pretrained dropped the routing state silently."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.self_attn\.q_proj")
    wrapped = peft.get_peft_model(tiny_model("olmoe"), config)
    rm = reroute.attach(wrapped)
    rm.set_offsets({rm.moe_layers[0]: torch.ones(rm.num_experts)})
    with pytest.warns(UserWarning, match="not the routing state"):
        wrapped.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
