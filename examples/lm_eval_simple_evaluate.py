"""lm-evaluation-harness's ``simple_evaluate`` with reroute's model, on the shipped testbed and local tasks.

    python examples/lm_eval_simple_evaluate.py                      # base, c3po, rerouting, scmoe on 64 items
    python examples/lm_eval_simple_evaluate.py --limit 16 --methods base,scmoe

Nothing is downloaded: the tasks are YAML files over a JSONL copy of the testbed's ``test_shift`` split, written to
a temporary folder by :func:`reroute.lmeval.write_testbed_tasks`. With a real checkpoint and a hub task (online),
the same call reads::

    lm_eval.simple_evaluate(
        model="reroute",
        model_args={"pretrained": "allenai/OLMoE-1B-7B-0924", "method": "rerouting", "method_args": {"steps": 3}},
        tasks=["arc_easy"],
    )

or from the shell: ``reroute lm-eval --model_args pretrained=allenai/OLMoE-1B-7B-0924,method=rerouting,steps=3
--tasks arc_easy``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

import reroute
from reroute.lmeval import RoutedLM, write_testbed_tasks
from reroute.testbed import load_testbed, make_split


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=64, help="items per task (default 64)")
    parser.add_argument("--methods", default="base,c3po,rerouting,scmoe", help="comma-separated methods")
    parser.add_argument("--reference-size", type=int, default=400, help="testbed reference items for C3PO's index")
    args = parser.parse_args(argv)

    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        tasks = write_testbed_tasks(Path(folder) / "tasks", n=args.limit)[:2]  # multiple choice and generation
        task_manager = TaskManager(include_path=str(Path(folder) / "tasks"), include_defaults=False)
        for method in args.methods.split(","):
            options: dict = {}
            if method == "c3po":
                reference = make_split("reference", n=args.reference_size)
                index = reroute.ReferenceIndex.build(rm, tokenizer, reference, progress=False)
                options = {"index": index, "steps": 5}
            elif method == "rerouting":
                options = {"steps": 3}
            # An already built model object, as HFLM accepts; model="reroute" with model_args works as well.
            lm = RoutedLM(model, tokenizer=tokenizer, method=method, method_args=options, batch_size=16)
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager)
            results[method] = {
                "mc acc": out["results"]["reroute_testbed_mc"]["acc,none"],
                "gen exact match": out["results"]["reroute_testbed_gen"]["exact_match,none"],
                "contexts adapted": lm.cache.misses,
            }
    print(f"{'method':<10} {'mc acc':>7} {'gen exact match':>16} {'contexts adapted':>17}")
    for method, row in results.items():
        print(f"{method:<10} {row['mc acc']:>7.3f} {row['gen exact match']:>16.3f} {row['contexts adapted']:>17}")
    return results


if __name__ == "__main__":
    main()
