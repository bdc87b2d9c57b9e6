"""lm-evaluation-harness integration on the testbed and local tasks (no downloads): ``reroute.lmeval.RoutedLM``,
its per-context adaptation cache, the ``reroute lm-eval`` wrapper and the ``simple_evaluate`` example."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import reroute  # noqa: E402
import reroute.lmeval as rl  # noqa: E402
from reroute.cli import main  # noqa: E402
from reroute.eval import make_method, run_eval  # noqa: E402
from reroute.scoring import build_batch, continuation_logprobs  # noqa: E402
from reroute.testbed import load_items, load_testbed, make_split  # noqa: E402

N_ITEMS = 16
MC, GEN, SC = "reroute_testbed_mc", "reroute_testbed_gen", "reroute_testbed_sc"


@pytest.fixture(scope="module")
def testbed():
    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    yield model, tokenizer, rm
    rm.detach()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Local tasks over the first test_shift items, and the TaskManager that finds them."""
    folder = tmp_path_factory.mktemp("tasks")
    names = rl.write_testbed_tasks(folder, split="test_shift", n=N_ITEMS, repeats=4)
    assert names == [MC, GEN, SC]
    return folder, TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def index(testbed, tmp_path_factory):
    model, tokenizer, rm = testbed
    path = tmp_path_factory.mktemp("index")
    reroute.ReferenceIndex.build(rm, tokenizer, make_split("reference", n=96), path=path, progress=False)
    return path


@pytest.fixture(autouse=True)
def clean_routing(testbed):
    yield
    testbed[2].reset()


def evaluate(lm, tasks, names, **kwargs):
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tasks[1], log_samples=True, **kwargs)
    per_doc = {}
    for name, metric in ((MC, "acc"), (GEN, "exact_match"), (SC, "exact_match")):
        if name in out["samples"]:
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            per_doc[name] = [bool(s[metric]) for s in samples]
    return out, per_doc


def requests_of(items):
    """lm-eval log-likelihood requests (context, continuation) for every choice of every item."""
    pairs = [(item["prompt"], choice) for item in items for choice in item["choices"]]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


# ---------------------------------------------------------------------------------------------------- consistency
def test_base_through_lm_eval_equals_reroute_eval(testbed, tasks, tmp_path):
    model, tokenizer, _ = testbed
    lm = rl.RoutedLM(model, tokenizer=tokenizer, batch_size=16)
    out, per_doc = evaluate(lm, tasks, [MC, GEN])
    data = str(tasks[0] / "data.jsonl")
    for mode, name in (("mc", MC), ("gen", GEN)):
        path = tmp_path / f"{mode}.json"
        assert main(["eval", "--data", data, "--method", "base", "--mode", mode, "--json", str(path), "--quiet"]) == 0
        (record,) = json.loads(path.read_text())
        assert record["n"] == N_ITEMS
        assert per_doc[name] == record["correct"]  # item by item, not just the mean
    assert out["results"][MC]["acc,none"] == pytest.approx(
        json.loads((tmp_path / "mc.json").read_text())[0]["accuracy"]
    )
    assert 0 < sum(per_doc[MC]) < N_ITEMS  # neither trivially right nor wrong: the comparison can fail


@pytest.mark.parametrize(
    ("method", "options"),
    [("c3po", {"steps": 3}), ("rerouting", {"steps": 2}), ("scmoe", {"beta": 0.5, "weak": "rank2"})],
)
def test_methods_through_lm_eval_equal_the_harness(testbed, tasks, index, method, options):
    model, tokenizer, rm = testbed
    items = load_items(str(tasks[0] / "data.jsonl"))
    extra = {"index": str(index)} if method == "c3po" else {}
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method=method, method_args={**options, **extra}, batch_size=16)
    _, per_doc = evaluate(lm, tasks, [MC, GEN])

    if method == "c3po":
        harness = make_method("c3po", index=str(index), options=options)
    else:
        harness = make_method(method, options=options)
    assert per_doc[MC] == run_eval(rm, tokenizer, items, harness, mode="mc", progress=False).correct
    assert per_doc[GEN] == run_eval(rm, tokenizer, items, harness, mode="gen", progress=False).correct

    # the method changes the scores (the equality above is not base against base)
    base = rl.RoutedLM(model, tokenizer=tokenizer, batch_size=16)
    requests = requests_of(items[:4])
    adapted = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    plain = [ll for ll, _ in base.loglikelihood(requests, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(adapted, plain)) > 1e-3
    if method != "scmoe":  # one adaptation per distinct context; generation reused what scoring adapted
        assert lm.cache.misses == N_ITEMS
    assert not any(layer.mixing is not None or layer.row_offsets is not None for layer in rm.layers.values())


def test_c3po_index_testbed_builds_and_reuses_the_testbed_reference_index(testbed, tmp_path, monkeypatch):
    model, tokenizer, _ = testbed
    monkeypatch.setenv("HOME", str(tmp_path))
    options = {"index": "testbed", "reference_size": 24, "k": 2}
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method="c3po", method_args=options)
    (folder,) = (tmp_path / ".cache" / "reroute").iterdir()
    assert (
        folder.name.startswith("testbed-reference-24-seed0-mc-lexical-question-") and (folder / "index.json").is_file()
    )
    assert 0 < len(lm.routing_method.index) <= 24  # the reference items the model answered correctly
    again = rl.RoutedLM(model, tokenizer=tokenizer, method="c3po", method_args=options)
    assert again.routing_method.index.items == lm.routing_method.index.items


