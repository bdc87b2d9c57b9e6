"""Reuse of what an optimisation step cannot change, across the steps.

C3PO (critical layers) and rerouting (selected layers) change routing only from some layer on, so the hidden states
entering that layer do not depend on the state being optimised. ``PrefixCache`` runs the batch once, keeps those
hidden states, and while active replaces the decoder layers below with pass-throughs that hand the cached states on:
each optimisation step then pays only for the critical suffix of the network (plus embeddings, masks and the head).

C3PO re-mixes only from one token position on (the last prompt token), and attention is causal, so nothing before
that position changes either, in any layer. ``SuffixScorer`` adds that: it keeps the KV cache of the positions
before the first re-mixed one, and each step runs only the columns from there on (the re-mixed token(s) and the
continuation) through the layers from the first adapted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from reroute.attach import RoutedModel
from reroute.compat import CACHE_KWARG
from reroute.scoring import ContinuationBatch


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: returns the cached output (last prefix layer) or its input unchanged."""

    def __init__(self, cached: Any = None, as_tuple: bool = False) -> None:
        super().__init__()
        self.cached, self.as_tuple = cached, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.cached is not None:
            return self.cached
        return (hidden_states,) if self.as_tuple else hidden_states


def decoder_layers(rm: RoutedModel) -> nn.ModuleList:
    """The ``layers`` module list of the model's decoder stack."""
    for name, module in rm.model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > max(rm.moe_layers):
            return module
    raise RuntimeError("could not find the decoder's `layers` module list")


class PrefixCache:
    """``with PrefixCache(rm, first_layer, run_batch):`` — inside, forwards of the same batch skip the layers
    below ``first_layer``.

    ``run_batch`` is a callable running the model on the batch (it is called once, without gradients, to record
    the hidden states entering ``first_layer``). With ``start``, only columns ``start:`` of those hidden states are
    kept: later forwards run those columns only (on a KV cache of the others, see :class:`SuffixScorer`). With
    ``rows`` (long ``[B]``), ``run_batch`` runs distinct rows only and row ``b`` of later forwards is its row
    ``rows[b]``.
    """

    def __init__(
        self, rm: RoutedModel, first_layer: int, run_batch: Any, start: int = 0, rows: torch.Tensor | None = None
    ) -> None:
        self.layers = decoder_layers(rm)
        self.first_layer = first_layer
        self.run_batch = run_batch
        self.start = start
        self.rows = rows
        self.saved: list[nn.Module] = []

    def __enter__(self) -> PrefixCache:
        if self.first_layer == 0:
            return self
        captured: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured["output"] = output

        handle = self.layers[self.first_layer - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.run_batch()
        finally:
            handle.remove()
        output = captured["output"]
        as_tuple = isinstance(output, tuple)
        cached = tuple(self._keep(o) for o in output) if as_tuple else self._keep(output)
        self.saved = [self.layers[i] for i in range(self.first_layer)]
        for i in range(self.first_layer - 1):
            self.layers[i] = _PassThrough(as_tuple=as_tuple)
        self.layers[self.first_layer - 1] = _PassThrough(cached=cached, as_tuple=as_tuple)
        return self

    def _keep(self, value: Any) -> Any:
        """The recorded hidden states ``[B, T, H]`` from column ``start`` on, detached (other outputs as they are)."""
        if not torch.is_tensor(value) or value.dim() != 3:
            return value.detach() if torch.is_tensor(value) else value
        value = value[:, self.start :].detach()
        return value if self.rows is None else value.index_select(0, self.rows.to(value.device))

    def __exit__(self, *exc: object) -> None:
        for i, layer in enumerate(self.saved):
            self.layers[i] = layer
        self.saved = []


class SuffixScorer:
    """``with SuffixScorer(rm, batch, first_layer, start) as score:`` — inside, ``score()`` returns what
    ``continuation_logprobs(rm.model, batch)`` does (``[B]``, differentiable in the routing state of layers
    ``>= first_layer`` at columns ``>= start``), recomputing only columns ``start:`` of layers ``first_layer:``.

    On entry the batch's distinct rows (neighbours shared by several test items run once) run once, without
    gradients and under the routing state of that moment: it records the KV cache of columns ``:start`` (every
    layer) and the hidden states of columns ``start:`` entering ``first_layer``.
    Valid while the routing of layers below ``first_layer`` and of columns before ``start`` stays as it was then.
    ``batch``: continuation rows whose scored tokens all lie after ``start`` (``start < prompt_len``).
    """

    def __init__(self, rm: RoutedModel, batch: ContinuationBatch, first_layer: int, start: int) -> None:
        if not 0 < start < batch.prompt_len:
            raise ValueError(f"suffix start must be in (0, {batch.prompt_len}), got {start}")
        self.rm, self.batch, self.first_layer, self.start = rm, batch, first_layer, start
        self.position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.prefix_cache: PrefixCache | None = None

    def _run(self, columns: slice, cache: DynamicCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        batch = self.batch
        ids, mask, positions = batch.input_ids, batch.attention_mask, self.position_ids
        if rows is not None:
            ids, mask, positions = ids[rows], mask[rows], positions[rows]
        return self.rm.model(
            input_ids=ids[:, columns],
            attention_mask=mask,
            position_ids=positions[:, columns],
            use_cache=True,
            **{CACHE_KWARG: cache},
        ).logits

    def __enter__(self) -> SuffixScorer:
        cache = DynamicCache()
        batch = self.batch
        _, inverse = torch.unique(torch.cat([batch.input_ids, batch.attention_mask], 1), dim=0, return_inverse=True)
        distinct = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=inverse.device)
        distinct[inverse] = torch.arange(len(inverse), device=inverse.device)  # one row per distinct row

        def run() -> torch.Tensor:
            return self._run(slice(None), cache, distinct)

        # one forward of the distinct rows: their cache's first `start` columns, and (through PrefixCache's hook, on
        # the suffix columns) the hidden states entering the first adapted layer, spread back to every row
        self.prefix_cache = PrefixCache(self.rm, self.first_layer, run, self.start, inverse)
        self.prefix_cache.__enter__()
        if self.first_layer == 0:
            with torch.no_grad():
                run()
        try:
            self.prefix_kv = [
                (
                    layer.keys[..., : self.start, :].index_select(0, inverse.to(layer.keys.device)),
                    layer.values[..., : self.start, :].index_select(0, inverse.to(layer.values.device)),
                )
                for layer in cache.layers
            ]
        except AttributeError as exc:  # a cache layout other than transformers 5.x's per-layer keys/values
            self.prefix_cache.__exit__(None, None, None)
            raise RuntimeError("suffix-only recompute needs a transformers 5.x DynamicCache") from exc
        return self

    def __call__(self) -> torch.Tensor:
        """Summed log-probability of each row's continuation ``[B]`` under the current routing state."""
        cache = DynamicCache(self.prefix_kv)  # a fresh cache per step: the prefix stays a constant of the graph
        logits = self._run(slice(self.start, None), cache)
        targets = self.batch.input_ids[:, self.start + 1 :]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return (logprobs * self.batch.target_mask[:, self.start + 1 :]).sum(-1)

    def __exit__(self, *exc: object) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.__exit__(*exc)
        self.prefix_kv = []
