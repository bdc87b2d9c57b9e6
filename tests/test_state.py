"""Trace helpers, saving/loading adaptation state, and every bad input named in the foundation issue."""

from __future__ import annotations

import hashlib
import json
import math
import traceback
from pathlib import Path

import pytest
import torch

import reroute
from reroute import ExpertMask, RoutingPolicy
from reroute.testing import tiny_model


def test_trace_shapes_usage_and_entropy(family, model, tokens):
    rm = reroute.attach(model)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    with rm.trace() as trace:
        model.generate(tokens, attention_mask=mask, max_new_tokens=3, do_sample=False)
    layer = rm.moe_layers[0]
    assert len(trace.records[layer]) == 3  # prefill + 2 decode steps that route (the last token is not fed back)
    total = tokens.shape[1] + 2
    assert trace.logits(layer).shape == (2, total, rm.num_experts)
    assert trace.indices(layer).shape[:2] == (2, total)
    usage = trace.expert_usage()
    assert usage.shape == (len(rm.moe_layers), rm.num_experts)
    torch.testing.assert_close(usage.sum(-1), torch.ones(len(rm.moe_layers)))
    counts = trace.expert_usage(normalize=False)
    assert counts[0].sum() == (trace.weights(layer) != 0).sum()
    full = torch.ones(2, total, dtype=torch.long)
    full[0, :2] = 0
    masked = trace.expert_usage(attention_mask=full, normalize=False)
    assert masked[0].sum() < counts[0].sum()
    entropy = trace.entropy()
    assert entropy.shape == (len(rm.moe_layers),)
    assert ((entropy >= 0) & (entropy <= math.log(rm.num_experts) + 1e-5)).all()
    # the recorded indices are what the rule gives for the recorded logits
    controller = rm.layer(layer)
    flat = trace.logits(layer)[:, : tokens.shape[1]].reshape(-1, rm.num_experts)
    _, expected = controller.rule.route(controller.router, flat, flat.dtype)
    assert torch.equal(trace.indices(layer)[:, : tokens.shape[1]].reshape(expected.shape), expected)


def test_trace_errors_are_clear(model, tokens):
    rm = reroute.attach(model)
    with rm.trace() as trace:
        pass
    with pytest.raises(ValueError, match="recorded nothing"):
        trace.logits(rm.moe_layers[0])
    with pytest.raises(KeyError, match="not an MoE layer"):
        trace.logits(99)


def test_save_load_round_trip(family, model, tokens, tmp_path):
    rm = reroute.attach(model)
    gen = torch.Generator().manual_seed(2)
    rm.set_offsets(torch.randn(len(rm.moe_layers), rm.num_experts, generator=gen))
    rm.set_policy(RoutingPolicy(top_k=1), layers=rm.moe_layers[-1])
    rm.set_mask(ExpertMask(banned=(1,)), layers=rm.moe_layers[0])
    with torch.no_grad():
        adapted = model(tokens).logits
    rm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "reroute_config.json").read_text())
    assert config["fingerprint"]["model_type"] == family
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    rm.reset()
    with torch.no_grad():
        assert not torch.equal(model(tokens).logits, adapted)
    rm.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, adapted)


