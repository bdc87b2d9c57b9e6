"""The Triton routing kernel against LayerRouting's PyTorch path on a real GPU, at real expert counts.

Run: ``PYTHONPATH=. python -m pytest tests/gpu/test_routing_kernel_gpu.py -s`` on a machine with a GPU (CI has
none; the same checks on tiny shapes run on the CPU in tests/test_kernels_routing.py).

Shapes: the routers of Mixtral-8x7B (E=8, k=2), OLMoE-1B-7B (64, 8), Qwen3-30B-A3B (128, 8) and a DeepSeek-V3-like
layer (256, 8, 8 groups, top-4 groups) at their hidden sizes, random bf16 weights; T in {1, 64, 4096} tokens; four
routing states (the family's rule; offsets + row offsets; mask + top-p on one row; C3PO re-mixing + rank-2 on
one row).

What must agree: the offset logits bit for bit; the selected experts, except where equal choice values tie
(``torch.topk``'s order among ties is unspecified; the kernel takes the lowest index), which must then be equally
ranked; the weights, compared per token as sorted values, within: bf16 weights rtol 8e-3 (one bf16 ulp, from
float32 results a few ulps apart rounding differently), float32 weights rtol 1e-5 / atol 1e-6.
Timings (µs per router call, both paths) are printed with ``-s``, not asserted.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from reroute.kernels import interpreted  # noqa: E402

if interpreted():
    pytest.skip("TRITON_INTERPRET is set: the GPU checks need compiled kernels", allow_module_level=True)

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

# the routing benchmark (benchmarks/kernels/bench_routing.py) builds the layers and states these checks run
_spec = importlib.util.spec_from_file_location(
    "bench_routing", Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_routing.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
from reroute.routing.policy import apply_mask  # noqa: E402

TOKENS = (1, 64, 4096)
TOLERANCE = {torch.bfloat16: {"rtol": 8e-3, "atol": 1e-6}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


@functools.cache
def _layer(shape: str):
    return bench.build_layer(shape)


def _outputs(layer, hidden: torch.Tensor, kernels: bool):
    layer.kernels = kernels
    with torch.no_grad():
        out = layer(hidden)
    layer.kernels = False
    return tuple(out[layer.output_order.index(i)] for i in range(3))


@pytest.mark.parametrize("state", bench.STATES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_kernel_matches_pytorch_path(shape, tokens, state):
    layer = _layer(shape)
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, layer.router.weight.shape[-1], generator=generator).to("cuda", torch.bfloat16)
    bench.set_state(layer, state, tokens)
    ref_logits, ref_w, ref_i = _outputs(layer, hidden, kernels=False)
    logits, weights, indices = _outputs(layer, hidden, kernels=True)

    assert torch.equal(logits, ref_logits)
    assert weights.dtype == ref_w.dtype and indices.dtype == ref_i.dtype and weights.shape == ref_w.shape
    same = (indices.sort(dim=-1).values == ref_i.sort(dim=-1).values).all(dim=-1)
    if not same.all():
        # ties: the differing tokens' picks must have the same choice values
        choice = apply_mask(layer.rule.choice(layer.router, layer.rule.scores(layer.router, logits)), layer.mask)
        rows = (~same).nonzero()[:, 0]
        ours = choice[rows].gather(1, indices[rows]).sort(dim=-1).values
        theirs = choice[rows].gather(1, ref_i[rows]).sort(dim=-1).values
        assert torch.equal(ours, theirs), f"tokens {rows.tolist()[:8]} differ beyond ties"
        print(f"{shape} T={tokens} {state}: {rows.numel()} token(s) broke a tie differently")
    torch.testing.assert_close(
        weights.float().sort(dim=-1).values, ref_w.float().sort(dim=-1).values, **TOLERANCE[weights.dtype]
    )
    layer.reset()


def test_print_timings():
    rows = bench.run(list(bench.SHAPES), list(TOKENS), ["family", "top_p_mask"])
    assert all(row["kernel_us"] > 0 for row in rows)
