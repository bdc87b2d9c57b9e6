"""Generation time of continuous rerouting relative to plain ``generate()`` (the paper: ~1.9x; target <= 1.3x).

A random OLMoE-shaped model built from its config (``--shape``); greedy generation of ``--new-tokens`` tokens after
a ``--prompt-tokens`` prompt, plain vs rerouted (interval 128, 5 steps by default) with the layer choices that
matter for cost: all layers, the confidence-selected half, and the stale-cache option. Prints a table and writes
JSON (device name included). A benchmark, not a test.

    python benchmarks/bench_rerouting.py --shape small --device cpu --json rerouting_cpu.json
    python benchmarks/bench_rerouting.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 --json rerouting_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

import reroute

SHAPES = {
    "small": dict(
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=64,
        num_experts_per_tok=8,
    ),
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

VARIANTS = {
    "all layers": dict(layers="all"),
    "confidence, half": dict(layers="confidence", ratio=0.5),
    "confidence, half, stale cache": dict(layers="confidence", ratio=0.5, rebuild_cache=False),
}


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--interval", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    vocab = 512
    config = transformers.OlmoeConfig(
        vocab_size=vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        max_position_embeddings=2048,
        **SHAPES[args.shape],
    )
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    rm = reroute.attach(model)
    prompt = torch.randint(3, vocab, (args.batch, args.prompt_tokens), device=args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def plain() -> None:
        model.generate(prompt, **kwargs)

    base = timed(plain, args.device, args.repeats)
    rows = [{"variant": "plain generate()", "seconds": base, "ratio": 1.0}]
    for name, options in VARIANTS.items():
        rerouter = reroute.Rerouter(rm, interval=args.interval, steps=args.steps, **options)

        def rerouted(rerouter: reroute.Rerouter = rerouter) -> None:
            rerouter.generate(input_ids=prompt, **kwargs)

        seconds = timed(rerouted, args.device, args.repeats)
        rows.append({"variant": name, "seconds": seconds, "ratio": seconds / base, "phases": len(rerouter.phases)})
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"rerouting / plain generation time — {args.shape}, {args.dtype}, batch {args.batch}, "
        f"{args.prompt_tokens}+{args.new_tokens} tokens, interval {args.interval}, {args.steps} steps, on {device_name}"
    )
    print(f"{'variant':<32}{'seconds':>10}{'ratio':>8}")
    for row in rows:
        print(f"{row['variant']:<32}{row['seconds']:>10.3f}{row['ratio']:>8.2f}")
    if args.json:
        record = {
            "benchmark": "rerouting_time_ratio",
            "device": device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **{k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
