"""SCMoE self-contrast decoding against a hand-computed example, a plain-PyTorch reference loop, ``generate()`` and
the routing trace."""

from __future__ import annotations

import json
import math

import pytest
import reference as ref
import torch
from conftest import Collect

import reroute
from reroute import RoutingPolicy, SCMoE, SCMoEConfig
from reroute.scmoe import RANDOM_OFFSET, self_contrast
from reroute.scmoe.method import suppress_tokens
from reroute.scoring import padded_logits
from reroute.testing import tiny_model, tiny_tokenizer

DESIGNS = ["one-batch", "two-pass"]


def contrast_model(family: str) -> torch.nn.Module:
    """A tiny model whose strong and weak logits differ enough for the contrast to change tokens: the random
    init gives near-uniform logits (std ~0.1), so the head and the experts are scaled up. No EOS."""
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # fixed-length outputs, comparable with the reference loop
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(3.0)
    return model


def prompts(batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded random prompts: row b has b pad tokens."""
    ids = torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b in range(batch):
        ids[b, :b], mask[b, :b] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def reference_decode(
    rm, ids: torch.Tensor, steps: int, beta: float, alpha: float, policy, layers=None, banned=()
) -> list[int]:
    """Greedy SCMoE for one unpadded prompt ``[S]``, written from Eq. 5-6 in the probability form: full forwards
    without a cache, strong = the model as it is, weak = ``rm.routing(policy)``; plausible tokens are those with
    ``p_strong >= alpha * max p_strong``; ``banned`` tokens get ``-inf`` (the authors' EOS ban)."""
    seq = ids.tolist()
    for _ in range(steps):
        x = torch.tensor([seq])
        with torch.no_grad():
            strong = rm.model(x).logits[0, -1].double()
            with rm.routing(policy, layers=layers):
                weak = rm.model(x).logits[0, -1].double()
        p = strong.softmax(-1)
        scores = (1 + beta) * strong - beta * weak
        scores[p < alpha * p.max()] = -math.inf
        scores[list(banned)] = -math.inf
        seq.append(int(scores.argmax()))
    return seq[len(ids) :]


# ------------------------------------------------------------------------------------------------ the contrast
def test_contrast_and_plausibility_mask_by_hand():
    strong = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    weak = torch.tensor([[1.0, 2.0, 0.0, -3.0]])
    # cut-off 2 + log 0.1 = -0.303: token 2 (-1.0) is implausible; 1.5 s - 0.5 w on the others:
    # 1.5 * 2 - 0.5 * 1 = 2.5, 1.5 * 1 - 0.5 * 2 = 0.5, 1.5 * 0 - 0.5 * (-3) = 1.5
    expected = torch.tensor([[2.5, 0.5, -math.inf, 1.5]])
    torch.testing.assert_close(self_contrast(strong, weak, beta=0.5, alpha=0.1), expected)
    # alpha = 1 keeps only the strong arg-max; beta = 0 is the strong logits on the plausible set
    only_top = self_contrast(strong, weak, beta=0.5, alpha=1.0)
    assert torch.isfinite(only_top).tolist() == [[True, False, False, False]]
    torch.testing.assert_close(self_contrast(strong, weak, 0.0, 0.1)[:, [0, 1, 3]], strong[:, [0, 1, 3]])
    # the logit form equals the log-probability form of the paper (softmax and arg-max agree)
    gen = torch.Generator().manual_seed(0)
    s, w = torch.randn(4, 50, generator=gen) * 3, torch.randn(4, 50, generator=gen) * 3
    logp = self_contrast(s.log_softmax(-1), w.log_softmax(-1), 0.7, 0.05)
    torch.testing.assert_close(self_contrast(s, w, 0.7, 0.05).softmax(-1), logp.softmax(-1))
    probs = s.softmax(-1)
    assert torch.equal(torch.isfinite(logp), probs >= 0.05 * probs.max(-1, keepdim=True).values)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("design", DESIGNS)
def test_beta_zero_is_greedy_generate(family, design):
    model = tiny_model(family)
    rm = reroute.attach(model)
    inputs = prompts()
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    actual = SCMoE(rm, beta=0.0, design=design).generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("design", DESIGNS)
def test_padded_batch_equals_reference_item_by_item(family, design):
    model = contrast_model(family)
    rm = reroute.attach(model)
    inputs = prompts()
    out = SCMoE(rm, beta=0.5, design=design).generate(**inputs, max_new_tokens=6, do_sample=False)
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, greedy), "the contrast should change some tokens of this model"
    prompt_len = inputs["input_ids"].shape[1]
    for b in range(3):
        expected = reference_decode(rm, inputs["input_ids"][b, b:], 6, 0.5, 0.1, RoutingPolicy(rank=2))
        assert out[b, prompt_len:].tolist() == expected, f"row {b}"


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v2", "glm4_moe", "phimoe"])
def test_designs_agree_when_sampling_with_return_sequences(family):
    model = contrast_model(family)
    rm = reroute.attach(model)
    inputs = prompts(batch=2)
    kwargs = dict(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_logits=True,
    )
    outputs = {}
    for design in DESIGNS:
        torch.manual_seed(7)
        outputs[design] = SCMoE(rm, beta=0.5, design=design).generate(**inputs, **kwargs)
    one, two = outputs["one-batch"], outputs["two-pass"]
    assert one.sequences.shape == (6, 12)
    assert torch.equal(one.sequences, two.sequences)
    for a, b in zip(one.logits, two.logits, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-4, atol=1e-4)
    # rows of one prompt are different samples of the same distribution
    assert len({tuple(r) for r in one.sequences[:3, 7:].tolist()}) > 1


def test_custom_generate_front_door_equals_the_object():
    model = contrast_model("qwen2_moe")
    rm = reroute.attach(model)
    inputs = prompts()
    for settings in (dict(do_sample=False), dict(do_sample=True, top_k=4, num_return_sequences=2)):
        torch.manual_seed(3)
        expected = SCMoE(rm, beta=0.3, alpha=0.05, weak="top1").generate(**inputs, max_new_tokens=5, **settings)
        torch.manual_seed(3)
        actual = model.generate(
            **inputs,
            max_new_tokens=5,
            custom_generate=reroute.scmoe_generate,
            beta=0.3,
            alpha=0.05,
            weak="top1",
            **settings,
        )
        assert torch.equal(actual, expected)
    config = SCMoEConfig(beta=0.9, weak="rank3", design="two-pass")
    expected = SCMoE(rm, config).generate(**inputs, max_new_tokens=5, do_sample=False)
    actual = model.generate(**inputs, max_new_tokens=5, custom_generate=reroute.scmoe_generate, scmoe_config=config)
    assert torch.equal(actual, expected)


def test_custom_generate_attaches_an_unattached_model():
    model = contrast_model("olmoe")
    inputs = prompts()
    out = model.generate(**inputs, max_new_tokens=4, custom_generate=reroute.scmoe_generate)
    expected = SCMoE(reroute.attach(model)).generate(**inputs, max_new_tokens=4)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("design", DESIGNS)
def test_streamer_eos_and_max_new_tokens(design):
    model = contrast_model("mixtral")
    rm = reroute.attach(model)
    scmoe = SCMoE(rm, design=design)
    inputs = prompts(batch=2)
    free = scmoe.generate(**inputs, max_new_tokens=6)
    prompt_len = inputs["input_ids"].shape[1]
    assert free.shape == (2, prompt_len + 6)
    eos = int(free[0, prompt_len + 1])
    assert eos != int(free[0, prompt_len]) and eos not in free[1, prompt_len:].tolist()
    stopped = scmoe.generate(**inputs, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, prompt_len:].tolist() == free[0, prompt_len : prompt_len + 2].tolist() + [0] * 4
    assert torch.equal(stopped[1], free[1])
    streamer = Collect()
    single = {k: v[:1] for k, v in inputs.items()}
    out = scmoe.generate(**single, max_new_tokens=6, eos_token_id=eos, streamer=streamer)
    assert out.shape == (1, prompt_len + 2)
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.puts], dim=1), out)
    assert streamer.ended == 1


