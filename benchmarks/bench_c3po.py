"""C3PO cost per item as a multiple of one plain forward pass of the item (the paper's RoMA estimate: 6–7×).

Builds a random OLMoE-shaped model from its config (``--shape``), a reference index from random multiple-choice
items, then times, per surrogate and per way of recomputing (``--recompute``, side by side in one process),
adaptation + scoring of a batch of test items against plain scoring of the same batch, done the way C3PO scores
(each prompt runs once, its choices on its KV cache; C3PO's prompt forward is that prompt pass), so that the cost is
what the adaptation adds; the JSON also gives the cost above scoring one full row per choice. ``suffix+cache`` is the
suffix recompute with every neighbour's prefix state already cached by an earlier call (the cache C3PO keeps across
calls; the other columns run with it off); ``suffix-compiled`` compiles each step (a CUDA graph on CUDA), timed after
its warm-up round compiled it. Also reports what the one prompt forward records next to recording every
layer and token, and the prefix cache's bytes per neighbour. Prints a table and writes JSON (device name included).
A benchmark, not a test.

    python benchmarks/bench_c3po.py --shape small --device cpu --recompute suffix layers --json c3po_cpu.json
    python benchmarks/bench_c3po.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 \\
        --recompute suffix suffix-compiled layers \\
        --json c3po_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import transformers
from bench_common import SHAPES, build, device_name, dispatched_ops, median_seconds

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.c3po.config import RECOMPUTE
from reroute.c3po.embed import prompt_forward
from reroute.scoring import choice_batch, continuation_logprobs, continuation_logprobs_shared, prompt_batch
from reroute.testing import tiny_tokenizer

NEIGHBOUR_SURROGATES = ("ngd", "kernel")  # the surrogates that score neighbours (and so use the prefix cache)
RECOMPUTING = ("ngd", "kernel", "oracle")  # the surrogates whose steps run forwards (``recompute`` applies)


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


def recording_bytes(rm: reroute.RoutedModel, tok, prompts: list[str], device: str) -> dict[str, float]:
    """What the one prompt forward keeps: C3PO's recording (last column's routing, hidden mean) against recording
    every layer's routing and hidden states at every token (``rm.trace()`` + ``output_hidden_states``); bytes held
    after the forward and, on CUDA, the forward's peak memory."""
    batch = prompt_batch(tok, prompts).to(device)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    cuda = device == "cuda"

    def full() -> int:
        with torch.no_grad(), rm.trace() as trace:
            out = rm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,
            )
        records = [t for rs in trace.records.values() for r in rs for t in (r.logits, r.indices, r.weights)]
        return sum(t.numel() * t.element_size() for t in [*records, *out.hidden_states])

    def ours() -> int:
        return prompt_forward(rm, batch, hidden=True).recorded_bytes

    result: dict[str, float] = {}
    for name, run in (("full", full), ("c3po", ours)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        result[f"{name}_recorded_bytes"] = run()
        if cuda:
            result[f"{name}_peak_bytes_above_model"] = torch.cuda.max_memory_allocated() - before
    return result


def profile_runs(runs: dict, device: str, path: str, title: str) -> dict[tuple[str, str], dict[str, float]]:
    """One warm call of each run under the profiler: appends the top kernels (by device time) to ``path`` and returns
    per run its wall time, summed device-kernel time and host-device syncs, which say whether a figure is bound by
    the GPU's work or by the host (launches, syncs)."""
    cuda = device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    out: dict[tuple[str, str], dict[str, float]] = {}
    with open(path, "a") as handle:
        for key, fn in runs.items():
            if cuda:
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
            events = prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            # the host waits for the device: a read of a device tensor (.item(), bool(), .cpu(), ...) synchronises
            # the stream; a scalar read of a host tensor does not, so aten::_local_scalar_dense is not counted
            syncs = sum(
                e.count
                for e in events
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
            )
            out[key] = {"wall_s": wall, "device_kernel_s": kernel_us / 1e6, "host_syncs": float(syncs)}
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            handle.write(
                f"=== {title} {key[0]} {key[1]}: wall {wall * 1e3:.1f} ms, device kernels {kernel_us / 1e3:.1f} ms, "
                f"{syncs} host syncs\n{events.table(sort_by=sort, row_limit=15)}\n"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8, help="test items adapted together")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="words per prompt (few-shot MC prompts)")
    parser.add_argument(
        "--answer-tokens", type=int, default=8, help="words per choice (an ARC/MMLU answer: a few words)"
    )
    parser.add_argument("--reference", type=int, default=256, help="reference items run to build the index")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--recompute",
        nargs="+",
        default=["suffix"],
        choices=list(RECOMPUTE),
        help="what each surrogate step recomputes; several are timed side by side in one process",
    )
    parser.add_argument(
        "--surrogates", default="mode,kernel,ngd,oracle,official", help="comma-separated surrogates to time"
    )
    parser.add_argument(
        "--no-skip-gates",
        action="store_true",
        help="turn off the gates that skip the surrogate (confidence, typicality), so every item pays for it",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--profile", help="append, per surrogate, a kernel-time table and the GPU-busy share of one warm call here"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vocab = 512
    dtype = getattr(torch, args.dtype)
    torch._dynamo.config.cache_size_limit = 64  # suffix-compiled: a graph per surrogate's shapes, with and without grad
    model = build(args.shape, args.device, dtype)
    rm = reroute.attach(model)
    tok = tiny_tokenizer(vocab)
    index = ReferenceIndex.build(
        rm, tok, items(args.reference, 1, vocab, args.prompt_tokens, args.answer_tokens), progress=False
    )
    test = items(args.batch, 2, vocab, args.prompt_tokens, args.answer_tokens)
    batch, n_choices = choice_batch(tok, test)
    batch = batch.to(args.device)

    surrogates = args.surrogates.split(",")
    variants = list(dict.fromkeys(args.recompute))
    # each suffix recompute also with every neighbour's prefix state cached by an earlier call
    variants = [
        name for variant in variants for name in (variant, f"{variant}+cache")[: 1 + variant.startswith("suffix")]
    ]
    c3pos: dict[tuple[str, str], C3PO] = {}
    gates = dict(max_confidence=None, max_typicality=None) if args.no_skip_gates else {}
    for surrogate in surrogates:
        for variant in variants:
            if variant != variants[0] and surrogate not in RECOMPUTING:
                continue  # mode / official run no forward steps: one timing serves every column
            if variant.endswith("+cache") and surrogate not in NEIGHBOUR_SURROGATES:
                continue
            recompute, cached = variant.removesuffix("+cache"), variant.endswith("+cache")
            c3pos[surrogate, variant] = C3PO(
                rm,
                index,
                tok,
                surrogate=surrogate,
                recompute=recompute,
                prefix_cache_mib=1e6 if cached else 0,
                **gates,
            )
    runs = {
        ("plain", ""): partial(continuation_logprobs_shared, model, batch, n_choices),
        ("plain", "per-choice rows"): partial(continuation_logprobs, model, batch),
    }
    runs.update({key: partial(c3po.score_choices, test) for key, c3po in c3pos.items()})
    errors: dict[str, str] = {}  # a run that fails in the warm-up round: reported, the others still timed
    with torch.no_grad():
        seconds = median_seconds(runs, args.device, args.repeats, errors)
        if args.json:  # the timings first, so that a run cut short in the op count or the profile keeps them
            partial_record = {
                "benchmark": "c3po_cost",
                "partial": "timings only: the run ended before its op count and table",
                "device": device_name(args.device),
                "seconds_per_batch": {"/".join(n for n in key if n): value for key, value in seconds.items()},
                "errors": errors,
            }
            with open(args.json, "w") as handle:
                json.dump(partial_record, handle, indent=2)
        # operators dispatched by one more call of each (warm: prefix caches filled as in the timed rounds); not for
        # compiled steps, which replay a graph (and which a Python dispatch mode would keep from compiling)
        ops = {key: dispatched_ops(fn) for key, fn in runs.items() if not key[1].startswith("suffix-compiled")}
        if args.profile:
            busy = profile_runs(runs, args.device, args.profile, f"{args.shape} batch {args.batch}")
    # one plain forward of the items: the choice batch holds one full row per choice, so 1 / n_choices of its cost
    base = seconds["plain", "per-choice rows"] / n_choices
    rows = []
    for surrogate in surrogates:
        timed = next((v for v in variants if (surrogate, v) in runs), None)
        if timed is None:
            continue  # every variant failed: its errors say why
        stats = c3pos[surrogate, timed].adapt(test).stats
        row = {
            "surrogate": surrogate,
            "forward_passes_per_item": stats["forward_passes"],
            "backward_passes_per_item": stats["backward_passes"],
            "seconds_per_batch": {},
            "cost_vs_plain_forward": {},
            "cost_above_per_choice_scoring": {},
            "dispatched_ops_per_batch": {},
        }
        for variant in variants:
            key = (surrogate, variant) if (surrogate, variant) in runs else None
            if key is None:
                continue
            row["seconds_per_batch"][variant] = seconds[key]
            row["cost_vs_plain_forward"][variant] = (seconds[key] - seconds["plain", ""]) / base
            above_rows = seconds[key] - seconds["plain", "per-choice rows"]
            row["cost_above_per_choice_scoring"][variant] = above_rows / base
            if key in ops:
                row["dispatched_ops_per_batch"][variant] = ops[key]
        rows.append(row)
    store = next((c3po.prefix_store for key, c3po in c3pos.items() if key[1].endswith("+cache")), None)
    per_neighbour = store.nbytes / len(store) if store is not None and len(store) else None
    memory = recording_bytes(rm, tok, [item["prompt"] for item in test], args.device)

    name = device_name(args.device)
    print(
        f"C3PO cost per item vs one plain forward — {args.shape}, {args.dtype}, batch {args.batch}, "
        f"{args.prompt_tokens}-token prompts, {args.answer_tokens}-token answers, index of {len(index)}, on {name}; "
        f"one plain forward {base / args.batch * 1e3:.2f} ms per item; plain scoring of the {n_choices} choices "
        f"{seconds['plain', ''] / base:.2f} forwards (each prompt once), {n_choices} with a full row per choice"
    )
    width = {v: max(14, len(v) + 2) for v in variants}
    print(f"{'surrogate':<10}" + "".join(f"{v:>{width[v]}}" for v in variants) + f"{'fwd/item':>10}{'bwd/item':>10}")
    for row in rows:
        costs, cells = row["cost_vs_plain_forward"], []
        for variant in variants:
            if variant in costs:
                cells.append(f"{costs[variant]:>{width[variant] - 1}.2f}×")
            elif f"{row['surrogate']}/{variant}" in errors:
                cells.append(f"{'failed':>{width[variant]}}")
            else:  # "=": no forward steps, recompute does not apply; "—": no neighbours, nothing to cache
                cells.append(f"{'=' if row['surrogate'] not in RECOMPUTING else '—':>{width[variant]}}")
        print(
            f"{row['surrogate']:<10}" + "".join(cells) + f"{row['forward_passes_per_item']:>10.0f}"
            f"{row['backward_passes_per_item']:>10.0f}"
        )
    print(
        f"operators dispatched per batch (about one kernel launch each on an eager GPU path); plain scoring "
        f"{ops['plain', '']} (each prompt once), {ops['plain', 'per-choice rows']} (a full row per choice):"
    )
    for row in rows:
        counts = row["dispatched_ops_per_batch"]
        print(
            f"{row['surrogate']:<10}"
            + "".join(f"{counts[v]:>{width[v]}}" if v in counts else f"{'':>{width[v]}}" for v in variants)
        )
    for key, error in errors.items():
        print(f"{key} failed: {error}")
    if per_neighbour is not None:
        print(f"prefix cache: {len(store)} neighbours, {per_neighbour / 2**20:.3f} MiB per neighbour")
    print(
        f"prompt forward recording: {memory['c3po_recorded_bytes'] / 2**10:.1f} KiB kept vs "
        f"{memory['full_recorded_bytes'] / 2**10:.1f} KiB recording every layer and token"
        + (
            f"; peak above the model {memory['c3po_peak_bytes_above_model'] / 2**20:.1f} MiB vs "
            f"{memory['full_peak_bytes_above_model'] / 2**20:.1f} MiB"
            if "c3po_peak_bytes_above_model" in memory
            else ""
        )
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
            "threads": torch.get_num_threads(),
            "variants": variants,
            "skip_gates": not args.no_skip_gates,
            "index_size": len(index),
            "plain_forward_seconds_per_batch": base,
            "plain_scoring_seconds_per_batch": {
                "shared_prompt": seconds["plain", ""],
                "per_choice_rows": seconds["plain", "per-choice rows"],
            },
            "plain_scoring_dispatched_ops": {
                "shared_prompt": ops["plain", ""],
                "per_choice_rows": ops["plain", "per-choice rows"],
            },
            "rows": rows,
            "prefix_cache_bytes_per_neighbour": per_neighbour,
            "prompt_forward_memory": memory,
            "errors": errors,
        }
        if args.profile:
            record["profile"] = {f"{s}/{v}" if v else s: value for (s, v), value in busy.items()}
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
