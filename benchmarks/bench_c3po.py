"""C3PO cost per item as a multiple of one plain forward pass of the item (the paper's RoMA estimate: 6–7×).

Builds a random OLMoE-shaped model from its config (``--shape``), a reference index from random multiple-choice
items, then times, per surrogate, adaptation + scoring of a batch of test items against plain scoring of the
same batch. Prints a table and writes JSON (device name included). A benchmark, not a test.

    python benchmarks/bench_c3po.py --shape small --device cpu --json c3po_cpu.json
    python benchmarks/bench_c3po.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 --json c3po_gpu.json
    python benchmarks/bench_c3po.py ... --recompute layers   # every position through the critical layers (before)
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import transformers
from bench_common import SHAPES, build, device_name, median_seconds

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.scoring import choice_batch, continuation_logprobs
from reroute.testing import tiny_tokenizer


def items(n: int, seed: int, vocab: int, length: int, answer_tokens: int) -> list[dict]:
    """``n`` random 4-choice items: a ``length``-word prompt, choices of ``answer_tokens`` words each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, vocab, (length,), generator=gen)]
        choices = [
            "".join(f" w{int(t)}" for t in torch.randint(3, vocab, (answer_tokens,), generator=gen)) for _ in range(4)
        ]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8, help="test items adapted together")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="words per prompt (few-shot MC prompts)")
    parser.add_argument("--answer-tokens", type=int, default=8, help="words per choice (an MC answer's length)")
    parser.add_argument("--reference", type=int, default=256, help="reference items run to build the index")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--recompute",
        default="suffix",
        choices=["suffix", "layers", "full"],
        help="what each surrogate step recomputes",
    )
    parser.add_argument(
        "--surrogates", default="mode,kernel,ngd,oracle,official", help="comma-separated surrogates to time"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    vocab = 512
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, args.device, dtype)
    rm = reroute.attach(model)
    tok = tiny_tokenizer(vocab)
    index = ReferenceIndex.build(
        rm, tok, items(args.reference, 1, vocab, args.prompt_tokens, args.answer_tokens), progress=False
    )
    test = items(args.batch, 2, vocab, args.prompt_tokens, args.answer_tokens)
    batch, _ = choice_batch(tok, test)
    batch = batch.to(args.device)

    c3pos = {
        surrogate: C3PO(rm, index, tok, surrogate=surrogate, recompute=args.recompute)
        for surrogate in args.surrogates.split(",")
    }
    runs = {"plain": partial(continuation_logprobs, model, batch)}
    runs.update({surrogate: partial(c3po.score_choices, test) for surrogate, c3po in c3pos.items()})
    with torch.no_grad():
        seconds = median_seconds(runs, args.device, args.repeats)
    # one plain forward of the items: the choice batch holds 4 rows per item, so a quarter of its cost
    base = seconds["plain"] / 4
    rows = []
    for surrogate, c3po in c3pos.items():
        stats = c3po.adapt(test).stats
        rows.append(
            {
                "surrogate": surrogate,
                "seconds_per_batch": seconds[surrogate],
                "cost_vs_plain_forward": (seconds[surrogate] - 4 * base) / base,
                "forward_passes_per_item": stats["forward_passes"],
                "backward_passes_per_item": stats["backward_passes"],
            }
        )
    name = device_name(args.device)
    print(
        f"C3PO cost per item vs one plain forward — {args.shape}, {args.dtype}, batch {args.batch}, "
        f"{args.prompt_tokens}-token prompts, {args.answer_tokens}-token answers, recompute={args.recompute}, "
        f"index of {len(index)}, on {name}"
    )
    print(f"{'surrogate':<10}{'s/batch':>10}{'× forward':>11}{'fwd/item':>10}{'bwd/item':>10}")
    for row in rows:
        print(
            f"{row['surrogate']:<10}{row['seconds_per_batch']:>10.4f}{row['cost_vs_plain_forward']:>11.2f}"
            f"{row['forward_passes_per_item']:>10.0f}{row['backward_passes_per_item']:>10.0f}"
        )
    if args.json:
        record = {
            "benchmark": "c3po_cost",
            "device": name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "shape": args.shape,
            "dtype": args.dtype,
            "batch": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "answer_tokens": args.answer_tokens,
            "recompute": args.recompute,
            "index_size": len(index),
            "plain_forward_seconds_per_item": base,
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
