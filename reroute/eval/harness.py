"""The evaluation harness: accuracy of a method on a list of items, with a bootstrap interval and costs.

``run_eval`` answers items in batches with one method (multiple choice by log-likelihood, or exact-match
generation), and returns an :class:`EvalResult` whose ``to_json()`` is the record scripts and plots read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from reroute.attach import RoutedModel
from reroute.data import Item
from reroute.methods import RoutingMethod
from reroute.progress import progress_bar
from reroute.scoring import (
    answer_matches,
    check_tokenizer,
    choice_batch,
    decode_continuations,
    pad_id,
    prompt_batch,
)


@dataclass
class EvalResult:
    """One run of one method on one split.

    Attributes:
        method, split, mode: what was run (``mode`` is ``"mc"`` or ``"gen"``).
        n: items scored.
        accuracy: share answered correctly.
        ci95: 95% percentile-bootstrap interval ``[low, high]`` of the accuracy.
        seconds_per_item: wall time per item (adaptation included).
        experts_per_token: mean experts with non-zero weight per routed token, over every forward the method ran.
        per_domain: accuracy per item domain, when items carry one.
        stats: method-specific costs (e.g. forward/backward passes per item); for a method that ``reports_ties``,
            ``ties``: the share of multiple-choice items whose best score several choices share.
        correct: per-item correctness, in item order.
        gates: per item, the do-no-harm gate that kept the model's own routing (``None``: the item was adapted), for
            a method with per-item gates (:meth:`~reroute.methods.RoutingMethod.gate_report`); empty otherwise.
        gate_inputs: per item, the quantities those gates read (e.g. C3PO's ``confidence``, ``gain``,
            ``agreement``), ``{name: [value per item]}``.
    """

    method: str
    split: str
    mode: str
    n: int
    accuracy: float
    ci95: list[float]
    seconds_per_item: float
    experts_per_token: float
    per_domain: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    correct: list[bool] = field(default_factory=list)
    gates: list[str | None] = field(default_factory=list)
    gate_inputs: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_ci(correct: Sequence[bool], seed: int = 0, resamples: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of the mean of ``correct``."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def paired_difference(
    correct: Sequence[bool], base: Sequence[bool], seed: int = 0, resamples: int = 2000
) -> dict[str, Any]:
    """Accuracy difference to ``base`` on the same items with a 95% paired percentile-bootstrap interval (the items
    are resampled together, so the interval reflects how often the two runs agree item by item), and the items
    won and lost."""
    if len(correct) != len(base) or not correct:
        raise ValueError(f"a paired difference needs two runs over the same items, got {len(correct)} and {len(base)}")
    diff = np.asarray(correct, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    return {
        "difference": float(diff.mean()),
        "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "wins": int((diff > 0).sum()),
        "losses": int((diff < 0).sum()),
    }


def run_eval(
    rm: RoutedModel,
    tokenizer: Any,
    items: Sequence[Item],
    method: Any,
    split: str = "custom",
    mode: str = "mc",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Answer ``items`` with ``method`` (a :func:`~reroute.eval.make_method` spec or a built
    :class:`~reroute.methods.RoutingMethod`) and score them.

    Per batch the method adapts to the prompts (:meth:`~reroute.methods.RoutingMethod.adapt_contexts`), then
    ``mc``: the choice with the highest summed log-likelihood under that state must be ``item["label"]``;
    ``gen``: the greedy answer (first line, whitespace-normalised) must equal ``item["answer"]`` (or the labelled
    choice). The tokenizer's assumptions are checked on every item first (:func:`reroute.scoring.check_tokenizer`).
    """
    if mode not in ("mc", "gen"):
        raise ValueError(f"mode must be 'mc' or 'gen', got {mode!r}")
    if not items:
        raise ValueError("no items to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_tokenizer(tokenizer, items, mode)
    if not isinstance(method, RoutingMethod):
        method = method.build(rm, tokenizer)
    name = getattr(method, "name", type(method).__name__)
    torch.manual_seed(seed)
    correct: list[bool] = []
    reports: list[dict[str, list[Any]] | None] = []
    routed_tokens = active = 0
    method.stats.clear()
    start = time.perf_counter()
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with progress_bar(progress, f"{name} · {split} · {mode}", len(items)) as advance:
        for batch in batches:
            with rm.trace(device="cpu") as trace:
                prompts = prompt_batch(tokenizer, [item["prompt"] for item in batch])
                state = method.adapt_contexts(batch, prompts)
                reports.append(method.gate_report(state))
                if mode == "mc":
                    rows, n_choices = choice_batch(tokenizer, batch)
                    scores = method.continuation_logprobs(rows, state).logprob.view(len(batch), n_choices)
                    if method.reports_ties:
                        ties = (scores == scores.max(-1, keepdim=True).values).sum(-1) > 1
                        method.add_stats(ties=float(ties.sum()))
                    correct += [int(p) == int(item["label"]) for p, item in zip(scores.argmax(-1).tolist(), batch)]
                else:
                    answers = [_answer(item) for item in batch]
                    budget = max(len(tokenizer(" " + a)["input_ids"]) for a in answers) + 2
                    prompts = prompts.to(rm.model.device)
                    out = method.generate_from(
                        prompts.input_ids,
                        prompts.attention_mask,
                        state,
                        max_new_tokens=budget,
                        do_sample=False,
                        pad_token_id=pad_id(tokenizer),
                    )
                    texts = decode_continuations(tokenizer, out, prompts.prompt_len)
                    correct += [answer_matches(t, a) for t, a in zip(texts, answers)]
            for records in trace.records.values():
                for record in records:
                    routed_tokens += record.weights.shape[0] * record.weights.shape[1]
                    active += int((record.weights != 0).sum())
            advance(len(batch))
    elapsed = time.perf_counter() - start
    domains = sorted({str(item["domain"]) for item in items if "domain" in item})
    per_domain = {
        d: float(np.mean([c for c, item in zip(correct, items) if str(item.get("domain")) == d])) for d in domains
    }
    gates, gate_inputs = _gate_columns(reports)
    return EvalResult(
        method=name,
        split=split,
        mode=mode,
        n=len(correct),
        accuracy=float(np.mean(correct)),
        ci95=bootstrap_ci(correct, seed),
        seconds_per_item=elapsed / len(correct),
        experts_per_token=active / max(routed_tokens, 1) if routed_tokens else float("nan"),
        per_domain=per_domain,
        stats={k: v / len(correct) for k, v in method.stats.items()},
        seed=seed,
        correct=correct,
        gates=gates,
        gate_inputs=gate_inputs,
    )


def _gate_columns(reports: Sequence[dict[str, list[Any]] | None]) -> tuple[list[str | None], dict[str, list[float]]]:
    """The batches' gate reports as one column per key over all items (empty unless every batch reported)."""
    if not reports or any(r is None for r in reports):
        return [], {}
    keys = [k for k in reports[0] if all(k in r for r in reports)]  # type: ignore[operator]
    columns = {k: [v for r in reports for v in r[k]] for k in keys}  # type: ignore[index]
    gates = columns.pop("gate", [])
    return gates, columns


def _answer(item: Item) -> str:
    if "answer" in item:
        return str(item["answer"])
    return str(item["choices"][int(item["label"])])
