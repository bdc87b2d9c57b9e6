"""Do no harm, by measurement (issue 17, item 1): every method and C3PO surrogate against base on the testbed.

Runs the evaluation harness (:func:`reroute.eval.run_eval`, the machinery of ``reroute eval``) over seeds x the three
testbed splits x methods x modes, one *cell* at a time, and writes each cell's per-item record (correctness, the gate
that fired per item and what the gates read) to ``OUT/cells/<method>_<mode>_<split>_seed<seed>.json``. A cell whose
file exists is skipped, so an interrupted run resumes where it stopped. Then it writes ``OUT/table.md`` and
``OUT/table.json``: accuracy with its 95% bootstrap interval, and the paired difference to base (same items, same
mode) with a 95% paired bootstrap interval, per cell and pooled over the seeds; a cell whose interval lies wholly
below zero is flagged as significantly below base.

The seed picks the test items and the C3PO reference set (as ``reroute eval --seed`` does).

    python benchmarks/do_no_harm.py                       # the study (resumes), then the table
    python benchmarks/do_no_harm.py --table-only          # rebuild the table from the cells on disk
    python benchmarks/do_no_harm.py --methods base,c3po-ngd --splits test_shift --seeds 0 --n 100 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reroute.eval import bootstrap_ci, make_method, paired_difference, run_eval

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "study" / "do_no_harm"
SPLITS = ("test", "test_shift", "test_fewshot")

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("base", {}),
    "c3po-mode": ("c3po", {"surrogate": "mode"}),
    "c3po-kernel": ("c3po", {"surrogate": "kernel"}),
    "c3po-ngd": ("c3po", {"surrogate": "ngd"}),
    "rerouting": ("rerouting", {}),
    "scmoe": ("scmoe", {}),
    "adapter": ("adapter", {}),
    "adapter+c3po": ("adapter", {"inner": "c3po", "inner_options": {"surrogate": "ngd"}}),
    "oracle": ("oracle", {}),
}
"""Study label -> (registered method, options). Defaults otherwise: the library's, as ``reroute eval`` runs them
(the adapter: fitted with ``AdapterConfig``'s defaults on the seed's reference set, cached)."""

MODES: dict[str, tuple[str, ...]] = {"oracle": ("mc",)}
"""Modes per label (default: both). The oracle is the upper reference, measured in multiple choice only."""


def cell_path(out: Path, label: str, mode: str, split: str, seed: int) -> Path:
    return out / "cells" / f"{label}_{mode}_{split}_seed{seed}.json"


def parse_settings(assignments: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``LABEL.KEY=VALUE`` (JSON values, else strings) -> ``{label: {key: value}}``."""
    settings: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        target, sep, value = assignment.partition("=")
        label, dot, key = target.partition(".")
        if not sep or not dot or label not in METHODS:
            raise SystemExit(f"--set {assignment!r}: write LABEL.KEY=VALUE with LABEL one of {', '.join(METHODS)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        settings.setdefault(label, {})[key] = parsed
    return settings


def run_cells(args: argparse.Namespace) -> None:
    import reroute
    from reroute.testbed import load_testbed
    from reroute.testbed.reference import reference_index
    from reroute.testbed.suite import make_split

    torch.set_num_threads(args.threads)
    settings = parse_settings(args.set or [])
    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    labels = args.methods.split(",")
    for seed in args.seeds:
        indexes: dict[str, Any] = {}
        for split in args.splits:
            items = make_split(split, n=args.n, seed=seed)
            for label in labels:
                for mode in MODES.get(label, ("mc", "gen")):
                    if mode not in args.modes:
                        continue
                    path = cell_path(args.out, label, mode, split, seed)
                    if path.exists():
                        continue
                    name, options = METHODS[label]
                    options = {**options, **settings.get(label, {})}
                    if name == "adapter":  # fitted on this seed's reference items
                        options["fit"] = {"seed": seed, **options.get("fit", {})}
                    c3po = options if name == "c3po" else options.get("inner_options", {})
                    if name == "c3po" or options.get("inner") == "c3po":
                        # the reference set of this seed, its items answered right in this mode
                        if mode not in indexes:
                            indexes[mode] = reference_index(rm, tokenizer, n=800, seed=seed, mode=mode)
                        c3po = {**c3po, "index": indexes[mode]}
                        options = c3po if name == "c3po" else {**options, "inner_options": c3po}
                    start = time.perf_counter()
                    spec = make_method(name, **options)
                    result = run_eval(rm, tokenizer, items, spec, split=split, mode=mode, seed=seed, progress=False)
                    record = result.to_json()
                    record.update(
                        label=label,
                        config=json.loads(json.dumps(vars(spec.config), default=str)),
                        item_ids=[item["id"] for item in items],
                        wall_seconds=time.perf_counter() - start,
                        threads=args.threads,
                        machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                    )
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record) + "\n")
                    tmp.replace(path)
                    print(
                        f"{time.strftime('%H:%M:%S')} seed {seed} {split:12s} {label:12s} {mode:3s} "
                        f"acc {100 * result.accuracy:5.1f}  {record['wall_seconds']:6.1f} s",
                        flush=True,
                    )


