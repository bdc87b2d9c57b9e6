"""The low-rank router delta against base and the offsets adapter on the testbed (issue 17 item 2).

Per seed: a rank-``r`` LoRA on every router weight is fitted on that seed's 800 reference items
(:func:`reroute.adapters.fit_router_lora`), then the harness scores it (the ``base`` method on the wrapped model) on
the do-no-harm study's items (same seed, splits, modes, 500 items), and it is compared item by item with the study's
base and adapter cells. Writes ``OUT/router_lora.json`` (per-item correctness per cell) and prints a table.

    python benchmarks/router_lora.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reroute.eval import make_method, paired_difference, run_eval

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "study" / "do_no_harm"
SPLITS = ("test", "test_shift", "test_fewshot")


def _diff(correct: list[bool], base: list[bool]) -> str:
    d = paired_difference(correct, base)
    return f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def main() -> None:
    import reroute
    from reroute.adapters import AdapterConfig, fit_router_lora
    from reroute.testbed import load_testbed
    from reroute.testbed.suite import make_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompt-field", default="question", help="reference field the gold answer follows")
    parser.add_argument("--n", type=int, default=500, help="items per cell (the study's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = args.out / "cells"
    record: dict = {"config": vars(args) | {"out": str(args.out)}, "fits": {}, "cells": []}
    for seed in args.seeds:
        model, tokenizer = load_testbed()
        config = AdapterConfig(steps=args.steps, lr=args.lr, prompt_field=args.prompt_field, seed=seed)
        fit = fit_router_lora(model, tokenizer, make_split("reference", n=800, seed=seed), config, rank=args.rank)
        record["fits"][str(seed)] = {"loss_before": fit.loss_before, "loss_after": fit.loss_after,
                                     "seconds": fit.seconds}  # fmt: skip
        rm = reroute.attach(fit.model)
        for mode in ("mc", "gen"):
            for split in SPLITS:
                items = make_split(split, n=args.n, seed=seed)
                result = run_eval(rm, tokenizer, items, make_method("base"), split, mode, seed=seed, progress=False)
                base = json.loads((cells / f"base_{mode}_{split}_seed{seed}.json").read_text())
                adapter = json.loads((cells / f"adapter_{mode}_{split}_seed{seed}.json").read_text())
                if base["item_ids"] != [item["id"] for item in items]:
                    raise ValueError(f"seed {seed} {split}: the study's items differ; rerun with its --n")
                row = {"seed": seed, "mode": mode, "split": split, "accuracy": result.accuracy,
                       "seconds_per_item": result.seconds_per_item, "correct": result.correct,
                       "vs_base": paired_difference(result.correct, base["correct"], seed=seed)}  # fmt: skip
                record["cells"].append(row)
                print(f"{time.strftime('%H:%M:%S')} seed {seed} {mode:3s} {split:12s} router-lora "
                      f"{100 * result.accuracy:5.1f}  vs base {_diff(result.correct, base['correct'])}  "
                      f"offsets adapter vs base {_diff(adapter['correct'], base['correct'])}", flush=True)  # fmt: skip
    print("\npooled over seeds: router-lora vs base | offsets adapter vs base")
    for mode in ("mc", "gen"):
        for split in SPLITS:
            rows = [c for c in record["cells"] if (c["mode"], c["split"]) == (mode, split)]
            lora = [x for c in rows for x in c["correct"]]
            base, adapter = [], []
            for c in rows:
                base += json.loads((cells / f"base_{mode}_{split}_seed{c['seed']}.json").read_text())["correct"]
                adapter += json.loads((cells / f"adapter_{mode}_{split}_seed{c['seed']}.json").read_text())["correct"]
            print(f"{mode:3s} {split:12s} {_diff(lora, base)} | {_diff(adapter, base)}")
    (args.out / "router_lora.json").write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
