"""The evaluation harness and the C3PO oracle on a tiny model (the trained testbed has its own tests)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import reroute
from reroute.c3po import optimise_oracle
from reroute.eval import bootstrap_ci, make_method, plot_bars, run_eval, write_json
from reroute.scoring import build_batch, continuation_logprobs, gold_batch
from reroute.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def setup():
    model = tiny_model("olmoe")
    return reroute.attach(model), tiny_tokenizer()


def _items(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        words = [
            f"w{int(t)}" for t in torch.randint(3, 96, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen)
        ]
        choices = [f" w{int(t)}" for t in torch.randperm(90, generator=gen)[:4] + 3]
        items.append({"prompt": " ".join(words), "choices": choices, "label": i % 4, "domain": "ab"[i % 2]})
    return items


def test_continuation_logprobs_match_hand_computation(setup):
    rm, _ = setup
    batch = build_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_token_id=0)
    assert batch.prompt_len == 3 and batch.input_ids.tolist() == [[5, 6, 7, 10, 11], [0, 8, 9, 12, 0]]
    with torch.no_grad():
        scores = continuation_logprobs(rm.model, batch)
        alone = torch.log_softmax(rm.model(torch.tensor([[8, 9, 12]])).logits[0].float(), -1)
    torch.testing.assert_close(scores[1], alone[1, 12], rtol=1e-5, atol=1e-5)


def test_base_mc_matches_argmax_of_loglikelihood(setup):
    rm, tok = setup
    items = _items(6)
    result = run_eval(rm, tok, items, make_method("base"), split="toy", mode="mc", batch_size=4, progress=False)
    expected = []
    for item in items:
        scores = []
        for choice in item["choices"]:
            ids = tok(item["prompt"] + choice)["input_ids"]
            ctx = len(tok(item["prompt"])["input_ids"])
            with torch.no_grad():
                lp = torch.log_softmax(rm.model(torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(lp[t - 1, ids[t]].item() for t in range(ctx, len(ids))))
        expected.append(int(np.argmax(scores)) == item["label"])
    assert result.correct == expected
    assert result.n == 6 and result.ci95[0] <= result.accuracy <= result.ci95[1]
    assert result.experts_per_token == pytest.approx(rm.top_k)
    assert set(result.per_domain) == {"a", "b"}


def test_oracle_never_raises_gold_nll_and_beats_base(setup):
    rm, tok = setup
    items = _items(8, seed=1)
    result = optimise_oracle(rm, gold_batch(tok, items), layers=2, core_experts=6, steps=15, lr=0.3)
    assert (result.loss_after <= result.loss_before).all()
    assert (result.loss_after < result.loss_before).any()
    assert result.forward_passes == 16 and result.backward_passes == 15
    assert all(layer.mixing is None for layer in rm.layers.values())  # state cleared afterwards
    base = run_eval(rm, tok, items, make_method("base"), mode="mc", progress=False)
    oracle = run_eval(
        rm, tok, items, make_method("oracle", layers=2, core_experts=6, steps=15, lr=0.3), mode="mc", progress=False
    )
    assert oracle.accuracy >= base.accuracy
    assert oracle.stats["forward_passes"] > 0


def test_generation_mode_and_reports(setup, tmp_path):
    rm, tok = setup
    items = _items(4)
    for item in items:
        item["answer"] = item["choices"][item["label"]].strip()
    result = run_eval(rm, tok, items, make_method("base"), split="toy", mode="gen", progress=False)
    assert result.mode == "gen" and len(result.correct) == 4
    path = write_json([result], tmp_path / "r.json")
    record = json.loads(path.read_text())[0]
    for key in ("method", "split", "n", "accuracy", "ci95", "seconds_per_item", "experts_per_token"):
        assert key in record
    png = plot_bars([result], tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_rerouting_and_scmoe_methods(setup):
    rm, tok = setup
    items = _items(4, seed=2)
    for item in items:
        item["answer"] = item["choices"][item["label"]].strip()
    for name, options in (("rerouting", {"steps": 2, "lr": 0.1}), ("scmoe", {"weak": "rank2"})):
        for mode in ("mc", "gen"):
            result = run_eval(rm, tok, items, make_method(name, options=options), mode=mode, progress=False)
            assert result.n == 4
    assert all(layer.row_offsets is None and layer.policy is None for layer in rm.layers.values())
    with pytest.raises(ValueError, match="unknown method"):
        make_method("magic")


def test_scmoe_with_zero_beta_scores_like_base(setup):
    """beta = 0 and alpha -> 0: the contrasted log-likelihood is the plain one."""
    rm, tok = setup
    items = _items(6, seed=3)
    base = run_eval(rm, tok, items, make_method("base"), progress=False)
    plain = run_eval(rm, tok, items, make_method("scmoe", options={"beta": 0.0, "alpha": 1e-30}), progress=False)
    assert plain.correct == base.correct


def test_bootstrap_interval():
    assert bootstrap_ci([True] * 10) == [1.0, 1.0]
    low, high = bootstrap_ci([True, False] * 50, seed=3)
    assert 0.38 < low < 0.5 < high < 0.62


@pytest.mark.parametrize(
    ("items", "mode", "match"),
    [
        ([{"prompt": "w5 w6 w7", "choices": ["w8", " w9"], "label": 0}], "mc", "item 0: tokenizing .* as a prefix"),
        (
            [
                {"prompt": "w5 w6", "choices": [" w8", " w9"], "label": 0},
                {"prompt": "w5", "choices": [" w8", " w9", " w4"], "label": 1},
            ],
            "mc",
            r"different numbers of choices \(item 0: 2, item 1: 3\)",
        ),
        ([{"prompt": "w5 w6", "answer": "w7"}], "mc", "item 0 has no choices for multiple choice"),
        ([{"prompt": "w5 w6", "answer": " "}], "gen", "adds no tokens after the prompt"),
    ],
    ids=["choice-merges-with-prompt", "mixed-choice-counts", "no-choices", "empty-answer"],
)
def test_tokenizer_assumptions_are_checked_before_anything_runs(setup, items, mode, match):
    rm, tok = setup
    calls = []
    handle = rm.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            run_eval(rm, tok, items, make_method("scmoe"), mode=mode, progress=False)
    finally:
        handle.remove()
    assert calls == []  # no forward ran


def test_a_tokenizer_without_pad_or_eos_is_refused(setup):
    rm, tok = setup
    tok = copy.deepcopy(tok)
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        run_eval(rm, tok, _items(2), make_method("base"), progress=False)


def test_paired_difference_by_hand():
    from reroute.eval import paired_difference

    result = paired_difference([True, True, False, True], [True, False, False, False], seed=0, resamples=500)
    assert result["difference"] == 0.5 and (result["wins"], result["losses"]) == (2, 0)
    assert 0.0 <= result["ci95"][0] <= 0.5 <= result["ci95"][1] <= 1.0
    same = paired_difference([True, False], [True, False])
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same items"):
        paired_difference([True], [True, False])
