"""Benchmark: one MoE experts layer, transformers' implementations vs the Triton dispatch; then decode tok/s.

Run on one GPU from the repository root::

    PYTHONPATH=. python benchmarks/kernels/bench.py --out bench.json            # everything
    PYTHONPATH=. python benchmarks/kernels/bench.py --shapes olmoe --m 1 16 --no-e2e

Per shape and tokens M: µs per layer (median of CUDA-event timings, ``triton.testing.do_bench``) for transformers'
``eager``, ``batched_mm`` and ``grouped_mm`` experts implementations and ours, all on the same experts module
(an ``OlmoeExperts`` built at the shape: every supported family's experts have the same structure); achieved
bandwidth = bytes of the experts actually touched / our time, as a fraction of the GPU's peak; forward+backward
time (gradients for hidden states and routing weights, expert weights frozen) for grouped_mm and ours.
``batched_mm`` copies every selected expert's weights per token, so it is skipped where that copy would not fit in
GPU memory.
End to end: decode tokens/s of an OLMoE-1B-7B-shaped model with random bf16 weights, plain ``generate()``
against the same model attached with the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SHAPES = {
    # name: (experts, top-k, hidden, intermediate, groups, top groups)
    "olmoe": (64, 8, 2048, 1024, 1, 1),
    "mixtral": (8, 2, 4096, 14336, 1, 1),
    "qwen3": (128, 8, 2048, 768, 1, 1),
    "deepseek_v3": (256, 8, 7168, 2048, 8, 4),
}
TOKENS = (1, 4, 16, 64, 512, 4096)
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}  # HBM datasheet figures (H100 SXM, H200)


def peak_bandwidth(name: str) -> float | None:
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps * 1e12
    return None


def routing(shape: tuple, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    E, k, _, _, groups, top_groups = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(tokens, E, device="cuda", generator=g).softmax(-1)
    if groups > 1:
        group_score = scores.view(tokens, groups, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(top_groups, dim=-1).indices, 1.0)
        scores = scores.masked_fill(~keep.repeat_interleave(E // groups, dim=1).bool(), 0.0)
    weights, indices = scores.topk(k, dim=-1)
    return indices, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def graph_us(fn, x: torch.Tensor, rotation: list) -> float | None:
    """Median µs per call replayed from a CUDA graph (no launch overhead); ``None`` if the call cannot be captured."""
    import triton

    calls = iter(range(1 << 30))

    def call() -> None:
        r = rotation[next(calls) % len(rotation)]
        fn(x, *r)

    try:
        return 1e3 * triton.testing.do_bench_cudagraph(call, rep=30, return_mode="median")
    except Exception:  # host synchronisation inside the call (or a capture-unsafe op)
        torch.cuda.synchronize()
        return None


def time_us(fn, warmup_ms: int = 25, rep_ms: int = 60) -> float:
    import triton

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_layer(name: str, tokens_list: tuple[int, ...], peak: float | None, log) -> list[dict]:
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    from reroute.compat import set_experts_implementation
    from reroute.kernels import experts as bridge

    shape = SHAPES[name]
    E, k, H, inter, _, _ = shape
    config = OlmoeConfig(hidden_size=H, intermediate_size=inter, num_experts=E, num_experts_per_tok=k)
    with torch.device("cuda"), default_dtype(torch.bfloat16):  # DeepSeek-V3's experts are 22.5 GB in bf16
        module = OlmoeExperts(config)
    torch.nn.init.normal_(module.gate_up_proj, std=H**-0.5)
    torch.nn.init.normal_(module.down_proj, std=inter**-0.5)
    module.requires_grad_(False)
    bridge.register()
    expert_bytes = 3 * H * inter * module.gate_up_proj.element_size()
    rows = []
    for tokens in tokens_list:
        ids, w = routing(shape, tokens, seed=tokens)
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        touched = int(torch.unique(ids).numel())
        # CUDA-graph timings rotate over several routings so that replays do not find the experts in L2
        rotation = [routing(shape, tokens, seed=1000 * tokens + i) for i in range(4)]
        rotation_bytes = expert_bytes * sum(int(torch.unique(r[0]).numel()) for r in rotation) / len(rotation)
        row = {"shape": name, "tokens": tokens, "experts_touched": touched, "bytes": touched * expert_bytes}
        free = torch.cuda.mem_get_info()[0]
        for impl in ("eager", "batched_mm", "grouped_mm", bridge.NAME):
            key = "ours" if impl == bridge.NAME else impl
            if impl == "batched_mm" and 2.2 * tokens * k * expert_bytes > free:
                row[f"{key}_us"] = None
                row[f"{key}_note"] = f"skipped: copies {tokens * k * expert_bytes / 2**30:.0f} GiB of weights"
                continue
            set_experts_implementation(config, impl)
            with torch.no_grad():
                row[f"{key}_us"] = time_us(functools.partial(module, x, ids, w))
                if impl != "eager":  # eager syncs on the host (nonzero), so it cannot be captured
                    row[f"{key}_graph_us"] = graph_us(module, x, rotation)
        if peak is not None:
            row["ours_bw_fraction"] = ratio(row["bytes"] / peak * 1e6, row["ours_us"])
            row["ours_graph_bw_fraction"] = ratio(rotation_bytes / peak * 1e6, row.get("ours_graph_us"))
        best = min((row[f"{i}_us"] for i in ("eager", "batched_mm", "grouped_mm") if row.get(f"{i}_us")), default=None)
        row["speedup_vs_best_hf"] = ratio(best, row["ours_us"])
        best = min(
            (row[f"{i}_graph_us"] for i in ("batched_mm", "grouped_mm") if row.get(f"{i}_graph_us")), default=None
        )
        row["graph_speedup_vs_best_hf"] = ratio(best, row.get("ours_graph_us"))
        # forward + backward (hidden states and routing weights; expert weights frozen)
        grad = torch.randn_like(x)
        for impl, key in (("grouped_mm", "grouped_mm_fwd_bwd_us"), (bridge.NAME, "ours_fwd_bwd_us")):
            set_experts_implementation(config, impl)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

            def step(xg=xg, wg=wg, ids=ids, grad=grad):
                torch.autograd.grad(module(xg, ids, wg), (xg, wg), grad)

            row[key] = time_us(step)
        rows.append(row)
        log(format_row(row))
    return rows


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    ("shape", "shape", "s"),
    ("M", "tokens", "d"),
    ("experts", "experts_touched", "d"),
    ("eager µs", "eager_us", ".0f"),
    ("batched_mm µs", "batched_mm_us", ".0f"),
    ("grouped_mm µs", "grouped_mm_us", ".0f"),
    ("ours µs", "ours_us", ".1f"),
    ("% peak BW", "ours_bw_pct", ".0f"),
    ("× best HF", "speedup_vs_best_hf", ".1f"),
    ("graph: batched_mm µs", "batched_mm_graph_us", ".0f"),
    ("graph: grouped_mm µs", "grouped_mm_graph_us", ".0f"),
    ("graph: ours µs", "ours_graph_us", ".1f"),
    ("graph: % peak BW", "ours_graph_bw_pct", ".0f"),
    ("graph: × best HF", "graph_speedup_vs_best_hf", ".1f"),
    ("fwd+bwd grouped µs", "grouped_mm_fwd_bwd_us", ".0f"),
    ("fwd+bwd ours µs", "ours_fwd_bwd_us", ".0f"),
)


def format_row(row: dict) -> str:
    pct = {f"{k[:-9]}_pct": 100 * v for k, v in row.items() if k.endswith("_fraction") and v is not None}
    row = {**row, **pct}
    return " | ".join(_fmt(row.get(key), spec) for _, key, spec in COLUMNS)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + format_row(row) + " |" for row in rows]
    return "\n".join(lines)


def bench_decode(batches: tuple[int, ...], layers: int, new_tokens: int, log, repeats: int = 2) -> list[dict]:
    """Decode tokens/s of an OLMoE-1B-7B-shaped model (random bf16 weights): plain generate() vs attached.

    Modes are interleaved and each is timed ``repeats`` times (best kept): the host is shared and decode at
    batch 1 is bound by host-side launch overhead, so single runs are noisy.
    """
    from transformers import OlmoeConfig, OlmoeForCausalLM

    import reroute

    config = OlmoeConfig(num_hidden_layers=layers)  # the defaults are OLMoE-1B-7B's sizes
    torch.manual_seed(0)
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        model = OlmoeForCausalLM(config).eval()
    experts_module = next(m for m in model.modules() if type(m).__name__ == "OlmoeExperts")
    seen: list[str] = []
    experts_module.register_forward_pre_hook(lambda m, a: seen.append(m.config._experts_implementation))
    modes = (("plain_generate", None), ("attached_no_kernels", False), ("attached_kernels", True))
    results = []
    for batch in batches:
        prompt = torch.randint(3, config.vocab_size, (batch, 32), device="cuda")
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
        row = {"batch": batch, "layers": layers, "new_tokens": new_tokens, "prompt_tokens": 32}
        for repeat in range(repeats + 1):  # the first round warms up (compilation, allocator)
            for label, kernels in modes:
                rm = None if kernels is None else reroute.attach(model, kernels=kernels)
                seen.clear()
                with torch.no_grad():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model.generate(prompt, **kwargs)
                    torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                if rm is not None:
                    rm.detach()
                row[f"{label}_implementation"] = sorted(set(seen))
                if repeat:
                    row[f"{label}_tok_s"] = max(row.get(f"{label}_tok_s", 0.0), batch * new_tokens / elapsed)
        row["speedup"] = row["attached_kernels_tok_s"] / row["plain_generate_tok_s"]
        log(f"decode batch {batch}: plain {row['plain_generate_tok_s']:.1f} tok/s, attached without kernels "
            f"{row['attached_no_kernels_tok_s']:.1f}, attached with kernels {row['attached_kernels_tok_s']:.1f} "
            f"({row['speedup']:.2f}x plain); experts implementations seen: "
            f"{[row[f'{label}_implementation'] for label, _ in modes]}")  # fmt: skip
        results.append(row)
    return results


SMALL_CANDIDATES = [  # (block_m, gate_up_n, gate_up_k, down_n, down_k, warps, stages)
    (16, 64, 128, 64, 128, 4, 4),
    (16, 32, 128, 64, 128, 4, 4),
    (16, 64, 256, 64, 256, 4, 3),
    (16, 32, 256, 32, 256, 4, 3),
    (16, 32, 128, 32, 128, 4, 6),
    (16, 16, 256, 32, 256, 4, 4),
    (16, 64, 128, 128, 128, 8, 4),
]
LARGE_CANDIDATES = [
    (64, 64, 64, 128, 64, 4, 3),
    (64, 128, 64, 128, 64, 8, 4),
    (128, 64, 64, 128, 64, 8, 3),
    (128, 128, 64, 128, 64, 8, 3),
    (128, 64, 64, 256, 64, 8, 3),
]


def tune(shapes: list[str], log) -> dict:
    """Time the forward (CUDA graph: kernel time) of every candidate tile table per path; the best has the lowest
    mean of time / best time."""
    from reroute.kernels import moe

    report = {}
    for path, candidates, tokens_list in (
        ("SMALL", SMALL_CANDIDATES, (1, 16, 64)),
        ("LARGE", LARGE_CANDIDATES, (512, 4096)),
    ):
        saved = getattr(moe, path)
        times: dict[tuple, list[float]] = {c: [] for c in candidates}
        for name in shapes:
            E, k, H, inter, _, _ = SHAPES[name]
            with torch.device("cuda"), default_dtype(torch.bfloat16):
                gate_up = torch.randn(E, 2 * inter, H) * H**-0.5
                down = torch.randn(E, H, inter) * inter**-0.5
            for tokens in tokens_list:
                rotation = [routing(SHAPES[name], tokens, seed=1000 * tokens + i) for i in range(4)]
                x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
                for cand in candidates:
                    setattr(moe, path, moe.TileConfig(*cand))
                    try:
                        with torch.no_grad():
                            run = functools.partial(moe.moe_experts, gate_up=gate_up, down=down)
                            t = graph_us(lambda x, ids, w, run=run: run(x, ids, w), x, rotation)
                        times[cand].append(float("inf") if t is None else t)
                    except Exception as exc:  # a tile table that does not compile (shared memory) is out
                        times[cand].append(float("inf"))
                        log(f"{path} {cand} {name} M={tokens}: {type(exc).__name__}")
                best = min(t[-1] for t in times.values())
                log(f"{path} {name} M={tokens}: " + ", ".join(f"{c}: {t[-1]:.1f}" for c, t in times.items())
                    + f" (best {best:.1f} µs)")  # fmt: skip
        setattr(moe, path, saved)
        n = len(next(iter(times.values())))
        best_per_case = [min(t[i] for t in times.values()) for i in range(n)]
        score = {c: sum(t[i] / best_per_case[i] for i in range(n)) / n for c, t in times.items()}
        winner = min(score, key=score.get)
        log(f"{path}: best tile table {winner} (mean time / best = {score[winner]:.3f})")
        report[path] = {"candidates": {str(c): t for c, t in times.items()}, "best": list(winner)}
    return report


def profile(shape_name: str, tokens: int, log) -> None:
    """Per-kernel GPU time and per-op host time of 20 calls of our forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from reroute.kernels import moe

    E, k, H, inter, _, _ = SHAPES[shape_name]
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        gate_up = torch.randn(E, 2 * inter, H) * H**-0.5
        down = torch.randn(E, H, inter) * inter**-0.5
    ids, w = routing(SHAPES[shape_name], tokens, seed=tokens)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            moe.moe_experts(x, ids, w, gate_up, down)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            moe.moe_experts(x, ids, w, gate_up, down)
        host_us = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                moe.moe_experts(x, ids, w, gate_up, down)
            torch.cuda.synchronize()
    log(f"profile {shape_name} M={tokens}: host enqueue {host_us:.1f} µs per call (200 calls, no sync)")
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=list(TOKENS), help="tokens per layer call")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    parser.add_argument("--e2e-layers", type=int, default=16, help="decoder layers of the OLMoE-shaped model")
    parser.add_argument("--e2e-tokens", type=int, default=48, help="generated tokens per decode run")
    parser.add_argument("--tune", action="store_true", help="time candidate tile tables first and use the best")
    parser.add_argument("--profile", nargs="*", metavar="SHAPE:M", help="profile our forward there, then stop")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels/bench.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import transformers
    import triton

    gpu = torch.cuda.get_device_name()
    peak = peak_bandwidth(gpu)

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")
    log(" | ".join(title for title, _, _ in COLUMNS))
    if args.profile is not None:
        for point in args.profile or ["olmoe:1", "olmoe:16", "olmoe:512", "mixtral:512"]:
            shape_name, tokens = point.split(":")
            profile(shape_name, int(tokens), log)
        return 0
    tuning = None
    if args.tune:
        from reroute.kernels import moe

        tuning = tune([s for s in args.shapes if s != "deepseek_v3"], log)
        moe.SMALL, moe.LARGE = moe.TileConfig(*tuning["SMALL"]["best"]), moe.TileConfig(*tuning["LARGE"]["best"])
    rows = []
    for name in args.shapes:
        rows += bench_layer(name, tuple(args.m), peak, log)
    decode = [] if args.no_e2e else bench_decode((1, 16), args.e2e_layers, args.e2e_tokens, log)
    result = {
        "gpu": gpu,
        "peak_bandwidth_tb_s": None if peak is None else peak / 1e12,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": triton.__version__,
        },
        "layers": rows,
        "decode": decode,
        "tuning": tuning,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log("\n" + markdown_table(rows))
    for row in decode:
        log(f"decode, {row['layers']} layers, batch {row['batch']}: plain generate() "
            f"{row['plain_generate_tok_s']:.1f} tok/s, attached without kernels {row['attached_no_kernels_tok_s']:.1f}"
            f" tok/s, attached with kernels {row['attached_kernels_tok_s']:.1f} tok/s")  # fmt: skip
    log(f"wrote {args.out}")
    return 0 if all(math.isfinite(r["ours_us"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
