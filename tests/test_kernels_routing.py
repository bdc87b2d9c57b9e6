"""The Triton routing kernel against the PyTorch routing path, on tiny models of every family.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton.language is first imported); with CUDA the same checks run on the GPU. The reference is the same
``LayerRouting`` with ``kernels=False`` (itself checked against the unattached models and hand-computed routing in
test_routing.py) on the same router inputs, and the family's plain ``rule.route``. Real sizes and timings are in
``tests/gpu/test_routing_kernel_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without CUDA, conftest has chosen Triton's interpreter (TRITON_INTERPRET=1)

import reroute  # noqa: E402
from reroute import ExpertMask, RoutingPolicy  # noqa: E402
from reroute.kernels import available  # noqa: E402
from reroute.testing import TINY_CONFIGS, tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not available(DEVICE):
    pytest.skip(f"Triton kernels cannot run on {DEVICE} here", allow_module_level=True)
from reroute.kernels import routing as kernel  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)
# families whose rule the kernel expresses; the others must fall back to the PyTorch path
EXPRESSED = [f for f in FAMILIES if f != "phimoe"]
# rules whose own route() calls topk(sorted=False): the kernel returns the same pairs in descending order
UNSORTED = {"deepseek_v2", "deepseek_v3", "glm4_moe"}
BATCH, SEQ = 2, 2


def _layer(family: str, seed: int = 0):
    rm = reroute.attach(tiny_model(family, seed=seed).to(DEVICE))
    layer = rm.layer(rm.moe_layers[0])
    layer.context.batch_size, layer.context.seq_len = BATCH, SEQ
    return rm, layer


def _hidden(layer, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH * SEQ, layer.router.weight.shape[-1], generator=generator).to(DEVICE)


def _outputs(layer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = layer(hidden)
    return tuple(out[layer.output_order.index(i)] for i in range(3))


def _both(layer, hidden: torch.Tensor, monkeypatch: pytest.MonkeyPatch, expect_kernel: bool = True):
    """(logits, weights, indices) from the PyTorch path and from the kernel path, checking the kernel ran."""
    calls = []
    launch = kernel.offset_and_route
    monkeypatch.setattr(kernel, "offset_and_route", lambda *a, **k: calls.append(1) or launch(*a, **k))
    with torch.no_grad():
        layer.kernels = False
        reference = _outputs(layer, hidden)
        layer.kernels = True
        actual = _outputs(layer, hidden)
    layer.kernels = False
    assert len(calls) == int(expect_kernel)
    return reference, actual


def _canonical(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the (expert, weight) pairs sorted by weight then expert: order-free comparison."""
    order = torch.sort(weights.float(), dim=-1, descending=True, stable=True).indices
    indices, weights = indices.gather(1, order), weights.gather(1, order)
    order = torch.sort(indices, dim=-1, stable=True).indices
    return indices.gather(1, order), weights.gather(1, order)


def _assert_same(family: str, reference, actual) -> None:
    ref_logits, ref_w, ref_i = reference
    logits, weights, indices = actual
    assert torch.equal(logits, ref_logits)
    assert weights.dtype == ref_w.dtype and indices.dtype == ref_i.dtype
    assert weights.shape == ref_w.shape
    if family not in UNSORTED:
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    ref_i, ref_w = _canonical(ref_i, ref_w)
    indices, weights = _canonical(indices, weights)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", EXPRESSED)
def test_family_rule_with_offsets_and_row_offsets(family, monkeypatch):
    rm, layer = _layer(family)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.offsets.copy_(torch.randn(layer.num_experts, generator=generator))
    layer.row_offsets = 2.0 * torch.randn(BATCH, layer.num_experts, generator=generator).to(DEVICE)
    hidden = _hidden(layer)
    reference, actual = _both(layer, hidden, monkeypatch)
    _assert_same(family, reference, actual)
    # with no state at all, the plain rule on the same logits
    layer.reset()
    logits = layer.rule.logits(layer.router, hidden)
    spec = kernel.spec_for(layer.rule, layer.router)
    weights, indices = kernel.route(logits, spec)
    expected = layer.rule.route(layer.router, logits, hidden.dtype)
    _assert_same(family, (logits, *expected), (logits, weights, indices))


@pytest.mark.parametrize("family", EXPRESSED)
def test_mask_and_top_p_on_one_row(family, monkeypatch):
    rm, layer = _layer(family)
    rm.set_mask(ExpertMask(banned=(0, 5), forced=(3,)))
    rm.set_policy(RoutingPolicy(top_p=0.6, max_experts=4), rows=[1])
    reference, actual = _both(layer, _hidden(layer), monkeypatch)
    assert actual[1].shape[1] == 4
    _assert_same(family, reference, actual)


