"""``reroute.Rerouter``: continuous rerouting during ``generate()`` (arXiv 2510.14853).

>>> rerouter = reroute.Rerouter(rm, interval=128, steps=5, lr=0.05)
>>> out = rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=256)
>>> out = model.generate(**inputs, custom_generate=reroute.rerouting_generate, interval=128, steps=5)

At prefill, and then every ``interval`` generated tokens, δ (per row, per selected layer) takes ``steps`` Adam steps
on the next-token loss of the row's context so far; between phases the model decodes with δ fixed. δ starts at
zero for every ``generate()`` call (every new prompt). After a phase the KV cache is rebuilt by prefilling the
whole context under the new routing (``rebuild_cache=False`` keeps the stale cache: faster, an approximation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import ALL_CACHE_NAMES

from reroute.attach import RoutedModel, attach
from reroute.data import Item
from reroute.generation import DecodingMethod, ModelStream
from reroute.methods import RoutingMethod, register_method, repeat_rows
from reroute.rerouting.adapt import (
    PhaseResult,
    adapt_phase,
    install_row_offsets,
    routing_confidence,
    select_layers,
)
from reroute.rerouting.config import RerouterConfig
from reroute.scoring import ContinuationBatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer
    from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class RowOffsets:
    """Rerouting's adapted state for a batch of contexts: the selected layers ``{layer: gradient weight}`` and δ
    ``[rows, L_sel, E]`` (column ``j`` belongs to the ``j``-th selected layer)."""

    layers: dict[int, float]
    delta: torch.Tensor


class _ReroutingScorer:
    """Next-token logits with adaptation phases at prefill and every ``interval`` tokens (see :mod:`generation`)."""

    def __init__(self, method: Rerouter, stream: ModelStream) -> None:
        self.rm, self.config, self.stream = method.rm, method.config, stream
        self.method = method
        self.generated = 0
        self.delta: torch.Tensor | None = None
        self.layers: dict[int, float] = {}

    @property
    def cache(self) -> Any:
        return self.stream.cache

    def _mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        mask = self.stream.model_kwargs.get("attention_mask")
        return torch.ones_like(input_ids) if mask is None else mask[:, : input_ids.shape[1]]

    def _phase(self, input_ids: torch.LongTensor) -> None:
        mask = self._mask(input_ids)
        prefill = self.method._prefill
        if self.delta is None and prefill is not None:  # the first phase was run before (RoutingMethod protocol)
            rows = repeat_rows(prefill.delta.shape[0], input_ids.shape[0])  # num_return_sequences rows share it
            self.layers, self.delta = dict(prefill.layers), prefill.delta.repeat_interleave(rows, dim=0)
            if self.layers:
                install_row_offsets(self.rm, list(self.layers), self.delta)
            return
        if self.delta is None:  # the first phase of this prompt: choose layers, δ = 0
            confidence = routing_confidence(self.rm, input_ids, mask) if self.config.layers == "confidence" else None
            self.layers = select_layers(self.rm, self.config, confidence)
            device = self.rm.layer(next(iter(self.layers))).device
            self.delta = torch.zeros(input_ids.shape[0], len(self.layers), self.rm.num_experts, device=device)
        result = adapt_phase(self.rm, self.config, self.layers, self.delta, input_ids, mask)
        self.method.phases.append(result)

    def prefill(self, input_ids: torch.LongTensor) -> torch.Tensor:
        self.method.phases = []
        if self.config.steps > 0:
            self._phase(input_ids)
        return self.stream.prefill(input_ids)

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        self.generated += 1
        if self.config.steps == 0 or self.generated % self.config.interval != 0:
            return self.stream.step(input_ids)
        self._phase(input_ids)
        if not self.config.rebuild_cache:
            return self.stream.step(input_ids)
        self.stream = _restart(self.stream)
        return self.stream.prefill(input_ids)


def _restart(stream: ModelStream) -> ModelStream:
    """A stream over the same rows and attention mask with a new, empty KV cache (to prefill the full context)."""
    kwargs = dict(stream.model_kwargs)
    for key in ALL_CACHE_NAMES:
        if kwargs.get(key) is not None:
            if not isinstance(kwargs[key], DynamicCache):
                raise ValueError(
                    f"rebuilding a {type(kwargs[key]).__name__} after a rerouting phase is not supported; use the "
                    "default dynamic cache or rebuild_cache=False"
                )
            kwargs[key] = DynamicCache(config=stream.model.config)
    return ModelStream(stream.model, stream.generation_config, kwargs)


class Rerouter(DecodingMethod, RoutingMethod):
    """Continuous rerouting on an attached model.

    Args:
        rm: the attached model (its own routing state, e.g. layer offsets, stays underneath δ).
        config: a :class:`RerouterConfig`, or its fields as keyword arguments (which also override a given config).

    After a call, ``phases`` holds each phase's :class:`~reroute.rerouting.adapt.PhaseResult` (losses, cost).
    """

    def __init__(self, rm: RoutedModel, config: RerouterConfig | None = None, **overrides: Any) -> None:
        self.rm = rm
        self.config = replace(config, **overrides) if config is not None else RerouterConfig(**overrides)
        select_layers(rm, self.config, {i: 0.0 for i in rm.moe_layers})  # fail early on a bad layer list
        self.phases: list[PhaseResult] = []
        self._prefill: RowOffsets | None = None

    def generate(
        self, input_ids: torch.LongTensor | None = None, *args: Any, **kwargs: Any
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """As :meth:`DecodingMethod.generate`; every row (``num_return_sequences`` rows too) adapts to its context."""
        if input_ids is not None:
            limit = getattr(self.rm.model.config, "max_position_embeddings", None)
            if limit is not None and input_ids.shape[1] > limit:
                raise ValueError(f"the prompt has {input_ids.shape[1]} tokens; the model's context is {limit}")
        return super().generate(input_ids, *args, **kwargs)

    def scorer(self, stream: ModelStream) -> _ReroutingScorer:
        return _ReroutingScorer(self, stream)

    def finish(self, scorer: _ReroutingScorer) -> None:
        for idx in scorer.layers:  # δ lives for this call only
            self.rm.layer(idx).row_offsets = None

    # --------------------------------------------------------------------------------------------- protocol
    @property
    def batch_adapt(self) -> bool:
        return self.config.layers != "confidence"  # confidence is measured over the whole batch

    def _record(self, phases: Sequence[PhaseResult], rows: int) -> None:
        for phase in phases:
            self.add_stats(forward_passes=phase.forward_passes * rows, backward_passes=phase.backward_passes * rows)

    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> RowOffsets:
        """The first phase (the one at prefill) on each prompt; δ ``[B, L_sel, E]``."""
        rows = prompts.input_ids.shape[0]
        if self.config.steps == 0:
            return RowOffsets({}, torch.zeros(rows, 0, self.rm.num_experts))
        prompts = prompts.to(self.rm.model.device)
        ids, mask = prompts.input_ids, prompts.attention_mask
        confidence = routing_confidence(self.rm, ids, mask) if self.config.layers == "confidence" else None
        layers = select_layers(self.rm, self.config, confidence)
        delta = torch.zeros(rows, len(layers), self.rm.num_experts, device=self.rm.layer(next(iter(layers))).device)
        try:
            self._record([adapt_phase(self.rm, self.config, layers, delta, ids, mask)], rows)
        finally:
            for idx in layers:
                self.rm.layer(idx).row_offsets = None
        return RowOffsets(dict(layers), delta.detach())

    def split_state(self, state: RowOffsets, rows: int) -> list[RowOffsets]:
        return [RowOffsets(dict(state.layers), state.delta[i : i + 1].clone()) for i in range(rows)]

    def stack_states(self, states: Sequence[RowOffsets]) -> RowOffsets:
        """Rows over the union of their layers (a layer a row did not adapt gets zero offsets, i.e. its routing is
        untouched); a layer's gradient weight is the mean over the rows that chose it."""
        layers = sorted({idx for s in states for idx in s.layers})
        template = states[0].delta
        delta = torch.zeros(len(states), len(layers), template.shape[-1], dtype=template.dtype, device=template.device)
        weights: dict[int, list[float]] = {idx: [] for idx in layers}
        for row, state in enumerate(states):
            for j, (idx, weight) in enumerate(state.layers.items()):
                delta[row, layers.index(idx)] = state.delta[0, j]
                weights[idx].append(weight)
        return RowOffsets({idx: sum(w) / len(w) for idx, w in weights.items()}, delta)

    @contextlib.contextmanager
    def applied(self, state: RowOffsets | None, batch: ContinuationBatch) -> Iterator[None]:
        if state is None or not state.layers:
            yield
            return
        delta = state.delta.repeat_interleave(repeat_rows(state.delta.shape[0], batch.input_ids.shape[0]), dim=0)
        self.rm.set_row_offsets({idx: delta[:, j].to(self.rm.layer(idx).device) for j, idx in enumerate(state.layers)})
        try:
            yield
        finally:
            for idx in state.layers:
                self.rm.layer(idx).row_offsets = None

    def generate_from(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any = None, **generate_kwargs: Any
    ) -> Any:
        """:meth:`generate` whose first phase is ``state`` (already adapted), when given."""
        self._prefill = state
        try:
            out = self.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            self._prefill = None
        self._record(self.phases, input_ids.shape[0])
        return out

    def __repr__(self) -> str:
        c = self.config
        return f"Rerouter(interval={c.interval}, steps={c.steps}, lr={c.lr}, layers={c.layers!r})"


register_method("rerouting", RerouterConfig, Rerouter)


def rerouting_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    interval: int = 128,
    steps: int = 5,
    lr: float = 0.05,
    layers: Any = "confidence",
    rerouter_config: RerouterConfig | None = None,
    token_streamer: BaseStreamer | None = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Continuous rerouting as a ``custom_generate`` callable:
    ``model.generate(**inputs, custom_generate=reroute.rerouting_generate, interval=128, steps=5, lr=0.05)``.

    ``rerouter_config`` replaces the separate hyperparameters; pass a streamer as ``token_streamer=`` (see
    :mod:`reroute.generation`). The model is attached if it is not yet.
    """
    config = rerouter_config or RerouterConfig(interval=interval, steps=steps, lr=lr, layers=layers)
    return Rerouter(attach(model), config).decoding_method(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        token_streamer=token_streamer,
        **model_kwargs,
    )
