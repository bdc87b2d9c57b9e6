"""C3PO's label-reading upper bound (``oracle``) as an evaluation method.

The oracle is :func:`reroute.c3po.optimise_oracle`, the same optimisation as ``C3PO(surrogate="oracle")``; it is
registered apart because an upper bound runs without C3PO's gates and its prompt forward, with more steps
(30 at lr 0.2 against NGD's 10 at 0.1) so that it gets near the optimum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reroute.attach import RoutedModel
from reroute.c3po.oracle import optimise_oracle
from reroute.c3po.pathway import Pathway
from reroute.data import Item
from reroute.methods.protocol import RoutingMethod, repeat_rows
from reroute.methods.registry import register_method
from reroute.scoring import ContinuationBatch, gold_batch


@dataclass
class OracleConfig:
    """C3PO's oracle as an upper bound (defaults: C3PO's OLMoE layers and core experts; more steps than NGD)."""

    layers: int | float | list[int] = field(default=5, metadata={"help": "critical layers (as C3PO's)"})
    core_experts: int | float = field(default=20, metadata={"help": "core experts per item (as C3PO's)"})
    steps: int = field(default=30, metadata={"help": "Adam steps on each item's own gold answer"})
    lr: float = field(default=0.2, metadata={"help": "Adam learning rate on the mixing logits"})

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")


@register_method("oracle", config_cls=OracleConfig)
class Oracle(RoutingMethod):
    """Each item's pathway optimised on its own gold answer (reads the label: evaluation only)."""

    needs_labels = True

    def __init__(self, rm: RoutedModel, tokenizer: Any, config: OracleConfig | None = None) -> None:
        self.rm, self.tokenizer, self.config = rm, tokenizer, config or OracleConfig()

    @classmethod
    def from_config(cls, rm: RoutedModel, tokenizer: Any, config: Any, **resources: Any) -> Oracle:
        if resources:
            raise ValueError(f"the oracle takes no {', '.join(resources)}")
        return cls(rm, tokenizer, config)

    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> Pathway:
        cfg = self.config
        with self.rm.exclusive("the oracle's adaptation"):  # the optimised re-mixing stays on the model between steps
            result = optimise_oracle(
                self.rm, gold_batch(self.tokenizer, items), cfg.layers, cfg.core_experts, cfg.steps, cfg.lr
            )
        self.add_stats(
            forward_passes=result.forward_passes * len(items), backward_passes=result.backward_passes * len(items)
        )
        return result.pathway

    def split_state(self, state: Pathway, rows: int) -> list[Pathway]:
        return [state.select([i]) for i in range(rows)]

    def stack_states(self, states: Sequence[Pathway]) -> Pathway:
        first = states[0]
        return Pathway(
            list(first.layers),
            {layer: torch.cat([s.experts[layer] for s in states]) for layer in first.layers},
            {layer: torch.cat([s.logits[layer] for s in states]) for layer in first.layers},
        )

    @contextlib.contextmanager
    def applied(self, state: Pathway | None, batch: ContinuationBatch) -> Iterator[None]:
        if state is None:
            yield
            return
        copies = repeat_rows(state.rows, batch.input_ids.shape[0])
        with self.rm.exclusive("the oracle's scoring"):  # the re-mixing stays on the model for the block's forwards
            state.apply(self.rm, batch.last_prompt_positions[:1])
            try:
                with self.rm.row_expansion(copies):  # each item's state covers its consecutive rows (item-major)
                    yield
            finally:
                self.rm.clear_mixing(state.layers)
