"""Decoding throughput of ``generate()``: plain transformers (eager and static cache + ``torch.compile``) against
reroute attached (zero state, offsets, a policy, a mask; compiled) and the methods (Rerouter, SCMoE), in one run on
one device.

Random-weight models of a real shape (``--shape``): OLMoE-1B-7B or Qwen3-30B-A3B (``--layers`` keeps fewer decoder
layers where memory or compile time forces it; the JSON says so). Per batch size, each variant generates exactly
``--new-tokens`` tokens after a ``--prompt-tokens`` prompt (greedy, EOS suppressed); the figure is
``batch * new_tokens / wall time`` of the whole ``generate()`` call (prefill included), median of ``--repeats`` runs
after a warm-up run (which compiles). Variants run interleaved, round by round, plain transformers' first, then
the attached ones (one attach for all of them).

Also reported: the HBM limit of the shape (bytes a decode step must read — every non-expert weight, the expected
number of distinct experts per layer at this batch under uniform routing, the KV cache — over the card's peak
bandwidth) and each variant's share of it; and the recompilations across 100 routing-state changes after warm-up
(offsets, policy, mask values changed between calls of the compiled attached model).

    python benchmarks/bench_decode.py --shape olmoe-1b-7b --batches 1 16 --json benchmarks/results/decode_h200.json
    python benchmarks/bench_decode.py --shape tiny --device cpu --new-tokens 8 --prompt-tokens 8   # smoke test

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch._dynamo.utils import counters
from transformers import CompileConfig

import reroute
from reroute.compat import set_experts_implementation

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": (
        "OlmoeForCausalLM",
        dict(hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             num_experts=8, num_experts_per_tok=2, vocab_size=512, norm_topk_prob=False),
    ),
    "olmoe-1b-7b": (
        "OlmoeForCausalLM",
        dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304, norm_topk_prob=False),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeForCausalLM",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
             vocab_size=151936, norm_topk_prob=True),
    ),
}  # fmt: skip

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def build(shape: str, layers: int | None, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    cls_name, fields = SHAPES[shape]
    fields = dict(fields)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096, **fields)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, cls_name)(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def set_experts(model: transformers.PreTrainedModel, implementation: str) -> None:
    """Choose transformers' experts implementation (the public setter exists from 5.24 on)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation_internal"):
            set_experts_implementation(config, implementation)


