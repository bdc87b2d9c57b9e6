"""Triton expert dispatch (``reroute.kernels.moe``) against a plain-PyTorch reference.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernels are
first imported); shapes are tiny because the interpreter runs every program in numpy. With CUDA the same
checks run on the GPU. Real model shapes are in ``tests/gpu/test_kernels_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without CUDA, conftest has chosen Triton's interpreter (TRITON_INTERPRET=1)

import reroute  # noqa: E402
from reroute.kernels import available, experts  # noqa: E402
from reroute.testing import tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not available(DEVICE):
    pytest.skip(f"Triton kernels cannot run on {DEVICE} here", allow_module_level=True)
moe = pytest.importorskip("reroute.kernels.moe")

# relative error bounds ||out - ref|| / ||ref|| against a float32 reference
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def weights_for(E: int, H: int, inter: int, dtype: torch.dtype, seed: int, transposed: bool = False):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * inter, H, generator=g) / H**0.5
    down = torch.randn(E, H, inter, generator=g) / inter**0.5
    if transposed:  # same function, [E, H, 2I] / [E, inter, H] storage
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def routing(T: int, K: int, E: int, seed: int, mode: str = "random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "one_expert":  # every pair of every token on expert 3 (k = 1) or on experts 3 and 5
        ids = torch.tensor([3, 5, 6, 1][:K]).repeat(T, 1)
    elif mode == "few_experts":  # most experts empty
        ids = torch.stack([torch.randperm(3, generator=g)[:K] for _ in range(T)]) * 2
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.05
    return ids.to(DEVICE), w.to(DEVICE)


@pytest.fixture(params=["small", "large"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both paths: the single-program align kernel with decode tiles, and the torch-op align with prefill tiles."""
    if request.param == "large":
        monkeypatch.setattr(moe, "SMALL_PAIRS", 0)
        monkeypatch.setattr(moe, "SMALL_ROWS_PER_EXPERT", 0)
    return request.param


