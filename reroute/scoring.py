"""Scoring continuations: the log-likelihood primitive shared by multiple-choice evaluation and the methods.

A batch row is ``[left-padded prompt | continuation | right padding]``: every prompt ends at the same column
``prompt_len - 1``, which is where C3PO re-mixes routing (the last prompt token) and where per-row routing state
can be addressed by absolute position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache

from reroute.compat import CACHE_KWARG, cache_holding
from reroute.data import Item, gold_text

if TYPE_CHECKING:
    from reroute.attach import RoutedModel


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


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` that follow the attention mask (as ``generate()`` gives them for left padding): a
    row's first real token is position 0 however much padding its batch needed."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def padded_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a padded batch, no KV cache. Position ids follow the attention mask
    (:func:`mask_positions`), so a row's result does not depend on how much padding its batch needed."""
    position_ids = mask_positions(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def next_token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of every next token ``[B, T - 1]`` (entry ``t`` scores ``input_ids[:, t + 1]``;
    differentiable)."""
    logprobs = torch.log_softmax(padded_logits(model, input_ids, attention_mask)[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None])[..., 0]


def continuation_logprobs(model: nn.Module, batch: ContinuationBatch) -> torch.Tensor:
    """Sum of the log-probabilities of each row's continuation tokens ``[B]`` (differentiable)."""
    token_lp = next_token_logprobs(model, batch.input_ids, batch.attention_mask)
    return (token_lp * batch.target_mask[:, 1:]).sum(-1)


def suffix_continuation_logprobs(logits: torch.Tensor, batch: ContinuationBatch, start: int) -> torch.Tensor:
    """:func:`continuation_logprobs` ``[B]`` from the logits of columns ``start:`` of ``batch`` only (a forward on a
    KV cache of the first ``start`` columns, which hold no scored token)."""
    targets = batch.input_ids[:, start + 1 :]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (logprobs * batch.target_mask[:, start + 1 :]).sum(-1)


PromptKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer, the keys and values ``[rows, kv_heads, columns, head_dim]`` of the first columns of a batch of
left-padded prompts: what scoring their continuations can reuse instead of running the prompts again."""


def prompt_kv(cache: Any, columns: int) -> PromptKV:
    """The first ``columns`` of every layer of a transformers 5.x ``DynamicCache`` (per-layer ``keys``/``values``)."""
    try:
        return [(layer.keys[..., :columns, :], layer.values[..., :columns, :]) for layer in cache.layers]
    except AttributeError as exc:  # a cache layout other than transformers 5.x's per-layer keys/values
        raise RuntimeError("reusing a prompt's KV cache needs a transformers 5.x DynamicCache") from exc


def prompt_forward_kv(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, columns: int, **kwargs: Any
) -> tuple[Any, PromptKV]:
    """One forward of left-padded prompts that keeps their KV cache: the model's output (last column's logits only)
    and the keys and values of the first ``columns`` (:func:`prompt_kv`). ``kwargs`` go to the model call.

    The cache is a plain ``DynamicCache`` made here, so every layer keeps every column (a sliding-window layer too:
    its mask, not its cache, limits what it attends to)."""
    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=mask_positions(attention_mask),
        use_cache=True,
        logits_to_keep=1,  # left padding: the last column is every prompt's last token
        **{CACHE_KWARG: cache},
        **kwargs,
    )
    return out, prompt_kv(cache, columns)


def shares_prompts(batch: ContinuationBatch, prompts: ContinuationBatch) -> bool:
    """Whether every group of ``n`` consecutive rows of ``batch`` (item-major) holds, in its prompt columns, exactly
    the matching row of ``prompts`` (the same tokens, the same padding), so that :func:`continuation_logprobs_from`
    may reuse their KV."""
    rows = prompts.input_ids.shape[0]
    if batch.prompt_len != prompts.prompt_len or rows == 0 or batch.input_ids.shape[0] % rows:
        return False
    n = batch.input_ids.shape[0] // rows
    p = batch.prompt_len
    return torch.equal(batch.input_ids[:, :p], prompts.input_ids[:, :p].repeat_interleave(n, 0)) and torch.equal(
        batch.attention_mask[:, :p], prompts.attention_mask[:, :p].repeat_interleave(n, 0)
    )


class _SharedPrefix(DynamicCache):
    """The KV cache of a forward that scores ``repeats`` rows per cached prompt row: each layer returns the prompt's
    keys and values, repeated per row, followed by the forward's own, and keeps neither (the forward is the last one
    on this cache). So the forward holds the repeated prompt KV of one layer at a time, not of every layer at once,
    as a cache that stores what it returns would: ``rows x layers x prompt`` is what a long few-shot prompt and many
    choices would otherwise need on top of the model."""

    def __init__(self, prefix: PromptKV, repeats: int) -> None:
        held = cache_holding(prefix)
        super().__init__()
        self.layers = held.layers
        self.repeats = repeats

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        keys = layer.keys.repeat_interleave(self.repeats, 0)
        values = layer.values.repeat_interleave(self.repeats, 0)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def continuation_logprobs_from(model: nn.Module, batch: ContinuationBatch, prefix: PromptKV) -> torch.Tensor:
    """What :func:`continuation_logprobs` gives (``[B]``, up to float rounding), running only the columns after
    ``prefix``: ``prefix`` holds the KV of the first columns of each prompt (``[B / n, ...]``: the ``n`` rows of a
    prompt, item-major, share one entry), as :func:`prompt_forward_kv` keeps it. Those columns must not differ
    between the prompt forward and this one (routing state that changes them — C3PO re-mixes at the last prompt
    token — must start after them), and must end before the first scored token."""
    columns = prefix[0][0].shape[-2]
    if not 0 < columns <= batch.prompt_len - 1:
        raise ValueError(f"the reused prompt columns must be 1 to {batch.prompt_len - 1}, got {columns}")
    repeats, left = divmod(batch.input_ids.shape[0], prefix[0][0].shape[0])
    if left:
        raise ValueError(f"{batch.input_ids.shape[0]} rows do not split into {prefix[0][0].shape[0]} prompts")
    logits = model(
        input_ids=batch.input_ids[:, columns:],
        attention_mask=batch.attention_mask,
        position_ids=mask_positions(batch.attention_mask)[:, columns:],
        use_cache=True,
        **{CACHE_KWARG: _SharedPrefix(prefix, repeats)},
    ).logits
    return suffix_continuation_logprobs(logits, batch, columns)


def continuation_logprobs_shared(model: nn.Module, batch: ContinuationBatch, n: int) -> torch.Tensor:
    """:func:`continuation_logprobs` of a batch of ``n`` continuations per prompt (item-major, e.g. a
    :func:`choice_batch`) that runs each prompt once: the prompts, then every row's last prompt token and
    continuation on their KV. Equal up to float rounding; the prompt tokens pass through the model once instead of
    ``n`` times."""
    rows = batch.input_ids.shape[0]
    if n < 1 or rows % n:
        raise ValueError(f"{rows} rows do not split into groups of n={n}")
    p = batch.prompt_len
    if p < 2:
        return continuation_logprobs(model, batch)
    ids, mask = batch.input_ids[::n, :p], batch.attention_mask[::n, :p]
    if not shares_prompts(batch, ContinuationBatch(ids, mask, torch.zeros_like(ids, dtype=torch.bool), p)):
        raise ValueError(f"each group of n={n} consecutive rows must share one prompt (tokens and padding)")
    _, prefix = prompt_forward_kv(model, ids, mask, p - 1)
    return continuation_logprobs_from(model, batch, prefix)


def decode_continuations(tokenizer: Any, sequences: torch.Tensor, prompt_len: int) -> list[str]:
    """The generated text after column ``prompt_len`` of each row, special tokens dropped, stripped."""
    return [tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip() for row in sequences]


def encode_pair(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``continuation`` as it is tokenised after the prompt (lm-eval's rule:
    encode the whole string and split off the prompt's tokens)."""
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    if whole[: len(context)] != context:
        raise ValueError(f"tokenizing {prompt!r} + {continuation!r} does not keep the prompt's tokens as a prefix")
    return context, whole[len(context) :]


