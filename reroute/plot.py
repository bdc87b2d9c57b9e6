"""Plots of routing and accuracy, and the routing statistics behind them.

Plot functions build a matplotlib :class:`~matplotlib.figure.Figure` without ``pyplot`` (no global state, no
backend switch: they work headless, in scripts and in Jupyter, where a returned figure renders inline after
``%matplotlib inline``). Each returns the figure and, given ``path=``, also writes it there (the format follows the
file suffix).

- :func:`usage_heatmap`: MoE layer × expert usage ``[L, E]`` (from a :class:`~reroute.routing.trace.Trace` or a
  tensor);
- :func:`usage_difference`: the difference of usage after / before an adaptation (with the share of each layer's
  assignments that moved, :func:`moved_share`), and both usages;
- :func:`domain_usage`: groups (domains) × experts for one layer, or one small panel per layer;
- :func:`accuracy_bars`, :func:`domain_accuracy`: accuracy of :class:`~reroute.eval.EvalResult` runs with their
  95% bootstrap intervals, overall and per domain.

The statistics run the attached model under its current routing state (offsets, masks, policies):

- :func:`prompt_usage`: expert usage ``[L, E]`` over a list of prompts, at every prompt token or the last one;
- :func:`usage_by_group`: the same per group of items (``{"add7": [L, E], ...}`` by their ``domain`` field);
- :func:`adaptation_usage`: usage without and with a C3PO adaptation, at the re-mixed positions.

Usage is the share of a layer's (token, slot) assignments that go to each expert, so a layer's row sums to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reroute.routing.trace import Trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from reroute.attach import RoutedModel
    from reroute.c3po.method import C3PO, Adaptation

POSITIONS = ("all", "last")
_BAR_COLOUR = "#4c72b0"


# ------------------------------------------------------------------------------------------------- statistics
def usage_matrix(source: Trace | torch.Tensor | np.ndarray, attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """Usage ``[L, E]`` as a float numpy array: from a trace (``Trace.expert_usage``, padding excluded with
    ``attention_mask [B, S]``) or a ``[L, E]`` tensor/array given as is."""
    if isinstance(source, Trace):
        return source.expert_usage(attention_mask=attention_mask).cpu().numpy()
    if attention_mask is not None:
        raise ValueError("attention_mask only applies when the usage comes from a Trace")
    if isinstance(source, torch.Tensor):
        source = source.detach().float().cpu().numpy()
    if not isinstance(source, np.ndarray):
        raise TypeError(f"usage must be a Trace, a tensor or an array [layers, experts], got {type(source).__name__}")
    if source.ndim != 2 or 0 in source.shape:
        raise ValueError(f"usage must be 2-D [layers, experts], got shape {list(source.shape)}")
    if not np.isfinite(source).all():
        raise ValueError("usage contains NaN or inf")
    return source.astype(np.float64)


def _positions_mask(attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "all":
        return attention_mask
    mask = torch.zeros_like(attention_mask)
    mask[:, -1] = 1  # prompts are left-padded: every last prompt token sits in the last column
    return mask


def _counts(rm: RoutedModel, tokenizer: Any, prompts: Sequence[str], positions: str, batch_size: int) -> torch.Tensor:
    """Summed assignment counts ``[L, E]`` over ``prompts`` under the current routing."""
    from reroute.scoring import padded_logits, prompt_batch

    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if not prompts:
        raise ValueError("no prompts to route")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = torch.zeros(len(rm.moe_layers), rm.num_experts)
    for start in range(0, len(prompts), batch_size):
        batch = prompt_batch(tokenizer, list(prompts[start : start + batch_size]))
        mask = _positions_mask(batch.attention_mask, positions)
        with torch.no_grad(), rm.trace(device="cpu") as trace:
            padded_logits(rm.model, batch.input_ids.to(rm.model.device), batch.attention_mask.to(rm.model.device))
        total += trace.expert_usage(attention_mask=mask, normalize=False)
    return total


def _normalise(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)


def prompt_usage(
    rm: RoutedModel, tokenizer: Any, prompts: Sequence[str], positions: str = "all", batch_size: int = 32
) -> torch.Tensor:
    """Expert usage ``[num_moe_layers, E]`` of the attached model over ``prompts`` (rows: ``rm.moe_layers``).

    ``positions``: ``"all"`` prompt tokens (padding excluded) or only the ``"last"`` one (where C3PO re-mixes and
    the answer is predicted). Prompts run left-padded in batches of ``batch_size``, without gradients, under the
    routing state currently set on ``rm``.
    """
    return _normalise(_counts(rm, tokenizer, prompts, positions, batch_size))


def usage_by_group(
    rm: RoutedModel,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    key: str = "domain",
    positions: str = "all",
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``{group: usage [num_moe_layers, E]}`` of the items' prompts, grouped by ``item[key]`` (sorted by group).

    Items are dicts with a ``prompt`` (the testbed's splits, or any list of dicts); see :func:`prompt_usage` for
    ``positions`` and ``batch_size``.
    """
    groups: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        if key not in item or "prompt" not in item:
            raise KeyError(f"item {i} lacks {key!r} or 'prompt'; usage_by_group needs both")
        groups.setdefault(str(item[key]), []).append(str(item["prompt"]))
    if not groups:
        raise ValueError("no items to group")
    return {name: prompt_usage(rm, tokenizer, groups[name], positions, batch_size) for name in sorted(groups)}