@pytest.mark.parametrize("family", EXPRESSED)
def test_mixing_and_rank_on_one_row(family, monkeypatch):
    rm, layer = _layer(family)
    # shared core experts [1, C] with per-row mixtures [B, C]: one position in row 0, two in row 1
    rm.set_mixing(
        layer.layer_idx,
        experts=[1, 4, 6],
        positions=torch.tensor([[1, -1], [0, 1]], device=DEVICE),
        logits=torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 3.0]], device=DEVICE),
    )
    rm.set_policy(RoutingPolicy(rank=2), rows=[0])
    reference, actual = _both(layer, _hidden(layer), monkeypatch)
    _assert_same(family, reference, actual)


@pytest.mark.parametrize(
    ("family", "policy"),
    [
        ("olmoe", RoutingPolicy(top_k=3, renormalize=True)),
        ("qwen3_moe", RoutingPolicy(top_k=1, renormalize=False)),
        ("mixtral", RoutingPolicy(top_p=0.5)),
        ("deepseek_v3", RoutingPolicy(top_p=0.9, max_experts=3, renormalize=False)),
        ("deepseek_v2", RoutingPolicy(rank=3)),
        ("gpt_oss", RoutingPolicy(top_k=8)),  # k = E
    ],
)
def test_policies_on_every_row(family, policy, monkeypatch):
    rm, layer = _layer(family)
    rm.set_policy(policy)
    reference, actual = _both(layer, _hidden(layer), monkeypatch)
    _assert_same(family, reference, actual)


def test_mixing_everywhere_with_two_forced_experts(monkeypatch):
    rm, layer = _layer("glm4_moe")
    rm.set_mixing(layer.layer_idx, experts=[[2, 3, 7], [0, 1, 2]], positions=[0, 1])
    rm.set_mask(ExpertMask(forced=(4, 6)))
    reference, actual = _both(layer, _hidden(layer), monkeypatch)
    # both forced experts are chosen (their +inf tie is ordered by index in the kernel)
    assert (actual[2] == 4).any(-1).all() and (actual[2] == 6).any(-1).all()
    _assert_same("glm4_moe", reference, actual)


def test_phimoe_and_gradients_fall_back_to_pytorch(monkeypatch):
    rm, layer = _layer("phimoe")
    assert kernel.spec_for(layer.rule, layer.router) is None
    reference, actual = _both(layer, _hidden(layer), monkeypatch, expect_kernel=False)
    for a, b in zip(reference, actual):
        assert torch.equal(a, b)
    # gradient mode with learnable offsets: the PyTorch path, so that gradients flow
    rm, layer = _layer("olmoe")
    layer.kernels = True
    weights = _outputs(layer, _hidden(layer))[1]
    assert weights.requires_grad
    with torch.no_grad():
        assert not _outputs(layer, _hidden(layer))[1].requires_grad


