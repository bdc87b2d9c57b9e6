"""Scoring continuations: the log-likelihood primitive shared by multiple-choice evaluation and the methods.

A batch row is ``[left-padded prompt | continuation | right padding]``: every prompt ends at the same column
``prompt_len - 1``, which is where C3PO re-mixes routing (the last prompt token) and where per-row routing state
can be addressed by absolute position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ContinuationBatch:
    """Token batch for scoring continuations.

    Attributes:
        input_ids: ``[B, P + C]`` prompt (left-padded to ``P``) then continuation (right-padded to ``C``).
        attention_mask: ``[B, P + C]``.
        target_mask: ``[B, P + C]`` bool, True at continuation tokens (the scored targets).
        prompt_len: ``P``; the last prompt token of every row sits at column ``P - 1``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    prompt_len: int

    def to(self, device: torch.device | str) -> ContinuationBatch:
        return ContinuationBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device), self.prompt_len
        )

    @property
    def last_prompt_positions(self) -> torch.Tensor:
        """``[B, 1]`` absolute position of each row's last prompt token."""
        return torch.full((self.input_ids.shape[0], 1), self.prompt_len - 1, dtype=torch.long)


def build_batch(
    prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_token_id: int
) -> ContinuationBatch:
    """Pack token-id lists into a :class:`ContinuationBatch`. Continuations may be empty (prompt-only rows)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        raise ValueError("nothing to score: empty batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    prompt_len = max(len(p) for p in prompts)
    cont_len = max(len(c) for c in continuations)
    rows = len(prompts)
    input_ids = torch.full((rows, prompt_len + cont_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        start = prompt_len - len(prompt)
        input_ids[i, start:prompt_len] = torch.as_tensor(prompt)
        input_ids[i, prompt_len : prompt_len + len(cont)] = torch.as_tensor(cont, dtype=torch.long)
        attention_mask[i, start : prompt_len + len(cont)] = 1
        target_mask[i, prompt_len : prompt_len + len(cont)] = True
    return ContinuationBatch(input_ids, attention_mask, target_mask, prompt_len)


def continuation_logprobs(model: nn.Module, batch: ContinuationBatch) -> torch.Tensor:
    """Sum of the log-probabilities of each row's continuation tokens ``[B]`` (differentiable).

    Position ids follow the attention mask (as ``generate()`` does for left padding), so a row's score does not
    depend on how much padding its batch needed.
    """
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
    ).logits  # [B, T, V]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.input_ids[:, 1:]
    token_lp = logprobs.gather(-1, targets[..., None])[..., 0]
    return (token_lp * batch.target_mask[:, 1:]).sum(-1)
