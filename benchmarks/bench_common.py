"""Shared by the benchmark scripts: model shapes, model building, timing, the device's name."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

SHAPES: dict[str, dict[str, int]] = {
    # the OLMoE shape of reroute.testing.tiny_model("olmoe")
    "tiny": dict(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    # a testbed-sized model: OLMoE's routing (64 experts, top-8) at small width
    "small": dict(
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=64,
        num_experts_per_tok=8,
    ),
    # OLMoE-1B-7B's shape (random weights; for an accelerator)
    "olmoe-1b-7b": dict(
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
    ),
}


# OLMoE-1B-7B's layer structure (16 layers, 64 experts, top-8) at small width: the operators a forward dispatches
# (bench_c3po's count) are those of the real shape, on a CPU
SHAPES["olmoe-1b-7b-thin"] = dict(SHAPES["olmoe-1b-7b"], hidden_size=128, intermediate_size=64)


def build(shape: str, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """A random OLMoE of ``shape`` (seed 0), in eval mode."""
    config = transformers.OlmoeConfig(
        vocab_size=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=1024,
        norm_topk_prob=False,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    return transformers.OlmoeForCausalLM(config).to(device=device, dtype=dtype).eval()


def median_seconds(
    runs: dict[tuple[str, str], Callable[[], object]],
    device: str,
    repeats: int,
    errors: dict[str, str] | None = None,
) -> dict:
    """Median wall time of each run over ``repeats`` rounds, after a warm-up round. Rounds visit the runs in turn,
    so that load changes on a shared machine affect every run alike.

    ``errors``: a run that raises in the warm-up round is recorded there (``"name/variant": "Type: first line"``),
    removed from ``runs`` and not timed, while the others go on; without it the error propagates."""
    times: dict[tuple[str, str], list[float]] = {name: [] for name in runs}
    for round_idx in range(repeats + 1):
        for name, fn in list(runs.items()):
            label = "/".join(n for n in name if n)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a benchmark reports any failure and goes on
                if errors is None or round_idx > 0:
                    raise
                lines = str(exc).splitlines()
                errors[label] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                print(f"{label} failed: {errors[label]}", flush=True)
                del runs[name], times[name]
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if round_idx > 0:
                times[name].append(elapsed)
            # as they come: a run cut at a time limit still shows what it measured
            print(f"round {round_idx} {label}: {elapsed:.3f} s", flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> int:
    """Operators one call of ``fn`` dispatches below autograd (a custom op counts once, whatever runs inside it).
    On an eager GPU path each is about one kernel launch, which sets the host time where launches, not FLOPs,
    bound a call; the count is the same on any device, so a CPU run can count what a GPU run launches."""
    with _CountOps() as counter:
        fn()
    return counter.count


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