def test_whole_model_forward_matches(monkeypatch):
    """All layers on the kernel path inside a real forward (the batch layout comes from the model)."""
    model = tiny_model("qwen2_moe").to(DEVICE)
    rm = reroute.attach(model)
    tokens = torch.randint(3, 96, (2, 3), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rm.set_row_offsets({i: torch.randn(2, rm.num_experts, device=DEVICE) for i in rm.moe_layers})
    with torch.no_grad(), rm.trace() as reference:
        expected = model(tokens).logits
    for idx in rm.moe_layers:
        rm.layer(idx).kernels = True
    with torch.no_grad(), rm.trace() as trace:
        actual = model(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for idx in rm.moe_layers:
        assert torch.equal(trace.indices(idx), reference.indices(idx))


def _spec(top_k: int, **fields) -> kernel.RoutingSpec:
    return kernel.RoutingSpec(top_k=top_k, **fields)


def test_edge_shapes_one_token_odd_experts_and_empty():
    generator = torch.Generator().manual_seed(4)
    # E = 5 (not a power of two), one token, k = E, renormalised softmax
    logits = torch.randn(1, 5, generator=generator).to(DEVICE)
    weights, indices = kernel.route(logits, _spec(5))
    probs = torch.softmax(logits, dim=-1)
    expected_w, expected_i = probs.topk(5)
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(weights, expected_w / expected_w.sum(), rtol=1e-6, atol=1e-7)
    # E = 12 in 3 groups of 4, sigmoid with bias, int32 indices, scaled
    bias = 0.1 * torch.randn(12, generator=generator).to(DEVICE)
    spec = _spec(3, score="sigmoid", group="top2", num_group=3, topk_group=2, scaling=2.0, correction_bias=bias)
    logits = torch.randn(3, 12, generator=generator).to(DEVICE)
    weights, indices = kernel.route(logits, spec, index_dtype=torch.int32)
    scores = logits.sigmoid()
    choice = scores + bias
    group = choice.view(3, 3, 4).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    allowed = torch.zeros(3, 3, dtype=torch.bool, device=DEVICE).scatter(1, group, True).repeat_interleave(4, dim=1)
    expected_i = choice.masked_fill(~allowed, float("-inf")).topk(3).indices
    expected_w = scores.gather(1, expected_i)
    assert indices.dtype == torch.int32 and torch.equal(indices.long(), expected_i)
    torch.testing.assert_close(weights, 2.0 * expected_w / expected_w.sum(-1, keepdim=True))
    # no tokens: empty outputs, no launch
    weights, indices = kernel.route(torch.empty(0, 12, device=DEVICE), spec)
    assert weights.shape == (0, 3) and indices.shape == (0, 3)


def test_row_index_matches_the_row_major_layout():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 8, generator=generator).to(DEVICE)
    row_offsets = 3.0 * torch.randn(2, 8, generator=generator).to(DEVICE)
    policy_rows = torch.tensor([False, True], device=DEVICE)
    state = {"row_offsets": row_offsets, "policy": RoutingPolicy(rank=2), "policy_rows": policy_rows}
    by_layout = kernel.route(logits, _spec(2), rows=2, **state)
    # tokens in row-major order are rows [0, 0, 1, 1]; give them interleaved and map them back with row_index
    order = torch.tensor([0, 2, 1, 3], device=DEVICE)
    row_index = torch.tensor([0, 1, 0, 1], device=DEVICE)
    by_index = kernel.route(logits[order], _spec(2), rows=2, row_index=row_index, **state)
    for a, b in zip(by_layout, by_index):
        assert torch.equal(a[order], b)
    assert not torch.equal(by_layout[1][0], by_layout[1][2])  # the rows really differ


def test_ties_take_the_lowest_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    weights, indices = kernel.route(logits, _spec(2))
    assert indices.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(weights, torch.full((2, 2), 0.5, device=DEVICE))
    # the PyTorch path picks among equal values in its own order: same values, maybe other experts
    ref_w, ref_i = torch.softmax(logits, -1).topk(2)
    torch.testing.assert_close(logits.gather(1, ref_i), logits.gather(1, indices.long()))


def test_bfloat16_logits_and_offsets_round_like_pytorch():
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 8, generator=generator)).bfloat16().to(DEVICE)
    offsets = torch.randn(8, generator=generator).to(DEVICE)
    spec = _spec(2, exact="logits_softmax")  # GPT-OSS: top-k on the bf16 logits, softmax over the k
    offset_logits, weights, indices = kernel.offset_and_route(logits, spec, offsets=offsets)
    expected_logits = logits + offsets.to(torch.bfloat16)
    assert torch.equal(offset_logits, expected_logits)
    top, expected_i = expected_logits.topk(2)
    assert torch.equal(indices, expected_i)
    assert weights.dtype == torch.bfloat16
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1, dtype=torch.bfloat16))


def test_bad_input_raises_clear_errors():
    spec = _spec(2)
    with pytest.raises(ValueError, match="at most 256"):
        kernel.route(torch.zeros(1, 300, device=DEVICE), spec)
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        kernel.route(torch.zeros(8, device=DEVICE), spec)
    with pytest.raises(ValueError, match="offsets must have shape"):
        kernel.route(torch.zeros(2, 8, device=DEVICE), spec, offsets=torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="not a multiple"):
        kernel.route(torch.zeros(6, 8, device=DEVICE), spec, rows=3, row_offsets=torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="exceeds"):
        kernel.route(torch.zeros(2, 8, device=DEVICE), spec, policy=RoutingPolicy(top_k=9))
    with pytest.raises(ValueError, match="leaves"):
        kernel.route(torch.zeros(2, 8, device=DEVICE), spec, mask=ExpertMask(banned=tuple(range(7))))
    with pytest.raises(ValueError, match="weights_dtype"):
        kernel.RoutingSpec(top_k=2, weights_dtype="float16")
