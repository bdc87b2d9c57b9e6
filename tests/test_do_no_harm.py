"""The do-no-harm study script (benchmarks/do_no_harm.py): its table flags cells below base, its post-hoc gate sweep
answers gated items as base, and a run writes per-item cells it then resumes from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from reroute.eval import paired_difference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("do_no_harm", ROOT / "benchmarks" / "do_no_harm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(label, correct, seed=0, gates=None, confidence=None):
    cell = {"label": label, "mode": "mc", "split": "test", "seed": seed, "n": len(correct), "correct": correct,
            "accuracy": sum(correct) / len(correct), "ci95": [0.0, 1.0], "seconds_per_item": 0.1, "stats": {},
            "item_ids": [f"i{k}" for k in range(len(correct))], "gates": gates or []}  # fmt: skip
    if confidence is not None:
        cell["gate_inputs"] = {"confidence": confidence}
    return cell


def _write(folder, cells):
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    for c in cells:
        (folder / "cells" / f"{c['label']}_{c['mode']}_{c['split']}_seed{c['seed']}.json").write_text(json.dumps(c))


def test_table_pools_seeds_and_flags_cells_below_base(study, tmp_path):
    base = [[True] * 40, [True] * 40]
    worse = [[True] * 30 + [False] * 10, [True] * 35 + [False] * 5]  # loses 15 of 80 items, wins none
    cells = [_cell("base", b, s) for s, b in enumerate(base)] + [_cell("rerouting", w, s) for s, w in enumerate(worse)]
    _write(tmp_path, cells)
    rows = {r["method"]: r for r in study.write_table(tmp_path)}
    pooled = paired_difference(worse[0] + worse[1], base[0] + base[1])
    assert rows["rerouting"]["vs_base"] == pooled and rows["rerouting"]["n"] == 80
    assert rows["rerouting"]["below_base"] and rows["rerouting"]["below_base_seeds"] == ["0", "1"]
    assert "below" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "table.json").read_text())[1]["method"] == "rerouting"


def test_sweep_answers_newly_gated_items_as_base(study, tmp_path):
    base = [True, False, True, False]
    method = [False, True, True, True]
    gates = [None, None, None, "confidence"]  # item 3 already kept the base routing (and answered as base)
    method[3] = base[3]
    _write(tmp_path, [_cell("base", base), _cell("c3po-kernel", method, gates=gates, confidence=[0.95, 0.5, 0.9, 1])])
    text = study.sweep(tmp_path, "c3po-kernel", "confidence", [0.9], [0])
    # at 0.9 items 0 and 2 newly keep base: answers [base0, method1, base2, base3] = [T, T, T, F] vs base [T, F, T, F]
    expected = paired_difference([True, True, True, False], base)
    assert f"{100 * expected['difference']:+.1f}" in text.splitlines()[-1]


def test_study_writes_per_item_cells_and_resumes(study, tmp_path, monkeypatch):
    import sys

    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the study's one thread would outlive this test
    argv = ["do_no_harm.py", "--methods", "base,scmoe", "--splits", "test_shift", "--seeds", "0", "--modes", "mc",
            "--n", "4", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    cell = json.loads((tmp_path / "cells" / "scmoe_mc_test_shift_seed0.json").read_text())
    assert cell["n"] == 4 and len(cell["correct"]) == len(cell["item_ids"]) == 4 and cell["gates"] == []
    stamp = (tmp_path / "cells" / "scmoe_mc_test_shift_seed0.json").stat().st_mtime_ns
    study.main()  # every cell exists: nothing runs again
    assert (tmp_path / "cells" / "scmoe_mc_test_shift_seed0.json").stat().st_mtime_ns == stamp
