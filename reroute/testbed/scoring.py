"""Evaluation primitives on plain PyTorch + transformers for the testbed's training script: multiple-choice
log-likelihood and greedy exact match, built on :mod:`reroute.scoring` (one scoring stack: the same tokenisation,
log-likelihood and exact-match rules as the harness).

Multiple choice follows lm-evaluation-harness: a choice's score is the summed log-probability of its tokens after
the prompt, where the choice's tokens are those of ``prompt + choice`` past the prompt's own tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reroute.scoring import answer_matches, build_batch, continuation_logprobs, encode_pair


@dataclass
class ChoiceScores:
    """Multiple-choice results for ``n`` items of ``c`` choices each.

    Attributes:
        loglikelihoods: ``[n, c]`` summed continuation log-probabilities.
        predictions: ``[n]`` index of the highest-scoring choice.
        correct: ``[n]`` bool, prediction equals the item's ``label``.
    """

    loglikelihoods: torch.Tensor
    predictions: torch.Tensor
    correct: torch.Tensor

    @property
    def accuracy(self) -> float:
        """Share of items answered correctly."""
        return float(self.correct.float().mean())


def split_continuation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` as tokenised after it (:func:`reroute.scoring.encode_pair`);
    raises if the continuation has no tokens of its own."""
    context, target = encode_pair(tokenizer, prompt, continuation)
    if not target:
        raise ValueError(f"{continuation!r} does not tokenise as a non-empty continuation of {prompt!r}")
    return context, target


def continuation_loglikelihoods(
    model: PreTrainedModel, pad_token_id: int, pairs: Sequence[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """``[len(pairs)]`` summed log-probability of each continuation given its context, in one forward
    (:func:`reroute.scoring.continuation_logprobs`; differentiable, so a method can optimise routing on it)."""
    batch = build_batch([c for c, _ in pairs], [t for _, t in pairs], pad_token_id).to(model.device)
    return continuation_logprobs(model, batch)


@torch.no_grad()
def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    batch_size: int = 64,
) -> ChoiceScores:
    """Multiple-choice scoring of ``items`` (each with ``prompt``, ``choices``, ``label``; equal choice counts).

    ``batch_size`` counts items; each forward holds ``batch_size * c`` rows.
    """
    counts = {len(item["choices"]) for item in items}
    if len(counts) != 1:
        raise ValueError(f"items must all have the same number of choices, got {sorted(counts)}")
    num_choices = counts.pop()
    pad = tokenizer.pad_token_id
    scores = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pairs = [split_continuation(tokenizer, item["prompt"], choice) for item in chunk for choice in item["choices"]]
        scores.append(continuation_loglikelihoods(model, pad, pairs).view(len(chunk), num_choices).cpu())
    loglikelihoods = torch.cat(scores)
    predictions = loglikelihoods.argmax(-1)
    labels = torch.tensor([int(item["label"]) for item in items])
    return ChoiceScores(loglikelihoods, predictions, predictions == labels)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 4,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens dropped, surrounding whitespace stripped).

    Prompts are left-padded so that every row's next token comes at the same column; ``generate`` derives the
    position ids from the attention mask, so a row's output does not depend on its batch-mates.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = batch.to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            texts += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return texts


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 4,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[n]`` bool: the first line of each item's greedy continuation equals its ``answer``, whitespace-normalised
    (:func:`reroute.scoring.answer_matches`, the rule ``reroute eval --mode gen`` uses).

    Cutting at the first line break is lm-evaluation-harness's ``until: ["\\n"]``: after an answer a model trained
    on few-shot prompts may go on with the next demonstration.
    """
    texts = generate_greedy(model, tokenizer, [item["prompt"] for item in items], max_new_tokens, batch_size)
    return torch.tensor([answer_matches(text, str(item["answer"])) for text, item in zip(texts, items)])
