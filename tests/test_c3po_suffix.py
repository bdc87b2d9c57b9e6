"""C3PO's suffix-only recompute equals the full recompute (fp32 CPU), on tiny models of three families."""

from __future__ import annotations

import pytest
import torch

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.c3po.pathway import Pathway, own_pathway
from reroute.prefix import SuffixScorer
from reroute.scoring import continuation_logprobs, gold_batch
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
        C3PO(rm, index, tok, surrogate=surrogate, critical_layers=1, steps=2, max_confidence=None).adapt(test)
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
