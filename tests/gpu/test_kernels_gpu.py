"""Triton expert dispatch on a real GPU at real model shapes (skipped without CUDA).

Run: ``PYTHONPATH=. python -m pytest tests/gpu/test_kernels_gpu.py`` on a machine with a GPU (CI has none).

Tolerances, as ``||out - ref|| / ||ref||`` against a float32 reference computed from the same bf16/fp16
weights and inputs: bf16 forward 1e-2, fp16 forward 2e-3 (the kernels round the SiLU·up intermediate to the
weights' dtype, as transformers' implementations do); gradients 2e-2 (bf16) / 5e-3 (fp16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from reroute.kernels import available, interpreted  # noqa: E402

if interpreted() or not available("cuda"):
    pytest.skip("Triton kernels unavailable on CUDA here (TRITON_INTERPRET set?)", allow_module_level=True)

import reroute  # noqa: E402
from reroute.compat import set_experts_implementation  # noqa: E402
from reroute.kernels import experts, moe  # noqa: E402
from reroute.testing import tiny_model  # noqa: E402

FORWARD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}

# name: (experts, top-k, hidden, intermediate, groups, top groups)
SHAPES = {
    "olmoe_1b_7b": (64, 8, 2048, 1024, 1, 1),
    "mixtral_8x7b": (8, 2, 4096, 14336, 1, 1),
    "qwen3_30b_a3b": (128, 8, 2048, 768, 1, 1),
    "deepseek_v3_like": (256, 8, 7168, 2048, 8, 4),  # group-limited: 8 groups, top-4 groups
}
_WEIGHTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def expert_weights(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (name, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one shape at a time: DeepSeek-V3's experts alone are 22.5 GB in bf16
        E, _, H, inter, _, _ = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        gate_up = torch.randn(E, 2 * inter, H, device="cuda", dtype=dtype, generator=g) / H**0.5
        down = torch.randn(E, H, inter, device="cuda", dtype=dtype, generator=g) / inter**0.5
        _WEIGHTS[key] = gate_up, down
    return _WEIGHTS[key]


def route(name: str, tokens: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing of random logits; group-limited (DeepSeek-V3 style) where the shape has groups."""
    E, k, _, _, groups, top_groups = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(tokens, E, device="cuda", generator=g).mul(2).sigmoid()
    if groups > 1:
        group_score = scores.view(tokens, groups, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(top_groups, dim=-1).indices, 1.0)
        scores = scores.masked_fill(~keep.repeat_interleave(E // groups, dim=1).bool(), 0.0)
    weights, indices = scores.topk(k, dim=-1)
    return indices, (weights / weights.sum(-1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("tokens", [1, 16, 64, 300])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_real_shapes(name: str, tokens: int) -> None:
    dtype = torch.bfloat16
    gate_up, down = expert_weights(name, dtype)
    ids, w = route(name, tokens, seed=tokens, dtype=dtype)
    # twice with fresh inputs: the second launch of each kernel takes the cached direct-launch path
    for _ in range(2):
        x = torch.randn(tokens, gate_up.shape[2], device="cuda", dtype=dtype)
        out = moe.moe_experts(x, ids, w, gate_up, down)
        assert rel(out, moe.reference_moe(x, ids, w, gate_up, down)) < FORWARD_TOL[dtype]
        ids, w = route(name, tokens, seed=tokens + 1, dtype=dtype)


@pytest.mark.parametrize("tokens", [4, 200])
def test_fp16_forward_and_backward(tokens: int) -> None:
    dtype = torch.float16
    gate_up, down = expert_weights("olmoe_1b_7b", dtype)
    ids, w = route("olmoe_1b_7b", tokens, seed=1, dtype=dtype)
    x = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, 2048, device="cuda", dtype=dtype)
    results = []
    for fn in (moe.moe_experts, moe.reference_moe):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xi, ids, wi, gate_up, down)
        out.backward(grad.to(out.dtype))
        results.append((out, xi.grad, wi.grad))
    (out, dx, dw), (ref, dx_ref, dw_ref) = results
    assert rel(out, ref) < FORWARD_TOL[dtype]
    assert rel(dx, dx_ref) < GRAD_TOL[dtype] and rel(dw, dw_ref) < GRAD_TOL[dtype]


@pytest.mark.parametrize("tokens", [16, 300])
@pytest.mark.parametrize("name", ["olmoe_1b_7b", "deepseek_v3_like"])
def test_backward_real_shapes(name: str, tokens: int) -> None:
    dtype = torch.bfloat16
    gate_up, down = expert_weights(name, dtype)
    ids, w = route(name, tokens, seed=2, dtype=dtype)
    H = gate_up.shape[2]
    x = torch.randn(tokens, H, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, H, device="cuda", dtype=dtype)
    grads = []
    for fn in (moe.moe_experts, moe.reference_moe):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xi, ids, wi, gate_up, down)
        out.backward(grad.to(out.dtype))
        grads.append((xi.grad, wi.grad))
    (dx, dw), (dx_ref, dw_ref) = grads
    assert rel(dx, dx_ref) < GRAD_TOL[dtype]
    assert rel(dw, dw_ref) < GRAD_TOL[dtype]


def test_decode_path_is_cuda_graph_capturable() -> None:
    """No device-to-host synchronisation at decode size: the dispatch captures into a CUDA graph and replays."""
    dtype = torch.bfloat16
    gate_up, down = expert_weights("olmoe_1b_7b", dtype)
    x = torch.randn(4, 2048, device="cuda", dtype=dtype)
    ids, w = route("olmoe_1b_7b", 4, seed=4, dtype=dtype)
    moe.moe_experts(x, ids, w, gate_up, down)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe.moe_experts(x, ids, w, gate_up, down)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.moe_experts(x, ids, w, gate_up, down)
    new_ids, new_w = route("olmoe_1b_7b", 4, seed=5, dtype=dtype)
    x.copy_(torch.randn_like(x))
    ids.copy_(new_ids)
    w.copy_(new_w)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, moe.reference_moe(x, ids, w, gate_up, down)) < FORWARD_TOL[dtype]


