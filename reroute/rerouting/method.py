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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

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
    """Rerouting's adapted state for a batch of contexts: each selected layer's gradient weight per row
    ``{layer: [rows]}`` (0 where a row did not select the layer; CPU float32) and δ ``[rows, L_sel, E]`` (column
    ``j`` belongs to the ``j``-th selected layer)."""

    layers: dict[int, torch.Tensor]
    delta: torch.Tensor


def _row_weights(layers: Mapping[int, float | torch.Tensor], rows: int) -> dict[int, torch.Tensor]:
    """:func:`select_layers`' weights (one float for all rows, or ``[rows]``) as ``{layer: [rows]}`` per row."""
    return {
        idx: torch.as_tensor(weight, dtype=torch.float32).reshape(-1).expand(rows).cpu().clone()
        for idx, weight in layers.items()
    }


class _ReroutingScorer:
    """Next-token logits with adaptation phases at prefill and every ``interval`` tokens (see :mod:`generation`)."""

    late_stop = True  # a step beyond the end leaves at most a phase in ``phases``: drop_last_step forgets it

    def __init__(self, method: Rerouter, stream: ModelStream) -> None:
        self.rm, self.config, self.stream = method.rm, method.config, stream
        self.method = method
        self.generated = 0
        self.phased = False  # whether the last step ran a phase
        self.delta: torch.Tensor | None = None
        self.layers: dict[int, float] | dict[int, torch.Tensor] = {}
        # row offsets the user set: δ adds to them during the call, and they are back afterwards
        self.saved = method._user_row_offsets()

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
            weights = _row_weights(prefill.layers, prefill.delta.shape[0])
            self.layers = {idx: w.repeat_interleave(rows) for idx, w in weights.items()}
            self.delta = prefill.delta.repeat_interleave(rows, dim=0)
            if self.layers:
                install_row_offsets(self.rm, list(self.layers), self.delta, base=self.saved)
            return
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
        self.phased = False
        if self.config.steps == 0 or self.generated % self.config.interval != 0:
            return self.stream.step(input_ids)
        self._phase(input_ids)
        self.phased = True
        if not self.config.rebuild_cache:
            return self.stream.step(input_ids)
        self.stream = self.stream.restart()
        return self.stream.prefill(input_ids)

    def drop_last_step(self) -> None:
        """decode() ran one step beyond the end (its late stop) and drops it: forget a phase that step ran (δ goes
        back with the rest of the call's state in ``finish``)."""
        if self.phased:
            self.method.phases.pop()