def test_allow_eos_false_bans_eos_as_the_official_code():
    """allow_eos=False: EOS is -inf in the contrast (the authors' loop without --early_stop), so a prompt whose free
    decoding emits EOS runs to max_new_tokens and equals the reference loop with EOS banned."""
    model = contrast_model("mixtral")
    rm = reroute.attach(model)
    ids = prompts(batch=1)["input_ids"][0]
    free = SCMoE(rm).generate(input_ids=ids[None], max_new_tokens=6)[0, len(ids) :].tolist()
    eos = free[1]
    expected = reference_decode(rm, ids, 6, 0.5, 0.1, RoutingPolicy(rank=2), banned=[eos])
    for design in DESIGNS:
        scmoe = SCMoE(rm, design=design, allow_eos=False)
        out = scmoe.generate(input_ids=ids[None], max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        assert out[0, len(ids) :].tolist() == expected and eos not in expected
    stops = SCMoE(rm).generate(input_ids=ids[None], max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stops[0, len(ids) :].tolist() == free[:2]  # the default still stops at EOS


def test_eos_ban_never_leaves_a_row_without_a_finite_logit():
    strong = torch.tensor([[5.0, 0.0, -1.0], [0.0, 3.0, 2.9]])
    contrast = self_contrast(strong, torch.zeros_like(strong), beta=0.5, alpha=0.5)
    banned = suppress_tokens(contrast, strong, torch.tensor([0]))
    # row 0: EOS (token 0) was the only plausible token -> the strong logits without EOS; row 1 unchanged
    assert banned[0].tolist() == [-math.inf, 0.0, -1.0]
    assert torch.equal(banned[1], contrast[1])


def test_scoring_logprobs_are_the_contrast_where_plausible_and_strong_elsewhere():
    model = contrast_model("mixtral")
    rm = reroute.attach(model)
    inputs = prompts(batch=2)
    scmoe = SCMoE(rm, alpha=0.5)
    scored = scmoe.scoring_logprobs(**inputs)
    contrast = scmoe.contrasted_logits(**inputs)
    strong = torch.log_softmax(padded_logits(model, inputs["input_ids"], inputs["attention_mask"])[:, :-1], -1)
    plausible = torch.isfinite(contrast)
    assert torch.isfinite(scored).all() and (~plausible).any() and plausible.any()
    torch.testing.assert_close(scored[plausible], torch.log_softmax(contrast, -1)[plausible])
    torch.testing.assert_close(scored[~plausible], strong[~plausible])


def test_multiple_choice_is_not_ranked_by_minus_inf():
    """With alpha=1 only each position's top token is plausible: the old -inf scores tied every item (arg-max then
    picks choice 0); now choices are ranked by finite scores and no item ties."""
    from reroute.eval import make_method, run_eval

    rm = reroute.attach(contrast_model("olmoe"))
    tok = tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    items = [
        {
            "prompt": " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (6,), generator=gen)),
            "choices": [f" w{int(t)} w{int(t) + 1}" for t in torch.randperm(90, generator=gen)[:4] + 3],
            "label": 0,
        }
        for _ in range(6)
    ]
    result = run_eval(rm, tok, items, make_method("scmoe", alpha=1.0), mode="mc", progress=False)
    assert result.stats["ties"] == 0
    assert not all(result.correct)  # every label is 0: not every pick is choice 0
    old = torch.log_softmax(SCMoE(rm, alpha=1.0).contrasted_logits(*_choice_rows(tok, items)), -1)
    assert torch.isinf(old).any()  # the contrast itself is -inf off the plausible set


def _choice_rows(tok, items):
    from reroute.scoring import choice_batch

    batch, _ = choice_batch(tok, items)
    return batch.input_ids, batch.attention_mask


# ------------------------------------------------------------------------------------------------ routing
def _check_rows(family, rm, trace, rows, layers, real, **policy):
    """The traced routing of ``rows`` in ``layers`` against the reference, on real (non-padding) tokens."""
    for idx in layers:
        layer = rm.layer(idx)
        logits = trace.logits(idx)[rows][real[rows]].double()
        actual = ref.as_dicts(trace.indices(idx)[rows][real[rows]], trace.weights(idx)[rows][real[rows]])
        ref.assert_same_routing(actual, ref.route(family, layer.router, logits, **policy))


def _real_tokens(inputs, new_tokens, copies=2):
    """Bool ``[B * copies, S + new_tokens - 1]``: the routed tokens that are not padding (padding positions can
    have all-equal router logits, where the reference and torch.topk break ties differently)."""
    mask = inputs["attention_mask"].bool()
    mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens - 1, dtype=torch.bool)], dim=1)
    return mask.repeat_interleave(copies, dim=0)


