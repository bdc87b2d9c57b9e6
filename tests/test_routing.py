"""Routing state against the plain-PyTorch reference (tests/reference.py), on every family."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from conftest import capture_router_inputs

import reroute
from reroute import ExpertMask, RoutingPolicy
from reroute.testing import tiny_model


def _routed(model, tokens, rm):
    """Run the model; per MoE layer the router input and the traced (indices, weights)."""
    inputs, handles = capture_router_inputs(rm)
    with torch.no_grad(), rm.trace() as trace:
        model(tokens)
    for h in handles:
        h.remove()
    return inputs, trace


def _check_layers(family, rm, inputs, trace, offsets=None, **policy):
    for idx, layer in rm.layers.items():
        logits = ref.router_logits(family, layer.router, inputs[idx])
        if offsets is not None and idx in offsets:
            logits = logits + offsets[idx].double()
        expected = ref.route(family, layer.router, logits, **policy)
        actual = ref.as_dicts(trace.indices(idx), trace.weights(idx))
        if family == "phimoe" and not policy:
            # SparseMixer: the first expert is the arg-max of the logits; each token uses top_k distinct experts,
            # each weighted by a masked-softmax probability in (0, 1]
            assert trace.indices(idx)[..., 0].reshape(-1).tolist() == logits.argmax(-1).tolist()
            assert all(len(t) == layer.top_k and all(0.0 < w <= 1.0 for w in t.values()) for t in actual), actual
            continue
        ref.assert_same_routing(actual, expected)


def test_offsets_move_routing_as_computed_by_hand(family, model, tokens):
    rm = reroute.attach(model)
    generator = torch.Generator().manual_seed(3)
    offsets = {idx: 2.0 * torch.randn(rm.num_experts, generator=generator) for idx in rm.moe_layers}
    rm.set_offsets(offsets)
    inputs, trace = _routed(model, tokens, rm)
    _check_layers(family, rm, inputs, trace, offsets)
    changed = sum((trace.indices(i) != _routed_without(model, tokens, rm)[i]).any().item() for i in rm.moe_layers)
    assert changed > 0, "offsets of scale 2 should change some routing decisions"


def _routed_without(model, tokens, rm):
    saved = rm.offsets.stack()
    rm.offsets.zero_()
    _, trace = _routed(model, tokens, rm)
    rm.set_offsets(saved.to(rm.layer(rm.moe_layers[0]).device))
    return {i: trace.indices(i) for i in rm.moe_layers}


@pytest.mark.parametrize(
    "policy",
    [dict(top_k=1), dict(top_k=3), dict(rank=2), dict(rank=1), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=1.0)],
    ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()),
)
def test_policies_match_reference(family, model, tokens, policy):
    rm = reroute.attach(model)
    rm.set_policy(RoutingPolicy(**policy))
    inputs, trace = _routed(model, tokens, rm)
    _check_layers(family, rm, inputs, trace, **policy)


def test_family_top_k_policy_matches_default_rule(family, model, tokens):
    """The generic path with the family's own k reproduces the family's rule (up to rounding)."""
    rm = reroute.attach(model)
    _, default = _routed(model, tokens, rm)
    rm.set_policy(RoutingPolicy(top_k=rm.top_k))
    _, generic = _routed(model, tokens, rm)
    for idx in rm.moe_layers:
        if family == "phimoe":
            # SparseMixer's weights are not a renormalised softmax, so later layers see other inputs; the
            # first MoE layer's selection must agree.
            if idx == rm.moe_layers[0]:
                assert torch.equal(default.indices(idx).sort(-1).values, generic.indices(idx).sort(-1).values)
            continue
        ref.assert_same_routing(
            ref.as_dicts(generic.indices(idx), generic.weights(idx)),
            ref.as_dicts(default.indices(idx), default.weights(idx)),
        )


@pytest.mark.parametrize("kind", ["ban", "force", "both"])
def test_expert_masks_match_reference(family, model, tokens, kind):
    rm = reroute.attach(model)
    _, base = _routed(model, tokens, rm)
    layer0 = rm.moe_layers[0]
    popular = torch.bincount(base.indices(layer0).reshape(-1), minlength=rm.num_experts)
    banned = (int(popular.argmax()),) if kind in ("ban", "both") else ()
    forced = (int(popular.argmin()),) if kind in ("force", "both") else ()
    rm.set_mask(ExpertMask(banned=banned, forced=forced))
    inputs, trace = _routed(model, tokens, rm)
    _check_layers(family if family != "phimoe" else "mixtral", rm, inputs, trace, banned=banned, forced=forced)
    for idx in rm.moe_layers:
        used = trace.indices(idx)[trace.weights(idx) != 0]
        assert not set(banned) & set(used.tolist())
        for expert in forced:
            assert (trace.indices(idx) == expert).any(-1).all()


def test_policy_on_selected_rows_only(family, model, tokens):
    rm = reroute.attach(model)
    _, base = _routed(model, tokens, rm)
    rm.set_policy(RoutingPolicy(rank=2), rows=[1])
    inputs, trace = _routed(model, tokens, rm)
    for idx, layer in rm.layers.items():
        seq = tokens.shape[1]
        indices, weights = trace.indices(idx), trace.weights(idx)
        # row 0 keeps the family's routing (bit for bit in the first MoE layer; later layers see inputs that
        # went through expert GEMMs batched differently, so equal up to rounding)
        k = base.indices(idx).shape[-1]
        assert torch.equal(indices[0, :, :k], base.indices(idx)[0])
        if idx == rm.moe_layers[0]:
            assert torch.equal(weights[0, :, :k], base.weights(idx)[0])
        torch.testing.assert_close(weights[0, :, :k], base.weights(idx)[0])
        logits = ref.router_logits(family, layer.router, inputs[idx]).reshape(2, seq, -1)[1]
        expected = ref.route(family if family != "phimoe" else "mixtral", layer.router, logits, rank=2)
        ref.assert_same_routing(ref.as_dicts(indices[1], weights[1]), expected)


def test_row_offsets_equal_running_each_row_alone(family, model, tokens):
    rm = reroute.attach(model)
    generator = torch.Generator().manual_seed(5)
    rows = 3.0 * torch.randn(2, len(rm.moe_layers), rm.num_experts, generator=generator)
    rm.set_row_offsets(rows)
    with torch.no_grad():
        batched = model(tokens).logits
    rm.reset()
    for b in range(2):
        rm.set_offsets(rows[b])
        with torch.no_grad():
            alone = model(tokens[b : b + 1]).logits
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_row_offsets_expand_under_num_return_sequences_and_beams(model, tokens):
    rm = reroute.attach(model)
    generator = torch.Generator().manual_seed(6)
    rows = 4.0 * torch.randn(2, len(rm.moe_layers), rm.num_experts, generator=generator)
    rm.set_row_offsets(rows)
    # top_k=1 sampling is greedy but allows num_return_sequences
    many = model.generate(tokens, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2)
    beams = model.generate(tokens, max_new_tokens=4, do_sample=False, num_beams=2)
    rm.reset()
    for b in range(2):
        rm.set_offsets(rows[b])
        alone = model.generate(tokens[b : b + 1], max_new_tokens=4, do_sample=False)
        alone_beam = model.generate(tokens[b : b + 1], max_new_tokens=4, do_sample=False, num_beams=2)
        assert torch.equal(many[2 * b], alone[0]) and torch.equal(many[2 * b + 1], alone[0])
        assert torch.equal(beams[b], alone_beam[0])
    rm.set_row_offsets({rm.moe_layers[0]: torch.zeros(3, rm.num_experts)})
    with pytest.raises(ValueError, match="has 3 rows but the forward has 2 batch rows"):
        model(tokens)


def test_mixing_identity_and_locality(family, model, tokens):
    """Re-mixing with the router's own proportions changes nothing; other positions are untouched."""
    rm = reroute.attach(model)
    layer = rm.moe_layers[-1]
    seq = tokens.shape[1]
    with torch.no_grad(), rm.trace() as trace:
        reference = model(tokens).logits
    scores = trace.scores(layer)[:, -1]  # [B, E] at the last position
    core = scores.topk(5, dim=-1).indices
    own = scores.gather(1, core)
    rm.set_mixing(layer, experts=core, positions=torch.full((2, 1), seq - 1), weights=own)
    with torch.no_grad():
        same = model(tokens).logits
    if family != "phimoe":  # re-mixed tokens use renormalised softmax weights, not SparseMixer's
        torch.testing.assert_close(same, reference, rtol=1e-5, atol=1e-6)
    # a different mixture moves the last position only
    rm.set_mixing(
        layer, experts=core, positions=torch.full((2, 1), seq - 1), logits=torch.tensor([[5.0, 0, 0, 0, -5]] * 2)
    )
    with torch.no_grad():
        moved = model(tokens).logits
    # (equal up to rounding: the expert GEMMs batch tokens differently once one token changes experts)
    torch.testing.assert_close(moved[:, :-1], reference[:, :-1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved[:, -1], reference[:, -1])


def test_mixing_applies_to_prompt_positions_not_decode_steps(model, tokens):
    rm = reroute.attach(model)
    layer = rm.moe_layers[-1]
    seq = tokens.shape[1]
    with torch.no_grad(), rm.trace() as before:
        model(tokens)
    core = before.scores(layer)[:, -1].topk(4, dim=-1).indices  # [B, 4]
    # all of the core's mass on its 4th-ranked expert, which then must be chosen
    rm.set_mixing(layer, experts=core, positions=[seq - 1], logits=torch.tensor([-9.0, -9, -9, 9]))
    with rm.trace() as trace:
        model.generate(tokens, max_new_tokens=3, do_sample=False)
    first = trace.records[layer][0]
    assert (first.indices[:, -1] == core[:, 3:]).any(-1).all()
    for record in trace.records[layer][1:]:  # decode steps: no re-mixing
        logits = record.logits.reshape(-1, rm.num_experts)
        controller = rm.layer(layer)
        expected_w, expected_i = controller.rule.route(controller.router, logits, logits.dtype)
        assert torch.equal(record.indices.reshape(expected_i.shape), expected_i)


def test_gradients_reach_every_core_expert_and_offsets(family, model, tokens):
    rm = reroute.attach(model)
    layer = rm.moe_layers[-1]
    seq = tokens.shape[1]
    with torch.no_grad(), rm.trace() as trace:
        model(tokens)
    core = trace.scores(layer)[:, -1].topk(6, dim=-1).indices  # C3PO's core: the router's own top experts
    mixing = torch.zeros(2, 6, requires_grad=True)
    rm.set_mixing(layer, experts=core, positions=torch.full((2, 1), seq - 1), logits=mixing)
    loss = model(tokens).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert mixing.grad is not None and (mixing.grad.abs() > 1e-8).all(), mixing.grad
    if family != "phimoe":  # SparseMixer's inference weights are locally constant in the logits
        # the first MoE layer reaches the last position through attention: a gradient well above rounding
        first = rm.offsets[rm.moe_layers[0]].grad
        assert first is not None and first.abs().max() > 1e-6, first
    # In the last layer only the last position reaches the loss, and it is re-mixed: where the family renormalises
    # the selected weights, the core's mass cancels and the weights do not depend on the logits, so the true
    # gradient to that layer's offsets is zero (what remains is rounding); without renormalisation it is not.
    last = rm.offsets[layer].grad
    if rm.layer(layer).rule.renormalizes(rm.layer(layer).router):
        assert last is None or last.abs().max() < 1e-9, last
    elif family != "phimoe":
        assert last.abs().max() > 1e-8, last


def _block_loss(rm, layer: int, hidden: torch.Tensor, direction: torch.Tensor):
    """Scalar loss of one MoE block's output, run with the batch layout the model forward would provide."""
    block = rm.layer(layer).router
    mlp = next(m for m in rm.model.modules() if any(c is block for c in m.children()))
    rm.context.batch_size, rm.context.seq_len = hidden.shape[:2]
    out = mlp(hidden)
    out = out[0] if isinstance(out, tuple) else out
    return (out * direction).sum()


def _finite_difference(param: torch.Tensor, loss_fn, eps: float) -> torch.Tensor:
    numeric = torch.zeros(param.shape, dtype=torch.float64)
    with torch.no_grad():
        for i in range(param.numel()):
            flat = param.view(-1)
            flat[i] += eps
            up = loss_fn().item()
            flat[i] -= 2 * eps
            down = loss_fn().item()
            flat[i] += eps
            numeric.view(-1)[i] = (up - down) / (2 * eps)
    return numeric


def test_offset_gradients_match_finite_differences():
    # GPT-OSS routes in the logits' dtype end to end: a float64 block differentiates in float64
    model = tiny_model("gpt_oss", dtype=torch.float64)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    rm = reroute.attach(model)
    layer = rm.moe_layers[1]
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 5, model.config.hidden_size, dtype=torch.float64, generator=gen)
    direction = torch.randn(1, 5, model.config.hidden_size, dtype=torch.float64, generator=gen)
    offsets = rm.offsets[layer]  # float32; steps of 2**-10 around values of order 1 are exact
    rm.set_offsets({layer: torch.randn(rm.num_experts, generator=gen)})
    _block_loss(rm, layer, hidden, direction).backward()
    numeric = _finite_difference(offsets, lambda: _block_loss(rm, layer, hidden, direction), 2.0**-10)
    torch.testing.assert_close(offsets.grad.double(), numeric, rtol=1e-4, atol=1e-7)
    assert offsets.grad.abs().sum() > 0


