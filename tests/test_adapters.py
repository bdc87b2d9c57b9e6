"""Amortised routing adapters: fitted offsets lower the reference loss, reload bit-identically and cost no graph."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

import reroute
from reroute.adapters import FIT_RECORD, AdapterConfig, fit_adapter, gold_loss
from reroute.testing import tiny_model, tiny_tokenizer


def _items(n: int = 12, seed: int = 0) -> list[dict]:
    """Prompts of 3-5 random words, the gold answer a word fixed by the first one (a learnable rule)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        words = torch.randint(3, 40, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator)
        prompt = " ".join(f"w{int(w)}" for w in words)
        items.append({"prompt": prompt, "answer": f" w{50 + int(words[0]) % 5}"})
    return items


def test_gold_loss_is_the_answer_nll_of_the_plain_model():
    model, tokenizer = tiny_model("olmoe"), tiny_tokenizer()
    items = _items(3)
    rm = reroute.attach(model)
    with torch.no_grad():
        losses = gold_loss(rm, tokenizer, items)
    for item, loss in zip(items, losses):
        prompt = tokenizer(item["prompt"])["input_ids"]
        whole = tokenizer(item["prompt"] + item["answer"])["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        expected = -sum(float(logprobs[t - 1, whole[t]]) for t in range(len(prompt), len(whole)))
        assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_fit_lowers_the_reference_loss_and_touches_only_the_fitted_layers():
    # the trained testbed, where routing decides answers (a tiny random model's outputs barely depend on it)
    from reroute.data import load_items
    from reroute.testbed import load_testbed

    model, tokenizer = load_testbed()
    rm = reroute.attach(model)
    items = load_items("reference_sets/testbed/reference.jsonl")[:16]
    fitted = rm.moe_layers[4:]
    config = AdapterConfig(steps=8, lr=0.1, batch_size=8, layers=fitted, prompt_field="question")
    fit = fit_adapter(rm, tokenizer, items, config)
    assert fit.loss_after < 0.8 * fit.loss_before
    with torch.no_grad():
        assert float(gold_loss(rm, tokenizer, items, "question").mean()) == pytest.approx(fit.loss_after, rel=1e-5)
    for idx in rm.moe_layers:
        if idx in fitted:
            assert torch.equal(rm.offsets[idx].detach(), fit.offsets[idx]) and fit.offsets[idx].norm() > 0
        else:
            assert torch.equal(rm.offsets[idx].detach(), torch.zeros(rm.num_experts))
    assert all(p.requires_grad for p in model.parameters()), "the model's own weights are thawed again"


def test_saved_adapter_reloads_bit_identically(tmp_path):
    tokenizer, tokens = tiny_tokenizer(), torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    model = tiny_model("mixtral")
    rm = reroute.attach(model)
    fit = fit_adapter(rm, tokenizer, _items(), steps=5, lr=0.2, batch_size=6)
    fit.save_pretrained(rm, tmp_path / "adapter")
    with torch.no_grad():
        adapted = model(tokens).logits
        fresh = tiny_model("mixtral")
        base = fresh(tokens).logits
        reroute.from_pretrained(fresh, tmp_path / "adapter")
        reloaded = fresh(tokens).logits
    assert not torch.equal(adapted, base)
    assert torch.equal(reloaded, adapted)
    record = json.loads((tmp_path / "adapter" / FIT_RECORD).read_text())
    assert record["config"]["steps"] == 5 and record["loss_after"] == fit.loss_after


def test_adapter_adds_no_compiled_graph_over_hand_set_offsets(tmp_path):
    tokenizer, tokens = tiny_tokenizer(), torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    fit_adapter(rm, tokenizer, _items(), steps=5, lr=0.2, batch_size=6)
    rm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        eager_adapter = model(tokens).logits
    rm.reset()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    try:
        with torch.no_grad():
            compiled(tokens)  # zero state
            rm.set_offsets({idx: torch.randn(rm.num_experts) for idx in rm.moe_layers})
            compiled(tokens)  # offsets set by hand
            by_hand = counters["stats"]["unique_graphs"]
            reroute.from_pretrained(model, tmp_path / "adapter")
            compiled_adapter = compiled(tokens).logits
        assert counters["stats"]["unique_graphs"] == by_hand
        assert torch.equal(compiled_adapter, eager_adapter)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"layers": "some"}, "layers must be"),
        ({"max_norm": 0.0}, "max_norm must be"),
    ],
)
def test_bad_config_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**options)


def test_bad_items_are_refused_before_anything_changes():
    model, tokenizer = tiny_model("olmoe"), tiny_tokenizer()
    rm = reroute.attach(model)
    rm.set_offsets({rm.moe_layers[0]: torch.ones(rm.num_experts)})
    before = rm.offsets.stack()
    with pytest.raises(ValueError, match="no 'question' field"):
        fit_adapter(rm, tokenizer, _items(), prompt_field="question")
    with pytest.raises(ValueError, match="no gold answer"):
        fit_adapter(rm, tokenizer, [{"prompt": "w3 w4"}])
    with pytest.raises(KeyError, match="not an MoE layer"):
        fit_adapter(rm, tokenizer, _items(), layers=[99])
    assert torch.equal(rm.offsets.stack(), before)


def _saved_adapter(rm, tokenizer, folder):
    """A small fitted adapter saved to ``folder``; ``rm`` back at zero state."""
    fit = fit_adapter(rm, tokenizer, _items(), steps=4, lr=0.3, batch_size=6)
    fit.save_pretrained(rm, folder)
    rm.reset()
    return fit


