"""Evaluation methods: how each method answers a batch of items, in multiple-choice or generation mode.

A method is a small object with ``score_choices`` (predicted choice index per item) and ``generate`` (answer
text per item); the harness handles batching, timing and statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reroute.attach import RoutedModel
from reroute.data import Item
from reroute.scoring import (
    choice_batch,
    decode_continuations,
    generate_with,
    gold_batch,
    prompt_batch,
    score_with,
)


@dataclass
class Base:
    """The model's own routing."""

    name: str = "base"
    stats: dict[str, float] = field(default_factory=dict)

    def score_choices(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]) -> list[int]:
        return score_with(rm, tokenizer, items)

    def generate(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        return generate_with(rm, tokenizer, items, max_new_tokens)


@dataclass
class Oracle:
    """C3PO's upper bound: each item's pathway optimised on its own gold answer (reads the label).

    Defaults follow C3PO's OLMoE settings (last 5 MoE layers, 20 core experts, last prompt token) with more
    steps than NGD's 10, since an upper bound should be near the optimum.
    """

    layers: int | float | Sequence[int] = 5
    core_experts: int | float = 20
    steps: int = 30
    lr: float = 0.2
    name: str = "oracle"
    stats: dict[str, float] = field(default_factory=dict)

    def _adapt(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]):
        from reroute.c3po.oracle import optimise_oracle

        result = optimise_oracle(rm, gold_batch(tokenizer, items), self.layers, self.core_experts, self.steps, self.lr)
        # passes over the batch, counted per item like the other methods
        self.stats["forward_passes"] = self.stats.get("forward_passes", 0) + result.forward_passes * len(items)
        self.stats["backward_passes"] = self.stats.get("backward_passes", 0) + result.backward_passes * len(items)
        return result.pathway

    def score_choices(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]) -> list[int]:
        pathway = self._adapt(rm, tokenizer, items)
        batch = choice_batch(tokenizer, items)
        pathway.apply(rm, batch[0].last_prompt_positions[:1])  # rows expand item-major over the choices
        try:
            return score_with(rm, tokenizer, items, batch)
        finally:
            rm.clear_mixing(pathway.layers)

    def generate(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        pathway = self._adapt(rm, tokenizer, items)
        prompt_len = max(len(tokenizer(item["prompt"])["input_ids"]) for item in items)
        pathway.apply(rm, torch.tensor([[prompt_len - 1]]))
        try:
            return generate_with(rm, tokenizer, items, max_new_tokens)
        finally:
            rm.clear_mixing(pathway.layers)


@dataclass
class C3POMethod:
    """C3PO with a reference index (``index``: a :class:`~reroute.c3po.ReferenceIndex` or a folder holding one);
    ``options`` are :class:`~reroute.c3po.C3POConfig` fields (surrogate, k, steps, gate, ...)."""

    index: Any = None
    surrogate: str = "ngd"
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "c3po"
    stats: dict[str, float] = field(default_factory=dict)

    def _c3po(self, rm: RoutedModel, tokenizer: Any):
        from reroute.c3po import C3PO, ReferenceIndex

        if self.index is None and self.surrogate != "oracle":
            raise ValueError("C3PO needs a reference index (build one with reroute.ReferenceIndex.build)")
        if self.index is not None and not isinstance(self.index, ReferenceIndex):
            self.index = ReferenceIndex.load(self.index, rm)
        return C3PO(rm, self.index, tokenizer, surrogate=self.surrogate, **self.options)

    def _record(self, adaptation: Any, rows: int) -> None:
        for key in ("forward_passes", "backward_passes"):
            self.stats[key] = self.stats.get(key, 0.0) + adaptation.stats[key] * rows
        self.stats["abstained"] = self.stats.get("abstained", 0.0) + float(adaptation.abstained.sum())

    def score_choices(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]) -> list[int]:
        c3po = self._c3po(rm, tokenizer)
        adaptation = c3po.adapt(items)
        self._record(adaptation, len(items))
        return c3po.score_choices(items, adaptation)

    def generate(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        c3po = self._c3po(rm, tokenizer)
        adaptation = c3po.adapt(items)
        self._record(adaptation, len(items))
        batch = prompt_batch(tokenizer, [item["prompt"] for item in items])
        out = c3po.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            adaptation=adaptation,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return decode_continuations(tokenizer, out, batch.prompt_len)


@dataclass
class ReroutingMethod:
    """Continuous rerouting. Multiple choice: one adaptation phase on each prompt (its context), then the choices
    are scored with δ fixed; generation: :class:`~reroute.Rerouter` (phases at prefill and every ``interval``).
    ``options`` are :class:`~reroute.RerouterConfig` fields."""

    options: dict[str, Any] = field(default_factory=dict)
    name: str = "rerouting"
    stats: dict[str, float] = field(default_factory=dict)

    def _record(self, phases: Sequence[Any], rows: int) -> None:
        for phase in phases:
            self.stats["forward_passes"] = self.stats.get("forward_passes", 0.0) + phase.forward_passes * rows
            self.stats["backward_passes"] = self.stats.get("backward_passes", 0.0) + phase.backward_passes * rows

    def score_choices(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]) -> list[int]:
        from reroute.rerouting import RerouterConfig, adapt_phase, routing_confidence, select_layers

        config = RerouterConfig(**self.options)
        prompts = prompt_batch(tokenizer, [item["prompt"] for item in items]).to(rm.model.device)
        confidence = (
            routing_confidence(rm, prompts.input_ids, prompts.attention_mask, per_row=True)
            if config.layers == "confidence"
            else None
        )
        layers = select_layers(rm, config, confidence)
        delta = torch.zeros(len(items), len(layers), rm.num_experts, device=rm.layer(next(iter(layers))).device)
        try:
            if config.steps > 0:
                phase = adapt_phase(rm, config, layers, delta, prompts.input_ids, prompts.attention_mask)
                self._record([phase], len(items))
            return score_with(rm, tokenizer, items)  # δ [B, ...] expands item-major over the choices
        finally:
            for idx in layers:
                rm.layer(idx).row_offsets = None

    def generate(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        from reroute.rerouting import Rerouter

        rerouter = Rerouter(rm, **self.options)
        batch = prompt_batch(tokenizer, [item["prompt"] for item in items]).to(rm.model.device)
        out = rerouter.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        self._record(rerouter.phases, len(items))
        return decode_continuations(tokenizer, out, batch.prompt_len)


@dataclass
class SCMoEMethod:
    """SCMoE. Generation: greedy self-contrast decoding. Multiple choice: each continuation token is scored by
    :meth:`~reroute.SCMoE.scoring_logprobs` (the contrast where the token is plausible, the strong log-probability
    otherwise; never ``-inf``); ``stats["ties"]`` counts the items whose best score is shared by several choices
    (arg-max then takes the first; the harness reports it as the share of items). ``options`` are
    :class:`~reroute.SCMoEConfig` fields (beta, alpha, weak, ...)."""

    options: dict[str, Any] = field(default_factory=dict)
    name: str = "scmoe"
    stats: dict[str, float] = field(default_factory=dict)

    def score_choices(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item]) -> list[int]:
        from reroute.scmoe import SCMoE

        batch, n_choices = choice_batch(tokenizer, items)
        batch = batch.to(rm.model.device)
        logprobs = SCMoE(rm, **self.options).scoring_logprobs(batch.input_ids, batch.attention_mask)
        token_lp = logprobs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        scores = token_lp.masked_fill(~batch.target_mask[:, 1:], 0.0).sum(-1).view(len(items), n_choices)
        ties = (scores == scores.max(-1, keepdim=True).values).sum(-1) > 1
        self.stats["ties"] = self.stats.get("ties", 0.0) + float(ties.sum())
        return scores.argmax(-1).tolist()

    def generate(self, rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        from reroute.scmoe import SCMoE

        batch = prompt_batch(tokenizer, [item["prompt"] for item in items]).to(rm.model.device)
        out = SCMoE(rm, **self.options).generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return decode_continuations(tokenizer, out, batch.prompt_len)


METHODS: dict[str, Callable[..., Any]] = {
    "base": Base,
    "oracle": Oracle,
    "c3po": C3POMethod,
    "rerouting": ReroutingMethod,
    "scmoe": SCMoEMethod,
}


def make_method(name: str, **options: Any) -> Any:
    """Instantiate an evaluation method by name (options are its dataclass fields)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](**options)