def test_pretrained_folder_loads_like_hflm_and_attaches(tmp_path):
    from reroute.testing import tiny_model, tiny_tokenizer

    tiny_model("qwen2_moe").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    requests = [Instance("loglikelihood", {}, ("w10 w20 w30 w40", f" w{i}"), i) for i in (5, 6)]
    scores = {}
    for method in ("base", "scmoe"):
        lm = rl.RoutedLM(str(tmp_path / "model"), method=method, device="cpu", batch_size=2)
        assert lm.rm.attached and type(lm.model).__name__ == "Qwen2MoeForCausalLM"
        scores[method] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        lm.rm.detach()
    assert all(torch.isfinite(torch.tensor(scores["base"])))
    assert scores["scmoe"] != pytest.approx(scores["base"], abs=1e-6)
    # α = 1 leaves one plausible token per position: continuations off it score low, never -inf (issue 14.1)
    lm = rl.RoutedLM(str(tmp_path / "model"), method="scmoe", alpha=1.0, device="cpu", batch_size=2)
    assert all(math.isfinite(ll) for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    lm.rm.detach()


def test_index_testbed_refuses_another_model_and_touches_no_testbed_data(tmp_path, monkeypatch):
    from reroute.testing import tiny_model, tiny_tokenizer

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="for the testbed model only"):
        rl.RoutedLM(tiny_model("olmoe"), tokenizer=tiny_tokenizer(), method="c3po", index="testbed")
    assert not (tmp_path / ".cache").exists()


def test_state_loads_a_save_pretrained_folder_with_per_row_state(testbed, tmp_path):
    """``state=`` reads the documented save_pretrained folders, per-row policies and re-mixing included."""
    model, tokenizer, rm = testbed
    rm.set_policy(reroute.RoutingPolicy(top_k=2), layers=rm.moe_layers[-1], rows=[0])
    rm.set_mixing(rm.moe_layers[0], experts=[0, 1, 2], positions=[[0]], logits=torch.tensor([[2.0, 0.0, -1.0]]))
    rm.save_pretrained(tmp_path / "state")
    rm.reset()
    lm = rl.RoutedLM(model, tokenizer=tokenizer, state=str(tmp_path / "state"))
    assert rm.layer(rm.moe_layers[-1]).policy_rows is not None and rm.layer(rm.moe_layers[0]).mixing is not None
    assert lm.rm is rm


def test_static_offsets_score_like_the_loaded_state(testbed, tmp_path):
    model, tokenizer, rm = testbed
    layer = rm.moe_layers[-1]
    offsets = torch.zeros(rm.num_experts)
    offsets[:8] = 3.0
    rm.set_offsets({layer: offsets})
    rm.save_pretrained(tmp_path / "state")
    rm.reset()
    items = make_split("test_shift", n=3)
    requests = requests_of(items)
    static = rl.RoutedLM(model, tokenizer=tokenizer, method="static", state=str(tmp_path / "state"))
    scores = torch.tensor([ll for ll, _ in static.loglikelihood(requests, disable_tqdm=True)])
    assert torch.equal(rm.offsets[layer].detach(), offsets)  # the state is loaded onto the model
    pairs = [static._encode_pair(*r.args) for r in requests]
    reference = continuation_logprobs(model, build_batch(*zip(*pairs), tokenizer.pad_token_id))
    torch.testing.assert_close(scores, reference.detach().float(), atol=1e-4, rtol=0)
    rm.reset()
    plain = continuation_logprobs(model, build_batch(*zip(*pairs), tokenizer.pad_token_id)).detach()
    assert (scores - plain).abs().max() > 1e-3


