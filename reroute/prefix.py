"""Reuse of what an optimisation step cannot change, across the steps and across calls.

C3PO (critical layers) and rerouting (selected layers) change routing only from some layer on, so the hidden states
entering that layer do not depend on the state being optimised. ``PrefixCache`` runs the batch once, keeps those
hidden states, and while active replaces the decoder layers below with pass-throughs that hand the cached states on:
each optimisation step then pays only for the critical suffix of the network (plus embeddings, masks and the head).

C3PO re-mixes only from one token position on (the last prompt token), and attention is causal, so nothing before
that position changes either, in any layer. ``SuffixScorer`` adds that: it keeps the KV cache of the positions
before the first re-mixed one (in the layers the steps run), and each step runs only the columns from there on (the
re-mixed token(s) and the continuation) through the layers from the first adapted one.

What a row needs (:class:`RowPrefix`) depends only on the row's own tokens, the model's weights and the routing state
of the moment, so a :class:`PrefixStore` keeps it across calls (C3PO's neighbours recur from batch to batch), keyed by
the row's tokens and valid for one model state (:class:`ModelState`): any change to the weights or the routing state
empties it.
"""

from __future__ import annotations

import itertools
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from reroute.attach import RoutedModel
from reroute.compat import CACHE_KWARG, cache_holding
from reroute.scoring import ContinuationBatch, mask_positions, suffix_continuation_logprobs

STEP_COMPILE: dict[str, dict[str, Any]] = {"cuda": {"mode": "reduce-overhead"}, "default": {}}
"""``torch.compile`` options of a compiled :class:`SuffixScorer` step by device type (``"default"``: any other), always
with ``fullgraph=True``. On CUDA each step replays as a CUDA graph: an eager optimisation step launches a few hundred
small kernels from Python (forward and backward through the critical layers), which bounds it by the host, not the
GPU."""


def compile_step(fn: Callable[[], torch.Tensor], device_type: str, eager: str) -> Callable[[], torch.Tensor]:
    """``fn`` (an optimisation step's forward, returning a tensor) compiled as one graph (``fullgraph=True``, the
    :data:`STEP_COMPILE` options of ``device_type``), returning a copy of its output: a CUDA graph's output lives in
    its memory pool, which the next replay overwrites. Dynamo keeps the graphs by ``fn``'s code, so a step made
    again (a new closure or bound method of the same code) reuses them where its guards hold.

    A step that does not compile as one graph raises a ``RuntimeError`` that says so and names ``eager``, the
    setting that runs the same steps eagerly: a graph break would split the forward into pieces run in between
    eagerly, where a replayed CUDA graph no longer pays off and the routing's per-call state is not in place."""
    compiled = torch.compile(fn, fullgraph=True, **STEP_COMPILE.get(device_type, STEP_COMPILE["default"]))

    def step() -> torch.Tensor:
        try:
            out = compiled()
        except torch._dynamo.exc.TorchDynamoException as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:300] if lines else type(exc).__name__
            raise RuntimeError(
                f"compiled steps need each step to compile as one graph, and this model's does not ({reason}); use "
                f"{eager} (the same steps, eager)"
            ) from exc
        return out.clone()

    return step


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


def _pass_through(layers: nn.ModuleList, first_layer: int, cached: Any, as_tuple: bool) -> list[nn.Module]:
    """Replace ``layers[:first_layer]`` by pass-throughs handing ``cached`` on; returns the replaced layers."""
    saved = [layers[i] for i in range(first_layer)]
    for i in range(first_layer - 1):
        layers[i] = _PassThrough(as_tuple=as_tuple)
    layers[first_layer - 1] = _PassThrough(cached=cached, as_tuple=as_tuple)
    return saved


def _restore(layers: nn.ModuleList, saved: list[nn.Module]) -> None:
    for i, layer in enumerate(saved):
        layers[i] = layer


class PrefixCache:
    """``with PrefixCache(rm, first_layer, run_batch):`` — inside, forwards of the same batch skip the layers
    below ``first_layer``.

    ``run_batch`` is a callable running the model on the batch (it is called once, without gradients, to record
    the hidden states entering ``first_layer``).
    """

    def __init__(self, rm: RoutedModel, first_layer: int, run_batch: Any) -> None:
        self.layers = decoder_layers(rm)
        self.first_layer = first_layer
        self.run_batch = run_batch
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
        detach = lambda o: o.detach() if torch.is_tensor(o) else o  # noqa: E731
        cached = tuple(detach(o) for o in output) if as_tuple else detach(output)
        self.saved = _pass_through(self.layers, self.first_layer, cached, as_tuple)
        return self

    def __exit__(self, *exc: object) -> None:
        _restore(self.layers, self.saved)
        self.saved = []