def choice_batch(tokenizer: Any, items: Sequence[Item]) -> tuple[ContinuationBatch, int]:
    """One row per (item, choice), item-major; returns the batch and the number of choices per item."""
    counts = {len(item["choices"]) for item in items}
    if len(counts) != 1:
        raise ValueError("items in one batch must have the same number of choices")
    prompts, continuations = [], []
    for item in items:
        for choice in item["choices"]:
            context, cont = encode_pair(tokenizer, item["prompt"], choice)
            prompts.append(context)
            continuations.append(cont)
    return build_batch(prompts, continuations, pad_id(tokenizer)), counts.pop()


def gold_batch(tokenizer: Any, items: Sequence[Item]) -> ContinuationBatch:
    """One row per item: the prompt and its gold answer."""
    pairs = [encode_pair(tokenizer, item["prompt"], gold_text(item)) for item in items]
    return build_batch([p for p, _ in pairs], [c for _, c in pairs], pad_id(tokenizer))


def prompt_batch(tokenizer: Any, prompts: Sequence[str]) -> ContinuationBatch:
    """Prompts only, left-padded: every last prompt token at column ``P - 1``."""
    return build_batch([tokenizer(p)["input_ids"] for p in prompts], [[] for _ in prompts], pad_id(tokenizer))


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token before scoring")
    return int(pad)


