"""Scoring continuations on the prompt's KV cache (each prompt runs once) equals scoring full rows (fp32 CPU), on
every family; C3PO's score_choices reuses its prompt forward's cache and gives the scores of the full forward."""

from __future__ import annotations

import pytest
import torch
from test_c3po_suffix import _items

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.compat import cache_holding
from reroute.scoring import (
    choice_batch,
    continuation_logprobs,
    continuation_logprobs_from,
    continuation_logprobs_shared,
    prompt_batch,
    prompt_forward_kv,
    shares_prompts,
)
from reroute.testing import TINY_CONFIGS, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_shared_prompt_scoring_equals_full_rows(family):
    # prompts of unequal lengths (left padding) longer than gpt_oss' 16-token sliding window
    batch, n = choice_batch(tiny_tokenizer(), _items(5, 3, length=24, answer=3))
    model = tiny_model(family)
    with torch.no_grad():
        full = continuation_logprobs(model, batch)
        shared = continuation_logprobs_shared(model, batch, n)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)


def test_shared_prompt_scoring_runs_each_prompt_once():
    batch, n = choice_batch(tiny_tokenizer(), _items(3, 3, length=12))
    model = tiny_model("olmoe")
    shapes = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        continuation_logprobs_shared(model, batch, n)
    handle.remove()
    p, t = batch.prompt_len, batch.input_ids.shape[1]
    assert shapes == [(3, p), (3 * n, t - p + 1)]


def test_shared_prompt_scoring_rejects_rows_that_do_not_share_their_prompt():
    tok = tiny_tokenizer()
    batch, n = choice_batch(tok, _items(3, 3, length=12))
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="groups of n=5"):
        continuation_logprobs_shared(model, batch, 5)
    with pytest.raises(ValueError, match="must share one prompt"):
        continuation_logprobs_shared(model, batch, 3)  # groups of 3 of 4 choices per item straddle two items
    prompts = prompt_batch(tok, [item["prompt"] for item in _items(3, 3, length=12)])
    assert shares_prompts(batch, prompts)
    other = prompt_batch(tok, [item["prompt"] for item in _items(3, 4, length=12)])
    assert not shares_prompts(batch, other)
    _, prefix = prompt_forward_kv(model, prompts.input_ids, prompts.attention_mask, batch.prompt_len)
    with pytest.raises(ValueError, match="reused prompt columns"):
        continuation_logprobs_from(model, batch, prefix)  # the last prompt column must run again


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def c3po_setup(request):
    rm = reroute.attach(tiny_model(request.param))
    tok = tiny_tokenizer()
    return rm, tok, ReferenceIndex.build(rm, tok, _items(48, 1, length=20), progress=False)


@pytest.mark.parametrize("surrogate", ["mode", "kernel", "ngd", "oracle", "official"])
@pytest.mark.parametrize("last_tokens", [1, 2])
def test_c3po_scoring_on_the_prompt_cache_equals_the_full_forward(c3po_setup, surrogate, last_tokens):
    rm, tok, index = c3po_setup
    test = _items(4, 2, length=20)
    c3po = C3PO(
        rm,
        index,
        tok,
        surrogate=surrogate,
        critical_layers=2,  # re-mixing at column P - 2 of the last layer alone would change no score
        core_experts=6,
        lr=0.3,
        last_tokens=last_tokens,
        min_gain=None,
        max_confidence=None,
        max_typicality=None,
    )
    adaptation = c3po.adapt(test)
    assert not bool(adaptation.abstained.any())
    full = c3po._choice_scores(test, adaptation)  # given an adaptation: one full row per choice
    shared = c3po._choice_scores(test)  # adapts, then scores on the prompt forward's cache
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    assert c3po.score_choices(test) == full.argmax(-1).tolist()
    # not vacuous: the re-mixing at the last prompt token(s), which the cache must leave out, moves the scores
    batch, n = choice_batch(tok, test)
    with torch.no_grad():
        base = continuation_logprobs(rm.model, batch).view(len(test), n)
    if surrogate != "oracle":  # the oracle may keep the base routing where no step improved the gold answer
        assert float((full - base).abs().max()) > 1e-4


def test_c3po_scoring_runs_each_prompt_once(c3po_setup):
    rm, tok, index = c3po_setup
    test = _items(4, 2, length=20)
    c3po = C3PO(rm, index, tok, surrogate="mode", critical_layers=1, max_confidence=None, max_typicality=None)
    lengths = []
    handle = rm.model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        c3po.score_choices(test)
    finally:
        handle.remove()
    batch, n = choice_batch(tok, test)
    p, t = batch.prompt_len, batch.input_ids.shape[1]
    assert lengths == [(4, p), (4 * n, t - p + 1)]


@pytest.mark.parametrize("surrogate", ["mode", "ngd", "official"])
def test_c3po_generate_starts_from_the_prompt_cache(c3po_setup, surrogate):
    rm, tok, index = c3po_setup
    prompts = [item["prompt"] for item in _items(3, 5, length=20)]
    c3po = C3PO(
        rm,
        index,
        tok,
        surrogate=surrogate,
        critical_layers=2,
        core_experts=6,
        lr=0.3,
        min_gain=None,
        max_confidence=None,
        max_typicality=None,
    )
    call = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    adaptation = c3po.adapt(prompts)
    full = c3po.generate(prompts, adaptation=adaptation, **call)  # given an adaptation: a full prefill
    lengths = []
    handle = rm.model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        shared = c3po.generate(prompts, **call)
    finally:
        handle.remove()
    prompt_len = full.sequences.shape[1] - 5
    assert lengths[0] == prompt_len  # the prompt forward (then, for NGD, the neighbours' forwards)
    assert lengths[-5:] == [1] * 5  # generate(): a prefill of the re-mixed column only, then 4 steps
    assert torch.equal(shared.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(shared.scores), torch.stack(full.scores), rtol=0, atol=1e-4)
    # beams, several sequences per prompt or a static cache: a full prefill, as before
    for extra in (dict(num_return_sequences=2, do_sample=True), dict(cache_implementation="static")):
        lengths.clear()
        handle = rm.model.register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        try:
            c3po.generate(prompts, **{**call, **extra})
        finally:
            handle.remove()
        assert lengths[-5] == prompt_len


def test_cache_holding_keeps_the_given_tensors_without_a_copy():
    kv = [(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)) for _ in range(3)]
    cache = cache_holding(kv)
    assert cache.get_seq_length() == 5
    for layer, (keys, values) in zip(cache.layers, kv):
        assert layer.keys.data_ptr() == keys.data_ptr() and layer.values.data_ptr() == values.data_ptr()
    before = [keys.clone() for keys, _ in kv]
    new_keys, _ = cache.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)
    assert new_keys.shape[-2] == 6 and torch.equal(new_keys[..., :5, :], before[0])
    assert all(torch.equal(keys, old) for (keys, _), old in zip(kv, before))  # the given tensors are never written


def test_shared_prefix_cache_returns_the_repeated_prompt_and_keeps_only_the_prompt():
    from reroute.scoring import _SharedPrefix

    kv = [(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)) for _ in range(2)]
    cache = _SharedPrefix(kv, repeats=3)
    new = torch.randn(6, 2, 4, 4)
    keys, values = cache.update(new, new + 1, 1)
    assert keys.shape == (6, 2, 9, 4)
    torch.testing.assert_close(keys[:, :, :5], kv[1][0].repeat_interleave(3, 0))
    torch.testing.assert_close(values[:, :, 5:], new + 1)
    assert cache.get_seq_length() == 5 and cache.layers[1].keys is kv[1][0]  # nothing stored: the prompt only
