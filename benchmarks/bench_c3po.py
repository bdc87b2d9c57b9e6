"""C3PO cost per item as a multiple of one plain forward pass of the item (the paper's RoMA estimate: 6–7×).

Builds a random OLMoE-shaped model from its config (``--shape``), a reference index from random multiple-choice
items, then times, per surrogate, adaptation + scoring of a batch of test items against plain scoring of the
same batch. Prints a table and writes JSON (device name included). A benchmark, not a test.

    python benchmarks/bench_c3po.py --shape small --device cpu --json c3po_cpu.json
    python benchmarks/bench_c3po.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 --json c3po_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.scoring import choice_batch, continuation_logprobs
from reroute.testing import tiny_tokenizer

SHAPES = {
    # a testbed-sized model
    "small": dict(hidden_size=256, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, num_experts=64, num_experts_per_tok=8),
    # OLMoE-1B-7B's shape (random weights)
    "olmoe-1b-7b": dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8),
}


def items(n: int, seed: int, vocab: int, length: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, vocab, (length,), generator=gen)]
        choices = [f" w{int(t)}" for t in torch.randperm(vocab - 3, generator=gen)[:4] + 3]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4})
    return out


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
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
    parser.add_argument("--batch", type=int, default=8, help="test items adapted together")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--reference", type=int, default=256, help="reference items run to build the index")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    vocab = 512
    config = transformers.OlmoeConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      max_position_embeddings=512, **SHAPES[args.shape])
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = transformers.OlmoeForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    rm = reroute.attach(model)
    tok = tiny_tokenizer(vocab)
    index = ReferenceIndex.build(rm, tok, items(args.reference, 1, vocab, args.prompt_tokens), progress=False)
    test = items(args.batch, 2, vocab, args.prompt_tokens)
    batch, _ = choice_batch(tok, test)
    batch = batch.to(args.device)

    def plain() -> None:
        with torch.no_grad():
            continuation_logprobs(model, batch)

    # one plain forward of the items: the choice batch holds 4 rows per item, so a quarter of its cost
    base = timed(plain, args.device, args.repeats) / 4
    rows = []
    for surrogate in ("mode", "kernel", "ngd", "oracle"):
        c3po = C3PO(rm, index, tok, surrogate=surrogate)

        def adapted(c3po: C3PO = c3po) -> None:
            c3po.score_choices(test)

        seconds = timed(adapted, args.device, args.repeats)
        stats = c3po.adapt(test).stats
        rows.append({
            "surrogate": surrogate,
            "seconds_per_batch": seconds,
            "cost_vs_plain_forward": (seconds - 4 * base) / base,
            "forward_passes_per_item": stats["forward_passes"],
            "backward_passes_per_item": stats["backward_passes"],
        })
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"C3PO cost per item vs one plain forward — {args.shape}, {args.dtype}, batch {args.batch}, "
          f"{args.prompt_tokens}-token prompts, index of {len(index)}, on {device_name}")
    print(f"{'surrogate':<10}{'s/batch':>10}{'× forward':>11}{'fwd/item':>10}{'bwd/item':>10}")
    for row in rows:
        print(f"{row['surrogate']:<10}{row['seconds_per_batch']:>10.4f}{row['cost_vs_plain_forward']:>11.2f}"
              f"{row['forward_passes_per_item']:>10.0f}{row['backward_passes_per_item']:>10.0f}")
    if args.json:
        record = {"benchmark": "c3po_cost", "device": device_name, "torch": torch.__version__,
                  "transformers": transformers.__version__, "shape": args.shape, "dtype": args.dtype,
                  "batch": args.batch, "prompt_tokens": args.prompt_tokens, "index_size": len(index),
                  "plain_forward_seconds_per_item": base, "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