def check_tokenizer(tokenizer: Any, items: Sequence[Item], mode: str = "mc") -> None:
    """Check, before anything runs, what scoring assumes of the tokenizer and the items; one clear error naming the
    first item that breaks an assumption.

    Assumptions: the tokenizer pads (a pad or EOS token); every prompt has tokens; tokenising ``prompt + choice``
    keeps the prompt's tokens as a prefix (so a choice usually starts with a space, and a BOS the tokenizer adds
    stays first) and leaves the choice at least one token of its own; multiple choice (``mode="mc"``): every item
    has the same number of choices (items are scored in batches).
    """
    pad_id(tokenizer)
    counts: dict[int, int] = {}
    for position, item in enumerate(items):
        prompt = tokenizer(item["prompt"])["input_ids"]
        if len(prompt) == 0:
            raise ValueError(f"item {position}: the tokenizer gives its prompt no tokens")
        if mode == "mc":
            if not item.get("choices"):
                raise ValueError(f"item {position} has no choices for multiple choice: give choices, or use mode='gen'")
            counts.setdefault(len(item["choices"]), position)
            continuations = list(item["choices"])
        else:
            continuations = [gold_text(item)]
        for choice in continuations:
            try:
                _, target = encode_pair(tokenizer, item["prompt"], choice)
            except ValueError as exc:
                raise ValueError(f"item {position}: {exc} (start choices with a space)") from exc
            if not target:
                raise ValueError(f"item {position}: {choice!r} adds no tokens after the prompt")
    if len(counts) > 1:
        (a, first), (b, second) = sorted(counts.items())[:2]
        raise ValueError(
            f"items have different numbers of choices (item {first}: {a}, item {second}: {b}); multiple-choice "
            "batches need one count: evaluate them in separate runs"
        )


def score_with(
    rm: RoutedModel, tokenizer: Any, items: Sequence[Item], batch: tuple[ContinuationBatch, int] | None = None
) -> list[int]:
    """Predicted choice per item by summed continuation log-likelihood under the current routing."""
    batch, n_choices = batch or choice_batch(tokenizer, items)
    with torch.no_grad(), rm.row_expansion(n_choices):  # per-item routing state covers its choices' rows
        scores = continuation_logprobs(rm.model, batch.to(rm.model.device))
    return scores.view(len(items), n_choices).argmax(-1).tolist()


def generate_with(rm: RoutedModel, tokenizer: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
    """Greedy answers under the current routing; prompts left-padded so the last prompt token is column P-1."""
    batch = prompt_batch(tokenizer, [item["prompt"] for item in items]).to(rm.model.device)
    with torch.no_grad():
        out = rm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
    return decode_continuations(tokenizer, out, batch.prompt_len)


def normalise_answer(text: str) -> str:
    """Whitespace-normalised text (runs of spaces, tabs and line breaks become one space; ends stripped)."""
    return " ".join(text.split())


def predicted_answer(text: str) -> str:
    """The generated answer: text up to the first line break (as lm-eval's ``until: ["\\n"]``), normalised."""
    return normalise_answer(text.strip().split("\n", 1)[0] if text.strip() else "")


def answer_matches(text: str, answer: str) -> bool:
    """Exact match of a generated text against the gold answer (first line, whitespace-normalised)."""
    return predicted_answer(text) == normalise_answer(answer)
