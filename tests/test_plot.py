"""``reroute.plot``: the routing statistics (checked against unpadded single-prompt runs) and the figures' data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reroute
from reroute import plot
from reroute.eval import EvalResult, plot_bars
from reroute.testing import tiny_model, tiny_tokenizer

pytest.importorskip("matplotlib")

PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23 w24", "w7", "w40 w41 w42"]
ITEMS = [
    {"prompt": p, "domain": d, "answer": " w9"}
    for p, d in zip(PROMPTS + ["w50 w51", "w60"], ["b", "a", "b", "a", "c", "a", "b"])
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def rm():
    return reroute.attach(tiny_model("deepseek_v3"))  # a dense first layer: MoE layers [1, 2]


def _reference_counts(rm, tokenizer, prompts, last_only):
    """Assignment counts [L, E] from each prompt run alone (no padding), the last token or all tokens."""
    counts = torch.zeros(len(rm.moe_layers), rm.num_experts)
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad(), rm.trace() as trace:
            rm.model(input_ids=ids)
        for row, layer in enumerate(rm.moe_layers):
            chosen = trace.indices(layer)[0]
            chosen = chosen[-1:] if last_only else chosen
            used = trace.weights(layer)[0][-chosen.shape[0] :] != 0
            counts[row] += torch.bincount(chosen[used], minlength=rm.num_experts).float()
    return counts


@pytest.mark.parametrize("positions", ["all", "last"])
def test_prompt_usage_matches_unpadded_runs(rm, tokenizer, positions):
    usage = plot.prompt_usage(rm, tokenizer, PROMPTS, positions=positions, batch_size=2)
    reference = _reference_counts(rm, tokenizer, PROMPTS, positions == "last")
    assert usage.shape == (len(rm.moe_layers), rm.num_experts)
    torch.testing.assert_close(usage, reference / reference.sum(-1, keepdim=True))
    # the routing state in place is what gets measured
    rm.set_offsets({rm.moe_layers[-1]: torch.full((rm.num_experts,), -50.0).index_fill(0, torch.tensor([3, 5]), 50.0)})
    steered = plot.prompt_usage(rm, tokenizer, PROMPTS, positions=positions)
    assert steered[-1, 3] == steered[-1, 5] == 0.5


def test_usage_by_group(rm, tokenizer):
    groups = plot.usage_by_group(rm, tokenizer, ITEMS, key="domain", positions="last")
    assert list(groups) == ["a", "b", "c"]
    for name, usage in groups.items():
        prompts = [item["prompt"] for item in ITEMS if item["domain"] == name]
        torch.testing.assert_close(usage, plot.prompt_usage(rm, tokenizer, prompts, positions="last"))
    with pytest.raises(KeyError, match="lacks 'topic'"):
        plot.usage_by_group(rm, tokenizer, ITEMS, key="topic")
    with pytest.raises(ValueError, match="positions must be one of"):
        plot.prompt_usage(rm, tokenizer, PROMPTS, positions="first")
    with pytest.raises(TypeError, match="not one string"):
        plot.prompt_usage(rm, tokenizer, "w3 w4")


def test_adaptation_usage(rm, tokenizer):
    items = ITEMS[:4]
    c3po = reroute.C3PO(rm, None, tokenizer, surrogate="oracle", critical_layers=1, core_experts=4, steps=5)
    adaptation = c3po.adapt(items)
    prompts = [item["prompt"] for item in items]
    before, after = plot.adaptation_usage(c3po, adaptation, prompts)
    torch.testing.assert_close(before, plot.prompt_usage(rm, tokenizer, prompts, positions="last"))
    torch.testing.assert_close(before[:-1], after[:-1])  # only the last (critical) layer is re-mixed
    torch.testing.assert_close(after.sum(-1), torch.ones(len(rm.moe_layers)))
    assert all(layer.mixing is None for layer in rm.layers.values())
    # counting only the adapted items: the same change, undiluted by the items where the gates kept the base
    adaptation.abstained[:] = torch.tensor([False, True, False, True])
    diluted = plot.adaptation_usage(c3po, adaptation, prompts)
    only = plot.adaptation_usage(c3po, adaptation, prompts, adapted_only=True)
    kept = [prompts[0], prompts[2]]
    torch.testing.assert_close(only[0], plot.prompt_usage(rm, tokenizer, kept, positions="last"))
    torch.testing.assert_close((only[1] - only[0]) / 2, diluted[1] - diluted[0])  # half of the items adapted
    adaptation.abstained[:] = True  # the gate kept the base routing everywhere: nothing changes
    assert torch.equal(plot.adaptation_usage(c3po, adaptation, prompts)[1], before)
    with pytest.raises(ValueError, match="adapted none of these items"):
        plot.adaptation_usage(c3po, adaptation, prompts, adapted_only=True)
    with pytest.raises(ValueError, match="covers 4 prompts but 3"):
        plot.adaptation_usage(c3po, adaptation, prompts[:3])


def test_usage_heatmap_from_a_trace(rm, tokenizer, tmp_path):
    import matplotlib.pyplot as plt

    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad(), rm.trace() as trace:
        rm.model(input_ids=ids)
    fig = plot.usage_heatmap(trace, title="t", path=tmp_path / "sub" / "heat.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), trace.expert_usage().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]  # MoE layers of the trace
    assert ax.get_xlabel() == "expert" and ax.get_title() == "t" and len(fig.axes) == 2  # + colour bar
    assert (tmp_path / "sub" / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.usage_heatmap(torch.rand(3, 8), path=tmp_path / "heat.svg")
    assert (tmp_path / "heat.svg").read_text().lstrip().startswith("<?xml")
    assert plt.get_fignums() == []  # built without pyplot: nothing left open
    with pytest.raises(ValueError, match="2 layer labels for 3 usage rows"):
        plot.usage_heatmap(torch.rand(3, 8), layers=[1, 2])
    with pytest.raises(ValueError, match="2-D"):
        plot.usage_heatmap(torch.rand(8))
    with pytest.raises(ValueError, match="NaN"):
        plot.usage_heatmap(torch.full((2, 4), float("nan")))


def test_usage_difference():
    gen = torch.Generator().manual_seed(0)
    before, after = torch.rand(4, 16, generator=gen), torch.rand(4, 16, generator=gen)
    before, after = before / before.sum(-1, keepdim=True), after / after.sum(-1, keepdim=True)
    fig = plot.usage_difference(before, after, layers=[3, 5, 7, 9])
    panels = [ax for ax in fig.axes if ax.images]
    # issue 14 item 24: the change comes first and largest (before/after looked alike on the testbed)
    assert [ax.get_title() for ax in panels] == ["after − before", "before", "after"]
    assert panels[0].get_position().width > 1.5 * panels[1].get_position().width
    np.testing.assert_allclose(panels[0].images[0].get_array(), (after - before).numpy(), rtol=1e-6)
    np.testing.assert_allclose(panels[1].images[0].get_array(), before.numpy())
    low, high = panels[0].images[0].get_clim()
    assert low == -high and high == pytest.approx(float((after - before).abs().max()), rel=1e-6)
    moved = [0.5 * float((after[i] - before[i]).abs().sum()) for i in range(4)]  # total-variation distance
    np.testing.assert_allclose(plot.moved_share(before, after), moved, rtol=1e-6)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == [
        f"{layer}: {100 * m:.1f}% moved" for layer, m in zip([3, 5, 7, 9], moved)
    ]
    assert f"{100 * np.mean(moved):.1f}% of assignments moved" in fig.get_suptitle()
    for panel in panels:  # the difference panel had no layer labels (shared, hidden axis)
        assert [t.get_text().split(":")[0] for t in panel.get_yticklabels()] == ["3", "5", "7", "9"]
        assert panel.get_ylabel() == "MoE layer" and panel.get_xlabel().startswith("expert")
        assert all(label.get_visible() for label in panel.get_yticklabels())
    assert "largest change" in panels[0].get_xlabel()
    assert plot.moved_share(before, before).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="differ in shape"):
        plot.usage_difference(before, after[:, :8])


def test_domain_usage():
    gen = torch.Generator().manual_seed(0)
    usage = {name: torch.rand(3, 8, generator=gen) for name in ("add7", "count", "max")}
    fig = plot.domain_usage(usage, layer=4, layers=[0, 2, 4])
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image, torch.stack([u[2] for u in usage.values()]).numpy())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["add7", "count", "max"]
    last = plot.domain_usage(usage, layer=-1, layers=[0, 2, 4])
    np.testing.assert_allclose(last.axes[0].images[0].get_array(), image)
    grid = plot.domain_usage(usage, layers=[0, 2, 4])
    panels = [ax for ax in grid.axes if ax.images and ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 2", "layer 4"]
    for row, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), torch.stack([u[row] for u in usage.values()]).numpy())
    with pytest.raises(KeyError, match="layer 3"):
        plot.domain_usage(usage, layer=3, layers=[0, 2, 4])
    with pytest.raises(ValueError, match="same shape"):
        plot.domain_usage({"a": torch.rand(3, 8), "b": torch.rand(2, 8)})


def _result(method, correct, per_domain):
    return EvalResult(
        method=method,
        split="test_shift",
        mode="mc",
        n=len(correct),
        accuracy=float(np.mean(correct)),
        ci95=[float(np.mean(correct)) - 0.1, min(1.0, float(np.mean(correct)) + 0.15)],
        seconds_per_item=0.01,
        experts_per_token=2.0,
        per_domain=per_domain,
        correct=correct,
    )


def test_accuracy_plots(tmp_path):
    from matplotlib.container import BarContainer

    results = [
        _result("base", [True, False, False, True], {"a": 0.5, "b": 0.5}),
        _result("c3po", [True, True, False, True], {"a": 1.0, "b": 0.5}),
        _result("oracle", [True, True, True, True], {"a": 1.0, "b": 1.0}),
    ]
    fig = plot.accuracy_bars(results, path=tmp_path / "acc.png")
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([50.0, 75.0, 100.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "c3po", "oracle"]
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    caps = bars.errorbar.lines[2][0].get_segments()  # one vertical segment per bar: the 95% interval
    ends = [value for segment in caps for value in (segment[0][1], segment[1][1])]
    assert ends == pytest.approx([40.0, 65.0, 65.0, 90.0, 90.0, 100.0])
    assert (tmp_path / "acc.png").stat().st_size > 0
    as_json = plot.accuracy_bars([r.to_json() for r in results])
    assert [p.get_height() for p in as_json.axes[0].patches] == pytest.approx([50.0, 75.0, 100.0])

    mixed = [_result("base", [True], {}), _result("base", [False], {})]
    mixed[1].split = "test"
    labels = [t.get_text() for t in plot.accuracy_bars(mixed).axes[0].get_xticklabels()]
    assert labels == ["base\ntest_shift", "base\ntest"]

    domains = plot.domain_accuracy(results)
    heights = [p.get_height() for p in domains.axes[0].patches]
    assert heights == pytest.approx([50.0, 50.0, 100.0, 50.0, 100.0, 100.0])  # per run, then per domain
    assert [t.get_text() for t in domains.axes[0].get_xticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="no per-domain"):
        plot.domain_accuracy(mixed)

    # issue 14 item 24: n per domain and 95% Wilson intervals, every value printed (a 0% bar is not "missing")
    items = [{"domain": d} for d in ("a", "b", "a", "b")]
    zero = _result("none", [False, False, False, False], {"a": 0.0, "b": 0.0})
    fig = plot.domain_accuracy([*results, zero], items=items)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a\nn=2", "b\nn=2"]
    assert "Wilson" in ax.get_ylabel()
    printed = [t.get_text() for t in ax.texts]
    assert printed[-2:] == ["0", "0"]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    low, high = plot.wilson_interval(0, 2)
    zero_caps = bars[-1].errorbar.lines[2][0].get_segments()
    assert [v for seg in zero_caps for v in (seg[0][1], seg[1][1])] == pytest.approx([100 * low, 100 * high] * 2)
    assert low == 0.0 and 0.6 < high < 0.7  # Wilson: 0 of 2 correct is compatible with up to ~66%
    with pytest.raises(ValueError, match="evaluated items"):
        plot.domain_accuracy(results, items=items[:3])
    with pytest.raises(ValueError, match="no results"):
        plot.accuracy_bars([])
    with pytest.raises(TypeError, match="EvalResult"):
        plot.accuracy_bars([{"method": "x"}])

    # the older report helper draws the same figure into a file
    path = plot_bars(results, tmp_path / "old" / "bars.png", title="old")
    assert path == tmp_path / "old" / "bars.png" and path.read_bytes()[:4] == b"\x89PNG"
