"""Graph-safe routing on CUDA: ``torch.compile`` (Inductor, CUDA graphs) of an attached model with reroute's Triton
kernels, one family per routing rule, equal to eager; changing routing state neither recompiles nor re-captures.

Run on a GPU machine: ``python -m pytest tests/gpu/test_compile_gpu.py -q``. Skips without CUDA. The CPU side of
these checks (dynamo tracing, guards, the PyTorch routing path) is ``tests/test_compile.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import reroute
from reroute import ExpertMask, RoutingPolicy
from reroute.testing import tiny_model

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")

RULE_FAMILIES = ["olmoe", "mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"]
# relative error ||compiled - eager|| / ||eager|| of the logits; fused Inductor arithmetic rounds differently
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


# every rule in fp32 (the tight tolerance checks the arithmetic); bf16, the dtype users decode in, on a softmax and a
# sigmoid rule (each case compiles a model: about 30 s of device time)
CASES = [(family, torch.float32) for family in RULE_FAMILIES] + [
    ("olmoe", torch.bfloat16),
    ("deepseek_v3", torch.bfloat16),
]


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_compiled_kernels_equal_eager_and_state_changes_reuse_the_graph(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype).cuda().eval()
    rm = reroute.attach(model)
    assert rm.kernels, "attach on CUDA runs reroute's Triton kernels"
    tokens = torch.randint(3, 96, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    compiled = torch.compile(model, mode="reduce-overhead")
    experts, layers = rm.num_experts, rm.moe_layers
    generator = torch.Generator("cuda").manual_seed(1)

    def check() -> None:
        with torch.no_grad():
            eager = model(tokens).logits
            for _ in range(2):  # the second call replays the captured graph
                out = compiled(tokens).logits.clone()
        assert rel(out, eager) < TOLERANCE[dtype]

    check()  # zero state
    rm.set_policy(RoutingPolicy(top_k=1), layers=layers[-1], rows=[1])
    rm.set_mask(ExpertMask(banned=(0,)), layers=layers[0])
    rm.set_row_offsets({layers[-1]: torch.randn(2, experts, device="cuda", generator=generator)})
    check()
    warm = counters["stats"]["unique_graphs"]
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    for policy in (RoutingPolicy(rank=2), RoutingPolicy(top_p=0.5, max_experts=2), RoutingPolicy(top_k=2)):
        rm.set_offsets({layers[0]: torch.randn(experts, device="cuda", generator=generator)})
        rm.set_row_offsets({layers[-1]: torch.randn(2, experts, device="cuda", generator=generator)})
        rm.set_policy(policy, layers=layers[-1], rows=[1])
        rm.set_mask(ExpertMask(banned=(int(torch.randint(experts, (1,))),)), layers=layers[0])
        check()
    assert counters["stats"]["unique_graphs"] == warm
    # no re-capture either: new values of the same shapes are read in place by the recorded CUDA graph
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == recorded


def test_static_cache_generate_with_kernels_equals_dynamic() -> None:
    model = tiny_model("olmoe").cuda().eval()
    rm = reroute.attach(model)
    ids = torch.randint(3, 96, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                  pad_token_id=0)  # fmt: skip
    static = dict(cache_implementation="static", compile_config=CompileConfig())
    for generate in (
        model.generate,
        reroute.SCMoE(rm, weak="rank2").generate,
        reroute.Rerouter(rm, interval=4, steps=2).generate,
    ):
        assert torch.equal(generate(**kwargs, **static), generate(**kwargs))


def test_c3po_static_cache_generate_with_kernels_equals_dynamic() -> None:
    """C3PO's re-mixed generation on the compiled (CUDA-graph) step with the Triton kernels: the dynamic cache's
    tokens. Needs faiss (carry a faiss-cpu wheel: ``benchmarks/device_runs.sh gpu-tests`` installs one from .whl)."""
    pytest.importorskip("faiss")
    from conftest import random_mc_items

    from reroute.c3po import C3PO, ReferenceIndex
    from reroute.testing import tiny_tokenizer

    model = tiny_model("olmoe").cuda().eval()
    rm, tok = reroute.attach(model), tiny_tokenizer()
    index = ReferenceIndex.build(rm, tok, random_mc_items(32, 1, 6), progress=False)
    c3po = C3PO(rm, index, tok, critical_layers=1, core_experts=4, max_confidence=None, max_typicality=None,
                min_gain=None)  # fmt: skip
    ids = torch.randint(3, 96, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                  pad_token_id=0)  # fmt: skip
    static = c3po.generate(cache_implementation="static", compile_config=CompileConfig(), **kwargs)
    assert torch.equal(static, c3po.generate(**kwargs))


@pytest.mark.parametrize("surrogate", ["ngd", "kernel"])
def test_c3po_compiled_steps_with_kernels_equal_eager_steps(surrogate: str) -> None:
    """recompute='suffix-compiled' on CUDA (Inductor, each step a CUDA graph, gradients through reroute's expert
    kernel) gives the eager suffix steps' pathways, in fp32; a second call reuses the graphs."""
    pytest.importorskip("faiss")
    from conftest import random_mc_items

    from reroute.c3po import C3PO, ReferenceIndex
    from reroute.testing import tiny_tokenizer

    model = tiny_model("olmoe").cuda().eval()
    rm, tok = reroute.attach(model), tiny_tokenizer()
    index = ReferenceIndex.build(rm, tok, random_mc_items(32, 1, 6), progress=False)
    kwargs = dict(surrogate=surrogate, critical_layers=2, core_experts=6, steps=6, lr=0.3, min_gain=None,
                  max_confidence=None, max_typicality=None)  # fmt: skip
    eager, compiled = (C3PO(rm, index, tok, recompute=mode, **kwargs) for mode in ("suffix", "suffix-compiled"))
    for call in range(2):
        test = random_mc_items(4, 2 + call, 6)
        before = counters["stats"]["unique_graphs"]
        want, got = eager.adapt(test), compiled.adapt(test)
        if call == 1:
            assert counters["stats"]["unique_graphs"] == before
        for layer in want.pathway.layers:
            assert torch.equal(got.pathway.experts[layer], want.pathway.experts[layer])
            diff = float((got.pathway.omega(layer) - want.pathway.omega(layer)).abs().max())
            assert diff <= 1e-4, f"call {call}: mixing weights differ by {diff}"