def test_weak_rows_route_as_specified(family):
    model = contrast_model(family)
    rm = reroute.attach(model)
    weak_layers = rm.moe_layers[-1:] if len(rm.moe_layers) > 1 else rm.moe_layers
    other_layers = [i for i in rm.moe_layers if i not in weak_layers]
    inputs = prompts(batch=2)
    with rm.trace() as trace:
        SCMoE(rm, weak="rank2", layers=weak_layers).generate(**inputs, max_new_tokens=3)
    first = trace.indices(rm.moe_layers[0])
    assert first.shape[:2] == (4, 7 + 2)  # one-batch: rows strong, weak, strong, weak
    real = _real_tokens(inputs, 3)
    reference_family = family if family != "phimoe" else "mixtral"  # SparseMixer's policies use softmax weights
    _check_rows(reference_family, rm, trace, slice(1, None, 2), weak_layers, real, rank=2)
    if family != "phimoe":  # SparseMixer's own top-2 is not a reference rule
        _check_rows(family, rm, trace, slice(0, None, 2), rm.moe_layers, real)
        _check_rows(family, rm, trace, slice(1, None, 2), other_layers, real)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_weak_top_k_weighs_by_the_familys_rule(family):
    """weak="top1" renormalises where the family does (Mixtral: weight 1, as the authors' Mixtral code) and keeps
    the raw weights where it does not (OLMoE, DeepSeek-V2: the authors' DeepSeekMoE setting)."""
    model = contrast_model(family)
    rm = reroute.attach(model)
    inputs = prompts(batch=2)
    with rm.trace() as trace:
        SCMoE(rm, weak="top1").generate(**inputs, max_new_tokens=3)
    real = _real_tokens(inputs, 3)[1::2]
    for idx in rm.moe_layers:
        layer = rm.layer(idx)
        logits = trace.logits(idx)[1::2][real].double()
        expected = ref.route(family, layer.router, logits, top_k=1)
        actual = ref.as_dicts(trace.indices(idx)[1::2][real], trace.weights(idx)[1::2][real])
        ref.assert_same_routing(actual, expected)
        if family == "mixtral":
            assert all(abs(w - 1.0) < 1e-6 for token in actual for w in token.values())