def test_rerouting_generation_equals_rerouter_with_later_phases(testbed):
    """The prefill phase comes from the cache; the phases every ``interval`` tokens still run as in Rerouter."""
    model, tokenizer, rm = testbed
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method="rerouting", steps=2, interval=1)
    prompts = [item["prompt"] for item in make_split("test_fewshot", n=3)]
    ids, mask = lm.tok_batch_encode(prompts)
    ours = lm._model_generate(ids, max_length=ids.shape[1] + 3, stop=[], attention_mask=mask, do_sample=False)
    reference = reroute.Rerouter(rm, steps=2, interval=1).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert torch.equal(ours, reference)
    assert lm.cache.misses == 3


def test_rerouting_confidence_layers_adapt_each_context_alone(testbed, tasks):
    """Layers chosen by routing confidence are chosen per context, so contexts adapted together score as each
    context adapted alone."""
    model, tokenizer, rm = testbed
    items = load_items(str(tasks[0] / "data.jsonl"))[:6]
    options = {"steps": 2, "layers": "confidence", "ratio": 0.5}
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method="rerouting", method_args=options, batch_size=12)
    scores = [ll for ll, _ in lm.loglikelihood(requests_of(items), disable_tqdm=True)]
    ours = torch.tensor(scores).view(len(items), -1).argmax(-1).tolist()
    alone = run_eval(rm, tokenizer, items, make_method("rerouting", options=options), batch_size=1, progress=False)
    assert [p == item["label"] for p, item in zip(ours, items)] == alone.correct


# ---------------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("method", ["c3po", "rerouting"])
def test_adaptation_runs_once_per_prompt(testbed, tasks, index, monkeypatch, method):
    model, tokenizer, _ = testbed
    adapted: list[int] = []  # prompts per adaptation call
    if method == "c3po":
        original = reroute.C3PO.adapt
        monkeypatch.setattr(
            reroute.C3PO, "adapt", lambda self, items: adapted.append(len(items)) or original(self, items)
        )
        options = {"index": str(index), "steps": 2}
    else:
        import reroute.rerouting.method as rerouting_method

        original = rerouting_method.adapt_phase

        def counting(rm, config, layers, delta, input_ids, attention_mask, **kwargs):
            adapted.append(len(input_ids))
            return original(rm, config, layers, delta, input_ids, attention_mask, **kwargs)

        monkeypatch.setattr(rerouting_method, "adapt_phase", counting)
        options = {"steps": 2}
    lm = rl.RoutedLM(model, tokenizer=tokenizer, method=method, method_args=options, batch_size=8)
    limit = 4
    # self-consistency: 4 sampled answers per prompt, 16 generation requests
    out, per_doc = evaluate(lm, tasks, [SC], limit=limit)
    assert sum(adapted) == limit and lm.cache.misses == limit and lm.cache.hits == 3 * limit
    responses = [s["resps"][0] for s in out["samples"][SC]]  # one request per prompt, answered 4 times
    assert [len(r) for r in responses] == [4] * limit and all(isinstance(x, str) for r in responses for x in r)
    # multiple choice on the same prompts: every (context, choice) request reuses the adaptation
    evaluate(lm, tasks, [MC], limit=limit)
    assert sum(adapted) == limit
    # a fresh model object adapts each context once for its 4 choices
    fresh = rl.RoutedLM(model, tokenizer=tokenizer, method=method, method_args=options, batch_size=8)
    evaluate(fresh, tasks, [MC], limit=limit)
    assert sum(adapted) == 2 * limit and fresh.cache.misses == limit and fresh.cache.hits == 3 * limit


