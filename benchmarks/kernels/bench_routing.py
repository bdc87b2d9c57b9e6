"""Benchmark: one MoE layer's routing, ``LayerRouting``'s PyTorch path vs the Triton routing kernel.

Run on one GPU from the repository root::

    PYTHONPATH=. python benchmarks/kernels/bench_routing.py --out routing.json
    PYTHONPATH=. python benchmarks/kernels/bench_routing.py --shapes olmoe --tokens 1 16

Per shape, tokens T and routing state: µs per router call (projection + offsets + score function + selection +
weights; the projection is the same ``F.linear`` on both paths) as the median of CUDA-event timings
(``triton.testing.do_bench``), which includes the gaps where the GPU waits for the host to launch the next op:
what a decode step pays without CUDA graphs. Then the same call captured in a CUDA graph and replayed
(``*_graph_us``: GPU time with the host's launch cost gone; ``None`` where the path cannot be captured). The router
is the family's own transformers module at the real hidden size and expert count, with random bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from reroute.arch import family_for
from reroute.routing.layer import LayerRouting, Mixing, RoutingContext
from reroute.routing.policy import ExpertMask, RoutingPolicy
from reroute.testing import TINY_CONFIGS

# name: (family, hidden, config fields giving the real expert count, top-k and groups)
SHAPES: dict[str, tuple[str, int, dict[str, object]]] = {
    "mixtral_8x7b": ("mixtral", 4096, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "olmoe_1b_7b": ("olmoe", 2048, {"num_experts": 64, "num_experts_per_tok": 8}),
    "qwen3_30b_a3b": ("qwen3_moe", 2048, {"num_experts": 128, "num_experts_per_tok": 8}),
    "deepseek_v3_like": (
        "deepseek_v3",
        7168,
        {"n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4},
    ),
}
TOKENS = (1, 4, 16, 64, 512, 4096)
STATES = ("family", "offsets", "top_p_mask", "mixing_rank")


def build_layer(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> LayerRouting:
    """The family's router module at ``shape``'s sizes (random weights) under a fresh ``LayerRouting``."""
    family, hidden, fields = SHAPES[shape]
    config_name, _, tiny_fields = TINY_CONFIGS[family]
    config = getattr(transformers, config_name)(
        **{**tiny_fields, **fields, "hidden_size": hidden, "num_attention_heads": 4, "num_key_value_heads": 4}
    )
    adapter = family_for(config.model_type)
    router = adapter.resolve_router_class()(config).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 2.0 / hidden**0.5)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return LayerRouting(0, router, adapter, RoutingContext(), (0, 1, 2))


def set_state(layer: LayerRouting, state: str, tokens: int) -> int:
    """Put ``layer`` in one of :data:`STATES` for a call on ``tokens`` tokens; returns the batch rows used."""
    layer.reset()
    rows = 2 if tokens % 2 == 0 else 1
    layer.context.batch_size, layer.context.seq_len = rows, tokens // rows
    experts, device = layer.num_experts, layer.device
    generator = torch.Generator().manual_seed(1)
    if state in ("offsets", "top_p_mask"):
        with torch.no_grad():
            layer.offsets.copy_(torch.randn(experts, generator=generator))
        layer.row_offsets = torch.randn(rows, experts, generator=generator).to(device)
    if state == "top_p_mask":
        layer.mask = ExpertMask(banned=(0,), forced=(1,))
        layer.policy = RoutingPolicy(top_p=0.7, max_experts=2 * layer.top_k)
        layer.policy_rows = torch.tensor([False, True][:rows] if rows == 2 else [True], device=device)
    if state == "mixing_rank":
        core = torch.arange(min(4, experts), device=device)[None]
        positions = torch.tensor([[tokens // rows - 1]], device=device)
        layer.mixing = Mixing(
            experts=core, logits=torch.randn(core.shape, generator=generator).to(device), positions=positions
        )
        layer.policy = RoutingPolicy(rank=2)
        layer.policy_rows = torch.tensor([True, False][:rows], device=device)
    return rows


def router_call(layer: LayerRouting, hidden: torch.Tensor, kernels: bool) -> Callable[[], object]:
    def call() -> object:
        layer.kernels = kernels
        return layer(hidden)

    return call


def time_us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    with torch.no_grad():
        return 1000.0 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def graph_time_us(fn: Callable[[], object]) -> float | None:
    """µs per replay of ``fn`` captured in a CUDA graph, or ``None`` if it cannot be captured (a host sync)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture: compiles, caches, allocator pools
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        try:
            with torch.cuda.graph(graph):
                fn()
        except RuntimeError:
            torch.cuda.synchronize()
            return None
    return time_us(graph.replay)


def run(shapes: list[str], tokens: list[int], states: list[str]) -> list[dict[str, object]]:
    rows = []
    for shape in shapes:
        layer = build_layer(shape)
        hidden_size = layer.router.weight.shape[-1]
        for count in tokens:
            hidden = torch.randn(count, hidden_size, device="cuda", dtype=torch.bfloat16)
            for state in states:
                set_state(layer, state, count)
                torch_us = time_us(router_call(layer, hidden, False))
                kernel_us = time_us(router_call(layer, hidden, True))
                torch_graph = graph_time_us(router_call(layer, hidden, False))
                kernel_graph = graph_time_us(router_call(layer, hidden, True))
                rows.append(
                    {
                        "shape": shape,
                        "experts": layer.num_experts,
                        "top_k": layer.top_k,
                        "tokens": count,
                        "state": state,
                        "pytorch_us": round(torch_us, 2),
                        "kernel_us": round(kernel_us, 2),
                        "speedup": round(torch_us / kernel_us, 2),
                        "pytorch_graph_us": None if torch_graph is None else round(torch_graph, 2),
                        "kernel_graph_us": None if kernel_graph is None else round(kernel_graph, 2),
                    }
                )
                print(
                    f"{shape:18s} E={layer.num_experts:<4d} T={count:<5d} {state:12s} "
                    f"pytorch {torch_us:8.1f} us  kernel {kernel_us:7.1f} us  x{torch_us / kernel_us:5.2f}   "
                    f"graphed: pytorch {_us(torch_graph)}  kernel {_us(kernel_graph)}",
                    flush=True,
                )
    return rows


def _us(value: float | None) -> str:
    return "   n/a   " if value is None else f"{value:6.1f} us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_routing needs a CUDA GPU", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}; transformers {transformers.__version__}")
    rows = run(args.shapes, args.tokens, args.states)
    if args.out is not None:
        payload = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
