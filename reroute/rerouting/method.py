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

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from reroute.attach import RoutedModel, attach
from reroute.generation import DecodingMethod, ModelStream
from reroute.rerouting.adapt import PhaseResult, RerouterConfig, adapt_phase, routing_confidence, select_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer
    from transformers.generation.utils import GenerateDecoderOnlyOutput


class _ReroutingScorer:
    """Next-token logits with adaptation phases at prefill and every ``interval`` tokens (see :mod:`generation`)."""

    def __init__(self, method: Rerouter, stream: ModelStream) -> None:
        self.rm, self.config, self.stream = method.rm, method.config, stream
        self.method = method
        self.generated = 0
        self.delta: torch.Tensor | None = None
        self.layers: dict[int, float] | dict[int, torch.Tensor] = {}
        # row offsets the user set: δ adds to them during the call, and they are back afterwards
        self.saved = {idx: self.rm.layer(idx).row_offsets for idx in self.rm.moe_layers}

    @property
    def cache(self) -> Any:
        return self.stream.cache

    def _mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        mask = self.stream.model_kwargs.get("attention_mask")
        return torch.ones_like(input_ids) if mask is None else mask[:, : input_ids.shape[1]]

    def _phase(self, input_ids: torch.LongTensor) -> None:
        mask = self._mask(input_ids)
        if self.delta is None:  # the first phase of this prompt: choose layers, δ = 0
            confidence = (
                routing_confidence(self.rm, input_ids, mask, per_row=True)
                if self.config.layers == "confidence"
                else None
            )
            self.layers = select_layers(self.rm, self.config, confidence)  # per row: batch-mates do not matter
            device = self.rm.layer(next(iter(self.layers))).device
            self.delta = torch.zeros(input_ids.shape[0], len(self.layers), self.rm.num_experts, device=device)
        result = adapt_phase(self.rm, self.config, self.layers, self.delta, input_ids, mask, base=self.saved)
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
        self.stream = self.stream.restart()
        return self.stream.prefill(input_ids)


class Rerouter(DecodingMethod):
    """Continuous rerouting on an attached model.

    Args:
        rm: the attached model (its own routing state, e.g. layer and row offsets, stays underneath δ and is as it
            was after each call).
        config: a :class:`RerouterConfig`, or its fields as keyword arguments (which also override a given config).

    Every row (``num_return_sequences`` rows too) adapts to its own context. After a call, ``phases`` holds each
    phase's :class:`~reroute.rerouting.adapt.PhaseResult` (losses, cost).
    """

    def __init__(self, rm: RoutedModel, config: RerouterConfig | None = None, **overrides: Any) -> None:
        self.rm = rm
        self.config = replace(config, **overrides) if config is not None else RerouterConfig(**overrides)
        select_layers(rm, self.config, {i: 0.0 for i in rm.moe_layers})  # fail early on a bad layer list
        self.phases: list[PhaseResult] = []

    def scorer(self, stream: ModelStream) -> _ReroutingScorer:
        return _ReroutingScorer(self, stream)

    def finish(self, scorer: _ReroutingScorer) -> None:
        for idx, row_offsets in scorer.saved.items():  # δ lives for this call only
            self.rm.layer(idx).row_offsets = row_offsets

    def __repr__(self) -> str:
        c = self.config
        return f"Rerouter(interval={c.interval}, steps={c.steps}, lr={c.lr}, layers={c.layers!r})"


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

    ``rerouter_config`` replaces the separate hyperparameters; a streamer works as ``streamer=`` or
    ``token_streamer=`` (see :mod:`reroute.generation`). The model is attached if it is not yet.
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
