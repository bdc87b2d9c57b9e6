"""Graph-safe routing: an attached model under ``torch.compile`` equals eager, and changing routing state between
calls reuses the compiled graph (``reroute.routing.graph``).

On the CPU the compiled graphs are traced with dynamo's ``eager`` backend (the tracing, guards and recompilations
are Inductor's; only code generation is skipped, which CI's two cores could not afford for every family). The GPU
counterpart with Inductor, CUDA graphs and the Triton kernels is ``tests/gpu/test_compile_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import reroute
from reroute import ExpertMask, RoutingPolicy
from reroute.testing import tiny_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


class StaticAddresses:
    """A dynamo backend that runs each graph as traced and records, per call, the addresses of its static inputs:
    the tensors a CUDA graph replay reads in place (dynamo makes every tensor reached through a module static;
    cudagraph trees record the graph again whenever one has moved)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[int, int]]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        static = [i for i, node in enumerate(placeholders) if node.meta.get("tensor_dict", {}).get(STATIC_TYPE)]

        def run(*args: object) -> object:
            addresses = {i: args[i].data_ptr() for i in static if isinstance(args[i], torch.Tensor)}
            self.calls.append((id(gm), addresses))
            return gm.forward(*args)

        return run


STATIC_TYPE = "_dynamo_static_input_type"


def compare(model: torch.nn.Module, compiled, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(tokens).logits - compiled(tokens).logits).abs().max())


def test_zero_state_compiled_is_bit_identical(family: str, tokens: torch.Tensor) -> None:
    model = tiny_model(family).eval()
    with torch.no_grad():
        original = model(tokens).logits
    reroute.attach(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(tokens).logits, original)


# one family per routing rule (softmax top-k, float softmax, top-k softmax, DeepSeek-V2, sigmoid group-limited,
# SparseMixer): tracing a model costs seconds on CI's cores
RULE_FAMILIES = ["olmoe", "mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3", "phimoe"]


@pytest.mark.parametrize("family", RULE_FAMILIES)
def test_state_changes_reuse_the_compiled_graph(family: str, tokens: torch.Tensor) -> None:
    """Every kind of state at once, on different layers; then its values (and a policy's kind) change five times:
    compiled equals eager each time and no graph is added."""
    model = tiny_model(family).eval()
    rm = reroute.attach(model)
    layers, experts = rm.moe_layers, rm.num_experts
    backend = StaticAddresses()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    last = tokens.shape[1] - 1
    policies = [RoutingPolicy(top_k=1), RoutingPolicy(rank=2), RoutingPolicy(top_p=0.6, max_experts=2),
                RoutingPolicy(top_k=2, renormalize=False), RoutingPolicy(rank=2, renormalize=False),
                RoutingPolicy(rank=1)]  # fmt: skip
    for round_idx, policy in enumerate(policies):
        rm.set_offsets({layers[0]: torch.randn(experts, generator=generator)})
        rm.set_row_offsets({layers[-1]: torch.randn(tokens.shape[0], experts, generator=generator)})
        rm.set_policy(policy, layers=layers[-1], rows=torch.tensor([round_idx % 2 == 0, True]))
        banned = tuple(torch.randperm(experts, generator=generator)[:2].tolist())
        rm.set_mask(ExpertMask(banned=banned), layers=layers[0])
        rm.set_mixing(layers[-1], torch.randperm(experts, generator=generator)[:4], [last - round_idx % 2],
                      logits=torch.randn(4, generator=generator))  # fmt: skip
        assert compare(model, compiled, tokens) < 1e-5, policy
        if round_idx == 0:
            warm = graphs()
    assert graphs() == warm
    # new values of the same shapes land at the same addresses: a CUDA graph of this forward replays, unrecorded
    graph_id, addresses = backend.calls[0]
    assert addresses and all(call == (graph_id, addresses) for call in backend.calls)
    rm.reset()
    rm.clear_mixing()
    rm.set_row_offsets({layers[-1]: torch.zeros(tokens.shape[0], experts)})
    assert compare(model, compiled, tokens) < 1e-5


