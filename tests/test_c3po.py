"""C3PO on tiny models: reference index, surrogates, gate, front doors, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_mc_items

import reroute
from reroute.c3po import C3PO, C3POConfig, ReferenceIndex, ReferenceIndexError
from reroute.c3po.embed import make_embedder, prompt_pathways
from reroute.c3po.pathway import Pathway, own_pathway
from reroute.c3po.surrogates import core_average, holdout_gain, kernel_weights, mode_finding, neighbour_loss
from reroute.data import item_key
from reroute.scoring import gold_batch
from reroute.testing import tiny_model, tiny_tokenizer


def _items(n: int, seed: int, length: int = 5) -> list[dict]:
    return random_mc_items(n, seed, length)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rm = reroute.attach(tiny_model("olmoe"))
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("index")
    index = ReferenceIndex.build(rm, tok, _items(80, 1), path=path, progress=False)
    return rm, tok, index, path


def test_index_keeps_only_successful_items_and_round_trips(setup):
    rm, tok, index, path = setup
    assert 0 < len(index) < 80 and len(index.seen) == 80
    for item in index.items[:5]:  # every stored item is answered correctly by the base model
        assert reroute.scoring.score_with(rm, tok, [item]) == [item["label"]]
    assert index.pathways.shape == (len(index), len(rm.moe_layers), rm.num_experts)
    torch.testing.assert_close(index.pathways.sum(-1), torch.ones(len(index), len(rm.moe_layers)))
    loaded = ReferenceIndex.load(path, rm)
    assert loaded.items == index.items and torch.equal(loaded.pathways, index.pathways)
    assert not list(path.glob("*.pkl")) and {p.name for p in path.iterdir()} == {
        "embeddings.faiss",
        "pathways.safetensors",
        "index.json",
    }


def test_index_resumes_and_extends(setup, tmp_path):
    rm, tok, _, _ = setup
    first = ReferenceIndex.build(rm, tok, _items(30, 1), path=tmp_path, progress=False)
    resumed = ReferenceIndex.build(rm, tok, _items(40, 1), path=tmp_path, progress=False)
    assert len(resumed.seen) == 40 and resumed.items[: len(first)] == first.items
    full = ReferenceIndex.build(rm, tok, _items(40, 1), progress=False)
    assert resumed.items == full.items
    torch.testing.assert_close(resumed.embeddings, full.embeddings)


def test_search_excludes_near_duplicates(setup):
    rm, tok, index, _ = setup
    query = index.embeddings[:2]
    found = index.search(query, k=3)
    assert (found.ids[:, 0] != torch.tensor([0, 1])).all()  # the item itself (similarity 1) is excluded
    assert (found.similarity <= 0.95).all()
    kept = index.search(query, k=3, exclude_above=1.0)
    assert kept.ids[:, 0].tolist() == [0, 1]


def test_index_errors(setup, tmp_path):
    rm, tok, index, path = setup
    with pytest.raises(ReferenceIndexError, match="exceeds"):
        index.search(index.embeddings[:1], k=len(index) + 1)
    with pytest.raises(ReferenceIndexError, match="dimensional"):
        index.search(torch.randn(1, index.dim + 3), k=1)
    with pytest.raises(ReferenceIndexError, match="another model"):
        ReferenceIndex.load(path, reroute.attach(tiny_model("mixtral")))
    with pytest.raises(ReferenceIndexError, match="cannot use embedder"):
        ReferenceIndex.load(path, rm, embedder="pathway")
    with pytest.raises(ValueError, match="no label"):
        ReferenceIndex.build(rm, tok, [{"prompt": "w5 w6"}], progress=False)
    with pytest.raises(ValueError, match="no items"):
        ReferenceIndex.build(rm, tok, [], progress=False)
    hopeless = [dict(item, label=(item["label"] + 1) % 4) for item in index.items]  # every label wrong
    empty = ReferenceIndex.build(rm, tok, hopeless, progress=False)
    with pytest.raises(ReferenceIndexError, match="empty"):
        C3PO(rm, empty, tok)
    with pytest.raises(ReferenceIndexError, match="exceeds"):
        C3PO(rm, index, tok, k=len(index) + 1)
    broken = tmp_path / "broken"
    index.save(broken)
    meta = json.loads((broken / "index.json").read_text())
    meta["size"] += 1
    (broken / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ReferenceIndexError, match="truncated"):
        ReferenceIndex.load(broken)
    (broken / "index.json").write_text("{")
    with pytest.raises(ReferenceIndexError, match="corrupted"):
        ReferenceIndex.load(broken)
    index.save(broken)
    (broken / "embeddings.faiss").write_bytes(b"garbage")
    with pytest.raises(ReferenceIndexError, match="corrupted"):
        ReferenceIndex.load(broken)
    with pytest.raises(FileNotFoundError):
        ReferenceIndex.load(tmp_path / "nothing")


def test_ngd_lowers_the_neighbours_loss(setup):
    rm, tok, index, _ = setup
    options = dict(surrogate="ngd", critical_layers=2, core_experts=6, min_gain=None, max_typicality=None)
    c3po = C3PO(rm, index, tok, steps=8, lr=0.3, **options)
    test = _items(6, 2)
    adaptation = c3po.adapt(test)
    own = C3PO(rm, index, tok, steps=0, **options).adapt(test)
    after = c3po.neighbour_losses(test, adaptation)
    before = c3po.neighbour_losses(test, own)
    assert (after <= before + 1e-5).all() and (after < before).any()
    assert adaptation.stats["backward_passes"] == 8 * 3  # steps x k neighbours per item
    assert all(p.grad is None and p.requires_grad for p in rm.model.parameters())  # weights untouched
    assert all(layer.mixing is None for layer in rm.layers.values())


def test_prefix_reuse_gives_the_same_ngd_result(setup):
    rm, tok, index, _ = setup
    test = _items(4, 3)
    kwargs = dict(surrogate="ngd", critical_layers=1, core_experts=6, steps=4, lr=0.3, min_gain=None)
    fast = C3PO(rm, index, tok, reuse_prefix=True, **kwargs).adapt(test)
    slow = C3PO(rm, index, tok, reuse_prefix=False, **kwargs).adapt(test)
    for layer in fast.pathway.layers:
        torch.testing.assert_close(fast.pathway.logits[layer], slow.pathway.logits[layer], rtol=1e-4, atol=1e-5)


def test_kernel_regression_with_one_neighbour_at_zero_bandwidth_returns_its_pathway(setup):
    rm, tok, index, _ = setup
    similarity = torch.tensor([[0.9, 0.5, 0.1]])
    weights = kernel_weights(similarity, "gaussian", bandwidth=1e-4)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.0]]))
    experts = {2: torch.tensor([[0, 3, 5]])}
    stored = index.pathways[torch.tensor([[4, 7, 9]])]
    target = core_average(stored, [2], experts, [2], weights)
    expected = index.pathways[4, 2, [0, 3, 5]]
    torch.testing.assert_close(target[2][0], expected / expected.sum())
    for kind in ("gaussian", "matern", "polynomial", "linear"):
        w = kernel_weights(similarity, kind)
        torch.testing.assert_close(w.sum(-1), torch.ones(1))
        assert w[0, 0] >= w[0, 1] >= w[0, 2]


def test_mode_finding_converges_on_a_planted_mode():
    gen = torch.Generator().manual_seed(0)
    experts = 8
    mode = torch.softmax(3 * torch.randn(1, 1, experts, generator=gen), -1)
    reference = (mode + 0.01 * torch.randn(30, 1, experts, generator=gen)).clamp(min=1e-4)
    reference = reference / reference.sum(-1, keepdim=True)
    start = torch.softmax(torch.randn(1, 1, experts, generator=gen), -1)
    start = 0.6 * start + 0.4 * mode
    own = own_pathway({0: start[:, 0]}, [0], experts)
    pathway, point = mode_finding(own, start, reference, [0], k=10, iterations=30, alpha=0.3)
    assert torch.dist(point, mode.flatten(1)) < 0.2 * torch.dist(start.flatten(1), mode.flatten(1))
    torch.testing.assert_close(
        pathway.omega(0)[0].sort().values, point[0].sort().values / point.sum(), atol=1e-3, rtol=1e-3
    )


def test_lexical_embedder_counts_tokens():
    from reroute.c3po.embed import LexicalEmbedder, make_embedder

    tok = tiny_tokenizer()
    emb = make_embedder("lexical-64")
    assert isinstance(emb, LexicalEmbedder) and emb.name == "lexical-64"
    vectors = emb(None, tok, ["w3 w4 w4", "w4 w3 w4", "w5"])
    assert torch.allclose(vectors[0], vectors[1])  # a bag of tokens: order does not matter
    assert float(vectors[0] @ vectors[2]) == 0.0
    ids = tok("w3 w4 w4", add_special_tokens=False)["input_ids"]
    expected = torch.zeros(64)
    for i in ids:
        expected[i % 64] += 1
    torch.testing.assert_close(vectors[0], expected / expected.norm())
    with pytest.raises(ValueError, match="dim"):
        LexicalEmbedder(0)


def test_index_retrieves_by_a_query_field(setup, tmp_path):
    rm, tok, _, _ = setup
    data = [{**item, "question": item["prompt"].split(" ", 1)[1]} for item in _items(40, 1)]
    index = ReferenceIndex.build(
        rm, tok, data, embedder="lexical", path=tmp_path, query_field="question", progress=False
    )
    keep = [item for item in data if item_key(item) in {item_key(i) for i in index.items}]
    torch.testing.assert_close(index.embeddings, make_embedder("lexical")(rm, tok, [i["question"] for i in keep]))
    # pathways still come from the full prompt
    torch.testing.assert_close(index.pathways, prompt_pathways(rm, tok, [i["prompt"] for i in keep]))
    loaded = ReferenceIndex.load(tmp_path, rm)
    assert loaded.query_field == "question" and loaded.embedder_name == "lexical-4096"
    c3po = C3PO(rm, loaded, tok, surrogate="kernel", critical_layers=2, core_experts=6)  # embedder from the index
    assert c3po.adapt([{**data[0], "prompt": "w9 " + data[0]["prompt"]}]).neighbours.shape == (1, 3)
    with pytest.raises(ReferenceIndexError, match="'question' field"):
        c3po.adapt(["w3 w4 w5"])  # a bare prompt has no question to retrieve by
    with pytest.raises(ReferenceIndexError, match="'question' field"):
        ReferenceIndex.build(rm, tok, _items(4, 9), embedder="lexical", query_field="question", progress=False)
    with pytest.raises(ReferenceIndexError, match="embeds the 'question' field"):
        ReferenceIndex.build(rm, tok, data, embedder="lexical", path=tmp_path, progress=False)


def test_gate_abstains_and_abstaining_items_route_exactly_as_base(setup):
    rm, tok, index, _ = setup
    test = _items(5, 4)
    c3po = C3PO(rm, index, tok, surrogate="kernel", critical_layers=2, core_experts=6, min_agreement=2.0)
    adaptation = c3po.adapt(test)
    assert adaptation.abstained.all() and adaptation.stats["abstained"] == 1.0
    expected = ["confidence" if c >= 0.99 else "agreement" for c in adaptation.confidence.tolist()]
    assert adaptation.gates == expected and "agreement" in expected  # the first gate that fired, per item
    assert adaptation.agreement.shape == adaptation.gain.shape == (5,) and (adaptation.agreement < 2.0).all()
    base = reroute.scoring.choice_batch(tok, test)[0]
    with torch.no_grad():
        plain = reroute.scoring.continuation_logprobs(rm.model, base)
    c3po.apply(adaptation, base.prompt_len)
    with torch.no_grad(), rm.row_expansion(4):  # each item's 4 choices are consecutive rows
        gated = reroute.scoring.continuation_logprobs(rm.model, base)
    rm.clear_mixing()
    assert torch.equal(gated, plain)


def test_confidence_gate_keeps_base_routing_where_the_model_is_sure(setup):
    rm, tok, index, _ = setup
    test = _items(6, 5)
    batch = reroute.scoring.prompt_batch(tok, [item["prompt"] for item in test])
    with torch.no_grad():
        logits = reroute.scoring.padded_logits(rm.model, batch.input_ids, batch.attention_mask)[:, -1]
    expected = torch.softmax(logits.float(), -1).max(-1).values
    options = dict(surrogate="kernel", critical_layers=2, core_experts=6, min_gain=None, max_typicality=None)
    free = C3PO(rm, index, tok, max_confidence=None, **options).adapt(test)
    torch.testing.assert_close(free.confidence, expected)
    assert not free.abstained.any()
    threshold = float(expected.median())
    gated = C3PO(rm, index, tok, max_confidence=threshold, **options).adapt(test)
    assert gated.abstained.tolist() == (expected >= threshold).tolist() and gated.abstained.any()
    assert gated.gates == ["confidence" if c >= threshold else None for c in expected.tolist()]
    oracle = C3PO(rm, None, tok, surrogate="oracle", critical_layers=2, core_experts=6, steps=1, max_confidence=1e-9)
    assert not oracle.adapt(test).abstained.any()  # the upper bound is never gated
    with pytest.raises(ValueError, match="max_confidence"):
        C3POConfig(max_confidence=1.5)


def test_surrogates_and_front_doors_run(setup):
    rm, tok, index, _ = setup
    test = _items(4, 5)
    for surrogate in ("mode", "kernel", "ngd", "oracle"):
        c3po = C3PO(rm, index, tok, surrogate=surrogate, critical_layers=2, core_experts=6, steps=3)
        predictions = c3po.score_choices(test)
        assert len(predictions) == 4 and all(0 <= p < 4 for p in predictions)
    c3po = C3PO(rm, index, tok, critical_layers=2, core_experts=6, steps=2)
    prompts = [t["prompt"] for t in test[:2]]
    adaptation = c3po.adapt(prompts)
    out = c3po.generate(
        prompts=prompts, adaptation=adaptation, max_new_tokens=3, do_sample=True, top_k=1, num_return_sequences=2
    )
    assert out.shape[0] == 4 and torch.equal(out[0], out[1])
    batch = reroute.scoring.prompt_batch(tok, prompts)
    same = c3po.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        adaptation=adaptation,
        max_new_tokens=3,
        do_sample=False,
    )
    assert torch.equal(same, out[::2])


def test_neighbour_pathway_plugged_into_neighbour_forward(setup):
    """The test item's pathway reaches every one of its k neighbour rows (state expands item-major)."""
    rm, tok, index, _ = setup
    own = own_pathway({2: index.pathways[:2, 2]}, [2], rm.num_experts)  # core = all experts
    neighbours = gold_batch(tok, [index.items[i] for i in (3, 4, 5, 6)])  # 2 items x k=2
    weights = torch.full((2, 2), 0.5)
    positions = torch.tensor([[neighbours.prompt_len - 1]])
    with torch.no_grad(), rm.trace() as trace:
        mixing = torch.tensor([[9.0] + [-9.0] * (rm.num_experts - 1)] * 2)  # all mass on the item's top expert
        neighbour_loss(rm, Pathway([2], own.experts, {2: mixing}), neighbours, weights, positions)
    rm.clear_mixing()
    chosen = trace.indices(2)[:, neighbours.prompt_len - 1]  # [4, k]
    for row in range(4):
        assert int(own.experts[2][row // 2, 0]) in chosen[row].tolist()


def test_config_validation():
    for bad in (
        dict(surrogate="magic"),
        dict(k=0),
        dict(steps=-1),
        dict(lr=0.0),
        dict(kernel="rbf"),
        dict(exclude_above=0.0),
        dict(last_tokens=0),
    ):
        with pytest.raises(ValueError):
            C3POConfig(**bad)


def test_c3po_through_the_harness(setup):
    from reroute.eval import make_method, run_eval

    rm, tok, index, path = setup
    test = _items(6, 6)
    for surrogate in ("ngd", "kernel"):
        method = make_method(
            "c3po", index=str(path), surrogate=surrogate, options=dict(critical_layers=2, core_experts=6, steps=2)
        )
        result = run_eval(rm, tok, test, method, split="toy", mode="mc", batch_size=3, progress=False)
        assert result.n == 6 and result.stats["forward_passes"] > 1
        assert 0.0 <= result.stats["abstained"] <= 1.0


def test_harness_reports_per_item_gates_and_their_inputs(setup):
    from reroute.eval import make_method, run_eval

    rm, tok, index, _ = setup
    test = _items(6, 5)
    options = dict(surrogate="ngd", critical_layers=2, core_experts=6, steps=2, min_gain=None, max_typicality=None)
    adaptation = C3PO(rm, index, tok, **options).adapt(test[:3])
    threshold = float(adaptation.confidence.median())
    options["max_confidence"] = threshold
    spec = make_method("c3po", index=index, **options)
    result = run_eval(rm, tok, test, spec, batch_size=3, progress=False)
    c3po = spec.build(rm, tok)
    expected = [g for start in (0, 3) for g in c3po.adapt(test[start : start + 3]).gates]
    assert result.gates == expected and "confidence" in expected and None in expected
    confidence = result.gate_inputs["confidence"]
    assert [g == "confidence" for g in result.gates] == [c >= threshold for c in confidence]
    assert len(result.gate_inputs["gain"]) == len(result.gate_inputs["agreement"]) == 6
    assert result.stats["abstained"] == pytest.approx(expected.count("confidence") / 6)
    base = run_eval(rm, tok, test, make_method("base"), progress=False)
    assert base.gates == [] and base.gate_inputs == {}  # no gate to report


def test_split_and_stacked_states_keep_their_gates(setup):
    rm, tok, index, _ = setup
    c3po = C3PO(rm, index, tok, surrogate="kernel", critical_layers=2, core_experts=6, min_agreement=0.5)
    adaptation = c3po.adapt(_items(4, 6))
    rows = c3po.split_state(adaptation, 4)
    assert [r.gates[0] for r in rows] == adaptation.gates
    stacked = c3po.stack_states(rows)
    assert stacked.gates == adaptation.gates and torch.equal(stacked.confidence, adaptation.confidence)
    assert c3po.gate_report(stacked)["gate"] == adaptation.gates


def test_holdout_gain_by_hand():
    weights = torch.full((2, 3), 1 / 3)
    # candidate 0 helps neighbours 0 and 1 but hurts 2; candidate 1 is the base routing (loss 2 everywhere)
    table = torch.tensor([[[1.0, 1.0, 5.0], [2.0, 2.0, 2.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])
    # item 0: without 0 or 1 the base wins (no change); without 2, candidate 0 is chosen and scores 5 on it
    # item 1: every held-out choice is candidate 0, which lowers each held-out loss from 2 to 1
    torch.testing.assert_close(holdout_gain(table, weights, base=1), torch.tensor([(-3 / 3) / 2, (3 / 3) / 2]))
    assert holdout_gain(table[:, :, :1], weights[:, :1], base=1).tolist() == [0.0, 0.0]  # one neighbour: no check


def test_holdout_gate_keeps_base_routing_where_the_leave_one_out_check_fails(setup):
    rm, tok, index, _ = setup
    test = _items(6, 8)
    options = dict(surrogate="kernel", critical_layers=2, core_experts=6, max_confidence=None, min_gain=None,
                   max_typicality=None)  # fmt: skip
    free = C3PO(rm, index, tok, **options).adapt(test)
    assert free.holdout_gain.shape == (6,) and free.gates == [None] * 6
    threshold = float(free.holdout_gain.median())
    gated = C3PO(rm, index, tok, min_holdout_gain=threshold, **options).adapt(test)
    assert gated.gates == ["holdout" if g <= threshold else None for g in free.holdout_gain.tolist()]
    assert "holdout" in gated.gates and None in gated.gates
    assert C3PO(rm, index, tok, **{**options, "surrogate": "ngd", "steps": 1}).adapt(test).holdout_gain is None


def test_typicality_gate_keeps_base_routing_where_the_item_routes_like_a_reference_item(setup):
    rm, tok, index, _ = setup
    test = _items(6, 9) + [index.items[0]]  # a reference item itself: typicality 1
    options = dict(surrogate="ngd", critical_layers=2, core_experts=6, steps=1, max_confidence=None, min_gain=None)
    free = C3PO(rm, index, tok, max_typicality=None, **options).adapt(test)
    pathways = prompt_pathways(rm, tok, [item["prompt"] for item in test])[:, -2:].flatten(1)
    stored = index.pathways[:, -2:].flatten(1)
    expected = torch.nn.functional.normalize(pathways, dim=-1) @ torch.nn.functional.normalize(stored, dim=-1).T
    torch.testing.assert_close(free.typicality, expected.max(-1).values)
    assert float(free.typicality[-1]) == pytest.approx(1.0)
    threshold = float(free.typicality[:-1].median())
    gated = C3PO(rm, index, tok, max_typicality=threshold, **options).adapt(test)
    fires = (free.typicality >= threshold).tolist()
    assert gated.gates == ["typical" if f else None for f in fires] and gated.gates[-1] == "typical"
    assert gated.stats["surrogate_items"] == fires.count(False)  # gated items skip the surrogate
    with pytest.raises(ValueError, match="max_typicality"):
        C3POConfig(max_typicality=1.5)
