"""Continuous rerouting: adaptation phases on tiny models."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import Collect
from torch.overrides import TorchFunctionMode

import reroute
from reroute.frozen import frozen, frozen_weights
from reroute.rerouting import Rerouter, RerouterConfig, adapt_phase, context_loss, routing_confidence, select_layers
from reroute.rerouting.method import _ReroutingScorer
from reroute.testing import tiny_model


@pytest.fixture
def rm():
    return reroute.attach(tiny_model("qwen3_moe"))


@pytest.fixture
def context():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


def _phase(rm, ids, mask, **cfg):
    config = RerouterConfig(**{"steps": 5, "lr": 0.2, **cfg})
    layers = select_layers(rm, config, routing_confidence(rm, ids, mask))
    delta = torch.zeros(ids.shape[0], len(layers), rm.num_experts)
    return adapt_phase(rm, config, layers, delta, ids, mask), layers


def test_phase_lowers_the_context_loss(rm, context):
    ids, mask = context
    with torch.no_grad():
        plain = context_loss(rm, ids, mask)
    result, _ = _phase(rm, ids, mask)
    torch.testing.assert_close(result.loss_before, plain)
    assert (result.loss_after < result.loss_before).all()
    with torch.no_grad():  # the δ left installed is the one that gave loss_after
        torch.testing.assert_close(context_loss(rm, ids, mask), result.loss_after)
    assert result.forward_passes == 6 and result.backward_passes == 5
    weights = list(rm.model.parameters())  # δ only: no weight gradient computed or kept, flags restored
    assert all(p.grad is None and p.requires_grad for p in weights)


def test_rows_adapt_independently(rm, context):
    ids, mask = context
    batched, layers = _phase(rm, ids, mask, layers="all")
    for row in range(ids.shape[0]):
        rm.reset()
        alone, _ = _phase(rm, ids[row : row + 1], mask[row : row + 1], layers="all")
        # Adam divides by sqrt(v): entries with near-zero gradient amplify float32 reduction-order noise, so the
        # tolerance is 0.5% of one lr-sized step
        torch.testing.assert_close(alone.delta[0], batched.delta[row], rtol=1e-3, atol=1e-3)


def test_padding_does_not_enter_the_loss(rm, context):
    ids, mask = context
    other = ids.clone()
    other[0, :4] = 7  # different tokens under the padding
    with torch.no_grad():
        torch.testing.assert_close(context_loss(rm, ids, mask)[0], context_loss(rm, other, mask)[0])


def test_nan_loss_is_rolled_back_with_a_warning(rm, context):
    ids, mask = context
    config = RerouterConfig(steps=3, lr=0.1, layers="all")
    layers = select_layers(rm, config, None)
    delta = torch.zeros(ids.shape[0], len(layers), rm.num_experts)

    def diverge(module, args, output):  # the model blows up as soon as δ moves away from zero
        moved = any(layer.row_offsets is not None and layer.row_offsets.abs().sum() > 0 for layer in rm.layers.values())
        return output * float("nan") if moved else output

    handle = rm.model.lm_head.register_forward_hook(diverge)
    with pytest.warns(UserWarning, match="rolled back"):
        result = adapt_phase(rm, config, layers, delta, ids, mask)
    handle.remove()
    assert result.rolled_back and torch.equal(result.delta, torch.zeros_like(delta))  # the last finite δ
    assert torch.isfinite(result.loss_after).all()


def test_norm_clipping_and_l2(rm, context):
    ids, mask = context
    clipped, _ = _phase(rm, ids, mask, lr=1.0, max_norm=0.05, layers="all")
    assert (clipped.delta.norm(dim=-1) <= 0.05 + 1e-5).all()
    rm.reset()
    free, _ = _phase(rm, ids, mask, lr=0.3, layers="all")
    rm.reset()
    penalised, _ = _phase(rm, ids, mask, lr=0.3, l2=10.0, layers="all")
    assert penalised.delta.norm() < free.delta.norm()


def test_layer_selection(rm, context):
    ids, mask = context
    confidence = routing_confidence(rm, ids, mask)
    assert set(confidence) == set(rm.moe_layers) and all(c > 0 for c in confidence.values())
    top = max(confidence, key=confidence.get)
    low = min(confidence, key=confidence.get)
    hard = select_layers(rm, RerouterConfig(layers="confidence", ratio=0.34, prefer="uncertain"), confidence)
    assert list(hard) == [top]  # 'uncertain': the highest C_i, as the paper's formula selects
    confident = select_layers(rm, RerouterConfig(layers="confidence", ratio=0.34), confidence)
    assert list(confident) == [low]  # the default, 'confident': the lowest C_i, as the paper's text says
    soft = select_layers(rm, RerouterConfig(layers="confidence", selection="soft", prefer="uncertain"), confidence)
    assert soft[top] > soft[low] and math.isclose(sum(soft.values()), len(soft), rel_tol=1e-5)
    assert list(select_layers(rm, RerouterConfig(layers=[2, 1]), None)) == [1, 2]
    with pytest.raises(KeyError, match="not an MoE layer"):
        select_layers(rm, RerouterConfig(layers=[7]), None)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(interval=0),
        dict(steps=-1),
        dict(lr=0.0),
        dict(lr=float("nan")),
        dict(lr=float("inf")),
        dict(layers="some"),
        dict(ratio=0.0),
        dict(selection="medium"),
        dict(prefer="both"),
        dict(max_norm=0.0),
        dict(l2=-1.0),
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        RerouterConfig(**kwargs)


def _prompt():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def test_zero_steps_reproduces_generate_token_for_token(rm):
    ids, mask = _prompt()
    plain = rm.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(
        Rerouter(rm, steps=0).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), plain
    )
    torch.manual_seed(3)
    sampled = rm.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(3)
    assert torch.equal(
        Rerouter(rm, steps=0).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20),
        sampled,
    )


def test_late_stop_keeps_output_and_phases_when_the_extra_step_adapts(rm, monkeypatch):
    """decode()'s late stop (CUDA; forced on the CPU here) runs one step beyond the end when every row ends by
    EOS. With interval 2 and every row ending by its second token, that extra step is a phase boundary: it adapts,
    and drop_last_step forgets that phase. Same tokens, same phases, δ gone after the call."""
    import reroute.generation as generation

    ids, mask = _prompt()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    free = Rerouter(rm, interval=2, steps=2).generate(**kwargs)
    kwargs["eos_token_id"] = sorted(set(free[:, ids.shape[1] + 1].tolist()))  # every row ends by its 2nd token

    def run():
        method = Rerouter(rm, interval=2, steps=2)
        return method.generate(**kwargs), [phase.loss_after for phase in method.phases]

    now, now_phases = run()
    monkeypatch.setattr(generation, "LATE_STOP_DEVICES", ("cuda", "cpu"))
    adapted = []
    phase = _ReroutingScorer._phase
    monkeypatch.setattr(_ReroutingScorer, "_phase", lambda self, ids: (adapted.append(1), phase(self, ids))[1])
    late, late_phases = run()
    assert now.shape[1] <= ids.shape[1] + 2 and torch.equal(late, now)
    assert len(adapted) == len(now_phases) + 1  # the extra step did adapt ...
    assert len(late_phases) == len(now_phases) and all(map(torch.equal, late_phases, now_phases))  # ... forgotten
    assert all(layer.row_offsets is None for layer in rm.layers.values())


def test_rebuilt_cache_equals_a_fresh_prefill_under_the_adapted_router(rm):
    ids, mask = _prompt()
    interval = 3
    rerouter = Rerouter(rm, steps=2, lr=0.3, interval=interval, layers="all")
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=interval + 1, do_sample=False)
    out = rerouter.generate(**call, return_dict_in_generate=True, output_logits=True)
    assert len(rerouter.phases) == 2  # prefill + after `interval` tokens
    delta = rerouter.phases[-1].delta  # the final δ
    context = out.sequences[:, : ids.shape[1] + interval]
    context_mask = torch.cat([mask, torch.ones(2, interval, dtype=mask.dtype)], 1)
    rm.set_row_offsets({layer: delta[:, j] for j, layer in enumerate(rm.moe_layers)})
    with torch.no_grad():
        fresh = rm.model(
            context,
            attention_mask=context_mask,
            position_ids=(context_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
    rm.reset()
    torch.testing.assert_close(out.logits[-1], fresh.logits[:, -1].float(), rtol=1e-5, atol=1e-5)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    fresh_cache = getattr(fresh, "cache", None) or getattr(fresh, "past_key_values", None)
    for layer in range(len(rm.model.model.layers)):
        torch.testing.assert_close(cache.layers[layer].keys, fresh_cache.layers[layer].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.layers[layer].values, fresh_cache.layers[layer].values, rtol=1e-5, atol=1e-5)
    # the stale cache is a different (approximate) computation
    stale = Rerouter(rm, steps=2, lr=0.3, interval=interval, layers="all", rebuild_cache=False).generate(
        **call, return_dict_in_generate=True, output_logits=True
    )
    assert not torch.allclose(stale.logits[-1], out.logits[-1])


def test_rows_are_isolated_and_state_resets_between_prompts(rm):
    ids, mask = _prompt()
    rerouter = Rerouter(rm, steps=2, lr=0.3, interval=4, layers="all")
    batched = rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False)
    alone = rerouter.generate(input_ids=ids[1:], attention_mask=mask[1:], max_new_tokens=9, do_sample=False)
    length = alone.shape[1]  # alone stops at its EOS; in the batch the row is padded after it
    assert torch.equal(batched[1, :length], alone[0]) and (batched[1, length:] == 0).all()
    again = rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False)
    assert torch.equal(again, batched)  # δ started from zero again
    assert all(layer.row_offsets is None for layer in rm.layers.values())


def test_front_doors_sampling_and_streamer(rm):
    from reroute.rerouting import rerouting_generate

    ids, mask = _prompt()
    obj = Rerouter(rm, steps=2, lr=0.2, interval=3).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False
    )
    custom = rm.model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        custom_generate=rerouting_generate,
        steps=2,
        lr=0.2,
        interval=3,
    )
    assert torch.equal(obj, custom)
    streamer = Collect()
    out = Rerouter(rm, steps=1, interval=2).generate(
        input_ids=ids[:1], max_new_tokens=4, do_sample=True, num_return_sequences=3, streamer=streamer
    )
    assert out.shape == (3, ids.shape[1] + 4) and streamer.ended == 1 and len(streamer.puts) == 5


def test_bad_inputs(rm):
    with pytest.raises(KeyError, match="not an MoE layer"):
        Rerouter(rm, layers=[9])
    too_long = torch.randint(3, 96, (1, rm.model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="context"):
        Rerouter(rm).generate(input_ids=too_long, max_new_tokens=1)


def test_user_row_offsets_stay_under_delta_and_come_back(rm):
    """Row offsets set before generate() are the base δ adds to, and are back (the same tensors) afterwards."""
    ids, mask = _prompt()
    gen = torch.Generator().manual_seed(3)
    user = {idx: torch.randn(ids.shape[0], rm.num_experts, generator=gen) for idx in rm.moe_layers}
    rm.set_row_offsets(user)
    with torch.no_grad():
        expected_before = context_loss(rm, ids, mask)
    rerouter = Rerouter(rm, steps=2, lr=0.2, layers="all")
    rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(rerouter.phases[0].loss_before, expected_before)  # δ = 0 on top of the user's
    assert all(rm.layer(idx).row_offsets is user[idx] for idx in rm.moe_layers)


def test_layers_are_selected_per_row(rm, context):
    """'confidence' selection ranks the layers of each row by its own C_i: a row adapts the layers it would adapt
    alone, whatever its batch-mates; δ stays zero on the layers it did not select."""
    ids, mask = context
    config = RerouterConfig(layers="confidence", ratio=0.34, steps=2, lr=0.2)
    per_row = routing_confidence(rm, ids, mask, per_row=True)
    layers = select_layers(rm, config, per_row)
    rerouter = Rerouter(rm, config)
    rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    delta = rerouter.phases[0].delta
    assert delta.shape[1] == len(layers)
    chosen_sets = []
    for b in range(ids.shape[0]):
        alone = select_layers(rm, config, routing_confidence(rm, ids[b : b + 1], mask[b : b + 1]))
        chosen = {idx for idx, weight in layers.items() if weight[b] == 1.0}
        assert chosen == set(alone)
        chosen_sets.append(frozenset(chosen))
        for j, idx in enumerate(layers):
            assert (delta[b, j].abs().sum() > 0) == (idx in chosen)
    assert len(set(chosen_sets)) > 1, "the rows of this context choose different layers"


def test_no_gradient_is_left_on_the_layer_offsets(rm, context):
    ids, mask = context
    Rerouter(rm, steps=2, layers="all").generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert all(p.grad is None and p.requires_grad for p in rm.offsets.parameters())


def test_protocol_path_selects_per_row_and_keeps_user_row_offsets(rm, context):
    """The registry's path (adapt_contexts, applied, split/stack, generate_from) adapts as generate()'s first phase
    does: layers chosen per row, δ on top of the user's row offsets, which are back (the same tensors) after each
    call."""
    from reroute.scoring import ContinuationBatch, padded_logits

    ids, mask = context
    gen = torch.Generator().manual_seed(5)
    user = {idx: torch.randn(ids.shape[0], rm.num_experts, generator=gen) for idx in rm.moe_layers}
    rm.set_row_offsets(user)
    config = RerouterConfig(layers="confidence", ratio=0.34, steps=2, lr=0.2)
    method = Rerouter(rm, config)
    prompts = ContinuationBatch(ids, mask, torch.zeros_like(ids, dtype=torch.bool), ids.shape[1])
    state = method.adapt_contexts([{"prompt": ""}] * ids.shape[0], prompts)
    assert all(rm.layer(idx).row_offsets is user[idx] for idx in rm.moe_layers)
    reference = Rerouter(rm, config)
    reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    torch.testing.assert_close(state.delta, reference.phases[0].delta)
    chosen = [frozenset(idx for idx, w in state.layers.items() if w[b] == 1.0) for b in range(ids.shape[0])]
    assert len(set(chosen)) > 1, "the rows of this context choose different layers"

    restacked = method.stack_states(method.split_state(state, ids.shape[0]))
    assert list(restacked.layers) == list(state.layers)
    assert all(torch.equal(restacked.layers[idx], state.layers[idx]) for idx in state.layers)
    assert torch.equal(restacked.delta, state.delta)

    logits = method.next_token_logits(prompts, state)
    rm.set_row_offsets({idx: user[idx] + state.delta[:, j] for j, idx in enumerate(state.layers)})
    with torch.no_grad():
        expected = padded_logits(rm.model, ids, mask)[:, :-1]
    rm.set_row_offsets(user)
    torch.testing.assert_close(logits, expected)
    assert all(rm.layer(idx).row_offsets is user[idx] for idx in rm.moe_layers)

    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    ours = method.generate_from(ids, mask, state, **kwargs)
    theirs = Rerouter(rm, config).generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)
    assert all(rm.layer(idx).row_offsets is user[idx] for idx in rm.moe_layers)


def _public_setter_phase(rm, config, layers, ids, mask, base):
    """Reference for :func:`adapt_phase`: the same Adam steps, with δ (plus ``base``) installed before every step
    through the validating public ``rm.set_row_offsets`` and plain full forwards."""
    order = list(layers)
    param = torch.zeros(ids.shape[0], len(order), rm.num_experts, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=config.lr)

    def install():
        rm.set_row_offsets(
            {idx: param[:, j] + (0 if base.get(idx) is None else base[idx]) for j, idx in enumerate(order)}
        )

    losses = []
    with frozen_weights(rm.model), frozen(rm.offsets.parameters()):
        for _ in range(config.steps):
            install()
            loss = context_loss(rm, ids, mask)
            losses.append(loss.detach())
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            install()
            losses.append(context_loss(rm, ids, mask))
    return param.detach(), losses


@pytest.mark.parametrize("user_offsets", [False, True], ids=["alone", "on-user-row-offsets"])
def test_phase_equals_the_public_setter_loop_bit_for_bit(rm, context, user_offsets):
    """Issue 13 item 3: the phase installs δ through the unchecked setter each step; the result is bit-identical to
    validating every step through ``rm.set_row_offsets``. With the user's row offsets under δ this also checks that
    every step sees that step's δ (before, δ + base was installed once, so all steps evaluated the first δ)."""
    ids, mask = context
    gen = torch.Generator().manual_seed(11)
    base = {
        idx: torch.randn(ids.shape[0], rm.num_experts, generator=gen) if user_offsets else None for idx in rm.moe_layers
    }
    config = RerouterConfig(steps=4, lr=0.2, layers="all", reuse_prefix=False)
    layers = select_layers(rm, config, None)
    expected, losses = _public_setter_phase(rm, config, layers, ids, mask, base)
    rm.reset()
    delta = torch.zeros(ids.shape[0], len(layers), rm.num_experts)
    result = adapt_phase(rm, config, layers, delta, ids, mask, base=base)
    assert torch.equal(result.delta, expected)
    assert torch.equal(result.loss_before, losses[0]) and torch.equal(result.loss_after, losses[-1])
    assert not torch.equal(losses[1], losses[0])  # the second step ran at the moved δ