def test_cache_is_lru():
    cache = rl.AdaptationCache(maxsize=2)
    computed: list[list[str]] = []

    def compute(keys):
        computed.append(list(keys))
        return [k.upper() for k in keys]

    assert cache.get_many(["a", "b", "a"], compute) == ["A", "B", "A"]
    assert cache.get_many(["a", "c"], compute) == ["A", "C"]  # "b" was least recently used
    assert cache.get_many(["b"], compute) == ["B"]
    assert computed == [["a", "b"], ["c"], ["b"]]
    assert (cache.misses, cache.hits) == (4, 2)
    with pytest.raises(ValueError, match="cache_size"):
        rl.AdaptationCache(0)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("method", "kwargs", "error", "match"),
    [
        ("nope", {}, ValueError, "unknown method 'nope'; known: base, static, c3po, rerouting, scmoe"),
        ("scmoe", {"steps": 3}, ValueError, "'steps' belongs to c3po, rerouting"),
        ("base", {"beta": 0.5}, ValueError, "'beta' belongs to scmoe"),
        ("rerouting", {"method_args": {"nope": 1}}, ValueError, "has no option 'nope'"),
        ("rerouting", {"method_args": "{not json"}, ValueError, "JSON object"),
        ("rerouting", {"lr": -1.0}, ValueError, "lr must be positive"),
        ("scmoe", {"weak": "rank0"}, ValueError, "weak"),
        ("c3po", {"surrogate": "bogus", "index": "."}, ValueError, "surrogate must be one of"),
        ("c3po", {}, ValueError, "needs index"),
        ("c3po", {"index": "/no/such/index"}, FileNotFoundError, "no reference index folder"),
        ("c3po", {"surrogate": "oracle", "index": "."}, ValueError, "label"),
        ("static", {}, ValueError, "needs state"),
        ("static", {"state": "/no/such/state"}, FileNotFoundError, "no routing state folder"),
        ("rerouting", {"stepz": 3}, ValueError, "'stepz' is neither an option of method 'rerouting'"),
        ("base", {"nonsense": 1}, ValueError, "nor an argument of lm-eval's HFLM"),
    ],
)
def test_bad_method_or_options_fail_clearly(testbed, method, kwargs, error, match):
    model, tokenizer, _ = testbed
    with pytest.raises(error, match=match):
        rl.RoutedLM(model, tokenizer=tokenizer, method=method, **kwargs)


def test_bad_layer_fails_once_the_model_is_known(testbed):
    model, tokenizer, _ = testbed
    with pytest.raises(KeyError, match="not an MoE layer"):
        rl.RoutedLM(model, tokenizer=tokenizer, method="rerouting", layers=[99])


# ---------------------------------------------------------------------------------------------------- front doors
def test_reroute_lm_eval_command(tasks, tmp_path, capsys):
    folder = tasks[0]
    out = tmp_path / "out"
    args = ["--model_args", "pretrained=testbed,method=scmoe,beta=0.5", "--tasks", MC, "--include_path", str(folder)]
    code = main(["lm-eval", *args, "--limit", "8", "--device", "cpu", "--batch_size", "8", "--output_path", str(out)])
    assert code == 0
    (result_file,) = out.rglob("results_*.json")
    result = json.loads(result_file.read_text())
    assert result["config"]["model"] == "reroute"
    accuracy = result["results"][MC]["acc,none"]
    # the same number as the harness on the same 8 items
    model, tokenizer = load_testbed()
    with reroute.attach(model) as rm:
        items = load_items(str(folder / "data.jsonl"))[:8]
        expected = run_eval(rm, tokenizer, items, make_method("scmoe", options={"beta": 0.5}), progress=False)
    assert accuracy == pytest.approx(expected.accuracy)
    assert MC in capsys.readouterr().out  # lm-eval's results table


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("pretrained=testbed,method=nope", "unknown method 'nope'"),
        ("pretrained=testbed,method=scmoe,steps=3", "belongs to c3po, rerouting"),
        ("pretrained=testbed,method=c3po", "needs index"),
        ("pretrained=testbed,method=rerouting,stepz=3", "'stepz' is neither an option of method 'rerouting'"),
    ],
)
def test_reroute_lm_eval_bad_model_args_are_usage_errors(model_args, message, capsys):
    assert main(["lm-eval", "--model_args", model_args, "--tasks", MC]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reroute: error: --model_args:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_reroute_lm_eval_help_lists_model_args_and_lm_eval_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lm-eval", "--help"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "method=base|static|c3po|rerouting|scmoe" in printed and "--model_args" in printed


def test_lm_eval_argv_defaults_to_the_reroute_model():
    from reroute.cli import lm_eval_argv

    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "reroute", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf"]) == ["run", "--model", "hf"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert lm_eval_argv(["--tasks", "x"], subcommands=False) == ["--model", "reroute", "--tasks", "x"]


def test_simple_evaluate_example_runs(monkeypatch, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "lm_eval_simple_evaluate.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--limit", "4", "--methods", "base,rerouting"])
    runpy.run_path(str(example), run_name="__main__")
    printed = capsys.readouterr().out
    assert "rerouting" in printed and "mc acc" in printed