@dataclass
class RowPrefix:
    """What a suffix step needs of one row, without its padding.

    Attributes:
        keys, values: per decoder layer from the first adapted one, the row's own tokens before the re-mixed
            position(s) ``[kv_heads, a, head_dim]``.
        hidden: the hidden states entering the first adapted layer at the row's own tokens from the first re-mixed
            position on ``[s, H]`` (``None`` when that layer is layer 0: the steps then start from the embeddings).
        as_tuple: the decoder layers return tuples (hidden states first).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor | None
    as_tuple: bool

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *([] if self.hidden is None else [self.hidden])]
        return sum(t.numel() * t.element_size() for t in tensors)


class ModelState:
    """What a cached prefix was computed under, compared without reading any weight: every parameter and buffer
    by identity, storage address, version counter, dtype, device and shape (so an in-place update — an optimiser
    step, ``load_state_dict``, ``copy_`` — a replaced tensor or a moved model makes a different state), the content
    of the routing state (offsets, policies, masks, the routing kernel switch), the attention implementation,
    and autocast (a model in training mode is never cached: see :func:`cacheable`).

    Writes made through ``tensor.data`` bypass PyTorch's version counter (autograd cannot see them either): after
    editing weights that way, empty the store (:meth:`PrefixStore.clear`).
    """

    def __init__(self, rm: RoutedModel) -> None:
        model = rm.model
        tensors = list(
            itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
        )
        self._refs = [weakref.ref(t) for _, t in tensors]  # identity without keeping a replaced tensor alive
        self._facts = tuple(
            (name, t.data_ptr(), t._version, t.dtype, str(t.device), tuple(t.shape)) for name, t in tensors
        )
        layers = list(rm.layers.values())
        offsets = torch.cat([layer.offsets.detach().float().cpu() for layer in layers])  # read once per call
        routing = [(layer.layer_idx, _as_json(layer.policy), _as_json(layer.mask), layer.kernels) for layer in layers]
        kind = model.device.type
        autocast = (
            (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else None
        )
        self._routing = (offsets.numpy().tobytes(), json.dumps(routing), _attention(model), autocast)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelState):
            return NotImplemented
        return (
            self._facts == other._facts
            and self._routing == other._routing
            and all(a() is not None and a() is b() for a, b in zip(self._refs, other._refs))
        )

    __hash__ = None  # type: ignore[assignment]  (mutable weak references: compared, never hashed)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``[heads, a, dim]`` zero-padded on the left of its token axis to ``[heads, length, dim]``."""
    return torch.nn.functional.pad(tensor, (0, 0, length - tensor.shape[1], 0))


def _as_json(value: Any) -> Any:
    return None if value is None else value.to_dict()


