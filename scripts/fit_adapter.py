"""Fit an amortised routing adapter on the testbed's reference set and measure it against base with the harness.

    PYTHONPATH=. python scripts/fit_adapter.py --prompt-field question --json benchmarks/results/adapters/x.json

For each split: base (the model's own routing), then the adapter (offsets fitted once on the reference items'
gold answers, ``reroute.adapters.fit_adapter``) and optionally C3PO on top of the adapter, each with the harness's
95% bootstrap interval, and the paired difference to base (per-item correctness difference, 95% bootstrap interval
over items). The adapter is saved with ``rm.save_pretrained`` (``--save``) and reloaded with
``reroute.from_pretrained`` before it is measured, so the numbers are those of the saved adapter. The JSON keeps
each row's per-item correctness as a string of 0/1 in item order (``correct``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import reroute
from reroute.adapters import AdapterConfig, fit_adapter
from reroute.data import load_items
from reroute.eval import bootstrap_ci, make_method, run_eval
from reroute.testbed import load_testbed

SPLITS = ("test", "test_shift", "test_fewshot")


def _paired(method_correct: list[bool], base_correct: list[bool], seed: int) -> dict[str, object]:
    # a shorter run (C3PO's --c3po-limit) pairs with base's first items
    diff = [float(a) - float(b) for a, b in zip(method_correct, base_correct)]
    return {"mean": sum(diff) / len(diff), "ci95": bootstrap_ci(diff, seed)}


def _row(result, base=None, seed: int = 0) -> dict[str, object]:
    row = result.to_json()
    row["correct"] = "".join("1" if c else "0" for c in row["correct"])  # per item, in item order: a short file
    if base is not None:
        row["paired_difference_to_base"] = _paired(result.correct, base.correct, seed)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="reference_sets/testbed/reference.jsonl", help="reference items (JSONL)")
    parser.add_argument("--data-dir", default="reference_sets/testbed", help="folder of <split>.jsonl test items")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits")
    parser.add_argument("--limit", type=int, default=400, help="items per split")
    parser.add_argument("--mode", default="mc", choices=("mc", "gen"))
    parser.add_argument("--prompt-field", default="prompt", help="reference field the gold answer follows")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--l2", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c3po", action="store_true", help="also run C3PO (NGD) on top of the adapter")
    parser.add_argument("--c3po-limit", type=int, default=100, help="items per split for adapter + C3PO")
    parser.add_argument("--save", default=None, help="folder for the adapter (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for the small testbed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    config = AdapterConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        l2=args.l2,
        prompt_field=args.prompt_field,
        seed=args.seed,
    )
    splits = {name: load_items(Path(args.data_dir) / f"{name}.jsonl")[: args.limit] for name in args.splits.split(",")}

    base = {}
    for name, items in splits.items():
        base[name] = run_eval(
            rm, tokenizer, items, make_method("base"), name, args.mode, seed=args.seed, progress=False
        )

    fit = fit_adapter(rm, tokenizer, load_items(args.reference), config)
    save = Path(args.save or Path("/tmp") / f"reroute-adapter-{args.prompt_field}-{args.seed}")
    fit.save_pretrained(rm, save)
    rm.reset()
    reroute.from_pretrained(model, save)  # measure the saved adapter
    adapter = {}
    for name, items in splits.items():
        method = make_method("base")
        method.name = "adapter"
        adapter[name] = run_eval(rm, tokenizer, items, method, name, args.mode, seed=args.seed, progress=False)

    c3po = {}
    if args.c3po:
        from reroute.testbed.reference import reference_index

        saved = rm.offsets.stack()
        rm.reset()  # the index's pathways come from the model's own routing
        index = reference_index(rm, tokenizer, seed=args.seed, mode=args.mode)
        rm.set_offsets(dict(zip(rm.moe_layers, saved)))
        for name, items in splits.items():
            method = make_method("c3po", index=index, surrogate="ngd")
            method.name = "adapter+c3po"
            few = items[: args.c3po_limit]
            c3po[name] = run_eval(rm, tokenizer, few, method, name, args.mode, seed=args.seed, progress=False)

    rows = []
    print(f"adapter fit: {fit.items} reference items ({args.prompt_field}), {fit.seconds:.1f} s, ", end="")
    print(f"gold NLL {fit.loss_before:.3f} -> {fit.loss_after:.3f}")
    header = f"{'split':<13}{'method':<14}{'n':>5}{'acc':>8}  {'95% CI':<15}{'diff to base':>13}  {'95% CI':<16}"
    print(header + f"{'s/item':>8}")
    for name in splits:
        for result, reference in ((base[name], None), (adapter[name], base[name]), (c3po.get(name), base[name])):
            if result is None:
                continue
            row = _row(result, reference, args.seed)
            rows.append(row)
            low, high = row["ci95"]
            text = f"{name:<13}{row['method']:<14}{row['n']:>5}{100 * row['accuracy']:>8.1f}  "
            text += f"[{100 * low:.1f}, {100 * high:.1f}]".ljust(15)
            if reference is not None:
                diff = row["paired_difference_to_base"]
                text += (
                    f"{100 * diff['mean']:>+13.1f}  "
                    + f"[{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}]".ljust(16)
                )
            else:
                text += " " * 31
            print(text + f"{row['seconds_per_item']:>8.3f}")
    if args.json:
        record = {
            "command": "python " + " ".join(sys.argv),
            "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, fp32",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "mode": args.mode,
            "fit": fit.to_json(),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
