"""The method protocol: what the evaluation harness, the lm-eval model and the CLI call on every method.

A method adapts routing to a batch of *contexts* (prompts), returns that adaptation as a *state* whose rows are the
contexts, and scores or generates under it:

>>> method = get_method("rerouting").method_cls.from_config(rm, tokenizer, RerouterConfig(steps=3))
>>> state = method.adapt_contexts(items, prompt_batch(tokenizer, [i["prompt"] for i in items]))
>>> scores = method.continuation_logprobs(choice_rows, state)     # rows item-major over the choices
>>> out = method.generate_from(input_ids, attention_mask, state, max_new_tokens=8)

States split into one-row states and stack back (:meth:`RoutingMethod.split_state` / :meth:`stack_states`), so
lm-eval caches one adaptation per context and re-assembles any batch of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from reroute.scoring import ContinuationBatch, padded_logits

if TYPE_CHECKING:
    from reroute.attach import RoutedModel
    from reroute.data import Item


@dataclass
class ContinuationScores:
    """Per batch row: ``logprob`` ``[B]`` the summed log-probability of the continuation tokens, ``greedy`` ``[B]``
    bool, True when every continuation token is the arg-max of its next-token distribution."""

    logprob: torch.Tensor
    greedy: torch.Tensor


class RoutingMethod:
    """Base class of a registered method (see :mod:`reroute.methods.registry`).

    A subclass sets ``self.rm`` and ``self.config`` and overrides what differs from the model's own routing:
    :meth:`adapt_contexts` (default: nothing to adapt), :meth:`applied` (install a state for a batch),
    :meth:`next_token_logits` (default: a forward under :meth:`applied`), :meth:`next_token_logprobs` (default: their
    log-softmax) when its scoring rule is not a softmax of logits, :meth:`generate_from`, and
    :meth:`split_state` / :meth:`stack_states` when its state is not ``None``.

    Class attributes:
        resources: options the method takes besides its config fields (``{name: help}``), e.g. C3PO's ``index``.
        needs_labels: adaptation reads each item's gold answer (an upper bound; lm-eval requests carry none).
        plain_routing: scoring is a plain forward of the model (lm-eval then uses ``HFLM``'s own code).
        batch_adapt: contexts may be adapted in one batch with the same result as one at a time.
        reports_ties: the harness counts in ``stats["ties"]`` the multiple-choice items whose best score several
            choices share (arg-max then takes the first).
    """

    resources: ClassVar[dict[str, str]] = {}
    needs_labels: ClassVar[bool] = False
    plain_routing: ClassVar[bool] = False
    reports_ties: ClassVar[bool] = False
    rm: RoutedModel
    config: Any

    @property
    def stats(self) -> dict[str, float]:
        """Costs summed over the rows adapted so far (``forward_passes``, ``backward_passes``, ...); the harness
        clears it and divides by the items."""
        if "_method_stats" not in self.__dict__:
            self.__dict__["_method_stats"] = {}
        return self.__dict__["_method_stats"]

    def add_stats(self, **costs: float) -> None:
        for key, value in costs.items():
            self.stats[key] = self.stats.get(key, 0.0) + float(value)

    @property
    def batch_adapt(self) -> bool:
        return True

    @classmethod
    def from_config(cls, rm: RoutedModel, tokenizer: Any, config: Any, **resources: Any) -> RoutingMethod:
        """The method on ``rm`` with ``config`` (its registered config dataclass) and its resources."""
        if resources:
            raise ValueError(f"{cls.__name__} takes no {', '.join(resources)}")
        return cls(rm, config)  # type: ignore[call-arg]

    @classmethod
    def reads_labels(cls, config: Any) -> bool:
        """Whether adaptation under ``config`` reads each item's gold answer (default: ``needs_labels``)."""
        return cls.needs_labels

    @classmethod
    def check_options(cls, config: Any, resources: dict[str, Any]) -> None:
        """Checks of resources that need no model (a missing folder, a missing required resource)."""

    # ------------------------------------------------------------------------------------------ adaptation
    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> Any:
        """The adapted routing state for ``items`` (one row per item; ``prompts``: their prompts tokenised and
        left-padded, prompt-only rows). ``None``: nothing to adapt."""
        return None

    def split_state(self, state: Any, rows: int) -> list[Any]:
        """One-row states, in row order."""
        if state is not None:
            raise NotImplementedError(f"{type(self).__name__} must define split_state for its states")
        return [None] * rows

    def stack_states(self, states: Sequence[Any]) -> Any:
        """The state whose row ``i`` is ``states[i]`` (one-row states)."""
        if any(s is not None for s in states):
            raise NotImplementedError(f"{type(self).__name__} must define stack_states for its states")
        return None

    @contextlib.contextmanager
    def applied(self, state: Any, batch: ContinuationBatch) -> Iterator[None]:
        """Install ``state`` for ``batch`` (its rows: the state's rows, each repeated ``B / rows`` times in a row,
        item-major) and remove it afterwards."""
        yield

    def gate_report(self, state: Any) -> dict[str, list[Any]] | None:
        """Per row of ``state``: ``{"gate": [name | None], <gate input>: [float], ...}``, the do-no-harm gate that
        kept the model's own routing for each row (``None``: the row was adapted) and the quantities the gates read
        (the harness reports them per item). ``None``: the method has no per-row gate (the default)."""
        return None

    # ------------------------------------------------------------------------------------------ scoring
    def next_token_logits(self, batch: ContinuationBatch, state: Any) -> torch.Tensor:
        """Next-token logits ``[B, T - 1, V]`` after each position of ``batch`` under the method; no gradient."""
        with torch.no_grad(), self.applied(state, batch):
            return padded_logits(self.rm.model, batch.input_ids, batch.attention_mask)[:, :-1]

    def next_token_logprobs(self, batch: ContinuationBatch, state: Any) -> torch.Tensor:
        """Next-token log-probabilities ``[B, T - 1, V]`` (float32) that score continuations; no gradient."""
        return torch.log_softmax(self.next_token_logits(batch, state).float(), dim=-1)

    def continuation_logprobs(self, batch: ContinuationBatch, state: Any = None) -> ContinuationScores:
        """Summed log-probability of each row's continuation (under :meth:`next_token_logprobs`) and whether it is
        the greedy one (every continuation token is the arg-max of those log-probabilities)."""
        batch = batch.to(self.rm.model.device)
        logprobs = self.next_token_logprobs(batch, state)
        targets, mask = batch.input_ids[:, 1:], batch.target_mask[:, 1:]
        # masked_fill, not a product: a method may give -inf to an implausible non-target token
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0].masked_fill(~mask, 0.0)
        greedy = ((logprobs.argmax(-1) == targets) | ~mask).all(-1)
        return ContinuationScores(token_lp.sum(-1).cpu(), greedy.cpu())

    # ------------------------------------------------------------------------------------------ generation
    def generate_from(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any = None, **generate_kwargs: Any
    ) -> Any:
        """``generate()`` on left-padded prompts ``[B, P]`` under ``state`` (``None``: adapt as the method's own
        ``generate`` does); returns what ``model.generate`` returns."""
        prompts = ContinuationBatch(input_ids, attention_mask, torch.zeros_like(input_ids, dtype=torch.bool),
                                    input_ids.shape[1])  # fmt: skip
        with torch.no_grad(), self.applied(state, prompts):
            return self.rm.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


def repeat_rows(state_rows: int, batch_rows: int) -> int:
    """How many batch rows each state row covers (item-major); an error when they do not divide."""
    if state_rows < 1 or batch_rows % state_rows:
        raise ValueError(f"a state of {state_rows} rows cannot cover a batch of {batch_rows} rows")
    return batch_rows // state_rows