def _attention(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", ""))


def cacheable(rm: RoutedModel) -> bool:
    """Whether a row's prefix depends on the row's tokens alone: no per-row routing state (row offsets, policy rows,
    re-mixing), no route replay, no dropout (eval mode)."""
    if rm.model.training:
        return False
    return not any(
        layer.row_offsets is not None
        or layer.policy_rows is not None
        or layer.mixing is not None
        or layer.replay is not None
        for layer in rm.layers.values()
    )


class PrefixStore:
    """Least-recently-used :class:`RowPrefix` entries across calls, at most ``max_bytes`` in all, for one model
    state: :meth:`sync` empties it when the weights or the routing state changed since the entries were made.

    Entries live where the model computed them (its device). An entry larger than ``max_bytes`` is not kept.
    ``hits``/``misses`` count lookups.
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, RowPrefix] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._state: ModelState | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def sync(self, rm: RoutedModel) -> bool:
        """Make the store valid for ``rm``'s current state (emptied if it changed); False where rows cannot be cached
        now (see :func:`cacheable`) or the store holds nothing (``max_bytes`` 0)."""
        if self.max_bytes == 0 or not cacheable(rm):
            return False
        state = ModelState(rm)
        if self._state is None or not state == self._state:
            self.clear()
            self._state = state
        return True

    def get(self, key: tuple) -> RowPrefix | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: RowPrefix) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.nbytes -= self.entries.pop(key).nbytes
        while self.entries and self.nbytes + size > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = entry
        self.nbytes += size

    def clear(self) -> None:
        """Drop every entry (and the model state they belong to)."""
        self.entries.clear()
        self.nbytes = 0
        self._state = None


class SuffixScorer:
    """``with SuffixScorer(rm, batch, first_layer, start) as score:`` — inside, ``score()`` returns what
    ``continuation_logprobs(rm.model, batch)`` does (``[B]``, differentiable in the routing state of layers
    ``>= first_layer`` at columns ``>= start``), recomputing only columns ``start:`` of layers ``first_layer:``.

    On entry each distinct row (a neighbour shared by several test items) gets its :class:`RowPrefix`: from
    ``store`` when it holds it for the current model state, else from one forward, without gradients and under the
    routing state of that moment, of the rows still missing (then kept in ``store``). Valid while the routing of
    layers below ``first_layer`` and of columns before ``start`` stays as it was then. ``batch``: continuation rows
    whose scored tokens all lie after ``start`` (``start < prompt_len``).

    ``compiled``: each ``score()`` runs compiled (:data:`STEP_COMPILE`). Dynamo keeps the graphs across scorers:
    the first call compiles, a second batch shape compiles once more with dynamic sizes, later shapes reuse that
    (a CUDA graph is recorded per new shape); with gradients on and off, one graph each.
    """

    def __init__(
        self,
        rm: RoutedModel,
        batch: ContinuationBatch,
        first_layer: int,
        start: int,
        store: PrefixStore | None = None,
        compiled: bool = False,
    ) -> None:
        if not 0 < start < batch.prompt_len:
            raise ValueError(f"suffix start must be in (0, {batch.prompt_len}), got {start}")
        self.rm, self.batch, self.first_layer, self.start, self.store = rm, batch, first_layer, start, store
        self.position_ids = mask_positions(batch.attention_mask)
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.layers = decoder_layers(rm)
        self.saved: list[nn.Module] = []
        self.rows_run = 0
        self._compiled: Any = None  # the compiled _logprobs, with ``compiled``
        if compiled:
            self._compiled = compile_step(self._logprobs, batch.input_ids.device.type, "recompute='suffix'")

    def _run(self, columns: slice, cache: DynamicCache, rows: list[int] | None = None) -> torch.Tensor:
        batch = self.batch
        ids, mask, positions = batch.input_ids, batch.attention_mask, self.position_ids
        if rows is not None:
            index = torch.tensor(rows, device=ids.device)
            ids, mask, positions = ids[index], mask[index], positions[index]
        return self.rm.model(
            input_ids=ids[:, columns],
            attention_mask=mask,
            position_ids=positions[:, columns],
            use_cache=True,
            **{CACHE_KWARG: cache},
        ).logits

    def __enter__(self) -> SuffixScorer:
        batch, start = self.batch, self.start
        mask = batch.attention_mask.cpu()  # one read of the (small) token batch, on entry only
        ids = batch.input_ids.cpu()
        prompt_len = batch.prompt_len
        # a row's prefix depends on its own tokens only (positions follow the mask), so they key it
        prompt_tokens = mask[:, :prompt_len].sum(-1).tolist()
        answer_tokens = mask[:, prompt_len:].sum(-1).tolist()
        keys = [
            (self.first_layer, prompt_len - start, tuple(row[mask_row.bool()].tolist()), answer)
            for row, mask_row, answer in zip(ids, mask, answer_tokens)
        ]
        store = self.store if self.store is not None and self.store.sync(self.rm) else None
        found: dict[tuple, RowPrefix] = {}
        missing: dict[tuple, int] = {}  # key -> first batch row holding it
        for row, key in enumerate(keys):
            if key in found or key in missing:
                continue
            entry = store.get(key) if store is not None else None
            if entry is None:
                missing[key] = row
            else:
                found[key] = entry
        if missing:
            for key, entry in zip(missing, self._compute(list(missing.values()), prompt_tokens, answer_tokens)):
                found[key] = entry
                if store is not None:
                    store.put(key, entry)
        self.rows_run = len(missing)
        entries = [found[key] for key in keys]
        distinct = list(dict.fromkeys(keys))  # a row repeated in the batch (shared neighbours, candidates) once
        slot = {key: i for i, key in enumerate(distinct)}
        rows = torch.tensor([slot[key] for key in keys], device=entries[0].keys[0].device)
        self.prefix_kv = self._assemble_kv([found[key] for key in distinct], rows)
        if self.first_layer > 0:
            hidden = self._assemble_hidden(entries, prompt_tokens)
            self.saved = _pass_through(self.layers, self.first_layer, hidden, entries[0].as_tuple)
        return self

    def _compute(self, rows: list[int], prompt_tokens: list[int], answer_tokens: list[int]) -> list[RowPrefix]:
        """One forward of batch ``rows`` (no gradient): each row's :class:`RowPrefix`, its padding cut off."""
        start, prompt_len, first = self.start, self.batch.prompt_len, self.first_layer
        cache = DynamicCache()
        captured: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured["output"] = output

        handle = self.layers[first - 1].register_forward_hook(hook) if first > 0 else None
        try:
            with torch.no_grad():
                self._run(slice(None), cache, rows)
        finally:
            if handle is not None:
                handle.remove()
        output = captured.get("output")
        as_tuple = isinstance(output, tuple)
        hidden = output[0] if as_tuple else output
        try:
            layers = [(layer.keys, layer.values) for layer in cache.layers[first:]]
        except AttributeError as exc:  # a cache layout other than transformers 5.x's per-layer keys/values
            raise RuntimeError("suffix-only recompute needs a transformers 5.x DynamicCache") from exc
        out = []
        for i, row in enumerate(rows):
            before = max(prompt_tokens[row] - (prompt_len - start), 0)  # own tokens before the first re-mixed one
            own_start = max(start, prompt_len - prompt_tokens[row]) - start  # first own suffix column
            own_end = prompt_len + answer_tokens[row] - start
            # clones: a slice would keep the whole batch's tensors alive in the store
            out.append(
                RowPrefix(
                    [k[i, :, start - before : start].clone() for k, _ in layers],
                    [v[i, :, start - before : start].clone() for _, v in layers],
                    None if hidden is None else hidden[i, start + own_start : start + own_end].detach().clone(),
                    as_tuple,
                )
            )
        return out

    def _assemble_kv(self, entries: list[RowPrefix], rows: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The batch's prefix cache: per layer ``[B, heads, start, head_dim]`` on that layer's device (zeros where a
        row is padding, which attention masks out), batch row ``i`` holding ``entries[rows[i]]`` (each distinct
        entry is padded once). Layers below the first adapted one never run in a step (pass-throughs): a
        one-channel stand-in gives the cache its length there."""
        start = self.start
        stand_in = entries[0].keys[0].new_zeros(len(rows), 1, start, 1)
        kv: list[tuple[torch.Tensor, ...]] = [(stand_in, stand_in)] * self.first_layer
        for layer in range(len(entries[0].keys)):
            keys, values = (
                torch.stack([_left_pad(getattr(entry, name)[layer], start) for entry in entries])
                for name in ("keys", "values")
            )
            index = rows.to(keys.device)
            kv.append((keys.index_select(0, index), values.index_select(0, index)))
        return kv

    def _assemble_hidden(self, entries: list[RowPrefix], prompt_tokens: list[int]) -> torch.Tensor:
        """Hidden states entering the first adapted layer, columns ``start:`` of the batch ``[B, T - start, H]``
        (zeros at padding)."""
        start, prompt_len = self.start, self.batch.prompt_len
        sample = entries[0].hidden
        assert sample is not None
        hidden = sample.new_zeros(len(entries), self.batch.input_ids.shape[1] - start, sample.shape[-1])
        for row, entry in enumerate(entries):
            own_start = max(start, prompt_len - prompt_tokens[row]) - start
            assert entry.hidden is not None
            hidden[row, own_start : own_start + len(entry.hidden)] = entry.hidden
        return (hidden,) if entries[0].as_tuple else hidden

    def __call__(self) -> torch.Tensor:
        """Summed log-probability of each row's continuation ``[B]`` under the current routing state."""
        return self._logprobs() if self._compiled is None else self._compiled()

    def _logprobs(self) -> torch.Tensor:
        cache = cache_holding(self.prefix_kv)  # a fresh cache per step: the prefix stays a constant of the graph
        return suffix_continuation_logprobs(self._run(slice(self.start, None), cache), self.batch, self.start)

    def __exit__(self, *exc: object) -> None:
        _restore(self.layers, self.saved)
        self.saved = []
        self.prefix_kv = []
