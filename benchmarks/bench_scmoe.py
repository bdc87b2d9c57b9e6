"""SCMoE decoding time against greedy ``generate()``: the one-batch design (strong and weak rows in one forward of
2B rows) and the two-pass design (two forwards, two KV caches, as the official code). The paper reports 1.30x
greedy at batch 1 for two passes on Mixtral (Table 3).

Random OLMoE-shaped models built from config (``--shapes``); per shape, batch and method, generation of exactly
``--new-tokens`` tokens after a ``--prompt-tokens`` prompt is timed, and so is a 1-token generation, so that

    decode ms/token = (time(new tokens) - time(1 token)) / (new tokens - 1)

separates the per-token cost from the prefill. Median of ``--repeats`` runs after a warm-up. Prints a table and
writes JSON (machine, versions, thread count included). A benchmark, not a test.

    python benchmarks/bench_scmoe.py --json scmoe_cpu.json
    python benchmarks/bench_scmoe.py --shapes olmoe-1b-7b --device cuda --dtype bfloat16 --json scmoe_gpu.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch
import transformers
from bench_common import SHAPES, build, device_name, median_seconds

import reroute


def fixed_length(
    generate: Callable[..., torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (EOS suppressed until then)."""
    with torch.no_grad():
        return generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows = []
    for shape in args.shapes:
        model = build(shape, args.device, dtype)
        rm = reroute.attach(model)
        methods: dict[str, Callable[..., torch.Tensor]] = {
            "greedy": model.generate,
            "scmoe one-batch": reroute.SCMoE(rm, design="one-batch").generate,
            "scmoe two-pass": reroute.SCMoE(rm, design="two-pass").generate,
        }
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, 512, (batch, args.prompt_tokens), generator=gen).to(args.device)
            mask = torch.ones_like(ids)
            runs = {}
            for name, generate in methods.items():
                runs[(name, "total")] = partial(fixed_length, generate, ids, mask, args.new_tokens)
                runs[(name, "first")] = partial(fixed_length, generate, ids, mask, 1)
            measured = median_seconds(runs, args.device, args.repeats)
            timings = {}
            for name in methods:
                total, prefill = measured[(name, "total")], measured[(name, "first")]
                timings[name] = (total, prefill, (total - prefill) / (args.new_tokens - 1))
            greedy_total, _, greedy_decode = timings["greedy"]
            for name, (total, prefill, decode) in timings.items():
                rows.append(
                    {
                        "shape": shape,
                        "batch": batch,
                        "method": name,
                        "total_s": total,
                        "first_token_s": prefill,
                        "decode_ms_per_token": 1e3 * decode,
                        "decode_ratio_vs_greedy": decode / greedy_decode,
                        "total_ratio_vs_greedy": total / greedy_total,
                    }
                )

    header = (
        f"{'shape':<12} {'batch':>5}  {'method':<16} {'total s':>8} {'1st tok s':>9} {'ms/tok':>8} "
        f"{'decode x':>8} {'total x':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:<12} {r['batch']:>5}  {r['method']:<16} {r['total_s']:>8.3f} {r['first_token_s']:>9.3f} "
            f"{r['decode_ms_per_token']:>8.2f} {r['decode_ratio_vs_greedy']:>8.2f} {r['total_ratio_vs_greedy']:>8.2f}"
        )
    if args.json:
        name = device_name(args.device)
        meta = {
            "device": args.device,
            "device_name": name,
            "dtype": args.dtype,
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "scmoe": reroute.SCMoEConfig().to_dict(),
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
