"""peft-style save / load: ``rm.save_pretrained(dir)``, ``reroute.from_pretrained(model, dir)``, bad folders."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import reroute
from reroute import C3POConfig, ExpertMask, RerouteConfig, RerouterConfig, RoutingPolicy, SCMoEConfig
from reroute.pretrained import CONFIG_NAME, LEGACY_CONFIG_NAME, STATE_NAME, convert_legacy
from reroute.testing import tiny_model


def _adapt(rm: reroute.RoutedModel) -> None:
    """Every kind of layer state at once: offsets, per-row offsets, a row-limited policy, a mask, re-mixing."""
    gen = torch.Generator().manual_seed(3)
    first, last = rm.moe_layers[0], rm.moe_layers[-1]
    rm.set_offsets(torch.randn(len(rm.moe_layers), rm.num_experts, generator=gen))
    rm.set_row_offsets({last: torch.randn(2, rm.num_experts, generator=gen)})
    rm.set_policy(RoutingPolicy(top_k=1), layers=last, rows=[1])
    rm.set_mask(ExpertMask(banned=(1,)), layers=first)
    rm.set_mixing(first, experts=[0, 2, 3], positions=[[8], [7]], logits=torch.randn(2, 3, generator=gen))


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_round_trip_onto_a_fresh_model(family, model, tokens, tmp_path):
    rm = reroute.attach(model)
    _adapt(rm)
    adapted = _logits(model, tokens)
    rm.save_pretrained(tmp_path, method=C3POConfig(k=5, kernel_alphas=(0.0, 0.5)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, STATE_NAME]
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["family"] == family and record["format_version"] == 1
    state = record["state"]
    assert state["offsets"] == rm.moe_layers and state["row_offsets"] == [rm.moe_layers[-1]]
    assert state["policies"] == {str(rm.moe_layers[-1]): {"top_k": 1}} and state["policy_rows"] == [rm.moe_layers[-1]]
    assert state["masks"] == {str(rm.moe_layers[0]): {"banned": [1], "forced": []}}
    assert state["mixing"] == [rm.moe_layers[0]]

    fresh = tiny_model(family)  # same weights, nothing attached
    assert not torch.equal(_logits(fresh, tokens), adapted)
    loaded = reroute.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded, reroute.RoutedModel) and loaded.model is fresh
    assert torch.equal(_logits(fresh, tokens), adapted)
    assert RerouteConfig.from_pretrained(tmp_path).method_config() == C3POConfig(k=5, kernel_alphas=(0.0, 0.5))
    # the classmethod and load_pretrained on an attached model give the same routing
    rm.reset()
    assert torch.equal(rm.load_pretrained(tmp_path).offsets.stack(), loaded.offsets.stack())
    assert torch.equal(_logits(model, tokens), adapted)
    other = tiny_model(family)
    assert torch.equal(_logits(reroute.RoutedModel.from_pretrained(other, tmp_path).model, tokens), adapted)


def test_zero_state_round_trip_is_the_original_model(tokens, tmp_path):
    model = tiny_model("qwen3_moe")
    original = _logits(model, tokens)
    reroute.attach(model).save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["state"]["offsets"] == []
    fresh = tiny_model("qwen3_moe")
    reroute.from_pretrained(fresh, tmp_path)
    assert torch.equal(_logits(fresh, tokens), original)


@pytest.mark.parametrize(
    "method",
    [
        C3POConfig(surrogate="kernel", critical_layers=[1, 2], kernel_alphas=(0.25, 1.0)),
        RerouterConfig(interval=16, steps=2, layers=[0, 2], max_norm=1.5),
        SCMoEConfig(beta=0.3, weak=RoutingPolicy(top_k=1, renormalize=False), layers=(1, 2), seed=4),
        SCMoEConfig(weak="random1"),
    ],
    ids=["c3po", "rerouter", "scmoe-policy", "scmoe-name"],
)
def test_method_config_round_trip(method, tmp_path):
    rm = reroute.attach(tiny_model("olmoe"))
    rm.save_pretrained(tmp_path, method=method)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["method"]["type"] == type(method).__name__
    assert RerouteConfig.from_pretrained(tmp_path).method_config() == method


def test_method_objects_store_their_config(tmp_path):
    rm = reroute.attach(tiny_model("mixtral"))
    rm.save_pretrained(tmp_path, method=reroute.Rerouter(rm, steps=3, lr=0.01))
    assert RerouteConfig.from_pretrained(tmp_path).method_config() == RerouterConfig(steps=3, lr=0.01)
    rm.save_pretrained(tmp_path / "none")
    assert RerouteConfig.from_pretrained(tmp_path / "none").method_config() is None
    with pytest.raises(TypeError, match="method must be one of"):
        rm.save_pretrained(tmp_path / "bad", method={"steps": 3})


def _legacy_folder(rm: reroute.RoutedModel, folder) -> None:
    """What the older ``rm.save`` wrote (offsets, layer policies and masks), byte for byte its layout."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"offsets.{i}": layer.offsets.detach().cpu().contiguous() for i, layer in rm.layers.items()},
              str(folder / STATE_NAME))  # fmt: skip
    record = {
        "format": "reroute-routing-state",
        "version": 1,
        "fingerprint": rm.fingerprint(),
        "policies": {str(i): c.policy.to_dict() for i, c in rm.layers.items() if c.policy is not None},
        "masks": {str(i): c.mask.to_dict() for i, c in rm.layers.items() if c.mask is not None},
    }
    (folder / LEGACY_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def test_older_save_folders_load_through_the_one_converter(tokens, tmp_path):
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    rm.set_offsets(torch.ones(len(rm.moe_layers), rm.num_experts).cumsum(-1))
    rm.set_policy(RoutingPolicy(top_k=1), layers=rm.moe_layers[-1])
    rm.set_mask(ExpertMask(banned=(2,)), layers=rm.moe_layers[0])
    adapted = _logits(model, tokens)
    _legacy_folder(rm, tmp_path / "old")
    config, tensors = convert_legacy(tmp_path / "old")
    assert config.family == "olmoe" and config.state["policies"] == {str(rm.moe_layers[-1]): {"top_k": 1}}
    assert sorted(tensors) == sorted(f"offsets.{i}" for i in rm.moe_layers)
    fresh = tiny_model("olmoe")
    reroute.from_pretrained(fresh, tmp_path / "old")
    assert torch.equal(_logits(fresh, tokens), adapted)
    # saving again writes the one format (the older config is gone, nothing else in the folder)
    reroute.attach(fresh).save_pretrained(tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [CONFIG_NAME, STATE_NAME]


def test_deprecated_save_keeps_every_kind_of_state(tokens, tmp_path):
    """``rm.save`` used to drop per-row offsets, per-row policies and re-mixing; it is now ``save_pretrained``."""
    model = tiny_model("olmoe")
    rm = reroute.attach(model)
    _adapt(rm)
    adapted = _logits(model, tokens)
    with pytest.warns(DeprecationWarning, match="save_pretrained"):
        rm.save(tmp_path)
    fresh = reroute.attach(tiny_model("olmoe"))
    with pytest.warns(DeprecationWarning, match="load_pretrained"):
        fresh.load(tmp_path)
    assert torch.equal(_logits(fresh.model, tokens), adapted)
    last = fresh.layer(rm.moe_layers[-1])
    assert last.row_offsets is not None and last.policy_rows is not None
    assert fresh.layer(rm.moe_layers[0]).mixing is not None


def test_save_is_atomic(tmp_path, monkeypatch):
    rm = reroute.attach(tiny_model("olmoe"))
    rm.set_offsets({rm.moe_layers[0]: torch.full((rm.num_experts,), 1.0)})
    rm.save_pretrained(tmp_path / "state")
    before = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()}
    rm.set_offsets({rm.moe_layers[0]: torch.full((rm.num_experts,), 2.0)})

    def fail(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(RerouteConfig, "save_pretrained", fail)  # the JSON write fails after the tensors
    with pytest.raises(OSError, match="disk full"):
        rm.save_pretrained(tmp_path / "state")
    assert {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary folder left behind
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="it is a file; pass a folder path"):
        rm.save_pretrained(tmp_path / "file")


def test_a_folder_mixing_two_saves_is_refused(tmp_path):
    rm = reroute.attach(tiny_model("olmoe"))
    rm.save_pretrained(tmp_path / "a")
    rm.set_offsets({rm.moe_layers[0]: torch.full((rm.num_experts,), 1.0)})
    rm.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / STATE_NAME).write_bytes((tmp_path / "b" / STATE_NAME).read_bytes())
    target = _target()
    before = _state(target)
    with pytest.raises(ValueError, match="come from different saves"):
        target.load_pretrained(tmp_path / "a")
    assert _same(_state(target), before)


@pytest.fixture
def saved(tmp_path):
    rm = reroute.attach(tiny_model("olmoe"))
    _adapt(rm)
    rm.save_pretrained(tmp_path / "state")
    return tmp_path / "state"


def _state(rm):
    return [
        (layer.offsets.detach().clone(), layer.row_offsets, layer.policy, layer.policy_rows, layer.mask, layer.mixing)
        for layer in rm.layers.values()
    ]


def _same(a, b) -> bool:
    return all(
        all((x is y) or (isinstance(x, torch.Tensor) and torch.equal(x, y)) for x, y in zip(la, lb))
        for la, lb in zip(a, b)
    )


def _target():
    rm = reroute.attach(tiny_model("olmoe", seed=1))
    rm.set_offsets({rm.moe_layers[1]: torch.full((rm.num_experts,), 0.5)})
    rm.set_policy(RoutingPolicy(top_p=0.5), layers=rm.moe_layers[0])
    return rm


def _rewrite_tensors(folder, **changes):
    """Tamper with the tensors and record their new checksum (a consistent folder with bad content)."""
    save_file({**load_file(str(folder / STATE_NAME)), **changes}, str(folder / STATE_NAME))
    _rewrite_config(
        folder, lambda r: r.update(tensors_sha256=hashlib.sha256((folder / STATE_NAME).read_bytes()).hexdigest())
    )


def _rewrite_config(folder, change):
    record = json.loads((folder / CONFIG_NAME).read_text())
    change(record)
    (folder / CONFIG_NAME).write_text(json.dumps(record))


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda f: (f / CONFIG_NAME).unlink(), FileNotFoundError, "reroute_config.json is missing"),
        (lambda f: (f / STATE_NAME).unlink(), FileNotFoundError, "lacks routing_state.safetensors"),
        (lambda f: (f / CONFIG_NAME).write_text("{not json"), ValueError, "not valid JSON"),
        (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), ValueError, "not a reroute config"),
        (lambda f: (f / STATE_NAME).write_bytes(b"\x00" * 40), ValueError, "not a readable safetensors"),
        (
            lambda f: _rewrite_config(f, lambda r: r.update(format_version=99)),
            ValueError,
            "format version 99",
        ),
        (
            lambda f: _rewrite_config(f, lambda r: r.update(method={"type": "os.system", "config": {}})),
            ValueError,
            "is not one of",
        ),
        (
            lambda f: _rewrite_config(f, lambda r: r["state"].update(row_offsets=[0, 1])),
            ValueError,
            "lacks the tensor 'row_offsets.0'",
        ),
        (
            lambda f: _rewrite_config(f, lambda r: r["state"].update(mixing=[99])),
            ValueError,
            "not an MoE layer",
        ),
        (
            lambda f: _rewrite_config(f, lambda r: r["state"]["policies"].update({"0": {"top_k": 1, "rank": 2}})),
            ValueError,
            "at most one of",
        ),
        (
            lambda f: _rewrite_tensors(f, **{"offsets.2": torch.zeros(5)}),
            ValueError,
            r"does not fit this model.*offsets for layer 2 must have shape \[8\]",
        ),
        (
            lambda f: _rewrite_tensors(f, **{"mixing.0.experts": torch.tensor([[0, 0, 1]])}),
            ValueError,
            "must not repeat",
        ),
        (lambda f: _rewrite_tensors(f, **{"policy_rows.2": torch.tensor([0.0, 1.0])}), ValueError, "bool or integer"),
        (
            lambda f: _rewrite_tensors(f, **{"mixing.0.experts": torch.zeros(2, 0, dtype=torch.long)}),
            ValueError,
            "C >= 1 core experts",
        ),
        (lambda f: _rewrite_tensors(f, **{"mixing.0.positions": torch.tensor([[7.5], [7.0]])}), ValueError, "integer"),
        (lambda f: _rewrite_tensors(f, **{"offsets.1": torch.ones(8)}), None, None),
    ],
    ids=[
        "no-config",
        "no-tensors",
        "bad-json",
        "not-a-config",
        "bad-safetensors",
        "newer-format",
        "unknown-method",
        "missing-tensor",
        "unknown-layer",
        "bad-policy",
        "wrong-shape",
        "bad-mixing",
        "float-policy-rows",
        "no-core-experts",
        "float-positions",
        "control-valid",
    ],
)
def test_bad_folders_are_clear_errors_and_change_nothing(saved, damage, error, match):
    damage(saved)
    target = _target()
    before = _state(target)
    if error is None:  # the control: the same tampering route with valid values loads (and changes the state)
        target.load_pretrained(saved)
        assert not _same(_state(target), before)
        return
    with pytest.raises(error, match=match):
        target.load_pretrained(saved)
    assert _same(_state(target), before)


def test_other_models_are_refused(saved, tmp_path):
    for other, match in (("mixtral", "saved for a 'olmoe' model"), ("deepseek_v3", "saved for a 'olmoe' model")):
        model = tiny_model(other)
        router_classes = {type(m) for m in model.modules()}
        with pytest.raises(ValueError, match=match):
            reroute.from_pretrained(model, saved)
        # from_pretrained attached the model for this call only: it is detached again
        assert "_reroute_attached" not in model.__dict__
        assert {type(m) for m in model.modules()} == router_classes
    # same family, other shape
    config = copy.deepcopy(tiny_model("olmoe").config)
    config.num_experts = 4
    wider = transformers.OlmoeForCausalLM(config).eval()
    with pytest.raises(ValueError, match="another architecture.*num_experts"):
        reroute.from_pretrained(wider, saved)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        reroute.from_pretrained(tiny_model("olmoe"), tmp_path / "nowhere")
    # an already attached model stays attached (with its state) after a failed load
    rm = _target()
    before = _state(rm)
    with pytest.raises(FileNotFoundError):
        reroute.from_pretrained(rm.model, tmp_path / "nowhere")
    assert rm.attached and _same(_state(rm), before)