def test_rerouter_compiled_adaptation_steps_with_kernels_equal_eager_steps() -> None:
    """Rerouter(compile_steps=True) on CUDA (Inductor, each adaptation step a CUDA graph, gradients through reroute's
    expert kernel): the eager steps' tokens and phase losses, in fp32; a second call records nothing new."""
    rm = reroute.attach(tiny_model("olmoe").cuda().eval())
    ids = torch.randint(3, 96, (2, 10), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                  pad_token_id=0)  # fmt: skip
    eager = reroute.Rerouter(rm, interval=4, steps=3, lr=0.2)
    want = eager.generate(**kwargs)
    for call in range(2):
        compiled = reroute.Rerouter(rm, interval=4, steps=3, lr=0.2, compile_steps=True)
        before = counters["stats"]["unique_graphs"]
        got = compiled.generate(**kwargs)
        if call == 1:
            assert counters["stats"]["unique_graphs"] == before
        assert torch.equal(got, want)
        for phase_got, phase_want in zip(compiled.phases, eager.phases):
            torch.testing.assert_close(phase_got.loss_after, phase_want.loss_after, rtol=0, atol=1e-4)


def test_late_stop_on_cuda_equals_the_waiting_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode()'s LateStop (pinned flag + event, read one step late) against reading the flag every step."""
    import reroute.generation as generation

    rm = reroute.attach(tiny_model("olmoe").cuda().eval())
    ids = torch.randint(3, 96, (3, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                  pad_token_id=0)  # fmt: skip
    free = reroute.SCMoE(rm).generate(**kwargs)
    kwargs["eos_token_id"] = sorted(set(free[:, ids.shape[1] + 2].tolist()))  # every row ends by its third token
    late = reroute.SCMoE(rm).generate(**kwargs)
    monkeypatch.setattr(generation, "LATE_STOP_DEVICES", ())
    assert torch.equal(late, reroute.SCMoE(rm).generate(**kwargs))
    assert late.shape[1] < ids.shape[1] + 8