def test_adapter_method_scores_and_generates_as_the_loaded_adapter(tmp_path):
    from conftest import random_mc_items

    from reroute.eval import make_method
    from reroute.scoring import choice_batch, prompt_batch

    model, tokenizer = tiny_model("olmoe"), tiny_tokenizer()
    rm = reroute.attach(model)
    _saved_adapter(rm, tokenizer, tmp_path / "adapter")
    items = random_mc_items(4, 3, 5)
    rows, _ = choice_batch(tokenizer, items)
    prompts = prompt_batch(tokenizer, [item["prompt"] for item in items])
    method = make_method("adapter", adapter=str(tmp_path / "adapter")).build(rm, tokenizer)
    state = method.adapt_contexts(items, prompts)
    scores = method.continuation_logprobs(rows, state).logprob
    generated = method.generate_from(prompts.input_ids, prompts.attention_mask, state, max_new_tokens=3,
                                     do_sample=False)  # fmt: skip
    assert all(torch.equal(p, torch.zeros(rm.num_experts)) for p in rm.offsets.stack())  # put back after each call
    plain = make_method("base").build(rm, tokenizer)
    unadapted = plain.continuation_logprobs(rows).logprob
    reroute.from_pretrained(model, tmp_path / "adapter")  # the reference: the saved adapter loaded as routing state
    loaded = plain.continuation_logprobs(rows).logprob
    with torch.no_grad():
        expected = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                  max_new_tokens=3, do_sample=False)  # fmt: skip
    assert torch.equal(scores, loaded) and not torch.equal(scores, unadapted)
    assert torch.equal(generated, expected)


def test_adapter_with_c3po_on_top_is_c3po_on_the_adapted_model(tmp_path):
    from conftest import random_mc_items

    from reroute.c3po import ReferenceIndex
    from reroute.eval import make_method
    from reroute.scoring import choice_batch, prompt_batch

    model, tokenizer = tiny_model("olmoe"), tiny_tokenizer()
    rm = reroute.attach(model)
    fit = _saved_adapter(rm, tokenizer, tmp_path / "adapter")
    index = ReferenceIndex.build(rm, tokenizer, random_mc_items(60, 1, 5), progress=False)
    options = {"index": index, "surrogate": "ngd", "steps": 2, "critical_layers": 2, "core_experts": 6,
               "max_confidence": None, "min_gain": None}  # fmt: skip
    items = random_mc_items(4, 7, 5)
    rows, _ = choice_batch(tokenizer, items)
    prompts = prompt_batch(tokenizer, [item["prompt"] for item in items])
    method = make_method("adapter", adapter=fit, inner="c3po", inner_options=options).build(rm, tokenizer)
    state = method.adapt_contexts(items, prompts)
    scores = method.continuation_logprobs(rows, state).logprob
    rm.set_offsets(fit.offsets)
    c3po = make_method("c3po", **options).build(rm, tokenizer)
    expected_state = c3po.adapt_contexts(items, prompts)
    expected = c3po.continuation_logprobs(rows, expected_state).logprob
    assert torch.equal(scores, expected)
    assert method.gate_report(state) == c3po.gate_report(expected_state)
    assert method.stats["forward_passes"] == c3po.stats["forward_passes"] > 1  # the inner method's costs


def test_adapter_method_refuses_bad_adapters_before_anything_changes(tmp_path):
    from reroute.eval import make_method

    model, tokenizer = tiny_model("olmoe"), tiny_tokenizer()
    rm = reroute.attach(model)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_method("adapter", inner="nope")
    with pytest.raises(ValueError, match="another registered method"):
        make_method("adapter", inner="adapter")
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        make_method("adapter", adapter=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs adapter="):  # a tiny model is not the testbed
        make_method("adapter").build(rm, tokenizer)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        make_method("adapter", adapter={rm.moe_layers[0]: torch.ones(3)}).build(rm, tokenizer)
    rm.set_row_offsets({rm.moe_layers[0]: torch.ones(2, rm.num_experts)})
    rm.save_pretrained(tmp_path / "rows")
    with pytest.raises(ValueError, match="besides layer offsets"):
        make_method("adapter", adapter=str(tmp_path / "rows")).build(rm, tokenizer)
    assert all(torch.equal(p, torch.zeros(rm.num_experts)) for p in rm.offsets.stack())


def test_router_lora_fit_lowers_the_loss_and_reloads_bit_identically(tmp_path):
    peft = pytest.importorskip("peft")
    from reroute.adapters import fit_router_lora
    from reroute.data import load_items
    from reroute.testbed import load_testbed

    model, tokenizer = load_testbed()
    router = model.model.layers[3].mlp.gate.weight.detach().clone()
    items = load_items("reference_sets/testbed/reference.jsonl")[:16]
    config = AdapterConfig(steps=6, lr=0.05, batch_size=8, prompt_field="question")
    fit = fit_router_lora(model, tokenizer, items, config, rank=2)
    assert fit.loss_after < 0.9 * fit.loss_before and len(fit.history) == 6
    trained = [n for n, p in fit.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".mlp.gate." in n for n in trained)  # the routers' factors only
    assert torch.equal(model.model.layers[3].mlp.gate.base_layer.weight, router)  # the weight itself untouched
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        fitted = fit.model(tokens).logits
    fit.model.save_pretrained(tmp_path / "router-lora")
    fresh, _ = load_testbed()
    with torch.no_grad():
        base = fresh(tokens).logits
        reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "router-lora")(tokens).logits
    assert torch.equal(reloaded, fitted) and not torch.equal(reloaded, base)
    with pytest.raises(ValueError, match="rank must be"):
        fit_router_lora(load_testbed()[0], tokenizer, items, config, rank=0)