def adaptation_usage(
    c3po: C3PO, adaptation: Adaptation, prompts: Sequence[str], positions: str = "last", adapted_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Usage ``[num_moe_layers, E]`` of ``prompts`` with the base routing and with a C3PO ``adaptation`` of the same
    prompts (from ``c3po.adapt(prompts)``, same order) installed — ``(before, after)``.

    The prompts run as one left-padded batch, as :meth:`~reroute.C3PO.score_choices` runs them; ``positions="last"``
    counts only the last prompt token, where the adapted pathway acts. ``adapted_only``: count only the items C3PO
    adapted (where its gates kept the base routing, before and after are the same counts, which dilute the change).
    """
    from reroute.scoring import padded_logits, prompt_batch

    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty sequence of strings")
    rows = int(adaptation.abstained.numel())
    if rows != len(prompts):
        raise ValueError(f"the adaptation covers {rows} prompts but {len(prompts)} were given")
    kept = ~adaptation.abstained.bool().cpu()
    if adapted_only and not kept.any():
        raise ValueError("C3PO adapted none of these items (its gates kept the base routing): nothing to count")
    rm = c3po.rm
    batch = prompt_batch(c3po.tokenizer, list(prompts))
    mask = _positions_mask(batch.attention_mask, positions)
    if adapted_only:
        mask = mask * kept[:, None].to(mask.dtype)
    device = rm.model.device
    usage = []
    for adapted in (False, True):
        if adapted:
            c3po.apply(adaptation, batch.prompt_len)
        try:
            with torch.no_grad(), rm.trace(device="cpu") as trace:
                padded_logits(rm.model, batch.input_ids.to(device), batch.attention_mask.to(device))
        finally:
            rm.clear_mixing(c3po.layers)
        usage.append(trace.expert_usage(attention_mask=mask))
    return usage[0], usage[1]


def moved_share(before: Trace | torch.Tensor | np.ndarray, after: Trace | torch.Tensor | np.ndarray) -> np.ndarray:
    """Per layer ``[L]``, the share of the layer's assignments that moved to other experts between two usages
    ``[L, E]`` (rows summing to 1): ``½ Σ_e |after − before|``, the total-variation distance (0: the same usage,
    1: no expert in common)."""
    first, second = usage_matrix(before), usage_matrix(after)
    if first.shape != second.shape:
        raise ValueError(f"before {list(first.shape)} and after {list(second.shape)} usage differ in shape")
    return 0.5 * np.abs(second - first).sum(axis=-1)


# ------------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _layer_labels(source: Any, rows: int, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        layers = source.layers if isinstance(source, Trace) else range(rows)
    layers = [int(i) for i in layers]
    if len(layers) != rows:
        raise ValueError(f"{len(layers)} layer labels for {rows} usage rows")
    return layers


def _expert_ticks(ax: Axes, num_experts: int) -> None:
    step = max(1, num_experts // 8)
    ax.set_xticks(range(0, num_experts, step))
    ax.set_xlabel("expert")


def _heatmap(
    ax: Axes, data: np.ndarray, row_labels: Sequence[object], cmap: str, vmin: float, vmax: float, ylabel: str
) -> Any:
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(row_labels)), [str(x) for x in row_labels])
    ax.set_ylabel(ylabel)
    _expert_ticks(ax, data.shape[1])
    return image


def usage_heatmap(
    usage: Trace | torch.Tensor | np.ndarray,
    layers: Sequence[int] | None = None,
    title: str = "expert usage",
    attention_mask: torch.Tensor | None = None,
    path: str | Path | None = None,
) -> Figure:
    """MoE layer × expert heatmap of usage ``[L, E]`` (a trace, or a tensor such as :func:`prompt_usage`'s).

    ``layers``: row labels (default: the trace's MoE layers, else ``0..L-1``).
    """
    data = usage_matrix(usage, attention_mask)
    labels = _layer_labels(usage, data.shape[0], layers)
    fig = _figure(max(5.0, 0.09 * data.shape[1] + 2.5), max(2.5, 0.3 * data.shape[0] + 1.2))
    ax = fig.add_subplot()
    image = _heatmap(ax, data, labels, "viridis", 0.0, float(data.max()) or 1.0, "MoE layer")
    fig.colorbar(image, ax=ax, label="share of assignments")
    ax.set_title(title)
    return _finish(fig, path)


def usage_difference(
    before: Trace | torch.Tensor | np.ndarray,
    after: Trace | torch.Tensor | np.ndarray,
    layers: Sequence[int] | None = None,
    title: str = "expert usage before / after adaptation",
    path: str | Path | None = None,
) -> Figure:
    """The change first: a full-width ``after - before`` panel over MoE layer × expert (diverging colours,
    symmetric around zero: red = used more after adaptation), each layer labelled with the share of its assignments
    that moved (:func:`moved_share`); below it the usage before and after, side by side on one colour scale."""
    first, second = usage_matrix(before), usage_matrix(after)
    if first.shape != second.shape:
        raise ValueError(f"before {list(first.shape)} and after {list(second.shape)} usage differ in shape")
    labels = _layer_labels(before, first.shape[0], layers)
    diff = second - first
    moved = moved_share(first, second)
    fig = _figure(max(10.0, 0.16 * first.shape[1] + 4.0), max(5.0, 0.6 * first.shape[0] + 3.0))
    mosaic = fig.subplot_mosaic([["change", "change"], ["before", "after"]], height_ratios=[1.2, 1])
    axes = [mosaic["change"], mosaic["before"], mosaic["after"]]  # every panel keeps its own layer and expert labels
    span = float(np.abs(diff).max()) or 1.0
    image = _heatmap(axes[0], diff, labels, "RdBu_r", -span, span, "MoE layer")
    axes[0].set_yticks(range(len(labels)), [f"{x}: {100 * m:.1f}% moved" for x, m in zip(labels, moved)])
    axes[0].set_title("after − before")
    axes[0].set_xlabel(f"expert (largest change {span:.3f})")
    fig.colorbar(image, ax=axes[0], label="change in share (red: more after)")
    top = float(max(first.max(), second.max())) or 1.0
    for ax, data, name in ((axes[1], first, "before"), (axes[2], second, "after")):
        image = _heatmap(ax, data, labels, "viridis", 0.0, top, "MoE layer")
        ax.set_title(name)
    fig.colorbar(image, ax=axes[1:], label="share of assignments")
    fig.suptitle(f"{title} — {100 * float(moved.mean()):.1f}% of assignments moved on average")
    return _finish(fig, path)


def domain_usage(
    usage: Mapping[str, torch.Tensor | np.ndarray],
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    title: str = "expert usage per domain",
    path: str | Path | None = None,
) -> Figure:
    """Groups × experts heatmaps from :func:`usage_by_group`'s ``{group: usage [L, E]}``.

    ``layer``: one MoE layer (a decoder-layer index from ``layers``; negative counts from the last) in one panel;
    ``None``: a compact view with one panel per MoE layer, sharing one colour scale. ``layers``: the decoder-layer
    indices of the usage rows (``rm.moe_layers``; default ``0..L-1``).
    """
    if not usage:
        raise ValueError("no groups to plot")
    groups = list(usage)
    matrices = [usage_matrix(usage[g]) for g in groups]
    if len({m.shape for m in matrices}) > 1:
        raise ValueError("every group's usage must have the same shape [layers, experts]")
    stacked = np.stack(matrices)  # [groups, layers, experts]
    labels = _layer_labels(None, stacked.shape[1], layers)
    top = float(stacked.max()) or 1.0
    if layer is not None:
        row = _layer_row(labels, layer)
        fig = _figure(max(5.0, 0.09 * stacked.shape[2] + 2.5), max(2.5, 0.3 * len(groups) + 1.2))
        ax = fig.add_subplot()
        image = _heatmap(ax, stacked[:, row], groups, "magma", 0.0, top, "")
        ax.set_title(f"{title} · layer {labels[row]}")
        fig.colorbar(image, ax=ax, label="share of assignments")
        return _finish(fig, path)
    cols = min(4, len(labels))
    rows = -(-len(labels) // cols)
    fig = _figure(3.2 * cols + 1.0, (0.18 * len(groups) + 0.9) * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= len(labels):
            ax.set_visible(False)
            continue
        image = _heatmap(ax, stacked[:, i], groups, "magma", 0.0, top, "")
        ax.set_title(f"layer {labels[i]}", fontsize=9)
        ax.tick_params(labelsize=7)
        if i + cols < len(labels):
            ax.set_xlabel("")
    fig.colorbar(image, ax=list(axes), label="share of assignments", shrink=0.8)
    fig.suptitle(title)
    return _finish(fig, path)


def _layer_row(labels: Sequence[int], layer: int) -> int:
    if -len(labels) <= layer < 0:
        return len(labels) + layer
    if layer not in labels:
        raise KeyError(f"layer {layer} is not among the usage rows' layers {list(labels)}")
    return list(labels).index(layer)


def _result_fields(result: Any) -> dict[str, Any]:
    """An ``EvalResult`` or its ``to_json()`` dict, as a dict."""
    record = result.to_json() if hasattr(result, "to_json") else result
    if not isinstance(record, Mapping) or not {"method", "accuracy", "ci95"} <= set(record):
        raise TypeError("results must be EvalResult objects or their to_json() dicts")
    return dict(record)


def _run_labels(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Method names, with split and mode added when the runs differ in them."""
    varying = [k for k in ("split", "mode") if len({r.get(k) for r in records}) > 1]
    labels = []
    for r in records:
        extra = " ".join(str(r.get(k)) for k in varying)
        labels.append(f"{r['method']}\n{extra}" if extra else str(r["method"]))
    return labels


def accuracy_bars(results: Sequence[Any], title: str = "accuracy", path: str | Path | None = None) -> Figure:
    """One bar per run (accuracy, %) with its 95% bootstrap interval as the error bar, value printed above.

    ``results``: :class:`~reroute.eval.EvalResult` objects (or their ``to_json()`` dicts), in display order.
    """
    if not results:
        raise ValueError("no results to plot")
    records = [_result_fields(r) for r in results]
    acc = np.array([100 * r["accuracy"] for r in records])
    low = np.array([100 * r["ci95"][0] for r in records])
    high = np.array([100 * r["ci95"][1] for r in records])
    fig = _figure(max(4.0, 1.2 * len(records) + 1.0), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(records))
    ax.bar(x, acc, yerr=[acc - low, high - acc], capsize=4, color=_BAR_COLOUR)
    ax.set_xticks(x, _run_labels(records), fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    for i, value in enumerate(acc):
        ax.text(i, max(value, high[i]) + 1.5, f"{value:.1f}", ha="center", fontsize=8)
    return _finish(fig, path)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / n`` (sound for small ``n`` and for 0 or n correct)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _domain_counts(record: Mapping[str, Any], items: Sequence[Mapping[str, Any]] | None) -> dict[str, tuple[int, int]]:
    """``{domain: (correct, n)}`` from a run's per-item ``correct`` and the items' ``domain`` fields."""
    correct = record.get("correct") or []
    if items is None or len(correct) != len(items):
        return {}
    counts: dict[str, list[int]] = {}
    for ok, item in zip(correct, items):
        if "domain" in item:
            entry = counts.setdefault(str(item["domain"]), [0, 0])
            entry[0] += int(bool(ok))
            entry[1] += 1
    return {d: (c, n) for d, (c, n) in counts.items()}


def domain_accuracy(
    results: Sequence[Any],
    items: Sequence[Mapping[str, Any]] | None = None,
    title: str = "accuracy per domain",
    path: str | Path | None = None,
) -> Figure:
    """Grouped bars: accuracy (%) per domain, one bar per run within each domain, its value printed on it.

    With ``items`` (the evaluated items, in the order of each result's ``correct``) each domain's label carries its
    number of items ``n`` and each bar a 95% Wilson interval — with a handful of items per domain the intervals are
    wide, and a 0% bar shows as a printed 0 with its interval rather than as a missing bar.
    """
    if not results:
        raise ValueError("no results to plot")
    records = [_result_fields(r) for r in results]
    domains = sorted({d for r in records for d in r.get("per_domain", {})})
    if not domains:
        raise ValueError("the results carry no per-domain accuracy (items without a 'domain' field)")
    if items is not None and any(len(r.get("correct") or []) != len(items) for r in records):
        raise ValueError("items must be the evaluated items, one per entry of each result's `correct`")
    counts = [_domain_counts(r, items) for r in records]
    sizes = {d: max((c.get(d, (0, 0))[1] for c in counts), default=0) for d in domains}
    fig = _figure(max(6.0, 0.3 * len(domains) * len(records) + 2.0), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(records)
    x = np.arange(len(domains))
    for i, (record, label, count) in enumerate(zip(records, _run_labels(records), counts)):
        values = np.array([100 * record.get("per_domain", {}).get(d, np.nan) for d in domains])
        where = x - 0.4 + width * (i + 0.5)
        errors = None
        if count:
            bounds = np.array([wilson_interval(*count[d]) if d in count else (np.nan, np.nan) for d in domains]) * 100
            errors = [np.clip(values - bounds[:, 0], 0, None), np.clip(bounds[:, 1] - values, 0, None)]
        bars = ax.bar(where, values, width, yerr=errors, capsize=2, label=label.replace("\n", " "))
        ax.bar_label(bars, labels=[f"{v:.0f}" if np.isfinite(v) else "" for v in values], fontsize=6, padding=1)
    ticks = [f"{d}\nn={sizes[d]}" if sizes[d] else d for d in domains]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("accuracy (%)" + (", 95% Wilson interval" if any(counts) else ""))
    ax.set_ylim(0, 112)
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=min(len(records), 5), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return _finish(fig, path)