class Rerouter(DecodingMethod, RoutingMethod):
    """Continuous rerouting on an attached model.

    Args:
        rm: the attached model (its own routing state, e.g. layer and row offsets, stays underneath δ and is as it
            was after each call).
        config: a :class:`RerouterConfig`, or its fields as keyword arguments (which also override a given config).

    Every row (``num_return_sequences`` rows too) adapts to its own context. After a call, ``phases`` holds each
    phase's :class:`~reroute.rerouting.adapt.PhaseResult` (losses, cost). δ stays on the model between a call's
    forwards, so a call holds the model for its thread (:meth:`~reroute.RoutedModel.exclusive`): another thread's
    forward or setter call meanwhile raises ``RuntimeError``.
    """

    def __init__(self, rm: RoutedModel, config: RerouterConfig | None = None, **overrides: Any) -> None:
        self.rm = rm
        self.config = replace(config, **overrides) if config is not None else RerouterConfig(**overrides)
        select_layers(rm, self.config, {i: 0.0 for i in rm.moe_layers})  # fail early on a bad layer list
        self.phases: list[PhaseResult] = []
        self._prefill: RowOffsets | None = None

    def scorer(self, stream: ModelStream) -> _ReroutingScorer:
        return _ReroutingScorer(self, stream)

    def finish(self, scorer: _ReroutingScorer) -> None:
        self._restore(scorer.saved)  # δ lives for this call only

    # --------------------------------------------------------------------------------------------- protocol
    def _record(self, phases: Sequence[PhaseResult], rows: int) -> None:
        for phase in phases:
            self.add_stats(forward_passes=phase.forward_passes * rows, backward_passes=phase.backward_passes * rows)

    def _user_row_offsets(self) -> dict[int, torch.Tensor | None]:
        """The row offsets set before the method runs, per MoE layer: δ adds to them, and they are put back."""
        return {idx: self.rm.layer(idx).row_offsets for idx in self.rm.moe_layers}

    def _restore(self, saved: Mapping[int, torch.Tensor | None]) -> None:
        for idx, row_offsets in saved.items():
            self.rm.layer(idx).row_offsets = row_offsets

    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> RowOffsets:
        """The first phase (the one at prefill) on each prompt; δ ``[B, L_sel, E]``. Each row selects its layers by
        its own routing confidence, so a row adapts as it would alone (the protocol's ``batch_adapt``); the user's
        row offsets stay underneath δ and are as they were afterwards."""
        rows = prompts.input_ids.shape[0]
        if self.config.steps == 0:
            return RowOffsets({}, torch.zeros(rows, 0, self.rm.num_experts))
        prompts = prompts.to(self.rm.model.device)
        ids, mask = prompts.input_ids, prompts.attention_mask
        with self.rm.exclusive("Rerouter.adapt_contexts"):  # δ stays on the model between the phase's steps
            saved = self._user_row_offsets()
            confidence = (
                routing_confidence(self.rm, ids, mask, per_row=True) if self.config.layers == "confidence" else None
            )
            layers = select_layers(self.rm, self.config, confidence)
            device = self.rm.layer(next(iter(layers))).device
            delta = torch.zeros(rows, len(layers), self.rm.num_experts, device=device)
            try:
                self._record([adapt_phase(self.rm, self.config, layers, delta, ids, mask, base=saved)], rows)
            finally:
                self._restore(saved)
        return RowOffsets(_row_weights(layers, rows), delta.detach())

    def split_state(self, state: RowOffsets, rows: int) -> list[RowOffsets]:
        """One-row states holding the layers each row selected (non-zero weight)."""
        weights = _row_weights(state.layers, rows)
        out = []
        for i in range(rows):
            kept = [(j, idx) for j, (idx, w) in enumerate(weights.items()) if float(w[i]) != 0.0]
            columns = torch.tensor([j for j, _ in kept], dtype=torch.long, device=state.delta.device)
            layers = {idx: weights[idx][i : i + 1].clone() for _, idx in kept}
            out.append(RowOffsets(layers, state.delta[i : i + 1].index_select(1, columns)))
        return out

    def stack_states(self, states: Sequence[RowOffsets]) -> RowOffsets:
        """Rows over the union of their layers; a layer a row did not adapt gets zero offsets (its routing is
        untouched) and gradient weight 0 (later phases leave it alone on that row, as the row alone would)."""
        layers = sorted({idx for s in states for idx in s.layers})
        template = states[0].delta
        delta = torch.zeros(len(states), len(layers), template.shape[-1], dtype=template.dtype, device=template.device)
        weights = torch.zeros(len(states), len(layers))
        for row, state in enumerate(states):
            for j, (idx, weight) in enumerate(_row_weights(state.layers, 1).items()):
                delta[row, layers.index(idx)] = state.delta[0, j]
                weights[row, layers.index(idx)] = weight[0]
        return RowOffsets({idx: weights[:, j] for j, idx in enumerate(layers)}, delta)

    @contextlib.contextmanager
    def applied(self, state: RowOffsets | None, batch: ContinuationBatch) -> Iterator[None]:
        """δ (each state row over its batch rows) added to the user's row offsets, which are back on exit."""
        if state is None or not state.layers:
            yield
            return
        delta = state.delta.repeat_interleave(repeat_rows(state.delta.shape[0], batch.input_ids.shape[0]), dim=0)
        with self.rm.exclusive("Rerouter.applied"):  # δ stays on the model for the block's forwards
            saved = self._user_row_offsets()
            install_row_offsets(self.rm, list(state.layers), delta, base=saved)
            try:
                yield
            finally:
                self._restore(saved)

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