def test_load_onto_other_architecture_is_an_error_and_changes_nothing(tmp_path):
    source = reroute.attach(tiny_model("olmoe"))
    source.set_offsets(torch.ones(len(source.moe_layers), source.num_experts))
    source.save_pretrained(tmp_path)
    for other in ("mixtral", "deepseek_v3"):
        target = reroute.attach(tiny_model(other))
        before = target.offsets.stack()
        with pytest.raises(ValueError, match="saved for a 'olmoe' model"):
            target.load_pretrained(tmp_path)
        assert torch.equal(target.offsets.stack(), before)
    with pytest.raises(FileNotFoundError):
        source.load_pretrained(tmp_path / "missing")
    (tmp_path / "reroute_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        source.load_pretrained(tmp_path)


def _state(rm):
    return [
        (layer.offsets.detach().clone(), layer.row_offsets, layer.policy, layer.mask, layer.mixing)
        for layer in rm.layers.values()
    ]


def _unchanged(rm, before) -> bool:
    after = _state(rm)
    return all(
        torch.equal(a[0], b[0]) and a[1] is b[1] and a[2] == b[2] and a[3] == b[3] and a[4] is b[4]
        for a, b in zip(after, before)
    )


E = 8


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda rm: rm.set_offsets(torch.zeros(len(rm.moe_layers), E + 1)), ValueError, "shape"),
        (lambda rm: rm.set_offsets({rm.moe_layers[0]: torch.zeros(E, dtype=torch.long)}), TypeError, "floating"),
        (lambda rm: rm.set_offsets({rm.moe_layers[0]: torch.zeros(E, device="meta")}), ValueError, "is on meta"),
        (
            lambda rm: rm.set_offsets({rm.moe_layers[0]: torch.tensor([float("nan")] + [0.0] * (E - 1))}),
            ValueError,
            "NaN",
        ),
        (
            lambda rm: rm.set_offsets({rm.moe_layers[0]: torch.tensor([float("inf")] + [0.0] * (E - 1))}),
            ValueError,
            "inf",
        ),
        (lambda rm: rm.set_offsets({0: torch.zeros(E), 99: torch.zeros(E)}), KeyError, "not an MoE layer"),
        (lambda rm: rm.set_offsets([1, 2]), TypeError, "tensor"),
        (lambda rm: rm.set_row_offsets(torch.zeros(2, E)), ValueError, "B, num_layers, E"),
        (lambda rm: rm.set_row_offsets({rm.moe_layers[0]: torch.full((2, E), float("nan"))}), ValueError, "NaN"),
        (lambda rm: rm.set_policy(RoutingPolicy(top_k=E + 1)), ValueError, "exceeds"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=E + 1)), ValueError, "exceeds"),
        (lambda rm: rm.set_policy(RoutingPolicy(top_k=1), layers=[42]), KeyError, "not an MoE layer"),
        (lambda rm: rm.set_mask(ExpertMask(banned=tuple(range(E)))), ValueError, "bans every expert"),
        (lambda rm: rm.set_mask(ExpertMask(banned=tuple(range(E - 1)))), ValueError, "leaves 1 experts"),
        (lambda rm: rm.set_mask(ExpertMask(forced=(E,))), ValueError, "out of range"),
        (lambda rm: rm.set_mask(ExpertMask(forced=(0, 1, 2))), ValueError, "forced experts exceed"),
        (lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0, E], positions=[1]), ValueError, "out of range"),
        (lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0, 0], positions=[1]), ValueError, "repeat"),
        (
            lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0, 1], positions=[1], logits=torch.zeros(3)),
            ValueError,
            "shape",
        ),
        (
            lambda rm: rm.set_mixing(
                rm.moe_layers[0], experts=[0, 1], positions=[1], weights=torch.tensor([-1.0, 2.0])
            ),
            ValueError,
            "non-negative",
        ),
        (lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0.0, 1.0], positions=[1]), TypeError, "integer"),
        (lambda rm: rm.layer(1.5), TypeError, "int"),
        # issue 14 item 15: fractional positions and 3-D experts were accepted
        (
            lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0, 1], positions=5.7),
            TypeError,
            "integer tensor of token positions",
        ),
        (lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[[[0, 1]]], positions=[1]), ValueError, "3-d"),
        (lambda rm: rm.set_mixing(rm.moe_layers[0], experts=[0, 1], positions=[[[1]]]), ValueError, "3-d"),
        # issue 14 item 17: raw IndexError / AttributeError before
        (lambda rm: rm.set_offsets(torch.tensor(1.0)), ValueError, "0-d"),
        (lambda rm: rm.set_offsets({rm.moe_layers[0]: torch.tensor(1.0)}), ValueError, "shape"),
        (lambda rm: rm.set_policy({"top_k": 1}), TypeError, "RoutingPolicy"),
        (lambda rm: rm.set_mask({"banned": (1,)}), TypeError, "ExpertMask"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows=[0.5]), TypeError, "integer row indices"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows=[]), ValueError, "rows is empty"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows=[-1]), ValueError, "non-negative"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows=[[0]]), ValueError, "one-dimensional"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows=[False, False]), ValueError, "selects no row"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), rows="01"), TypeError, "rows"),
        (lambda rm: rm.set_policy(None, rows=[0]), ValueError, "needs a policy"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), layers=[]), ValueError, "layers is empty"),
        # issue 14 item 18: layer keys that are True meant layer 1
        (lambda rm: rm.set_offsets({True: torch.zeros(E)}), TypeError, "bool"),
        (lambda rm: rm.set_policy(RoutingPolicy(rank=2), layers=True), TypeError, "bool"),
        (lambda rm: rm.set_mask(ExpertMask(banned=(1,)), layers=[True]), TypeError, "bool"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_is_a_clear_error_and_changes_nothing(call, error, match):
    rm = reroute.attach(tiny_model("olmoe"))
    rm.set_offsets({0: torch.ones(E)})
    before = _state(rm)
    with pytest.raises(error, match=match):
        call(rm)
    assert _unchanged(rm, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(rank=0), "rank"),
        (dict(top_k=2, rank=1), "at most one"),
        (dict(max_experts=2), "only applies"),
    ],
)
def test_bad_policies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingPolicy(**kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RoutingPolicy(top_k=True),
        lambda: RoutingPolicy(rank=True),
        lambda: RoutingPolicy(top_p=True),
        lambda: RoutingPolicy(top_k=2.0),
        lambda: RoutingPolicy(top_k="2"),
        lambda: RoutingPolicy(top_p="0.5"),
        lambda: RoutingPolicy(top_p=0.5, max_experts=True),
        lambda: RoutingPolicy(renormalize=1),
        lambda: ExpertMask(banned=(1.7,)),
        lambda: ExpertMask(banned="12"),
        lambda: ExpertMask(banned=3),
        lambda: ExpertMask(forced=(True,)),
    ],
    ids=[
        "top_k-bool", "rank-bool", "top_p-bool", "top_k-float", "top_k-str", "top_p-str", "max_experts-bool",
        "renormalize-int", "banned-float", "banned-str", "banned-int", "forced-bool",
    ],
)  # fmt: skip
def test_coercion_rejects_bools_floats_and_strings(make):
    """Issue 14 item 16: ``top_k=True`` was accepted, ``banned=(1.7,)`` became ``(1,)`` and ``'12'`` ``(1, 2)``."""
    with pytest.raises(TypeError, match="must be"):
        make()


