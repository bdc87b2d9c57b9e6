"""``reroute demo`` on the shipped testbed: base vs each method vs the oracle on a fixed sample of ``test_shift``.

Runs in a few minutes on a 2-core CPU. The full evaluation (all items, intervals, JSON, PNG) is ``reroute eval``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import reroute
from reroute.eval import make_method, print_table, run_eval
from reroute.testbed.model import load_testbed
from reroute.testbed.reference import reference_index
from reroute.testbed.suite import make_split

SAMPLE = 48  # test_shift items: seconds per method on a CPU
REFERENCE = 400  # reference items run to build C3PO's index


def main(args: argparse.Namespace) -> int:
    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    items = make_split("test_shift", n=SAMPLE, seed=args.seed)
    index = reference_index(rm, tokenizer, n=REFERENCE, seed=args.seed, cache=False)
    methods: list[tuple[str, Any]] = [
        ("base", make_method("base")),
        ("c3po (ngd)", make_method("c3po", index=index, surrogate="ngd")),
        ("rerouting", make_method("rerouting")),
        ("scmoe", make_method("scmoe")),
        ("oracle", make_method("oracle")),
    ]
    results = []
    for label, method in methods:
        result = run_eval(rm, tokenizer, items, method, split="test_shift", mode="mc", seed=args.seed)
        result.method = label
        results.append(result)
    print_table(results, title=f"reroute demo · testbed · test_shift, first {SAMPLE} items (multiple choice)")
    print(
        "The cue word that names each task is removed in test_shift, so the model must route from content alone.\n"
        "Full evaluation with 95% intervals: reroute eval --method base,c3po,rerouting,scmoe,oracle "
        "--split test_shift --json results.json --png results.png"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([r.to_json() for r in results], handle, indent=2)
    return 0
