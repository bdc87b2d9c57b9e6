"""Models spread over devices with accelerate (``device_map``), checked on the CPU.

A CPU has one device, so two stand-ins cover what a second GPU would: accelerate's dispatch hooks (installed on
every module of a multi-device dispatch, here forced on a CPU split, and with disk offload), and the meta device
as "another device" for checking where routing state is created. ``tests/gpu/test_multi_gpu.py`` runs the same
methods on two real GPUs.
"""

from __future__ import annotations

import accelerate
import pytest
import torch
from multi_device import assert_same_results, items, run_methods, split_device_map

import reroute
from reroute.c3po import ReferenceIndex
from reroute.c3po.pathway import Pathway
from reroute.rerouting.adapt import install_row_offsets
from reroute.routing.policy import RoutingPolicy
from reroute.testing import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 31, 8, 12, 40, 41]])


def _dispatched(family: str, tmp_path=None, offload: bool = False) -> torch.nn.Module:
    model = tiny_model(family)
    device_map = split_device_map(model, ["cpu", "disk" if offload else "cpu"])
    kwargs = {"offload_dir": str(tmp_path)} if offload else {"force_hooks": True}
    return accelerate.dispatch_model(model, device_map=device_map, **kwargs)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3", "qwen2_moe"])
def test_routing_state_takes_effect_behind_accelerate_hooks(family):
    model, plain = _dispatched(family), tiny_model(family)
    routers = [m for m in model.modules() if "_old_forward" in m.__dict__ and m.__class__.__name__.endswith("Router")]
    assert routers  # a multi-device dispatch hooks every module with weights, the routers included
    saved = [r.__dict__["_old_forward"] for r in routers]
    rm, ref = reroute.attach(model), reroute.attach(plain)
    with torch.no_grad():
        base = model(IDS).logits
        assert torch.equal(base, plain(IDS).logits)  # zero state: the original model
        offsets = {i: torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(i)) * 3
                   for i, layer in rm.layers.items()}  # fmt: skip
        rm.set_offsets(offsets)
        ref.set_offsets(offsets)
        steered = model(IDS).logits
        assert not torch.equal(steered, base)  # the hooks call the routed forward, not the one saved when hooking
        assert torch.equal(steered, plain(IDS).logits)
        with rm.routing(RoutingPolicy(rank=2)), ref.routing(RoutingPolicy(rank=2)):
            assert torch.equal(model(IDS).logits, plain(IDS).logits)
    rm.detach()
    assert [r.__dict__["_old_forward"] for r in routers] == saved  # accelerate's own forwards back in place
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_dispatching_an_attached_model_then_detaching():
    model, plain = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    rm, ref = reroute.attach(model), reroute.attach(plain)
    accelerate.dispatch_model(model, device_map=split_device_map(model, ["cpu", "cpu"]), force_hooks=True)
    with torch.no_grad():
        base = plain(IDS).logits
        rm.set_offsets({i: torch.linspace(-3, 3, rm.num_experts) for i in rm.moe_layers})
        ref.set_offsets({i: torch.linspace(-3, 3, rm.num_experts) for i in rm.moe_layers})
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
        rm.detach()
        assert torch.equal(model(IDS).logits, base)  # the hooks now run the original router forward


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_offloaded_routers_route_with_state_on_their_execution_device(family, tmp_path):
    model, plain = _dispatched(family, tmp_path, offload=True), tiny_model(family)
    rm, ref = reroute.attach(model), reroute.attach(plain)
    offloaded = [layer for layer in rm.layers.values() if layer.router.weight.device.type == "meta"]
    assert offloaded  # weights live on disk between forwards
    assert all(layer.device == torch.device("cpu") and layer.offsets.device.type == "cpu" for layer in offloaded)
    offsets = {i: torch.full((layer.num_experts,), 0.0).index_fill(0, torch.tensor([i % 4]), 5.0)
               for i, layer in rm.layers.items()}  # fmt: skip
    rm.set_offsets(offsets)
    ref.set_offsets(offsets)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def index():
    rm = reroute.attach(tiny_model("olmoe"))
    built = ReferenceIndex.build(rm, tiny_tokenizer(), items(60, 1), progress=False)
    rm.detach()
    return built


def test_every_method_gives_the_single_device_results_on_a_dispatched_model(index, tmp_path):
    single = run_methods(reroute.attach(tiny_model("olmoe")), index, torch.device("cpu"))
    split = run_methods(reroute.attach(_dispatched("olmoe", tmp_path, offload=True)), index, torch.device("cpu"))
    assert_same_results(split, single)


def test_state_is_created_on_each_layers_device(monkeypatch):
    """The meta device stands in for a second accelerator: what a setter or method installs on a layer must land
    on that layer's device, from inputs given on the first device. (Meta tensors cannot be checked for NaN, so the
    validating setters are intercepted where the methods call them.)"""
    model = tiny_model("olmoe")
    for layer in model.model.layers[1:]:
        layer.to("meta")
    rm = reroute.attach(model, kernels=False)
    devices = {idx: layer.device.type for idx, layer in rm.layers.items()}
    assert devices == {0: "cpu", 1: "meta", 2: "meta"}
    assert {i: p.device.type for i, p in rm.offsets.items()} == devices

    rm.set_policy(RoutingPolicy(rank=2), rows=torch.tensor([True, False]))  # SCMoE's weak rows
    assert {i: layer.policy_rows.device.type for i, layer in rm.layers.items()} == devices

    installed: dict = {}
    monkeypatch.setattr(rm, "set_row_offsets", lambda values: installed.update(values))
    delta = torch.zeros(3, 2, rm.num_experts, requires_grad=True)  # rerouting's δ, on the first device
    install_row_offsets(rm, [0, 2], delta)
    assert {i: t.device.type for i, t in installed.items()} == {0: "cpu", 2: "meta"}
    assert all(t.grad_fn is not None for t in installed.values())  # moved differentiably: gradients reach δ

    mixing: dict = {}
    monkeypatch.setattr(rm, "set_mixing", lambda layer, **kwargs: mixing.update({layer: kwargs}))
    experts = {i: torch.tensor([[0, 3, 5]]) for i in (0, 2)}
    Pathway([0, 2], experts, {i: torch.zeros(1, 3) for i in (0, 2)}).apply(rm, torch.tensor([[4]]))  # C3PO's ω
    assert {i: {t.device.type for t in kwargs.values()} for i, kwargs in mixing.items()} == {0: {"cpu"}, 2: {"meta"}}

    with pytest.raises(ValueError, match="offsets for layer 1 is on cpu but the layer is on meta"):
        rm.set_offsets({1: torch.zeros(rm.num_experts)})
    rm.layer(1).row_offsets = torch.zeros(2, rm.num_experts)  # state left on the wrong device ...
    rm.to("cpu")  # ... follows its own layer when the model has moved
    assert rm.layer(1).row_offsets.device.type == "meta" and rm.layer(0).offsets.device.type == "cpu"