def hbm_bytes_per_step(model: transformers.PreTrainedModel, batch: int, context: int) -> float:
    """Bytes one decode step must read: non-expert weights (the input embedding's one row aside), the expected
    distinct experts of each MoE layer at ``batch`` tokens under uniform routing, and the KV cache."""
    config = model.config
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    expert_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = total - expert_bytes - embed.numel() * embed.element_size()
    num_experts = experts[0].gate_up_proj.shape[0]
    top_k = config.num_experts_per_tok
    distinct = num_experts * (1 - (1 - top_k / num_experts) ** batch)
    active = expert_bytes * distinct / num_experts
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * batch * embed.element_size()
    return dense + active + kv


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-1b-7b")
    parser.add_argument("--layers", type=int, help="keep this many decoder layers (default: the shape's)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--state-changes", type=int, default=100)
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    parser.add_argument("--json", help="write the results here (rewritten after every batch)")
    parser.add_argument("--profile", help="append a kernel-time table of each warm variant to this text file")
    parser.add_argument("--profile-variants", nargs="+", help="profile only these variants (default: all)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    # every variant below is one more compiled graph of the same forward: keep them all
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    cuda = device == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"

    model = build(args.shape, args.layers, device, dtype)
    compile_config = CompileConfig(fullgraph=False)
    if not cuda:  # CPU smoke test: trace only
        compile_config = CompileConfig(backend="eager")
        compile_config._compile_all_devices = True
    vocab = model.config.vocab_size
    results: dict[str, Any] = {
        "benchmark": "bench_decode",
        "device": gpu,
        "shape": args.shape,
        "layers": model.config.num_hidden_layers,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "python": platform.python_version(),
        },
        "rows": [],
    }

    def write() -> None:
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)

    rm_holder: dict[str, reroute.RoutedModel] = {}

    def attached() -> reroute.RoutedModel:
        if "rm" not in rm_holder:
            rm_holder["rm"] = reroute.attach(model)
        return rm_holder["rm"]

    def detached() -> None:
        if "rm" in rm_holder:
            rm_holder.pop("rm").detach()

    def run_batch(batch: int) -> None:
        torch.manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, args.prompt_tokens), device=device)
        mask = torch.ones_like(ids)
        fixed = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        static = dict(cache_implementation="static", compile_config=compile_config)

        def plain(experts: str | None = None, **extra: Any) -> Callable[[], object]:
            def run() -> object:
                detached()
                if experts == "grouped_mm":  # keep grouped_mm in decode too (generate() switches it to batched_mm)
                    set_experts(model, "grouped_mm")
                    model._optimize_model_for_decode = contextlib.nullcontext
                else:
                    model.__dict__.pop("_optimize_model_for_decode", None)
                    set_experts(model, experts or "grouped_mm")
                try:
                    return model.generate(**fixed, **extra)
                finally:
                    model.__dict__.pop("_optimize_model_for_decode", None)
                    set_experts(model, "grouped_mm")

            return run

        def with_state(setup: Callable[[reroute.RoutedModel], object], **extra: Any) -> Callable[[], object]:
            def run() -> object:
                rm = attached()
                rm.reset()
                setup(rm)
                try:
                    return model.generate(**fixed, **extra)
                finally:
                    rm.reset()

            return run

        def method(make: Callable[[reroute.RoutedModel], Any], **extra: Any) -> Callable[[], object]:
            def run() -> object:
                rm = attached()
                rm.reset()
                return make(rm).generate(**fixed, **extra)

            return run

        experts_layers = attached().moe_layers
        num_experts = attached().num_experts
        detached()
        offsets = {i: torch.randn(num_experts, device=device) for i in experts_layers}
        runs: dict[str, Callable[[], object]] = {
            "hf_eager_grouped_mm": plain("grouped_mm"),
            "hf_eager_default": plain(),
            "hf_static_compiled": plain(None, **static),
            "reroute_eager_zero": with_state(lambda rm: None),
            "reroute_compiled_zero": with_state(lambda rm: None, **static),
            "reroute_compiled_offsets": with_state(lambda rm: rm.set_offsets(offsets), **static),
            "reroute_compiled_top4": with_state(lambda rm: rm.set_policy(reroute.RoutingPolicy(top_k=4)), **static),
            "reroute_compiled_mask": with_state(lambda rm: rm.set_mask(reroute.ExpertMask(banned=(0, 1))), **static),
            "rerouter_compiled": method(lambda rm: reroute.Rerouter(rm, interval=128, steps=5, lr=0.05), **static),
            # the adaptation steps compiled too (each a CUDA graph), not only the decode step
            "rerouter_compiled_steps": method(
                lambda rm: reroute.Rerouter(rm, interval=128, steps=5, lr=0.05, compile_steps=True), **static
            ),
            "scmoe_compiled": method(lambda rm: reroute.SCMoE(rm, beta=0.5, alpha=0.1, weak="rank2"), **static),
            "rerouter_eager": method(lambda rm: reroute.Rerouter(rm, interval=128, steps=5, lr=0.05)),
            "scmoe_eager": method(lambda rm: reroute.SCMoE(rm, beta=0.5, alpha=0.1, weak="rank2")),
        }
        if args.variants:
            runs = {name: fn for name, fn in runs.items() if name in args.variants}
        times: dict[str, list[float]] = {name: [] for name in runs}
        errors: dict[str, str] = {}
        # plain transformers first, then the attached variants: attaching anew makes new state buffers, which the
        # compiled graphs guard on, so interleaving the two groups would time a recompilation in every round
        plain_names = [name for name in runs if name.startswith("hf_")]
        groups = [plain_names, [name for name in runs if name not in plain_names]]
        order = [(round_idx, name) for group in groups for round_idx in range(args.repeats + 1) for name in group]
        for round_idx, name in order:
            fn = runs[name]
            if name in errors:
                continue
            if cuda:
                torch.cuda.synchronize()
            recorded_before = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    fn()
            except torch.OutOfMemoryError as exc:
                errors[name] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
                continue
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if round_idx == 0:
                print(f"batch {batch} {name}: warm-up {elapsed:.1f} s", flush=True)
                results.setdefault("warmup_seconds", {}).setdefault(str(batch), {})[name] = elapsed
            else:
                times[name].append(elapsed)
                # CUDA graphs recorded during a timed round (cudagraph trees count their non-static inputs as they
                # record). generate() makes a new static cache every call (transformers 5.17-5.25), whose tensors
                # are static inputs, so any variant may record once per call (unless the allocator hands back the
                # same addresses); more than transformers' own variant is re-recording caused by routing state
                recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"] - recorded_before
                rerecords = results.setdefault("cudagraph_recorded_inputs_in_timed_rounds", {})
                rerecords.setdefault(str(batch), {})[name] = rerecords.get(str(batch), {}).get(name, 0) + recorded
                print(f"batch {batch} {name}: {batch * args.new_tokens / elapsed:.1f} tok/s", flush=True)
                # kept as they come, so that a run cut short by a time limit still reports what it measured
                results.setdefault("seconds", {}).setdefault(str(batch), {})[name] = list(times[name])
            write()

        # recompilations across routing-state changes of the compiled attached model, after its warm-up above
        rm = attached()
        short = dict(fixed, max_new_tokens=4, min_new_tokens=4)
        before = dict(counters["stats"])
        skips_before = sum(counters["inductor"].values()) if "inductor" in counters else 0
        recorded_before = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
        generator = torch.Generator().manual_seed(0)
        # only kinds of state whose graph was warmed up above (a first mask or policy compiles once, by design)
        kinds = [0] + [1] * ("reroute_compiled_top4" in runs) + [2] * ("reroute_compiled_mask" in runs)
        changes = args.state_changes if "reroute_compiled_offsets" in runs else 0
        for change in range(changes):
            rm.reset()
            kind = kinds[change % len(kinds)]
            if kind == 0:
                rm.set_offsets({i: torch.randn(num_experts, generator=generator).to(device) for i in experts_layers})
            elif kind == 1:
                rm.set_policy(reroute.RoutingPolicy(top_k=int(torch.randint(1, 5, (1,), generator=generator))))
            else:
                banned = tuple(torch.randperm(num_experts, generator=generator)[:2].tolist())
                rm.set_mask(reroute.ExpertMask(banned=banned))
            with torch.no_grad():
                model.generate(**short, **static)
        rm.reset()
        after = dict(counters["stats"])
        recompiles = after.get("unique_graphs", 0) - before.get("unique_graphs", 0)

        if args.profile:
            with open(args.profile, "a") as handle:
                # the attached variants first: they are attached now, with their graphs warm
                for name in groups[1] + groups[0]:
                    fn = runs[name]
                    if name in errors or (args.profile_variants and name not in args.profile_variants):
                        continue
                    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
                    with torch.profiler.profile(activities=[activity]) as prof:
                        with torch.no_grad():
                            fn()
                        if cuda:
                            torch.cuda.synchronize()
                    table = prof.key_averages().table(
                        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12
                    )
                    handle.write(f"=== batch {batch} {name}\n{table}\n")

        limit = hbm_bytes_per_step(model, batch, args.prompt_tokens + args.new_tokens // 2)
        bandwidth = peak_bandwidth(gpu)
        limit_tok_s = batch * bandwidth / limit if bandwidth else None
        for name in runs:
            if name in errors:
                row = {"batch": batch, "variant": name, "error": errors[name]}
            else:
                seconds = statistics.median(times[name])
                tok_s = batch * args.new_tokens / seconds
                row = {"batch": batch, "variant": name, "seconds": seconds, "tok_s": tok_s}
                if limit_tok_s:
                    row["pct_hbm_limit"] = 100 * tok_s / limit_tok_s
            results["rows"].append(row)
        hf = next((r for r in results["rows"] if r["batch"] == batch and r["variant"] == "hf_static_compiled"), None)
        reference = hf.get("tok_s") if hf else None
        for row in results["rows"]:
            if row["batch"] == batch and reference and "tok_s" in row:
                row["vs_hf_static_compiled"] = row["tok_s"] / reference
        results.setdefault("hbm", {})[str(batch)] = {
            "bytes_per_step": limit,
            "peak_bandwidth": bandwidth,
            "limit_tok_s": limit_tok_s,
        }
        results.setdefault("recompiles_after_warmup", {})[str(batch)] = {
            "state_changes": changes,
            "kinds": sorted({("offsets", "policy", "mask")[k] for k in kinds}),
            "dynamo_new_graphs": recompiles,
            "inductor_counter_delta": (sum(counters["inductor"].values()) if "inductor" in counters else 0)
            - skips_before,
            # CUDA graphs recorded across the state changes (0: every decode step replayed a recorded graph)
            "cudagraph_recorded_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"] - recorded_before,
        }
        write()

    for batch in args.batches:
        run_batch(batch)
    print(f"\n{gpu}, {args.shape} ({results['layers']} layers), {args.dtype}, prompt {args.prompt_tokens}, ")
    print(f"{args.new_tokens} new tokens, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'batch':>5} {'variant':<26} {'tok/s':>9} {'x HF compiled':>13} {'% HBM limit':>11}")
    for row in results["rows"]:
        if "error" in row:
            print(f"{row['batch']:>5} {row['variant']:<26} {row['error']}")
            continue
        ratio = row.get("vs_hf_static_compiled", math.nan)
        pct = row.get("pct_hbm_limit", math.nan)
        print(f"{row['batch']:>5} {row['variant']:<26} {row['tok_s']:>9.1f} {ratio:>13.2f} {pct:>11.1f}")
    for batch, info in results.get("recompiles_after_warmup", {}).items():
        print(
            f"batch {batch}: {info['dynamo_new_graphs']} new graphs and {info['cudagraph_recorded_inputs']} inputs of "
            f"newly recorded CUDA graphs across {info['state_changes']} state changes"
        )
    for batch, per_variant in results.get("cudagraph_recorded_inputs_in_timed_rounds", {}).items():
        rerecorded = {name: count for name, count in per_variant.items() if count}
        print(f"batch {batch}: CUDA graphs recorded inside timed rounds (inputs counted): {rerecorded or 'none'}")
    write()


if __name__ == "__main__":
    main()