def test_coercion_accepts_integer_like_numbers():
    """Issue 14 item 16: ``top_k=np.int64(2)`` was rejected."""
    np = pytest.importorskip("numpy")
    policy = RoutingPolicy(top_k=np.int64(2))
    assert policy == RoutingPolicy(top_k=2) and type(policy.top_k) is int
    assert RoutingPolicy(top_p=np.float32(0.5)).top_p == 0.5
    assert RoutingPolicy(rank=torch.tensor(2)).rank == 2
    mask = ExpertMask(banned=(np.int64(1), torch.tensor(3)), forced=np.array([2]))
    assert mask == ExpertMask(banned=(1, 3), forced=(2,)) and all(type(i) is int for i in mask.banned + mask.forced)
    rm = reroute.attach(tiny_model("olmoe"))
    rm.set_offsets({np.int64(rm.moe_layers[0]): torch.ones(E)})
    assert rm.offsets[rm.moe_layers[0]].sum() == E
    rm.set_policy(RoutingPolicy(rank=2), rows=np.array([1]))


def test_banned_and_forced_overlap():
    with pytest.raises(ValueError, match="both banned and forced"):
        ExpertMask(banned=(1,), forced=(1,))


def test_routing_scope_restores_previous_state(model, tokens):
    rm = reroute.attach(model)
    with torch.no_grad():
        base = model(tokens).logits
    with rm.routing(RoutingPolicy(rank=2)):
        with torch.no_grad():
            weak = model(tokens).logits
    assert not torch.equal(weak, base)
    assert all(layer.policy is None for layer in rm.layers.values())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base)


def test_offsets_table_for_optimisers(family, model, tokens):
    rm = reroute.attach(model)
    if family == "phimoe":
        # SparseMixer's inference weights are locally constant in the logits; the generic top-2 path
        # (renormalised softmax) is differentiable
        rm.set_policy(RoutingPolicy(top_k=2))
    assert list(rm.offsets) == rm.moe_layers and len(rm.offsets) == len(rm.moe_layers)
    optimizer = torch.optim.Adam(rm.offsets.parameters(), lr=0.1)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    assert rm.offsets.norm() > 0
    assert rm.layer(-1) is rm.layer(rm.moe_layers[-1])
    rm.offsets.zero_()
    assert rm.offsets.norm() == 0