def test_mixing_gradients_match_finite_differences():
    # OLMoE without renormalisation: the exact gradient reaches every core expert through the softmax normaliser
    model = tiny_model("olmoe", dtype=torch.float64)
    model.set_experts_implementation("eager")
    rm = reroute.attach(model)
    layer = rm.moe_layers[-1]
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(1, 4, model.config.hidden_size, dtype=torch.float64, generator=gen)
    direction = torch.randn(1, 4, model.config.hidden_size, dtype=torch.float64, generator=gen)
    mixing = (0.5 * torch.randn(1, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    rm.set_mixing(layer, experts=[[0, 2, 3, 5, 7]], positions=[[3]], logits=mixing)
    _block_loss(rm, layer, hidden, direction).backward()
    # routing runs in float32 (softmax(dtype=float)), so the finite differences are taken with a wide step
    numeric = _finite_difference(mixing, lambda: _block_loss(rm, layer, hidden, direction), 1e-3)
    torch.testing.assert_close(mixing.grad, numeric, rtol=2e-2, atol=1e-4)
    assert (mixing.grad.abs() > 0).all()


def test_policy_rows_mean_batch_rows(model, tokens):
    """Issue 14 item 3: ``rows=[i]`` changes batch row i only; before, ``rows=[0]`` of a batch of 2 changed both
    rows and ``rows=[1]`` of a batch of 4 changed rows 2 and 3."""
    rm = reroute.attach(model)
    batch = torch.cat([tokens, tokens.flip(0)])  # 4 rows
    with torch.no_grad():
        base = model(batch).logits
    for rows in ([1], [0, 3], torch.tensor([False, True, True, False])):
        rm.set_policy(RoutingPolicy(rank=2), rows=rows)
        with torch.no_grad():
            out = model(batch).logits
        chosen = torch.zeros(4, dtype=torch.bool)
        chosen[torch.as_tensor(rows)] = True
        for b in range(4):
            moved = not torch.allclose(out[b], base[b], rtol=1e-5, atol=1e-6)
            assert moved == bool(chosen[b]), (rows, b)
    rm.set_policy(RoutingPolicy(rank=2), rows=[0])
    with torch.no_grad():
        out = model(tokens).logits
        torch.testing.assert_close(out[1], base[1], rtol=1e-5, atol=1e-6)
    rm.set_policy(RoutingPolicy(rank=2), rows=[5])
    with pytest.raises(ValueError, match="beyond the batch"):
        model(tokens)


def test_per_row_state_of_another_batch_size_is_an_error(model, tokens):
    """Issue 14 item 3: ``[2, E]`` row offsets on a batch of 4 were broadcast as ``[r0, r0, r1, r1]``."""
    rm = reroute.attach(model)
    batch = torch.cat([tokens, tokens])
    rm.set_row_offsets({rm.moe_layers[0]: torch.randn(2, rm.num_experts)})
    with pytest.raises(ValueError, match="one row per batch row"):
        model(batch)
    rm.set_row_offsets({rm.moe_layers[0]: torch.randn(1, rm.num_experts)})
    with pytest.raises(ValueError, match="has 1 rows but the forward has 2"):
        model(tokens)
    rm.reset()
    rm.set_policy(RoutingPolicy(rank=2), rows=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="policy rows has 2 rows"):
        model(batch)


def test_rows_beyond_the_batch_are_refused_at_set_time_where_the_batch_is_known(tokens):
    """Issue 14 item 17: a row index beyond the batch was accepted by the setter and failed at the first forward.
    Inside ``generate()`` (its prompts) and ``rm.row_expansion(copies, rows=R)`` the batch is known, so per-row state
    that cannot fit it is refused when set, and nothing changes; elsewhere the forward still refuses it."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    layer = rm.moe_layers[0]
    errors = []

    class SetRows(LogitsProcessor):  # runs inside generate(), between its forwards
        def __call__(self, input_ids, scores):
            rm.set_policy(RoutingPolicy(rank=2), rows=[1])  # prompt rows 0..1 (4 rows with 2 sequences each)
            rm.set_row_offsets({layer: torch.zeros(4, rm.num_experts)})
            rm.set_row_offsets({layer: torch.zeros(2, rm.num_experts)})
            for bad in (
                lambda: rm.set_policy(RoutingPolicy(rank=2), rows=[2]),
                lambda: rm.set_policy(RoutingPolicy(rank=2), rows=torch.tensor([True, False, True])),
                lambda: rm.set_row_offsets({layer: torch.zeros(3, rm.num_experts)}),
            ):
                with pytest.raises(ValueError, match="beyond the batch of 2 rows|has 3 rows but the batch being run"):
                    bad()
                errors.append(bad)
            rm.reset()
            return scores

    call = dict(max_new_tokens=1, do_sample=True, top_k=1, num_return_sequences=2)
    model.generate(tokens, logits_processor=LogitsProcessorList([SetRows()]), **call)
    assert len(errors) == 3 and not rm.has_state()

    with rm.row_expansion(3, rows=2):
        rm.set_mixing(layer, experts=[[0, 1], [2, 3]], positions=[[1], [2]])
        for bad in (
            lambda: rm.set_policy(RoutingPolicy(rank=2), rows=[2]),
            lambda: rm.set_row_offsets({layer: torch.zeros(5, rm.num_experts)}),
            lambda: rm.set_mixing(layer, experts=[[0, 1]] * 3, positions=[[1]] * 3),
        ):
            before = (rm.layer(layer).policy, rm.layer(layer).row_offsets, rm.layer(layer).mixing)
            with pytest.raises(ValueError, match="beyond the batch of 2 rows|but the batch being run has 6 rows"):
                bad()
            assert (rm.layer(layer).policy, rm.layer(layer).row_offsets, rm.layer(layer).mixing) == before
    rm.reset()
    rm.set_policy(RoutingPolicy(rank=2), rows=[5])  # no batch known here: the forward refuses it
    with pytest.raises(ValueError, match="beyond the batch"):
        model(tokens)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        with rm.row_expansion(2, rows=0):
            pass


def test_policy_rows_follow_num_return_sequences(model, tokens):
    """Inside generate(), row indices and masks name prompt rows and follow their num_return_sequences copies."""
    rm = reroute.attach(model)
    rm.set_policy(RoutingPolicy(rank=2), rows=[1])
    many = model.generate(tokens, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2)
    rm.set_policy(RoutingPolicy(rank=2))
    weak = model.generate(tokens[1:], max_new_tokens=4, do_sample=False)
    rm.set_policy(None)
    plain = model.generate(tokens[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(many[0], plain[0]) and torch.equal(many[1], plain[0])
    assert torch.equal(many[2], weak[0]) and torch.equal(many[3], weak[0])
    assert rm.context.expansion == 1  # back to plain forwards after generate()


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "olmoe", "mixtral"])
def test_random_policies_and_masks_match_reference(family, tokens):
    """Issue 14 item 4, property-based: random (policy, mask) pairs; each is either rejected at set time or routes
    exactly as tests/reference.py does (kept experts renormalised over themselves; nothing routed to a blocked
    slot). A seeded generator draws the cases, so a failure names a reproducible draw."""
    model = tiny_model(family)
    rm = reroute.attach(model)
    gen = torch.Generator().manual_seed(14)
    num_experts = rm.num_experts
    accepted = rejected = 0
    for draw in range(12):
        kind = ("top_k", "rank", "top_p")[draw % 3]
        value = (
            float(torch.rand((), generator=gen) * 0.9 + 0.1)
            if kind == "top_p"
            else int(torch.randint(1, num_experts + 1, (), generator=gen))
        )
        count = int(torch.randint(0, 4, (), generator=gen))
        banned = tuple(torch.randperm(num_experts, generator=gen)[:count].tolist())
        rm.reset()
        try:
            rm.set_mask(ExpertMask(banned=banned))
            rm.set_policy(RoutingPolicy(**{kind: value}))
        except ValueError:
            rejected += 1
            continue
        accepted += 1
        inputs, trace = _routed(model, tokens, rm)
        for idx, layer in rm.layers.items():
            logits = ref.router_logits(family, layer.router, inputs[idx])
            expected = ref.route(family, layer.router, logits, banned=banned, **{kind: value})
            assert all(expected_token for expected_token in expected), f"draw {draw}: a token routed to no expert"
            ref.assert_same_routing(ref.as_dicts(trace.indices(idx), trace.weights(idx)), expected)
    assert accepted >= 4 and (family not in ("deepseek_v3", "glm4_moe") or rejected >= 1), (accepted, rejected)


def test_unroutable_policies_and_masks_are_rejected_at_set_time():
    """Issue 14 item 4: rank beyond the experts a group limit leaves, and masks that leave a token's groups too few
    experts, are errors when set (before: a token routed to no expert at forward time)."""
    rm = reroute.attach(tiny_model("deepseek_v3"))  # 8 experts in 4 groups of 2; 2 groups per token: 4 selectable
    with pytest.raises(ValueError, match="rank=5 needs 5 experts"):
        rm.set_policy(RoutingPolicy(rank=5))
    rm.set_policy(RoutingPolicy(rank=4))
    with pytest.raises(ValueError, match="rank=4 needs 4 experts"):
        rm.set_mask(ExpertMask(banned=(0,)))
    rm.set_policy(None)
    with pytest.raises(ValueError, match="within the group limit"):
        rm.set_mask(ExpertMask(banned=(0, 1, 2)))  # groups {0,1} and {2,3} chosen: 1 expert left for top-2
    rm.set_mask(ExpertMask(banned=(0, 2, 4)))  # any 2 groups still hold 2 allowed experts
    with pytest.raises(ValueError, match="rank=3 needs 3"):
        rm.set_policy(RoutingPolicy(rank=3))
    with pytest.raises(ValueError, match="within the group limit"):
        rm.set_policy(RoutingPolicy(top_k=6))  # the mask would cut below the 4 experts the group limit keeps
    rm.set_mask(None)
    rm.set_policy(RoutingPolicy(top_k=6))  # the family's own group limit caps it: routes to the 4 kept, renormalised
    with pytest.raises(ValueError, match="rank=5"):
        reroute.SCMoE(rm, weak="rank5")


def test_top_p_with_a_banned_expert_routes_as_the_reference(tokens):
    """Issue 14 item 4: top-p with one banned expert was refused (and failed at forward time before that)."""
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    rm.set_mask(ExpertMask(banned=(3,)))
    rm.set_policy(RoutingPolicy(top_p=0.7))
    inputs, trace = _routed(model, tokens, rm)
    _check_layers("olmoe", rm, inputs, trace, top_p=0.7, banned=(3,))