def test_random1_draws_one_uniform_expert_per_token(family):
    model = contrast_model(family)
    rm = reroute.attach(model)
    inputs = prompts(batch=2)
    steps = 12
    with rm.trace() as trace:
        out = SCMoE(rm, weak="random1", seed=5).generate(**inputs, max_new_tokens=steps)
    prompt_len = inputs["input_ids"].shape[1]
    hits, total = 0, 0
    for idx in rm.moe_layers:
        layer = rm.layer(idx)
        weights, indices = trace.weights(idx)[1::2], trace.indices(idx)[1::2]
        used = weights != 0
        assert (used.sum(-1) == 1).all(), "one expert per weak token"
        expert = indices.gather(-1, used.float().argmax(-1, keepdim=True))[..., 0]
        torch.testing.assert_close(weights.sum(-1), torch.full(expert.shape, layer.rule.scaling(layer.router)))
        # undo the draw's offset: how often is the drawn expert the router's own first choice?
        signs = 2.0 * torch.nn.functional.one_hot(expert, layer.num_experts) - 1.0
        logits = trace.logits(idx)[1::2] - RANDOM_OFFSET * signs
        scores = layer.rule.choice(layer.router, layer.rule.scores(layer.router, logits.reshape(-1, layer.num_experts)))
        hits += int((scores.argmax(-1).reshape(expert.shape) == expert).sum())
        total += expert.numel()
        assert len(set(expert[:, prompt_len:].reshape(-1).tolist())) >= layer.num_experts // 2
        # prompt tokens are drawn per token too (the authors' code), not once per row
        assert len(set(expert[0, :prompt_len].tolist())) > 1
    assert hits / total < 0.4, "draws should be uniform, not the router's top choice (expected 1/8)"
    again = SCMoE(rm, weak="random1", seed=5, design="two-pass").generate(**inputs, max_new_tokens=steps)
    assert torch.equal(again, out)
    other = SCMoE(rm, weak="random1", seed=6).generate(**inputs, max_new_tokens=steps)
    assert not torch.equal(other, out)