def _raised_in(excinfo: pytest.ExceptionInfo) -> str:
    """``module:function`` where the error (or, for a wrapped error, its cause) was raised."""
    error = excinfo.value
    while error.__cause__ is not None:
        error = error.__cause__
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).stem}:{frame.name}"


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda rm, d: rm.set_offsets({0: torch.zeros(E, dtype=torch.long)}), TypeError),
        (lambda rm, d: rm.set_offsets({0: torch.full((E,), float("nan"))}), ValueError),
        (lambda rm, d: rm.set_offsets({0: torch.zeros(E + 1)}), ValueError),
        (lambda rm, d: rm.set_row_offsets({0: torch.zeros(2, E - 1)}), ValueError),
        (lambda rm, d: rm.set_row_offsets({0: torch.full((2, E), float("inf"))}), ValueError),
        (lambda rm, d: rm.set_mixing(0, experts=[0, 1], positions=[1], logits=torch.zeros(3)), ValueError),
        (lambda rm, d: rm.set_mixing(0, experts=[0, 1], positions=[1], weights=torch.tensor([1, 2])), TypeError),
        (lambda rm, d: rm.set_mixing(0, experts=[0.0, 1.0], positions=[1]), TypeError),
        (lambda rm, d: rm.set_mixing(0, experts=[0, 1], positions=[True]), TypeError),
        (lambda rm, d: rm.load_pretrained(_tampered(d, **{"offsets.0": torch.zeros(E, dtype=torch.long)})), ValueError),
        (lambda rm, d: rm.load_pretrained(_tampered(d, **{"offsets.0": torch.zeros(E + 1)})), ValueError),
        (lambda rm, d: rm.load_pretrained(_tampered(d, **{"row_offsets.0": torch.zeros(2, E).long()})), ValueError),
        (lambda rm, d: rm.replay(_float_routes(rm)).__enter__(), ValueError),
    ],
    ids=[
        "offsets-dtype",
        "offsets-nan",
        "offsets-shape",
        "row-offsets-shape",
        "row-offsets-inf",
        "mixing-logits-shape",
        "mixing-weights-dtype",
        "mixing-experts-dtype",
        "mixing-positions-dtype",
        "file-offsets-dtype",
        "file-offsets-shape",
        "file-row-offsets-dtype",
        "routes-indices-dtype",
    ],
)
def test_every_tensor_is_checked_by_the_one_validator(call, error, tmp_path):
    """Issue 13 item 5: the setters, saved state folders and recorded routes share one tensor validator
    (``reroute.routing.checks.check_tensor``): each bad tensor is refused there, before anything changes."""
    rm = reroute.attach(tiny_model("olmoe"))
    rm.set_row_offsets({0: torch.zeros(2, E)})
    rm.save_pretrained(tmp_path / "state")
    rm.set_offsets({0: torch.ones(E)})
    before = _state(rm)
    with pytest.raises(error) as excinfo:
        call(rm, tmp_path / "state")
    assert _raised_in(excinfo) == "checks:check_tensor", excinfo.value
    assert _unchanged(rm, before)


def _tampered(folder: Path, **tensors: torch.Tensor) -> Path:
    """``folder`` with some tensors replaced (and the checksum in its config updated to match)."""
    from safetensors.torch import load_file, save_file

    from reroute.pretrained import CONFIG_NAME, STATE_NAME

    save_file({**load_file(str(folder / STATE_NAME)), **tensors}, str(folder / STATE_NAME))
    record = json.loads((folder / CONFIG_NAME).read_text())
    record["tensors_sha256"] = hashlib.sha256((folder / STATE_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(record))
    return folder


def _float_routes(rm):
    """Routes recorded on ``rm`` whose expert ids were turned into floats."""
    with torch.no_grad(), rm.record() as routes:
        rm.model(torch.tensor([[3, 4, 5], [6, 7, 8]]))  # two rows, as the row offsets set
    segment = routes.segments[0]
    segment.indices = {idx: ind.float() for idx, ind in segment.indices.items()}
    return routes