def test_state_a_caller_saved_is_not_overwritten_by_the_next(tokens: torch.Tensor) -> None:
    """The compiled path reads copies held at fixed addresses; the tensors callers set (and save, to restore
    later, as SCMoE's weak routing and the rerouting phases do) stay theirs."""
    model = tiny_model("olmoe").eval()
    rm = reroute.attach(model)
    layer, experts = rm.layer(rm.moe_layers[-1]), rm.num_experts
    compiled = torch.compile(model, backend=StaticAddresses(), fullgraph=True)
    first, second = torch.randn(2, tokens.shape[0], experts, generator=torch.Generator().manual_seed(0))
    rm.set_row_offsets({layer.layer_idx: first})
    rm.set_policy(RoutingPolicy(top_k=1), layers=layer.layer_idx, rows=torch.tensor([True, False]))
    saved, saved_rows = layer.row_offsets, layer.policy_rows
    with torch.no_grad():
        expected = model(tokens).logits
    rm.set_row_offsets({layer.layer_idx: second})
    rm.set_policy(RoutingPolicy(top_k=1), layers=layer.layer_idx, rows=torch.tensor([False, True]))
    assert compare(model, compiled, tokens) < 1e-5
    assert torch.equal(saved, first) and saved_rows.tolist() == [True, False]
    layer.row_offsets, layer.policy_rows = saved, saved_rows
    with torch.no_grad():
        assert float((compiled(tokens).logits - expected).abs().max()) < 1e-5


def test_held_copies_keep_their_address_and_skip_what_needs_gradients() -> None:
    """The compiled path's copy of per-row state and re-mixing: same address for same-shape values; an optimisation
    step's tensors (requiring grad: NGD's mixing logits, rerouting's δ) are read as they are, with no copy."""
    from reroute.routing.layer import Mixing

    rm = reroute.attach(tiny_model("olmoe").eval())
    layer, experts = rm.layer(rm.moe_layers[0]), rm.num_experts
    core, positions = torch.tensor([[0, 1, 2]]), torch.tensor([[4]])
    layer.mixing = Mixing(core, torch.randn(1, 3), positions)
    held = layer.graph.mixing
    layer.mixing = Mixing(core + 1, torch.randn(1, 3), positions)
    assert held.logits.data_ptr() == layer.graph.mixing.logits.data_ptr()
    assert torch.equal(layer.graph.mixing.experts, core + 1) and layer.graph.mixing.experts is not layer.mixing.experts
    trained = Mixing(core, torch.zeros(1, 3, requires_grad=True), positions)
    layer.mixing = trained
    assert layer.graph.mixing is trained
    delta = torch.zeros(2, experts, requires_grad=True)
    layer.row_offsets = delta
    assert layer.graph.row_offsets is delta
    layer.row_offsets = layer.mixing = None
    assert layer.graph.row_offsets is None and layer.graph.mixing is None


