"""Generation time of continuous rerouting relative to plain ``generate()`` (the paper: ~1.9x; target <= 1.3x).

A random OLMoE-shaped model built from its config (``--shape``); greedy generation of ``--new-tokens`` tokens after
a ``--prompt-tokens`` prompt, plain vs rerouted (interval 128, 5 steps by default) with the layer choices that
matter for cost: the default (the confident half of the MoE layers by C_i), the uncertain half, all layers, and the
stale-cache option. Prints a table and writes
JSON (device name included). A benchmark, not a test.

    python benchmarks/bench_rerouting.py --shape small --device cpu --json rerouting_cpu.json
    python benchmarks/bench_rerouting.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 --json rerouting_gpu.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import transformers
from bench_common import SHAPES, build, device_name, median_seconds

import reroute

VARIANTS = {
    "default (confident half)": dict(),
    "uncertain half": dict(prefer="uncertain"),
    "all layers": dict(layers="all"),
    "default, stale cache": dict(rebuild_cache=False),
}


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
    model = build(args.shape, args.device, getattr(torch, args.dtype))
    rm = reroute.attach(model)
    prompt = torch.randint(3, vocab, (args.batch, args.prompt_tokens), device=args.device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    runs = {"plain generate()": lambda: model.generate(prompt, **kwargs)}
    rerouters = {
        name: reroute.Rerouter(rm, interval=args.interval, steps=args.steps, **options)
        for name, options in VARIANTS.items()
    }
    for name, rerouter in rerouters.items():
        runs[name] = partial(rerouter.generate, input_ids=prompt, **kwargs)
    seconds = median_seconds(runs, args.device, args.repeats)
    base = seconds["plain generate()"]
    rows = [{"variant": "plain generate()", "seconds": base, "ratio": 1.0}]
    rows += [
        {"variant": name, "seconds": seconds[name], "ratio": seconds[name] / base, "phases": len(rerouter.phases)}
        for name, rerouter in rerouters.items()
    ]
    name = device_name(args.device)
    print(
        f"rerouting / plain generation time — {args.shape}, {args.dtype}, batch {args.batch}, "
        f"{args.prompt_tokens}+{args.new_tokens} tokens, interval {args.interval}, {args.steps} steps, on {name}"
    )
    print(f"{'variant':<32}{'seconds':>10}{'ratio':>8}")
    for row in rows:
        print(f"{row['variant']:<32}{row['seconds']:>10.3f}{row['ratio']:>8.2f}")
    if args.json:
        record = {
            "benchmark": "rerouting_time_ratio",
            "device": name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **{k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
