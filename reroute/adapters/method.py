"""Fitting an amortised routing adapter: per-layer router-logit offsets learned once on a reference set.

RoMA (arXiv 2511.07419) shows that routing learned offline on successful reference samples carries most of
test-time routing adaptation's gain at no inference cost. The adapter here is the smallest such form: one additive
offset vector ``[E]`` per MoE layer (``rm.offsets``), fitted by Adam on the summed log-likelihood of the reference
items' gold answers, the model's weights frozen. It is saved and loaded as ordinary routing state
(``rm.save_pretrained`` / ``reroute.from_pretrained``), and C3PO or rerouting run on top of it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reroute.adapters.config import AdapterConfig
from reroute.attach import RoutedModel
from reroute.data import Item, gold_text
from reroute.frozen import frozen_weights
from reroute.scoring import build_batch, continuation_logprobs, encode_pair

FIT_RECORD = "adapter_fit.json"
"""File written beside the routing state by :meth:`AdapterFit.save_pretrained`: the config and the fit's losses."""


def gold_loss(rm: RoutedModel, tokenizer: Any, items: Sequence[Item], prompt_field: str = "prompt") -> torch.Tensor:
    """Negative log-likelihood of each item's gold answer after its prompt ``[B]`` (summed over the answer's
    tokens; differentiable with respect to the routing state)."""
    pairs = [encode_pair(tokenizer, str(item[prompt_field]), gold_text(item)) for item in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = build_batch([p for p, _ in pairs], [c for _, c in pairs], int(pad)).to(rm.model.device)
    return -continuation_logprobs(rm.model, batch)


def _mean_loss(rm: RoutedModel, tokenizer: Any, items: Sequence[Item], config: AdapterConfig) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            total += float(gold_loss(rm, tokenizer, batch, config.prompt_field).sum())
    return total / len(items)


@dataclass
class AdapterFit:
    """A fitted adapter: the offsets (CPU copies, ``{layer: [E]}``) and how the fit went.

    Attributes:
        config: the hyperparameters.
        offsets: the fitted offsets of the fitted layers.
        loss_before, loss_after: mean gold-answer NLL over the reference items, before and after.
        history: mini-batch loss per step.
        items: reference items used; seconds: wall time of the fit.
    """

    config: AdapterConfig
    offsets: dict[int, torch.Tensor]
    loss_before: float
    loss_after: float
    history: list[float] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "layers": sorted(self.offsets),
            "offset_norms": {str(i): float(v.norm()) for i, v in sorted(self.offsets.items())},
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "history": self.history,
            "items": self.items,
            "seconds": self.seconds,
        }

    def save_pretrained(self, rm: RoutedModel, directory: str | Path) -> Path:
        """``rm.save_pretrained(directory)`` (the routing state, loaded back by ``reroute.from_pretrained``) plus
        :data:`FIT_RECORD` with this fit's config and losses; returns the folder."""
        directory = Path(rm.save_pretrained(directory))
        (directory / FIT_RECORD).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return directory


def fit_adapter(
    rm: RoutedModel, tokenizer: Any, items: Sequence[Item], config: AdapterConfig | None = None, **overrides: Any
) -> AdapterFit:
    """Fit ``rm``'s offsets on the gold answers of ``items`` and leave them set on ``rm``.

    Starts from the current offsets of the fitted layers (zero after ``attach``); other layers and other state are
    untouched. Items need ``config.prompt_field`` and a gold answer (``answer``, or ``choices`` + ``label``).
    Checked before anything changes; if the fit fails the offsets are restored.
    """
    config = dataclasses.replace(config or AdapterConfig(), **overrides) if overrides else config or AdapterConfig()
    rm._check_attached()
    if not items:
        raise ValueError("no reference items to fit the adapter on")
    for position, item in enumerate(items):
        if config.prompt_field not in item:
            raise ValueError(f"reference item {position} has no {config.prompt_field!r} field (config.prompt_field)")
        if "answer" not in item and not ("choices" in item and "label" in item):
            raise ValueError(f"reference item {position} has no gold answer ('answer', or 'choices' and 'label')")
    layers = rm._select(None if config.layers == "all" else list(config.layers))
    params = [layer.offsets for layer in layers]
    saved = [p.detach().clone() for p in params]
    start = time.perf_counter()
    order = list(range(len(items)))
    rng = random.Random(config.seed)
    history: list[float] = []
    try:
        loss_before = _mean_loss(rm, tokenizer, items, config)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        cursor = len(order)
        with frozen_weights(rm.model):
            for _ in range(config.steps):
                if cursor + config.batch_size > len(order):
                    rng.shuffle(order)
                    cursor = 0
                batch = [items[i] for i in order[cursor : cursor + config.batch_size]]
                cursor += config.batch_size
                loss = gold_loss(rm, tokenizer, batch, config.prompt_field).mean()
                if config.l2 > 0:
                    loss = loss + config.l2 * sum(p.pow(2).sum() for p in params)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if config.max_norm is not None:
                    with torch.no_grad():
                        for p in params:
                            p.mul_(torch.clamp(config.max_norm / (p.norm() + 1e-12), max=1.0))
                history.append(float(loss.detach()))
        for p in params:
            p.grad = None
        loss_after = _mean_loss(rm, tokenizer, items, config)
    except BaseException:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None
        raise
    return AdapterFit(
        config=config,
        offsets={layer.layer_idx: layer.offsets.detach().cpu().clone() for layer in layers},
        loss_before=loss_before,
        loss_after=loss_after,
        history=history,
        items=len(items),
        seconds=time.perf_counter() - start,
    )