def test_matches_transformers_grouped_mm_on_an_olmoe_experts_module() -> None:
    """The registered experts implementation against transformers' own grouped_mm on an OLMoE-1B-7B layer."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    config = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8)
    module = OlmoeExperts(config).to("cuda", torch.bfloat16)
    module.gate_up_proj.data, module.down_proj.data = expert_weights("olmoe_1b_7b", torch.bfloat16)
    ids, w = route("olmoe_1b_7b", 33, seed=6, dtype=torch.bfloat16)
    x = torch.randn(33, 2048, device="cuda", dtype=torch.bfloat16)
    experts.register()
    outs = {}
    for impl in ("grouped_mm", experts.NAME):
        set_experts_implementation(config, impl)
        with torch.no_grad():
            outs[impl] = module(x, ids, w)
    assert rel(outs[experts.NAME], outs["grouped_mm"]) < FORWARD_TOL[torch.bfloat16]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_attach_uses_kernels_on_cuda(family: str) -> None:
    """attach() switches to the kernels automatically on CUDA; zero state stays equal to the original model
    within the bf16 tolerance; kernels=False and detach() give the original implementation back."""
    model = tiny_model(family).to("cuda", torch.bfloat16)
    tokens = torch.randint(3, 96, (2, 11), device="cuda")
    original = model.get_experts_implementation()
    with torch.no_grad():
        before = model(tokens).logits
    rm = reroute.attach(model)
    assert rm.kernels and model.config._experts_implementation == experts.NAME
    with torch.no_grad():
        after = model(tokens).logits
        generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 15)
    assert rel(after, before) < FORWARD_TOL[torch.bfloat16]
    rm.detach()
    assert model.get_experts_implementation() == original
    with reroute.attach(model, kernels=False) as off:
        assert not off.kernels and model.get_experts_implementation() == original
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, before)