def test_widening_policy_is_one_recompile_then_reused(tokens: torch.Tensor) -> None:
    model = tiny_model("olmoe").eval()
    rm = reroute.attach(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    rm.set_policy(RoutingPolicy(top_k=1))
    compare(model, compiled, tokens)
    before = graphs()
    rm.set_policy(RoutingPolicy(top_k=4))  # wider than the family's top-2: the graph grows once
    assert compare(model, compiled, tokens) < 1e-5
    assert graphs() == before + 1
    for k in (1, 3, 4, 2):  # narrower or equal: masked slots of the same graph
        rm.set_policy(RoutingPolicy(top_k=k))
        assert compare(model, compiled, tokens) < 1e-5
    assert graphs() == before + 1


def _compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate() compiles on accelerators only unless told
    return config


@pytest.mark.parametrize("name", ["attached", "offsets", "rerouter", "scmoe", "scmoe-two-pass"])
def test_static_cache_generate_equals_dynamic(name: str) -> None:
    """``generate(cache_implementation="static")`` (compiled decode steps) gives the dynamic-cache tokens."""
    model = tiny_model("olmoe").eval()
    rm = reroute.attach(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # left padding
    if name == "offsets":
        rm.set_offsets({i: torch.randn(rm.num_experts, generator=generator) for i in rm.moe_layers})
    generate = {
        "attached": model.generate,
        "offsets": model.generate,
        "rerouter": reroute.Rerouter(rm, interval=3, steps=2).generate,
        "scmoe": reroute.SCMoE(rm, weak="rank2").generate,
        "scmoe-two-pass": reroute.SCMoE(rm, weak="rank2", design="two-pass").generate,
    }[name]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    dynamic = generate(**kwargs)
    static = generate(cache_implementation="static", compile_config=_compile_config(), **kwargs)
    assert graphs() >= 1  # the decode steps did run compiled
    assert torch.equal(static, dynamic)


def test_c3po_generate_with_a_static_cache_equals_dynamic() -> None:
    """C3PO's re-mixed generation decodes with the compiled step too: the same tokens, logits equal to float
    rounding, and the re-mixing reaches them (they differ from the base model's)."""
    from conftest import random_mc_items

    from reroute.c3po import C3PO, ReferenceIndex
    from reroute.testing import tiny_tokenizer

    model = tiny_model("olmoe").eval()
    rm, tok = reroute.attach(model), tiny_tokenizer()
    index = ReferenceIndex.build(rm, tok, random_mc_items(32, 1, 6), progress=False)
    gates_off = dict(max_confidence=None, max_typicality=None, min_gain=None)
    c3po = C3PO(rm, index, tok, critical_layers=1, core_experts=4, **gates_off)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)  # fmt: skip
    dynamic = c3po.generate(**kwargs)
    static = c3po.generate(cache_implementation="static", compile_config=_compile_config(), **kwargs)
    assert graphs() >= 1
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, reference in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    base = model.generate(**kwargs)
    assert (dynamic.logits[0] - base.logits[0]).abs().max() > 1e-4


def test_mixing_positions_under_a_static_cache_read_the_device_count(tokens: torch.Tensor) -> None:
    """Re-mixing at a decode position: the compiled step finds the position from the static cache's device-side
    length (no host sync), as eager does from the dynamic cache."""
    model = tiny_model("olmoe").eval()
    rm = reroute.attach(model)
    ids = tokens[:1]
    rm.set_mixing(rm.moe_layers[-1], [0, 1, 2, 3], [ids.shape[1] + 2], logits=torch.tensor([5.0, -5.0, 0.0, 1.0]))
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(**kwargs)
    static = model.generate(cache_implementation="static", compile_config=_compile_config(), **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-5)
    rm.clear_mixing()
    plain = model.generate(**kwargs)
    assert torch.equal(plain.logits[0], dynamic.logits[0])  # before the re-mixed position
    assert not torch.allclose(plain.logits[3], dynamic.logits[3])  # the step after it


def test_kernel_path_compiles_under_the_interpreter(tokens: torch.Tensor) -> None:
    """The Triton expert dispatch is one custom op (``reroute::moe_experts``, with a fake implementation and
    autograd) inside a compiled graph; the routing kernel gives way to the graph-safe PyTorch path."""
    pytest.importorskip("triton")
    from reroute.kernels import available

    if not available("cpu"):
        pytest.skip("the Triton interpreter is not active")
    model = tiny_model("olmoe").eval()
    rm = reroute.attach(model, kernels=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    rm.set_policy(RoutingPolicy(top_k=1), rows=[1])
    assert compare(model, compiled, tokens) < 1e-5
    # gradients through the custom op reach the hidden states and routing weights (row offsets); the expert
    # weights stay frozen, as every method keeps them
    model.requires_grad_(False)
    delta = torch.zeros(tokens.shape[0], rm.num_experts, requires_grad=True)
    rm.set_row_offsets({rm.moe_layers[-1]: delta})
    compiled(tokens).logits.float().pow(2).mean().backward()
    eager_delta = delta.grad.clone()
    delta.grad = None
    model(tokens).logits.float().pow(2).mean().backward()
    assert eager_delta.abs().sum() > 0
    torch.testing.assert_close(eager_delta, delta.grad, rtol=1e-4, atol=1e-6)
