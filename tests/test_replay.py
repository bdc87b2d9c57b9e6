"""Route record / replay: replaying an adapted run on the unadapted model reproduces its logits bit for bit."""

from __future__ import annotations

import pytest
import torch

import reroute
from reroute import RoutingPolicy
from reroute.routing.replay import Routes
from reroute.testing import tiny_model


def _offsets(rm, scale: float = 3.0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {idx: scale * torch.randn(rm.num_experts, generator=generator) for idx in rm.moe_layers}


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_replay_of_an_offset_run_reproduces_its_logits_on_every_family(family, model, tokens):
    rm = reroute.attach(model)
    base = _logits(model, tokens)
    rm.set_offsets(_offsets(rm))
    with rm.record() as routes:
        adapted = _logits(model, tokens)
    assert not torch.equal(adapted, base), "offsets of scale 3 should change the output"
    rm.reset()
    with rm.replay(routes):
        replayed = _logits(model, tokens)
    assert torch.equal(replayed, adapted)
    assert torch.equal(_logits(model, tokens), base), "leaving the block restores the model's own routing"
    # the recorded selection is the run's own (checked against a trace of the same run)
    rm.set_offsets(_offsets(rm))
    with rm.trace() as trace:
        _logits(model, tokens)
    for idx in rm.moe_layers:
        assert torch.equal(routes.indices(idx), trace.indices(idx))
        assert torch.equal(routes.weights(idx), trace.weights(idx))
        family_renormalizes = rm.layer(idx).rule.renormalizes(rm.layer(idx).router)
        assert routes.renormalized(idx).eq(family_renormalizes).all()


def _c3po_state(rm, tokens):
    """C3PO re-mixing on the last MoE layer at the last position: all the routing mass to the core's last expert."""
    core = list(range(rm.num_experts))
    weights = torch.ones(rm.num_experts)
    weights[-1] = 50.0
    rm.set_mixing(rm.moe_layers[-1], experts=core, positions=[tokens.shape[1] - 1], weights=weights)


def test_replay_reproduces_scmoe_weak_routing_and_c3po_remixing():
    model = tiny_model("olmoe")
    tokens = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    rm = reroute.attach(model)
    base = _logits(model, tokens)
    scmoe = reroute.SCMoE(rm, weak="rank2")
    with rm.record() as weak_routes, scmoe.weak.applied(rm, tokens.shape[0]):
        weak = _logits(model, tokens)
    _c3po_state(rm, tokens)
    with rm.record() as mixed_routes:
        mixed = _logits(model, tokens)
    rm.reset()
    for routes, expected in ((weak_routes, weak), (mixed_routes, mixed)):
        assert not torch.equal(expected, base)
        with rm.replay(routes):
            assert torch.equal(_logits(model, tokens), expected)
    # the rank-2 policy renormalises its single expert: recorded as renormalised, one expert per token
    first = rm.moe_layers[0]
    assert weak_routes.indices(first).shape[-1] == 1 and weak_routes.renormalized(first).all()


def test_policy_renormalisation_flag_is_recorded_per_row():
    model = tiny_model("qwen3_moe")  # the tiny Qwen3-MoE renormalises (norm_topk_prob=True)
    rm = reroute.attach(model)
    tokens = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    with rm.record() as routes, rm.routing(RoutingPolicy(top_k=3, renormalize=False), rows=[1]):
        _logits(model, tokens)
    flags = routes.renormalized(rm.moe_layers[0])
    assert flags[0].all() and not flags[1].any()
    weights = routes.weights(rm.moe_layers[0])
    assert torch.allclose(weights[0].sum(-1), torch.ones(5)) and (weights[1].sum(-1) < 1 - 1e-4).all()


def test_replay_of_a_generate_keeps_the_token_cursor_and_survives_save_load(tmp_path):
    model = tiny_model("qwen3_moe")
    rm = reroute.attach(model)
    prompt = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    rm.set_offsets(_offsets(rm, 4.0))
    with rm.record() as routes, torch.no_grad():
        adapted = model.generate(prompt, **kwargs)
    rm.reset()
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(adapted.logits, plain.logits))
    # one segment: the prefill (6 tokens) then 4 decode steps (the 5th new token is never forwarded)
    assert [(s.batch, s.calls) for s in routes.segments] == [(2, [6, 1, 1, 1, 1])]
    routes.save(tmp_path / "routes")
    loaded = Routes.load(tmp_path / "routes")
    for replayable in (routes, loaded, tmp_path / "routes"):
        with rm.replay(replayable) as cursors, torch.no_grad():
            replayed = model.generate(prompt, **kwargs)
        assert torch.equal(replayed.sequences, adapted.sequences)
        assert all(torch.equal(a, b) for a, b in zip(replayed.logits, adapted.logits))
        assert all(cursor.tokens_left == 0 for cursor in cursors.values())
    # vLLM's layout: ids per token, layer and slot
    assert routes.routed_experts().shape == (2, 10, len(rm.moe_layers), rm.top_k)


