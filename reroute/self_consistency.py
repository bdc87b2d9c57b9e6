"""Self-consistency (Wang et al., ICLR 2023, arXiv 2203.11171): sample n answers per prompt, keep the majority.

Works with any sampling method: plain ``model.generate``, ``reroute.SCMoE``, and routing-adaptation methods. For the
latter, adaptation that depends only on the prompt (C3PO's neighbour search and pathway optimisation, a prompt-level
rerouting phase) must run once per prompt, not once per sample. The contract:

* ``generate_fn(prompt, k)`` returns ``k`` samples for ``prompt``;
* with ``prepare=``, ``state = prepare(prompt)`` runs once per prompt and every call for that prompt is
  ``generate_fn(prompt, k, state)`` — however many calls ``samples_per_call`` splits the ``n`` samples into.

SCMoE has no prompt-level step (its contrast is per token), so it is used without ``prepare``::

    sample = reroute.text_sampler(reroute.SCMoE(rm, weak="rank3").generate, tokenizer, max_new_tokens=256)
    votes = reroute.self_consistency(sample, questions, n=20, extract_answer=last_number)
    predictions = [v.winner for v in votes]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Vote:
    """The vote of one prompt.

    Attributes:
        samples: the ``n`` samples in the order they were drawn.
        answers: each sample's extracted answer (``None``: nothing could be extracted; such samples do not vote).
        votes: ``Counter`` of the answers, in order of first appearance.
        winner: the answer with the most votes; among tied answers the one drawn first; ``None`` if no sample gave
            an answer.
    """

    samples: list[Any]
    answers: list[Hashable | None]
    votes: Counter
    winner: Hashable | None


def majority_vote(answers: Sequence[Hashable | None]) -> tuple[Counter, Hashable | None]:
    """``(votes, winner)`` of ``answers``: ``None`` answers abstain; ties go to the answer that appears first."""
    votes = Counter(a for a in answers if a is not None)
    # max() returns the first maximal key in iteration order, and a Counter iterates in order of first insertion
    winner = max(votes, key=votes.__getitem__) if votes else None
    return votes, winner


def self_consistency(
    generate_fn: Callable[..., Sequence[Any]],
    prompts: Sequence[Any],
    n: int,
    extract_answer: Callable[[Any], Hashable | None],
    *,
    prepare: Callable[[Any], Any] | None = None,
    samples_per_call: int | None = None,
) -> list[Vote]:
    """Sample ``n`` answers per prompt with ``generate_fn`` and take a majority vote.

    Args:
        generate_fn: ``generate_fn(prompt, k)`` (or ``generate_fn(prompt, k, state)`` with ``prepare``) returning
            ``k`` samples; :func:`text_sampler` wraps a ``generate``-style method into one.
        prompts: anything ``generate_fn`` and ``prepare`` accept (strings, item dicts, ...).
        n: samples per prompt.
        extract_answer: maps a sample to a hashable answer, or ``None`` when it holds none; normalise here
            (``"42.0"`` and ``"42"`` only vote together if this maps them to the same value).
        prepare: per-prompt step run once per prompt; its result is passed to every ``generate_fn`` call for that
            prompt.
        samples_per_call: draw the ``n`` samples in calls of at most this many (default: all ``n`` in one call).

    Returns:
        One :class:`Vote` per prompt, in order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if samples_per_call is None:
        samples_per_call = n
    if isinstance(samples_per_call, bool) or not isinstance(samples_per_call, int) or samples_per_call < 1:
        raise ValueError(f"samples_per_call must be a positive integer, got {samples_per_call!r}")
    results = []
    for prompt in prompts:
        state_args = () if prepare is None else (prepare(prompt),)
        samples: list[Any] = []
        while len(samples) < n:
            k = min(samples_per_call, n - len(samples))
            drawn = list(generate_fn(prompt, k, *state_args))
            if len(drawn) != k:
                raise ValueError(f"generate_fn returned {len(drawn)} samples for a request of {k}")
            samples.extend(drawn)
        answers = [extract_answer(sample) for sample in samples]
        votes, winner = majority_vote(answers)
        results.append(Vote(samples=samples, answers=answers, votes=votes, winner=winner))
    return results


def text_sampler(
    generate: Callable[..., Any],
    tokenizer: Any,
    device: str | torch.device | None = None,
    do_sample: bool = True,
    **generate_kwargs: Any,
) -> Callable[[str, int], list[str]]:
    """A ``generate_fn`` for :func:`self_consistency` from a ``generate``-style callable (``model.generate``,
    ``SCMoE(...).generate``): tokenises the prompt, asks for ``k`` samples with ``num_return_sequences=k`` (one
    batched call) and decodes the new tokens of each, special tokens skipped.

    ``device``: where the prompt ids go (the model's device); ``generate_kwargs`` go to every call
    (``max_new_tokens``, ``temperature``, ``top_p``, ...).
    """

    def sample(prompt: str, k: int) -> list[str]:
        inputs = tokenizer(prompt, return_tensors="pt").to(device or "cpu")
        with torch.no_grad():
            out = generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                num_return_sequences=k,
                do_sample=do_sample,
                **generate_kwargs,
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return sample
