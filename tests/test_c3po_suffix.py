"""C3PO's suffix-only recompute equals the full recompute (fp32 CPU), on tiny models of three families; the
neighbours' prefix states kept across calls change no result; the prompt forward records only what C3PO reads."""

from __future__ import annotations

import pytest
import torch

import reroute
from reroute.c3po import C3PO, C3POConfig, HiddenStateEmbedder, ReferenceIndex
from reroute.c3po.embed import prompt_forward
from reroute.c3po.pathway import Pathway, own_pathway
from reroute.c3po.surrogates import core_average, kernel_regression, kernel_weights
from reroute.prefix import PrefixStore, RowPrefix, SuffixScorer
from reroute.scoring import continuation_logprobs, gold_batch, prompt_batch
from reroute.testing import tiny_model, tiny_tokenizer

FAMILIES = ("olmoe", "qwen3_moe", "deepseek_v3")


def _items(n: int, seed: int, length: int = 9, answer: int = 3) -> list[dict]:
    """Prompts of unequal lengths (so rows are left-padded) and multi-token choices."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, 96, (length - i % 3,), generator=gen)]
        choices = ["".join(f" w{int(t)}" for t in torch.randint(3, 96, (answer,), generator=gen)) for _ in range(4)]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request):
    rm = reroute.attach(tiny_model(request.param))
    tok = tiny_tokenizer()
    index = ReferenceIndex.build(rm, tok, _items(48, 1), progress=False)
    return rm, tok, index


@pytest.mark.parametrize("surrogate", ["ngd", "kernel", "oracle"])
def test_suffix_recompute_equals_full_recompute(family_setup, surrogate):
    rm, tok, index = family_setup
    test = _items(4, 2)
    # min_gain/max_confidence off: every item adapts, so every row's weights are compared
    kwargs = dict(
        surrogate=surrogate, critical_layers=1, core_experts=6, steps=10, lr=0.3, min_gain=None, max_confidence=None
    )
    runs = {mode: C3PO(rm, index, tok, recompute=mode, **kwargs) for mode in ("suffix", "layers", "full")}
    adapted = {mode: c3po.adapt(test) for mode, c3po in runs.items()}
    reference = adapted["full"].pathway
    for mode in ("suffix", "layers"):
        for layer in reference.layers:
            assert torch.equal(adapted[mode].pathway.experts[layer], reference.experts[layer])
            diff = (adapted[mode].pathway.omega(layer) - reference.omega(layer)).abs().max()
            assert diff <= 1e-5, f"{mode}: mixing weights differ by {diff}"
        torch.testing.assert_close(adapted[mode].gain, adapted["full"].gain, rtol=0, atol=1e-5)
    predictions = {mode: runs[mode].score_choices(test, adapted[mode]) for mode in runs}
    assert predictions["suffix"] == predictions["full"] == predictions["layers"]


def test_suffix_recompute_moves_the_weights(family_setup):
    """The equality above is not vacuous: NGD moves the mixing weights away from the base routing."""
    rm, tok, index = family_setup
    test = _items(4, 2)
    kwargs = dict(critical_layers=1, core_experts=6, min_gain=None, max_confidence=None, lr=0.3)
    moved = C3PO(rm, index, tok, steps=10, **kwargs).adapt(test).pathway
    base = C3PO(rm, index, tok, steps=0, **kwargs).adapt(test).pathway
    assert max(float((moved.omega(i) - base.omega(i)).abs().max()) for i in moved.layers) > 1e-3


def test_no_gradient_left_on_offsets_or_weights(family_setup):
    rm, tok, index = family_setup
    test = _items(2, 3)
    for surrogate in ("ngd", "oracle"):
        C3PO(
            rm, index, tok, surrogate=surrogate, critical_layers=1, steps=2, max_confidence=None, max_typicality=None
        ).adapt(test)
    assert all(rm.layer(i).offsets.grad is None and rm.layer(i).offsets.requires_grad for i in rm.moe_layers)
    assert all(p.grad is None for p in rm.model.parameters())


def test_suffix_scorer_equals_a_full_forward_and_runs_repeated_rows_once(family_setup):
    """``SuffixScorer`` under re-mixing at the last prompt token: the scores of a full forward; a neighbour repeated
    across items (the same row twice) runs once on entry."""
    rm, tok, index = family_setup
    rows = [index.items[i] for i in (0, 1, 0, 2, 1)]
    batch = gold_batch(tok, rows)
    layer = rm.moe_layers[-1]
    own = own_pathway({layer: index.pathways[[0, 1, 0, 2, 1], -1]}, [layer], 4)
    mixing = {layer: torch.randn(5, 4, generator=torch.Generator().manual_seed(0))}
    pathway = Pathway([layer], own.experts, mixing)
    positions = torch.tensor([[batch.prompt_len - 1]])
    seen_rows = []
    hook = rm.model.register_forward_pre_hook(
        lambda m, a, kw: seen_rows.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad(), SuffixScorer(rm, batch, layer, batch.prompt_len - 1) as score:
            pathway.install(rm, positions)
            ours = score()
        pathway.install(rm, positions)
        with torch.no_grad():
            full = continuation_logprobs(rm.model, batch)
    finally:
        hook.remove()
        rm.clear_mixing()
    assert seen_rows[0][0] == 3  # three distinct rows on entry
    assert seen_rows[1] == (5, batch.input_ids.shape[1] - batch.prompt_len + 1)  # the step: 5 rows, suffix only
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = continuation_logprobs(rm.model, batch)
    assert (ours - base).abs().max() > 1e-4  # the re-mixing reached the suffix forward


# ------------------------------------------------------------------ the neighbours' prefix states across calls


def _omega_gap(a: Pathway, b: Pathway) -> float:
    return max(float((a.omega(layer) - b.omega(layer)).abs().max()) for layer in a.layers)


@pytest.mark.parametrize("surrogate", ["ngd", "kernel"])
def test_prefix_cache_across_calls_gives_the_uncached_result(family_setup, surrogate):
    """A second batch whose neighbours were cached by the first adapts as with no cache at all."""
    rm, tok, index = family_setup
    kwargs = dict(
        surrogate=surrogate,
        critical_layers=1,
        core_experts=6,
        lr=0.3,
        min_gain=None,
        max_confidence=None,
        max_typicality=None,
    )
    cached, plain = C3PO(rm, index, tok, **kwargs), C3PO(rm, index, tok, prefix_cache_mib=0, **kwargs)
    first, second = _items(6, 2), _items(6, 5)
    cached.adapt(first)
    hits = cached.prefix_store.hits
    ours, reference = cached.adapt(second), plain.adapt(second)
    assert cached.prefix_store.hits > hits  # neighbours of the second batch came from the first call
    assert len(plain.prefix_store) == 0  # prefix_cache_mib=0: nothing kept
    assert torch.equal(ours.neighbours, reference.neighbours)
    assert _omega_gap(ours.pathway, reference.pathway) <= 1e-5
    torch.testing.assert_close(ours.gain, reference.gain, rtol=0, atol=1e-5)
    assert cached.score_choices(second, ours) == plain.score_choices(second, reference)


@pytest.fixture(scope="module")
def olmoe_setup():
    rm = reroute.attach(tiny_model("olmoe"))
    tok = tiny_tokenizer()
    return rm, tok, ReferenceIndex.build(rm, tok, _items(48, 1), progress=False)


def _change_offsets(rm):
    rm.set_offsets({rm.moe_layers[0]: torch.linspace(-3.0, 3.0, rm.num_experts)})


def _change_mask(rm):
    rm.set_mask(reroute.ExpertMask(banned=(0, 1, 2)), rm.moe_layers[0])


def _change_policy(rm):
    rm.set_policy(reroute.RoutingPolicy(top_k=1), rm.moe_layers[0])


def _change_weights(rm):
    with torch.no_grad():  # in place, as an optimiser step or load_state_dict writes
        rm.model.model.layers[0].self_attn.o_proj.weight.mul_(2.0)


def _replace_weights(rm):
    attention = rm.model.model.layers[0].self_attn
    attention.o_proj.weight = torch.nn.Parameter(attention.o_proj.weight.detach() * 2.0)


@pytest.mark.parametrize("change", [_change_offsets, _change_mask, _change_policy, _change_weights, _replace_weights])
def test_prefix_cache_is_emptied_when_the_model_or_its_routing_changes(olmoe_setup, change):
    """After a change of the base routing state or of the weights, the cached C3PO recomputes the neighbours'
    prefixes and adapts as a fresh, uncached one does under the new state (never as before the change)."""
    rm, tok, index = olmoe_setup
    kwargs = dict(critical_layers=1, core_experts=6, lr=0.3, min_gain=None, max_confidence=None, max_typicality=None)
    cached = C3PO(rm, index, tok, **kwargs)
    items = _items(4, 2)
    weights = {name: p.detach().clone() for name, p in rm.model.named_parameters()}
    attention = rm.model.model.layers[0].self_attn
    saved_projection = attention.o_proj.weight
    try:
        before = cached.adapt(items)
        cached.adapt(items)
        assert cached.prefix_store.misses == len(cached.prefix_store)  # the second call: every row from the cache
        store = cached.prefix_store
        hits, misses = store.hits, store.misses
        change(rm)
        after = cached.adapt(items)
        fresh = C3PO(rm, index, tok, prefix_cache_mib=0, **kwargs).adapt(items)
        # emptied: every row of the call after the change recomputed, none taken from before
        assert store.hits == hits and store.misses - misses == len(store) > 0
    finally:
        rm.reset()
        attention.o_proj.weight = saved_projection
        with torch.no_grad():
            for name, p in rm.model.named_parameters():
                p.copy_(weights[name])
    assert torch.equal(after.neighbours, fresh.neighbours)
    assert _omega_gap(after.pathway, fresh.pathway) <= 1e-5
    assert _omega_gap(after.pathway, before.pathway) > 1e-4  # the change matters: stale state would show


def test_prefix_cache_respects_its_memory_bound(olmoe_setup):
    """A cache smaller than a batch's neighbours keeps at most its budget (least recently used dropped first) and
    changes no result."""
    rm, tok, index = olmoe_setup
    kwargs = dict(critical_layers=1, core_experts=6, lr=0.3, min_gain=None, max_confidence=None, max_typicality=None)
    unbounded = C3PO(rm, index, tok, **kwargs)
    reference = [unbounded.adapt(_items(4, seed)) for seed in (2, 5)]
    entry = max(e.nbytes for e in unbounded.prefix_store.entries.values())
    budget = 3 * entry
    bounded = C3PO(rm, index, tok, prefix_cache_mib=budget / 2**20, **kwargs)
    for seed, expected in zip((2, 5), reference):
        got = bounded.adapt(_items(4, seed))
        store = bounded.prefix_store
        assert store.max_bytes == budget and 0 < store.nbytes <= budget and len(store) <= 3
        assert store.nbytes == sum(e.nbytes for e in store.entries.values())
        assert _omega_gap(got.pathway, expected.pathway) <= 1e-5
    assert len(unbounded.prefix_store) > 3  # the bound did bite


def test_prefix_store_drops_the_least_recently_used_entry_first():
    store = PrefixStore(max_bytes=3 * 4 * 10)

    def entry():
        return RowPrefix([torch.zeros(10)], [], None, False)  # 40 bytes

    for key in "abc":
        store.put((key,), entry())
    assert store.get(("a",)) is not None  # a is now the most recent
    store.put(("d",), entry())
    assert list(store.entries) == [("c",), ("a",), ("d",)] and store.nbytes == 120
    store.put(("big",), RowPrefix([torch.zeros(31)], [], None, False))  # larger than the whole budget: not kept
    assert ("big",) not in store.entries and store.nbytes == 120
    assert (store.hits, store.misses) == (1, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixStore(max_bytes=-1)
    with pytest.raises(ValueError, match="prefix_cache_mib"):
        C3POConfig(prefix_cache_mib=-1.0)


# ------------------------------------------------------------------ the one prompt forward records what C3PO reads


def test_prompt_forward_records_only_the_last_column_and_the_hidden_mean(olmoe_setup):
    """Same pathways, confidence and hidden-state query as recording every layer and token, with a recording
    of ``[N, E]`` per MoE layer and ``[N, H]``: the full recording is over ``seq_len`` times larger."""
    rm, tok, _ = olmoe_setup
    prompts = [item["prompt"] for item in _items(3, 7)]
    batch = prompt_batch(tok, prompts)
    asked = []
    hook = rm.model.register_forward_pre_hook(
        lambda m, a, kw: asked.append(kw.get("output_hidden_states")), with_kwargs=True
    )
    try:
        state = prompt_forward(rm, batch, hidden=True)
    finally:
        hook.remove()
    assert asked == [None]  # not every layer's hidden states
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), rm.trace() as trace:
        out = rm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
        )
    full = torch.stack([trace.scores(layer)[:, -1].float() for layer in rm.moe_layers], dim=1)
    assert torch.equal(state.pathways, full)
    assert torch.equal(state.confidence, torch.softmax(out.logits[:, -1].float(), -1).max(-1).values)
    assert torch.equal(state.embedding, HiddenStateEmbedder()(rm, tok, prompts))
    rows, seq = batch.input_ids.shape
    hidden_size = rm.model.config.hidden_size
    assert state.recorded_bytes == 4 * rows * (len(rm.moe_layers) * rm.num_experts + hidden_size)
    tensors = [t for records in trace.records.values() for r in records for t in (r.logits, r.indices, r.weights)]
    full_bytes = sum(t.numel() * t.element_size() for t in [*tensors, *out.hidden_states])
    assert full_bytes > seq * state.recorded_bytes


@pytest.fixture
def compile_with_aot_eager(monkeypatch, family_setup):
    """Compiled steps trace as on any device (dynamo + AOTAutograd) but run without Inductor's code generation. The
    experts run as ``batched_mm``: transformers 5.17's CPU fallback of ``grouped_mm`` reads its group sizes on the
    host in its backward, which no graph can hold (on CUDA ``grouped_mm`` is native, and reroute's kernels are ops)."""
    import reroute.prefix
    from reroute.compat import set_experts_implementation

    monkeypatch.setitem(reroute.prefix.STEP_COMPILE, "default", {"backend": "aot_eager"})
    configs = {id(m.config): m.config for m in family_setup[0].model.modules() if hasattr(m, "gate_up_proj")}
    saved = {key: config._experts_implementation for key, config in configs.items()}
    for config in configs.values():
        set_experts_implementation(config, "batched_mm")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for key, config in configs.items():
        set_experts_implementation(config, saved[key])


@pytest.mark.parametrize("surrogate", ["ngd", "oracle"])
def test_compiled_steps_equal_eager_steps(family_setup, surrogate, compile_with_aot_eager):
    """recompute='suffix-compiled' (each step compiled, gradients through the compiled graph) gives the eager suffix
    recompute's weights, gains and predictions; across calls with new batch shapes it compiles at most once more
    (dynamic sizes after the first change), then never."""
    if surrogate == "oracle" and family_setup[0].family.model_type != "olmoe":
        pytest.skip("the oracle runs NGD's loop on its own rows: one family covers it (compiling is slow)")
    from torch._dynamo.utils import counters

    rm, tok, index = family_setup
    kwargs = dict(
        surrogate=surrogate, critical_layers=2, core_experts=6, steps=6, lr=0.3, min_gain=None, max_confidence=None
    )
    eager, compiled = (C3PO(rm, index, tok, recompute=mode, **kwargs) for mode in ("suffix", "suffix-compiled"))
    graphs = []
    for call, (n, seed, length) in enumerate([(4, 2, 9), (3, 5, 11), (2, 8, 12)]):
        test = _items(n, seed, length)
        before = counters["stats"]["unique_graphs"]
        want, got = eager.adapt(test), compiled.adapt(test)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        for layer in want.pathway.layers:
            assert torch.equal(got.pathway.experts[layer], want.pathway.experts[layer])
            diff = (got.pathway.omega(layer) - want.pathway.omega(layer)).abs().max()
            assert diff <= 1e-5, f"call {call}: mixing weights differ by {diff}"
        torch.testing.assert_close(got.gain, want.gain, rtol=0, atol=1e-5)
        assert compiled.score_choices(test, got) == eager.score_choices(test, want)
    # the first call compiles the step with and without gradients (NGD's last step scores without): two graphs
    assert graphs[0] == 2 and graphs[2] == 0, graphs


def test_a_step_that_does_not_compile_as_one_graph_says_so(family_setup, compile_with_aot_eager):
    """A graph break in the step (here a hook on the last decoder layer) is a clear error naming the eager
    alternative, and the model is left with no re-mixing installed."""
    from reroute.prefix import decoder_layers

    rm, tok, index = family_setup
    if rm.family.model_type != "olmoe":
        pytest.skip("one family shows the error path")
    handle = decoder_layers(rm)[-1].register_forward_hook(lambda *args: torch._dynamo.graph_break())
    try:
        c3po = C3PO(rm, index, tok, critical_layers=1, steps=2, min_gain=None, max_confidence=None,
                    recompute="suffix-compiled")  # fmt: skip
        with pytest.raises(RuntimeError, match="compile as one graph.*recompute='suffix'"):
            c3po.adapt(_items(2, 3))
    finally:
        handle.remove()
    assert all(rm.layer(layer).mixing is None for layer in rm.moe_layers)


def test_kernel_regression_scores_every_candidate_in_one_forward(family_setup):
    """All blends of all items run as one batch; the loss table equals one plain forward per candidate."""
    rm, tok, index = family_setup
    test = _items(3, 2)
    c3po = C3PO(rm, index, tok, surrogate="kernel", critical_layers=2, core_experts=6)
    state = prompt_forward(rm, prompt_batch(tok, [item["prompt"] for item in test]))
    own = own_pathway({i: state.pathways[:, p] for i, p in zip(c3po.layers, c3po.layer_pos)}, c3po.layers, 6)
    found = c3po._neighbours(test)
    weights = kernel_weights(found.similarity)
    batch, positions = c3po._neighbour_batch(found.ids)
    target = core_average(index.pathways[found.ids], c3po.layer_pos, own.experts, c3po.layers, weights)
    alphas = (0.0, 0.5, 1.0)
    calls = []
    handle = rm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        result = kernel_regression(rm, own, target, batch, weights, positions, alphas, recompute="full")
    finally:
        handle.remove()
    assert len(calls) == 1
    reference = []
    for alpha in alphas:
        for layer in own.layers:
            mix = alpha * own.omega(layer) + (1 - alpha) * target[layer]
            rm.set_mixing(layer, own.experts[layer], positions, logits=mix.clamp(min=1e-30).log())
        try:
            with torch.no_grad(), rm.row_expansion(weights.shape[-1]):
                nll = -continuation_logprobs(rm.model, batch).view(len(test), -1)
        finally:
            rm.clear_mixing(own.layers)
        reference.append((nll * weights).sum(-1))
    table = torch.stack(reference, dim=1)  # [B, A]
    torch.testing.assert_close(result.loss_before, table[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.loss_after, table.min(dim=1).values, rtol=0, atol=1e-5)
    best = table.argmin(dim=1)
    for layer in own.layers:
        for row, a in enumerate(best.tolist()):
            mix = alphas[a] * own.omega(layer)[row] + (1 - alphas[a]) * target[layer][row]
            torch.testing.assert_close(result.pathway.logits[layer][row], mix.clamp(min=1e-30).log())