CASES = {
    # name: (tokens, top-k, experts, hidden, intermediate, routing)
    "one_token": (1, 2, 8, 32, 16, "random"),
    "empty_experts": (5, 2, 8, 32, 16, "few_experts"),
    "all_on_one_expert": (7, 1, 4, 32, 16, "one_expert"),
    "ragged_sizes": (9, 3, 6, 40, 24, "random"),  # hidden / intermediate not multiples of the tiles
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_reference(case: str, path: str) -> None:
    T, K, E, H, inter, mode = CASES[case]
    gate_up, down = weights_for(E, H, inter, torch.float32, seed=1)
    ids, w = routing(T, K, E, seed=2, mode=mode)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = moe.moe_experts(x, ids, w, gate_up, down)
    ref = moe.reference_moe(x, ids, w, gate_up, down)
    assert out.shape == (T, H) and out.dtype == x.dtype
    assert rel(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype: torch.dtype) -> None:
    T, K, E, H, inter = 6, 2, 8, 32, 16
    gate_up, down = weights_for(E, H, inter, dtype, seed=4)
    ids, w = routing(T, K, E, seed=5)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    out = moe.moe_experts(x, ids, w.to(dtype), gate_up, down)
    ref = moe.reference_moe(x, ids, w.to(dtype), gate_up, down)
    assert out.dtype == dtype
    assert rel(out, ref) < TOLERANCE[dtype]


def test_transposed_layout_and_sentinels() -> None:
    """[E, H, 2I] storage gives the same result; ids outside [0, E) (expert-parallel sentinels) are skipped."""
    T, K, E, H, inter = 4, 3, 8, 32, 16
    gate_up, down = weights_for(E, H, inter, torch.float32, seed=7)
    gate_up_t, down_t = weights_for(E, H, inter, torch.float32, seed=7, transposed=True)
    ids, w = routing(T, K, E, seed=8)
    ids[1, 2] = E
    ids[3, 0] = -1
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = moe.moe_experts(x, ids, w, gate_up_t, down_t, transposed=True)
    ref = moe.reference_moe(x, ids, w, gate_up, down)
    assert rel(out, ref) < TOLERANCE[torch.float32]
    kept = ids.clone()
    kept[1, 2], kept[3, 0] = 0, 0
    dropped = w.clone()
    dropped[1, 2] = dropped[3, 0] = 0.0
    assert rel(out, moe.reference_moe(x, kept, dropped, gate_up, down)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("case", ["one_token", "empty_experts", "ragged_sizes"])
def test_backward_matches_reference(case: str, path: str) -> None:
    T, K, E, H, inter, mode = CASES[case]
    gate_up, down = weights_for(E, H, inter, torch.float32, seed=10)
    ids, w = routing(T, K, E, seed=11, mode=mode)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    grads = []
    for fn in (moe.moe_experts, moe.reference_moe):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xi, ids, wi, gate_up, down).backward(grad)
        grads.append((xi.grad, wi.grad))
    (dx, dw), (dx_ref, dw_ref) = grads
    assert rel(dx, dx_ref) < 1e-5
    assert rel(dw, dw_ref) < 1e-5


def test_backward_into_expert_weights() -> None:
    """Expert weights that require grad get correct gradients too (through the slower torch path)."""
    T, K, E, H, inter = 5, 2, 6, 32, 16
    ids, w = routing(T, K, E, seed=14, mode="few_experts")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    results = []
    for fn in (moe.moe_experts, moe.reference_moe):
        gate_up, down = (p.requires_grad_() for p in weights_for(E, H, inter, torch.float32, seed=17))
        xi = x.clone().requires_grad_()
        fn(xi, ids, w, gate_up, down).backward(grad)
        results.append((xi.grad, gate_up.grad, down.grad))
    for got, want in zip(*results):
        assert rel(got, want) < 1e-5


def test_plan_groups_pairs_without_padding(path: str) -> None:
    """The align step: every valid pair once, grouped by expert in stable order; blocks stay inside an expert."""
    E = 8
    ids = torch.tensor([5, 1, 5, 9, 1, 5, 0, 5, -1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], device=DEVICE)
    plan = moe.plan_dispatch(ids, E, moe.SMALL)
    bm = plan.tiles.block_m
    valid = [(int(i), s) for s, i in enumerate(ids.tolist()) if 0 <= i < E]
    expected = [s for _, s in sorted(valid, key=lambda p: p[0])]
    assert plan.sorted_pair[: len(expected)].tolist() == expected
    covered = []
    for e, r0, r1 in zip(plan.blk_expert.tolist(), plan.blk_row0.tolist(), plan.blk_rowend.tolist()):
        if e < 0:
            continue
        rows = list(range(r0, min(r0 + bm, r1)))
        assert all(int(ids[expected[r]]) == e for r in rows)
        covered += rows
    assert sorted(covered) == list(range(len(expected)))


def test_zero_tokens_and_bad_input() -> None:
    gate_up, down = weights_for(4, 32, 16, torch.float32, seed=23)
    empty = moe.moe_experts(torch.zeros(0, 32, device=DEVICE), torch.zeros(0, 2, dtype=torch.long, device=DEVICE),
                            torch.zeros(0, 2, device=DEVICE), gate_up, down)  # fmt: skip
    assert empty.shape == (0, 32)
    x = torch.randn(3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="tokens"):
        moe.moe_experts(x, torch.zeros(2, 2, dtype=torch.long, device=DEVICE), torch.ones(2, 2, device=DEVICE),
                        gate_up, down)  # fmt: skip
    with pytest.raises(TypeError, match="integer"):
        moe.moe_experts(x, torch.zeros(3, 2, device=DEVICE), torch.ones(3, 2, device=DEVICE), gate_up, down)
    with pytest.raises(ValueError, match="expert weights do not match"):
        moe.moe_experts(x, torch.zeros(3, 2, dtype=torch.long, device=DEVICE), torch.ones(3, 2, device=DEVICE),
                        gate_up, down[:, :, :8])  # fmt: skip


# ----------------------------------------------------------------------------------------------- integration
def test_attached_model_with_kernels_matches_original() -> None:
    """attach(kernels=True) routes the experts through the Triton dispatch; zero state == the original model."""
    model = tiny_model("qwen3_moe").to(DEVICE)
    tokens = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    original = model.get_experts_implementation()
    with torch.no_grad():
        before = model(tokens).logits
    calls = []
    rm = reroute.attach(model, kernels=True)
    assert rm.kernels and all(layer.kernels for layer in rm.layers.values())
    assert model.config._experts_implementation == experts.NAME
    handle = torch.nn.Module.register_forward_hook
    hooks = [handle(m, lambda *a: calls.append(1)) for m in experts.experts_modules(model)]
    with torch.no_grad():
        after = model(tokens).logits
    assert len(calls) == len(rm.layers)
    assert rel(after, before) < 1e-5
    rm.set_offsets({rm.moe_layers[0]: torch.linspace(-2, 2, rm.num_experts, device=DEVICE)})
    steered = model(tokens).logits
    steered.float().pow(2).mean().backward()  # gradients reach the offsets through the kernels' backward
    assert rm.offsets[rm.moe_layers[0]].grad is not None and rm.offsets[rm.moe_layers[0]].grad.abs().sum() > 0
    for h in hooks:
        h.remove()
    rm.detach()
    assert model.get_experts_implementation() == original


def test_kernel_selection_rules() -> None:
    model = tiny_model("olmoe")
    assert not experts.should_enable(model, "auto")  # CPU: "auto" keeps the model's own path
    assert not experts.should_enable(model, False)
    with pytest.raises(ValueError, match="kernels must be"):
        reroute.attach(model, kernels="yes")
    assert "_reroute_attached" not in model.__dict__  # a rejected request leaves the model untouched
    gpt_oss = tiny_model("gpt_oss").to(DEVICE)
    reason = experts.unsupported_reason(experts.experts_modules(gpt_oss)[0])
    assert reason is not None and "bias" in reason
    with pytest.raises(RuntimeError, match="expert biases"):
        reroute.attach(gpt_oss, kernels=True)
    assert not reroute.attach(gpt_oss, kernels="auto").kernels