# ------------------------------------------------------------------------------------------------ routing state
@pytest.mark.parametrize("design", DESIGNS)
def test_strong_routing_is_the_models_current_state_and_state_is_restored(design):
    model = contrast_model("olmoe")
    rm = reroute.attach(model)
    gen = torch.Generator().manual_seed(0)
    rm.set_offsets(torch.randn(len(rm.moe_layers), rm.num_experts, generator=gen))
    rm.set_row_offsets(torch.randn(3, len(rm.moe_layers), rm.num_experts, generator=gen))
    rm.set_mask(reroute.ExpertMask(banned=(3,)))
    before = [(layer.policy, layer.policy_rows, layer.row_offsets, layer.mask) for layer in rm.layers.values()]
    inputs = prompts()
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(SCMoE(rm, beta=0.0, design=design).generate(**inputs, max_new_tokens=5), expected)
    for weak in ("rank2", "random1"):
        SCMoE(rm, weak=weak, design=design).generate(**inputs, max_new_tokens=3)
    after = [(layer.policy, layer.policy_rows, layer.row_offsets, layer.mask) for layer in rm.layers.values()]
    assert all(a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3] for a, b in zip(after, before))


def test_one_batch_sets_the_weak_routing_once_per_call_and_restores_it_after_an_error(monkeypatch):
    """The one-batch rows are fixed for a call: the weak routing is written at the prefill, not at every step (on
    the compiled path each write is host work per token), and put back even when decoding fails midway."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    rm = reroute.attach(contrast_model("olmoe"))
    writes = []
    set_policy = rm.set_policy
    monkeypatch.setattr(rm, "set_policy", lambda *args, **kwargs: (writes.append(1), set_policy(*args, **kwargs))[1])
    out = SCMoE(rm).generate(**prompts(), max_new_tokens=6, min_new_tokens=6)
    assert out.shape[1] == prompts()["input_ids"].shape[1] + 6 and len(writes) == 1

    class FailAtThirdToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] >= prompts()["input_ids"].shape[1] + 3:
                raise RuntimeError("stopped by the test")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with pytest.raises(RuntimeError, match="stopped by the test"):
        SCMoE(rm).generate(**prompts(), max_new_tokens=6, stopping_criteria=StoppingCriteriaList([FailAtThirdToken()]))
    assert all(layer.policy is None and layer.policy_rows is None for layer in rm.layers.values())


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("sample", [False, True])
def test_late_stop_gives_the_same_output_with_one_step_more(monkeypatch, design, sample):
    """decode() reads "every row has finished" one step late on CUDA (no host wait per step); here forced on the
    CPU. Rows that end by EOS at different steps, all before the length limit: same sequences, scores and logits;
    the scorer ran exactly one step more."""
    import reroute.generation as generation

    rm = reroute.attach(contrast_model("olmoe"))
    inputs = prompts()
    free = SCMoE(rm, design=design).generate(**inputs, max_new_tokens=8, do_sample=False)
    eos = sorted(set(free[:, inputs["input_ids"].shape[1] + 2].tolist()))  # every row ends by its third token
    kwargs = dict(max_new_tokens=8, do_sample=sample, eos_token_id=eos, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    steps = []
    step = generation.ModelStream.step
    monkeypatch.setattr(generation.ModelStream, "step", lambda self, ids: (steps.append(1), step(self, ids))[1])

    def run():
        torch.manual_seed(0)
        steps.clear()
        return SCMoE(rm, design=design).generate(**inputs, **kwargs), len(steps)

    now, now_steps = run()
    monkeypatch.setattr(generation, "LATE_STOP_DEVICES", ("cuda", "cpu"))
    late, late_steps = run()
    assert now.sequences.shape[1] < inputs["input_ids"].shape[1] + 8  # ended by EOS, not by the limit
    assert torch.equal(late.sequences, now.sequences)
    for a, b in zip((late.scores, late.logits), (now.scores, now.logits)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    streams = 2 if design == "two-pass" else 1
    assert late_steps == now_steps + streams
    # ended by the length limit: nothing extra runs
    kwargs.update(eos_token_id=None, return_dict_in_generate=False)
    limit, limit_steps = run()
    monkeypatch.setattr(generation, "LATE_STOP_DEVICES", ("cuda",))
    assert torch.equal(limit, run()[0]) and limit_steps == run()[1]


def test_static_cache_serves_both_designs():
    rm = reroute.attach(contrast_model("olmoe"))
    inputs = prompts()
    expected = SCMoE(rm).generate(**inputs, max_new_tokens=5)
    for design in ("one-batch", "two-pass"):
        static = SCMoE(rm, design=design).generate(**inputs, max_new_tokens=5, cache_implementation="static")
        assert torch.equal(static, expected), design


def test_user_policy_needs_the_two_pass_design():
    model = contrast_model("mixtral")
    rm = reroute.attach(model)
    rm.set_policy(RoutingPolicy(top_k=1))
    inputs = prompts()
    with pytest.raises(ValueError, match="two-pass"):
        SCMoE(rm).generate(**inputs, max_new_tokens=3)
    assert rm.layer(rm.moe_layers[0]).policy == RoutingPolicy(top_k=1)
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)  # strong = top-1 everywhere
    actual = SCMoE(rm, beta=0.0, design="two-pass").generate(**inputs, max_new_tokens=5)
    assert torch.equal(actual, expected)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(beta="0.5"), TypeError, "beta"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(weak="rank0"), ValueError, "at least 1"),
        (dict(weak="second"), ValueError, "not understood"),
        (dict(weak="random2"), ValueError, "random1"),
        (dict(weak=2), TypeError, "weak"),
        (dict(layers=[]), ValueError, "empty"),
        (dict(layers=[1, 1]), ValueError, "repeats"),
        (dict(layers="1"), TypeError, "layers"),
        (dict(design="fast"), ValueError, "design"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        SCMoEConfig(**kwargs)


def test_config_round_trips_through_json():
    for config in (SCMoEConfig(), SCMoEConfig(beta=0.3, weak=RoutingPolicy(top_k=1), layers=[2, 1], seed=4)):
        assert SCMoEConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert SCMoEConfig(weak="rank-3").weak == "rank-3"


def test_bad_weak_routing_for_the_model():
    rm = reroute.attach(tiny_model("mixtral"))  # 8 experts, top-2
    with pytest.raises(ValueError, match="rank=9 needs at least 9 experts"):
        SCMoE(rm, weak="rank9")
    with pytest.raises(ValueError, match="more experts than the strong routing"):
        SCMoE(rm, weak="top3")
    with pytest.raises(KeyError, match="not an MoE layer"):
        SCMoE(rm, layers=[7])
    with pytest.warns(UserWarning, match="contrast is zero"):
        SCMoE(rm, weak=RoutingPolicy(top_k=2))
    with pytest.warns(UserWarning, match="contrast is zero"):
        SCMoE(rm, weak=RoutingPolicy())
    SCMoE(rm, weak="rank8")  # an expert top-2 never uses: allowed (paper Table 8)
    SCMoE(rm, weak=RoutingPolicy(top_k=2, renormalize=False))  # Mixtral renormalises: a different routing
    with pytest.raises(ValueError, match="beam search"):
        SCMoE(rm).generate(**prompts(), max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="another model"):
        tiny_model("mixtral").generate(**prompts(), max_new_tokens=2, custom_generate=SCMoE(rm).decoding_method)


def test_random1_respects_masks_and_refuses_what_it_cannot_force():
    rm = reroute.attach(contrast_model("deepseek_v3"))
    layer = rm.layer(rm.moe_layers[0])
    rm.set_mask(reroute.ExpertMask(banned=(0, 5)))
    with rm.trace() as trace:
        SCMoE(rm, weak="random1", seed=0).generate(**prompts(batch=2), max_new_tokens=8)
    for idx in rm.moe_layers:
        used = trace.indices(idx)[1::2][trace.weights(idx)[1::2] != 0]
        assert not {0, 5} & set(used.tolist())
    rm.set_mask(reroute.ExpertMask(forced=(1,)))
    with pytest.raises(ValueError, match="cannot make experts"):
        SCMoE(rm, weak="random1")
    rm.set_mask(None)
    with torch.no_grad():
        layer.router.e_score_correction_bias[3] = 5.0  # outranks a score of 1 for every other expert
    with pytest.raises(ValueError, match="cannot make experts"):
        SCMoE(rm, weak="random1")
    SCMoE(rm, weak="random1", layers=rm.moe_layers[1:])  # the other layers are fine