def load_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (label, mode, split): per-seed and pooled accuracy and paired difference to base."""
    by_key = {(c["label"], c["mode"], c["split"], c["seed"]): c for c in cells}
    rows = []
    for label in METHODS:
        for mode in ("mc", "gen"):
            for split in SPLITS:
                seeds = sorted(s for (lab, m, sp, s) in by_key if (lab, m, sp) == (label, mode, split))
                if not seeds:
                    continue
                row: dict[str, Any] = {"method": label, "mode": mode, "split": split, "seeds": {}}
                pooled, pooled_base, gates = [], [], []
                for seed in seeds:
                    cell = by_key[(label, mode, split, seed)]
                    entry: dict[str, Any] = {
                        "n": cell["n"],
                        "accuracy": cell["accuracy"],
                        "ci95": cell["ci95"],
                        "seconds_per_item": cell["seconds_per_item"],
                        "stats": cell["stats"],
                    }
                    base = by_key.get(("base", mode, split, seed))
                    if base is not None and label != "base":
                        if base["item_ids"] != cell["item_ids"]:
                            raise ValueError(f"{label} {mode} {split} seed {seed}: items differ from base's")
                        entry["vs_base"] = paired_difference(cell["correct"], base["correct"], seed=seed)
                        pooled += cell["correct"]
                        pooled_base += base["correct"]
                    if cell.get("gates"):
                        gates += cell["gates"]
                    row["seeds"][str(seed)] = entry
                all_correct = [c for s in seeds for c in by_key[(label, mode, split, s)]["correct"]]
                per_seed = [by_key[(label, mode, split, s)] for s in seeds]
                row["seconds_per_item"] = float(np.mean([c["seconds_per_item"] for c in per_seed]))
                row["forward_passes"] = float(np.mean([c["stats"].get("forward_passes", 0.0) for c in per_seed]))
                row["backward_passes"] = float(np.mean([c["stats"].get("backward_passes", 0.0) for c in per_seed]))
                row["n"] = len(all_correct)
                row["accuracy"] = float(np.mean(all_correct))
                row["ci95"] = bootstrap_ci(all_correct)
                if pooled:
                    row["vs_base"] = paired_difference(pooled, pooled_base)
                    row["below_base"] = row["vs_base"]["ci95"][1] < 0
                    row["below_base_seeds"] = [
                        s for s, e in row["seeds"].items() if "vs_base" in e and e["vs_base"]["ci95"][1] < 0
                    ]
                if gates:
                    names = sorted({str(g) for g in gates})
                    row["gates"] = {n: sum(str(g) == n for g in gates) / len(gates) for n in names}
                rows.append(row)
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| method | mode | split | n | accuracy [95% CI] | vs base [paired 95% CI] | per seed vs base | gates fired "
        "| s/item | adaptation fwd / bwd per item |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc = f"{_pct(row['accuracy'])} [{_pct(row['ci95'][0])}, {_pct(row['ci95'][1])}]"
        diff = per_seed = ""
        if "vs_base" in row:
            d = row["vs_base"]
            flag = " **below**" if row["below_base"] else ""
            diff = f"{d['difference'] * 100:+.1f} [{d['ci95'][0] * 100:+.1f}, {d['ci95'][1] * 100:+.1f}]{flag}"
            per_seed = " / ".join(
                f"{e['vs_base']['difference'] * 100:+.1f}" + ("*" if e["vs_base"]["ci95"][1] < 0 else "")
                for e in row["seeds"].values()
                if "vs_base" in e
            )
        gates = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row.get("gates", {}).items())
        cost = f"{row['seconds_per_item']:.3f} | {row['forward_passes']:.1f} / {row['backward_passes']:.1f}"
        lines.append(f"| {row['method']} | {row['mode']} | {row['split']} | {row['n']} | {acc} | {diff} | "
                     f"{per_seed} | {gates} | {cost} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method and mode: base accuracy or the paired difference to base [95% CI] per split, pooled over
    the seeds (``*``: significantly below base)."""
    by_key = {(r["method"], r["mode"], r["split"]): r for r in rows}
    lines = ["| method | mode | " + " | ".join(SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    for label in METHODS:
        for mode in ("mc", "gen"):
            entries = []
            for split in SPLITS:
                row = by_key.get((label, mode, split))
                if row is None:
                    entries.append("")
                elif "vs_base" not in row:
                    entries.append(f"{_pct(row['accuracy'])} [{_pct(row['ci95'][0])}, {_pct(row['ci95'][1])}]")
                else:
                    d = row["vs_base"]
                    star = "*" if row["below_base"] else ""
                    entries.append(
                        f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]{star}"
                    )
            if any(entries):
                lines.append(f"| {label} | {mode} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path) -> list[dict[str, Any]]:
    cells = load_cells(out)
    rows = summarise(cells)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    header = (
        "Do-no-harm study (benchmarks/do_no_harm.py): accuracy with 95% bootstrap CI, pooled over seeds; paired "
        "difference to base on the same items (95% paired bootstrap); per seed: the difference, * = significantly "
        "below base; gates fired: share of items per gate (None = adapted).\n\n"
    )
    (out / "table.md").write_text(header + table_markdown(rows) + "\nSummary (base: accuracy; others: paired "
                                  "difference to base):\n\n" + summary_markdown(rows))  # fmt: skip
    return rows


FIRES = {"confidence": np.greater_equal, "gain": np.less_equal, "holdout_gain": np.less_equal, "agreement": np.less}
"""How each gate input fires a stricter gate at threshold ``t`` (as the method's own gate does)."""


def sweep(out: Path, label: str, gate_input: str, thresholds: Sequence[float], seeds: Sequence[int]) -> str:
    """Post-hoc stricter gates on ``label``'s recorded cells: an item whose ``gate_input`` fires at threshold ``t``
    keeps the base routing, so it answers as base did (exact: an abstaining item routes exactly as base). Rows per
    threshold and mode, columns the splits: the paired difference to base pooled over ``seeds``."""
    cells = {(c["label"], c["mode"], c["split"], c["seed"]): c for c in load_cells(out)}
    lines = [f"{label}: gate on {gate_input}, seeds {list(seeds)}", "| mode | threshold | " + " | ".join(SPLITS) + " |",
             "|---|---|" + "---|" * len(SPLITS)]  # fmt: skip
    for mode in ("mc", "gen"):
        for t in thresholds:
            entries = []
            for split in SPLITS:
                gated, base = [], []
                for seed in seeds:
                    cell, ref = cells.get((label, mode, split, seed)), cells.get(("base", mode, split, seed))
                    if cell is None or ref is None:
                        continue
                    fires = FIRES[gate_input](np.asarray(cell["gate_inputs"][gate_input]), t)
                    kept = [g is not None or bool(f) for g, f in zip(cell["gates"], fires)]
                    gated += [b if k else c for k, b, c in zip(kept, ref["correct"], cell["correct"])]
                    base += ref["correct"]
                if not gated:
                    entries.append("")
                    continue
                d = paired_difference(gated, base)
                star = "*" if d["ci95"][1] < 0 else ""
                entries.append(
                    f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]{star}"
                )
            if any(entries):
                lines.append(f"| {mode} | {t:g} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"labels among {', '.join(METHODS)}")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["mc", "gen"], choices=["mc", "gen"])
    parser.add_argument("--n", type=int, default=500, help="items per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--set", action="append", help="LABEL.KEY=VALUE option of a study label (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--sweep",
        nargs=3,
        metavar=("LABEL", "INPUT", "THRESHOLDS"),
        help="post-hoc stricter gate on recorded cells, e.g. c3po-kernel holdout_gain 0,0.05 (no new runs)",
    )
    args = parser.parse_args()
    if args.sweep:
        label, gate_input, thresholds = args.sweep
        print(sweep(args.out, label, gate_input, [float(t) for t in thresholds.split(",")], args.seeds))
        return
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown labels {unknown}; choose from {', '.join(METHODS)}")
    if not args.table_only:
        run_cells(args)
    rows = write_table(args.out)
    print(table_markdown(rows))
    print(summary_markdown(rows))


if __name__ == "__main__":
    main()