def test_batches_of_different_sizes_make_segments_and_replay_in_order():
    model = tiny_model("mixtral")
    rm = reroute.attach(model)
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randint(3, 96, shape, generator=generator) for shape in ((1, 4), (1, 3), (3, 5))]
    rm.set_offsets(_offsets(rm))
    with rm.record() as routes:
        adapted = [_logits(model, b) for b in batches]
    rm.reset()
    assert [(s.batch, s.calls) for s in routes.segments] == [(1, [4, 3]), (3, [5])]
    with rm.replay(routes):
        for tokens, expected in zip(batches, adapted):
            assert torch.equal(_logits(model, tokens), expected)


def _bad_routes(routes: Routes, kind: str) -> Routes:
    layer = routes.moe_layers[0]
    segment = routes.segments[0]
    if kind == "layers":
        routes.moe_layers = routes.moe_layers[:-1]
    elif kind == "expert_range":
        segment.indices[layer] = segment.indices[layer].clone()
        segment.indices[layer][0, 0, 0] = 99
    elif kind == "shape":
        segment.weights[layer] = segment.weights[layer][:, :-1]
    return routes


@pytest.mark.parametrize(
    ("kind", "message"),
    [("layers", "recorded for MoE layers"), ("expert_range", "out of range"), ("shape", "do not match")],
)
def test_bad_routes_are_refused_before_anything_changes(kind, message):
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    tokens = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    with rm.record() as routes:
        base = _logits(model, tokens)
    with pytest.raises(ValueError, match=message), rm.replay(_bad_routes(routes, kind)):
        pass
    assert all(layer.replay is None for layer in rm.layers.values())
    assert torch.equal(_logits(model, tokens), base)


def test_a_run_that_does_not_match_the_recorded_tokens_is_refused():
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    tokens = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(8))
    with rm.record() as routes:
        _logits(model, tokens)
    with rm.replay(routes) as cursors:
        with pytest.raises(ValueError, match=r"forwards \[1, 5\] tokens"):
            _logits(model, tokens[:1])
        assert all(c.tokens_left == 5 for c in cursors.values()), "a refused forward consumes nothing"
        _logits(model, tokens)
        with pytest.raises(ValueError, match="used up"):
            _logits(model, tokens)


def test_replay_under_torch_compile_runs_eagerly_or_refuses_a_full_graph():
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    tokens = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(9))
    rm.set_offsets(_offsets(rm))
    with rm.record() as routes:
        adapted = _logits(model, tokens)
    rm.reset()
    torch._dynamo.reset()
    try:
        with rm.replay(routes), pytest.raises(Exception, match="route replay runs eagerly only"):
            _logits(torch.compile(model, backend="eager", fullgraph=True), tokens)
        # without fullgraph the router call breaks the graph and replays eagerly: the recorded run, not the model's
        with rm.replay(routes):
            assert torch.equal(_logits(torch.compile(model, backend="eager"), tokens), adapted)
    finally:
        torch._dynamo.reset()