def test_phase_steps_neither_validate_nor_read_back(rm, context, monkeypatch):
    """Issue 13 item 3: a phase validates δ once (its final install through the public setter) and adds no
    validation and no host read (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()`` ...) in reroute's code per step."""
    from reroute.routing.checks import check_tensor

    validated = []

    def counting(*args, **kwargs):
        validated.append(args[1])
        return check_tensor(*args, **kwargs)

    monkeypatch.setattr(sys.modules["reroute.attach"], "check_tensor", counting)
    ids, mask = context
    package = str(Path(reroute.__file__).parent)
    counts = {}
    for steps in (1, 4):
        config = RerouterConfig(steps=steps, lr=0.2, layers="all")
        layers = select_layers(rm, config, None)
        delta = torch.zeros(ids.shape[0], len(layers), rm.num_experts)
        validated.clear()
        with HostReads(package) as reads:
            adapt_phase(rm, config, layers, delta, ids, mask)
        counts[steps] = (len(validated), reads.count)
        rm.reset()
    assert counts[1][0] == len(rm.moe_layers)  # once per layer: the result, through rm.set_row_offsets
    assert counts[4] == counts[1]  # three more steps: no more validation, no more host reads from reroute


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that read a value back to the host, called directly from code under ``package``
    (transformers' and torch's own reads, e.g. Adam's CPU step counter, are not counted)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"}

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package, self.count = package, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and sys._getframe(1).f_code.co_filename.startswith(self.package):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def steps_with_aot_eager(monkeypatch):
    """Compiled steps traced as on any device (dynamo + AOTAutograd) without Inductor's code generation; experts as
    ``batched_mm`` (transformers 5.17's CPU ``grouped_mm`` reads group sizes on the host in its backward)."""
    import reroute.prefix

    monkeypatch.setitem(reroute.prefix.STEP_COMPILE, "default", {"backend": "aot_eager"})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_compiled_adaptation_steps_equal_eager_steps(family, steps_with_aot_eager):
    """compile_steps=True (each phase step compiled, gradients through the graph) gives the eager phases' δ and
    losses and the same tokens; a second call with the same shapes compiles nothing."""
    from torch._dynamo.utils import counters

    from reroute.compat import set_experts_implementation

    model = tiny_model(family)
    for module in model.modules():
        if hasattr(module, "gate_up_proj"):
            set_experts_implementation(module.config, "batched_mm")
    rm = reroute.attach(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    outputs, phases, graphs = {}, {}, []
    for compiled in (False, True, True):
        rerouter = Rerouter(rm, interval=3, steps=3, lr=0.2, compile_steps=compiled)
        before = counters["stats"]["unique_graphs"]
        outputs[compiled] = rerouter.generate(**call)
        phases[compiled] = list(rerouter.phases)
        if compiled:
            graphs.append(counters["stats"]["unique_graphs"] - before)
    assert torch.equal(outputs[True], outputs[False])
    assert len(phases[True]) == len(phases[False]) >= 2
    for got, want in zip(phases[True], phases[False]):
        torch.testing.assert_close(got.loss_after, want.loss_after, rtol=0, atol=1e-5)
    assert graphs[0] >= 2 and graphs[1] == 0, graphs  # with and without gradients; then reused


def test_compiled_adaptation_step_that_does_not_compile_says_so(context, steps_with_aot_eager):
    """A graph break in the step is a clear error naming the eager setting, and the call's routing state goes
    back."""
    from reroute.prefix import decoder_layers

    rm = reroute.attach(tiny_model("olmoe"))
    ids, mask = context
    handle = decoder_layers(rm)[-1].register_forward_hook(lambda *args: torch._dynamo.graph_break())
    try:
        with pytest.raises(RuntimeError, match="compile as one graph.*compile_steps=False"):
            Rerouter(rm, interval=4, steps=2, compile_steps=True).generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0
            )
    finally:
        handle.remove()
    assert all(rm.layer(i).row_offsets is None for i in rm.moe_layers)  # the call's state went back
