"""lm-evaluation-harness model ``reroute``: any task's requests through a routing-adaptation method.

>>> import lm_eval, reroute.lmeval                    # the import registers the model name "reroute"
>>> lm_eval.simple_evaluate(model="reroute", model_args="pretrained=testbed,method=rerouting,steps=3", tasks=[...])
>>> lm = reroute.lmeval.RoutedLM(model, tokenizer=tokenizer, method="c3po", index="path/to/index")

From the shell, ``reroute lm-eval ...`` takes lm-eval's own arguments (lm-eval's command line cannot see models
registered by other packages) with ``--model reroute`` as the default.

Methods (``method=``) and where their options come from (``method_args={...}`` or plain ``model_args`` keys):

* ``base``: the model's own routing (exactly :class:`lm_eval.models.huggingface.HFLM`).
* ``static``: fixed router-logit offsets / policies saved with :meth:`reroute.RoutedModel.save` (``state=DIR``).
  ``state=`` also works under every other method (the adaptation then starts from that routing).
* ``c3po``: :class:`reroute.C3PO` with a reference index (``index=DIR``, or ``index=testbed`` to build the
  testbed's from its reference split) and :class:`reroute.C3POConfig` fields (``surrogate``, ``k``, ``steps``, ...).
* ``rerouting``: continuous rerouting, :class:`reroute.RerouterConfig` fields (``steps``, ``lr``, ``interval``, ...).
* ``scmoe``: self-contrast decoding, :class:`reroute.SCMoEConfig` fields (``beta``, ``alpha``, ``weak``, ...).

Log-likelihood requests are ``(context, continuation)`` pairs. C3PO's and rerouting's adaptation depends on the
context only, so requests are grouped by context and each context is adapted once; the adaptation is kept in an LRU
cache keyed by the context's tokens, so repeated requests (every choice of a multiple-choice question, the up to 64
repeats of a self-consistency task, a second evaluation) reuse it. Each (context, continuation) row is then scored
under its context's adaptation (C3PO: the re-mixed pathway at the last context token; rerouting: the context's
offsets δ on every token). SCMoE scores continuations with :meth:`reroute.SCMoE.scoring_logprobs` (the contrast where a
token is plausible, the strong log-probability otherwise; never ``-inf``), as :class:`reroute.eval.methods.SCMoEMethod`
does.

Generation requests (``generate_until``) go through the method's ``generate()`` with the task's ``until``,
``max_gen_toks``, ``do_sample`` and ``temperature``: C3PO with each prompt's cached adaptation, rerouting with its
prefill phase taken from the same cache (later phases every ``interval`` tokens depend on the generated text and
run as usual), SCMoE decoding contrastively.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from reroute.attach import RoutedModel, attach
from reroute.c3po import C3PO, C3POConfig, ReferenceIndex
from reroute.c3po.method import Adaptation
from reroute.c3po.pathway import Pathway
from reroute.rerouting import Rerouter, RerouterConfig
from reroute.rerouting.adapt import adapt_phase, routing_confidence, select_layers
from reroute.rerouting.method import _ReroutingScorer
from reroute.scmoe import SCMoE, SCMoEConfig
from reroute.scoring import ContinuationBatch, build_batch, padded_logits

logger = logging.getLogger(__name__)

METHODS = ("base", "static", "c3po", "rerouting", "scmoe")
"""Values of ``method=``."""

_CONFIGS: dict[str, type] = {"c3po": C3POConfig, "rerouting": RerouterConfig, "scmoe": SCMoEConfig}
_EXTRA_OPTIONS: dict[str, tuple[str, ...]] = {"c3po": ("index", "reference_size", "embedder")}


def method_options(method: str) -> tuple[str, ...]:
    """The option names ``method`` accepts (its config dataclass's fields, plus C3PO's index options)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    config = _CONFIGS.get(method)
    names = tuple(f.name for f in fields(config)) if config is not None else ()
    return names + _EXTRA_OPTIONS.get(method, ())


def _all_options() -> dict[str, list[str]]:
    """``{option: [methods taking it]}`` over every method."""
    owners: dict[str, list[str]] = {}
    for method in METHODS:
        for name in method_options(method):
            owners.setdefault(name, []).append(method)
    return owners


def resolve_method(
    method: str,
    method_args: dict[str, Any] | str | None = None,
    kwargs: dict[str, Any] | None = None,
    state: str | Path | None = None,
) -> dict[str, Any]:
    """Check a method and its options before any model is loaded; returns the options.

    Options come from ``method_args`` (a dict or a JSON object string) and from the keys of ``kwargs`` that name one
    of the method's options (those are removed from ``kwargs``; the rest stay for ``HFLM``). Raises ``ValueError``
    for an unknown method, an option of another method (naming the method it belongs to), a bad option value (the
    method's config dataclass validates it) and missing required options; ``FileNotFoundError`` for a missing
    ``state`` or ``index`` folder.
    """
    kwargs = {} if kwargs is None else kwargs
    known = method_options(method)
    if isinstance(method_args, str):
        try:
            method_args = json.loads(method_args) if method_args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"method_args must be a JSON object, got {method_args!r}: {exc}") from exc
    if method_args is not None and not isinstance(method_args, dict):
        raise ValueError(f"method_args must be a dict, got {type(method_args).__name__}")
    options = dict(method_args or {})
    unknown = [k for k in options if k not in known]
    owners = _all_options()
    for key in list(kwargs):
        if key in known:
            options[key] = kwargs.pop(key)
        elif key in owners:
            unknown.append(key)
    if unknown:
        hints = "; ".join(f"{k!r} belongs to {', '.join(owners[k])}" for k in unknown if k in owners)
        raise ValueError(
            f"method {method!r} has no option {', '.join(map(repr, unknown))}"
            + (f" ({hints})" if hints else "")
            + f"; its options: {', '.join(known) or 'none'}"
        )
    if method == "static" and state is None:
        raise ValueError("method='static' needs state=<folder written by RoutedModel.save>")
    if state is not None and not Path(state).is_dir():
        raise FileNotFoundError(f"no routing state folder {state}")
    config = _CONFIGS.get(method)
    if config is not None:
        config(**{k: v for k, v in options.items() if k not in _EXTRA_OPTIONS.get(method, ())})
    if method == "c3po":
        if options.get("surrogate") == "oracle":
            raise ValueError("C3PO's oracle reads each item's label, which lm-eval requests do not carry")
        index = options.get("index")
        if index is None and options.get("surrogate", "ngd") != "mode":
            raise ValueError("method='c3po' needs index=<reference index folder> (or index=testbed)")
        if isinstance(index, (str, Path)) and index != "testbed" and not Path(index).is_dir():
            raise FileNotFoundError(f"no reference index folder {index}")
    return options


class AdaptationCache:
    """An LRU map from a context (its token ids) to that context's adaptation.

    ``hits`` counts lookups served without adapting (from earlier calls, or repeats inside one batch); ``misses``
    counts contexts adapted.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"cache_size must be a positive integer, got {maxsize!r}")
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get_many(self, keys: Sequence[Hashable], compute: Callable[[list[Hashable]], list[Any]]) -> list[Any]:
        """Values for ``keys`` in order; ``compute(missing)`` adapts the distinct missing keys in one call."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._entries]
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        if len(fresh) != len(missing):
            raise RuntimeError(f"adaptation returned {len(fresh)} results for {len(missing)} contexts")
        values = []
        for key in keys:
            if key in fresh:
                values.append(fresh[key])
            else:
                self._entries.move_to_end(key)
                values.append(self._entries[key])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key, value in fresh.items():
            self._entries[key] = value
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return values

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0


@dataclass
class _Offsets:
    """One context's rerouting adaptation: selected layers ``{layer: gradient weight}`` and δ ``[L_sel, E]``."""

    layers: dict[int, float]
    delta: torch.Tensor


def _stack_pathways(entries: Sequence[Adaptation]) -> Adaptation:
    """One-row C3PO adaptations -> one adaptation with a row per entry (in order)."""
    first = entries[0].pathway
    pathway = Pathway(
        list(first.layers),
        {layer: torch.cat([e.pathway.experts[layer] for e in entries]) for layer in first.layers},
        {layer: torch.cat([e.pathway.logits[layer] for e in entries]) for layer in first.layers},
    )
    return Adaptation(
        pathway,
        torch.cat([e.abstained for e in entries]),
        torch.cat([e.neighbours for e in entries]),
        {},
    )


def _stack_offsets(entries: Sequence[_Offsets]) -> _Offsets:
    """Per-context δ -> ``[rows, L, E]`` over the union of their layers (a layer a context did not adapt gets zero
    offsets, i.e. its routing is untouched); a layer's gradient weight is the mean over the contexts that chose it."""
    layers = sorted({idx for e in entries for idx in e.layers})
    template = entries[0].delta
    delta = torch.zeros(len(entries), len(layers), template.shape[-1], dtype=template.dtype, device=template.device)
    weights: dict[int, list[float]] = {idx: [] for idx in layers}
    for row, entry in enumerate(entries):
        for j, (idx, weight) in enumerate(entry.layers.items()):
            delta[row, layers.index(idx)] = entry.delta[j]
            weights[idx].append(weight)
    return _Offsets({idx: sum(w) / len(w) for idx, w in weights.items()}, delta)


class _CachedPrefillScorer(_ReroutingScorer):
    """Continuous rerouting whose first phase (at prefill, on the prompt alone) comes from the per-context cache."""

    def _phase(self, input_ids: torch.LongTensor) -> None:
        if self.delta is not None:
            super()._phase(input_ids)
            return
        stacked = self.method.prefill_offsets(input_ids, self._mask(input_ids))
        self.layers, self.delta = stacked.layers, stacked.delta.clone()
        self.rm.set_row_offsets({idx: self.delta[:, j] for j, idx in enumerate(self.layers)})


class _CachedRerouter(Rerouter):
    """:class:`~reroute.Rerouter` taking each prompt's prefill δ from a :class:`RoutedLM`'s cache."""

    def __init__(self, rm: RoutedModel, config: RerouterConfig, prefill_offsets: Callable[..., _Offsets]) -> None:
        super().__init__(rm, config)
        self.prefill_offsets = prefill_offsets

    def scorer(self, stream: Any) -> _CachedPrefillScorer:
        return _CachedPrefillScorer(self, stream)


@register_model("reroute")
class RoutedLM(HFLM):
    """:class:`~lm_eval.models.huggingface.HFLM` whose requests run through a routing-adaptation method.

    Args:
        pretrained: a model name/folder (as for ``HFLM``), ``"testbed"`` (the shipped trained testbed with its
            tokenizer) or an already built model object.
        method: one of :data:`METHODS`.
        method_args: the method's options as a dict (or a JSON object string); they may also be given as plain
            keyword arguments (``model_args`` keys), e.g. ``steps=3``.
        state: a folder written by :meth:`reroute.RoutedModel.save` loaded before anything runs (``static``
            requires it).
        cache_size: contexts whose adaptation is kept (LRU).
        **kwargs: ``HFLM``'s arguments (``tokenizer``, ``batch_size``, ``device``, ``dtype``, ``max_length``, ...).

    Attributes:
        rm: the attached :class:`~reroute.RoutedModel`.
        cache: the per-context :class:`AdaptationCache`.
    """

    def __init__(
        self,
        pretrained: Any,
        method: str = "base",
        method_args: dict[str, Any] | str | None = None,
        state: str | Path | None = None,
        cache_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        options = resolve_method(method, method_args, kwargs, state)
        self.cache = AdaptationCache(cache_size)
        self.method = method
        self.method_args = dict(options)
        if isinstance(pretrained, str) and pretrained == "testbed":
            pretrained, kwargs = self._testbed(kwargs)
        super().__init__(pretrained, **kwargs)
        if getattr(self, "backend", "causal") != "causal":
            raise ValueError("reroute's lm-eval model supports decoder-only (causal) models")
        self.rm = attach(self.model)
        if state is not None:
            self.rm.load(state)
        self._c3po: C3PO | None = None
        self._rerouting: RerouterConfig | None = None
        self._scmoe: SCMoE | None = None
        if method == "c3po":
            self._c3po = self._build_c3po(options)
        elif method == "rerouting":
            self._rerouting = RerouterConfig(**options)
            select_layers(self.rm, self._rerouting, {i: 0.0 for i in self.rm.moe_layers})  # a bad layer list fails now
        elif method == "scmoe":
            self._scmoe = SCMoE(self.rm, **options)

    # ------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _testbed(kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from reroute.testbed import load_testbed

        dtype = kwargs.pop("dtype", "float32")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        device = kwargs.pop("device", None)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                logger.warning("device %r is not available; the testbed runs on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_testbed(dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32, device=device)
        kwargs.setdefault("tokenizer", tokenizer)
        return model, kwargs

    def _build_c3po(self, options: dict[str, Any]) -> C3PO:
        options = dict(options)
        index = options.pop("index", None)
        reference_size = options.pop("reference_size", 800)
        embedder = options.pop("embedder", None)
        if index == "testbed":
            from reroute.testbed.reference import DEFAULT_EMBEDDER, reference_index

            embedder = embedder if embedder is not None else DEFAULT_EMBEDDER
            if not isinstance(embedder, str):
                raise ValueError("index=testbed builds the testbed's index: pass embedder as a name")
            index = reference_index(self.rm, self.tokenizer, n=int(reference_size), embedder=embedder)
        elif index is not None and not isinstance(index, ReferenceIndex):
            index = ReferenceIndex.load(index, self.rm)
        return C3PO(self.rm, index, self.tokenizer, embedder=embedder, **options)

    # ------------------------------------------------------------------------------------------ adaptation
    def _adapt_c3po(self, keys: list[tuple[int, ...]], texts: dict[tuple[int, ...], str]) -> list[Adaptation]:
        """One C3PO adaptation per context, adapted together, split into one-row adaptations for the cache."""
        assert self._c3po is not None
        adaptation = self._c3po.adapt([texts[k] for k in keys])
        return [
            Adaptation(
                adaptation.pathway.select([i]),
                adaptation.abstained[i : i + 1],
                adaptation.neighbours[i : i + 1],
                adaptation.stats,
            )
            for i in range(len(keys))
        ]

    def _adapt_rerouting(self, keys: list[tuple[int, ...]]) -> list[_Offsets]:
        """The first rerouting phase on each context alone (rows are independent, so contexts adapt together unless
        layers are chosen by routing confidence, which is measured over the whole batch)."""
        config = self._rerouting
        assert config is not None
        if config.steps == 0:
            device = self.rm.layer(self.rm.moe_layers[0]).device
            return [_Offsets({}, torch.zeros(0, self.rm.num_experts, device=device)) for _ in keys]
        groups = [[k] for k in keys] if config.layers == "confidence" else [keys]
        results: list[_Offsets] = []
        for group in groups:
            batch = build_batch(list(group), [[] for _ in group], self._pad_id).to(self.device)
            confidence = (
                routing_confidence(self.rm, batch.input_ids, batch.attention_mask)
                if config.layers == "confidence"
                else None
            )
            layers = select_layers(self.rm, config, confidence)
            device = self.rm.layer(next(iter(layers))).device
            delta = torch.zeros(len(group), len(layers), self.rm.num_experts, device=device)
            try:
                adapt_phase(self.rm, config, layers, delta, batch.input_ids, batch.attention_mask)
            finally:
                for idx in layers:
                    self.rm.layer(idx).row_offsets = None
            results += [_Offsets(dict(layers), delta[i].detach().clone()) for i in range(len(group))]
        return results

    def prefill_offsets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Offsets:
        """Rerouting's prefill δ for a left-padded batch of prompts ``[B, S]`` from the cache ``[B, L, E]``."""
        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)]
        return _stack_offsets(self.cache.get_many(keys, self._adapt_rerouting))

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.method in ("base", "static"):  # fixed routing: HFLM's own scoring is exact
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        rows = []
        for request, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("every log-likelihood request needs a non-empty context and continuation")
            keep = max(1, self.max_length - len(continuation))  # lm-eval's rule: truncate the context from the left
            rows.append((request, tuple(context[-keep:]), list(continuation)))
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(rows):
            by_context.setdefault(context, []).append(i)
        texts = {}
        for request, context, _ in rows:
            if context not in texts:
                text = request[0].rstrip() if request is not None else ""
                texts[context] = text or self.tok_decode(list(context))
        batch_rows = override_bs or (
            self.batch_size if isinstance(self.batch_size, int) else int(self.max_batch_size or 64)
        )
        chunks: list[list[tuple[int, ...]]] = [[]]
        count = 0
        for context, members in by_context.items():
            if chunks[-1] and count + len(members) > batch_rows:
                chunks.append([])
                count = 0
            chunks[-1].append(context)
            count += len(members)
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(
            total=len(rows),
            disable=disable_tqdm or self.rank != 0,
            desc=f"Running loglikelihood requests ({self.method})",
        )
        for contexts in chunks:
            order = [i for c in contexts for i in by_context[c]]
            batch = build_batch([rows[i][1] for i in order], [rows[i][2] for i in order], self._pad_id)
            scores = self._score(batch, [rows[i][1] for i in order], texts)
            for i, score in zip(order, scores):
                results[i] = score
                request = rows[i][0]
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, score)
            bar.update(len(order))
        bar.close()
        return results  # type: ignore[return-value]

    def _score(
        self, batch: ContinuationBatch, contexts: list[tuple[int, ...]], texts: dict[tuple[int, ...], str]
    ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probabilities, continuation is the greedy one)`` per row, under the method."""
        batch = batch.to(self.device)
        with torch.no_grad():
            if self.method == "c3po":
                assert self._c3po is not None
                entries = self.cache.get_many(contexts, lambda keys: self._adapt_c3po(keys, texts))
                self._c3po.apply(_stack_pathways(entries), batch.prompt_len)
                try:
                    logits = padded_logits(self.model, batch.input_ids, batch.attention_mask)[:, :-1]
                finally:
                    self.rm.clear_mixing(self._c3po.layers)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            elif self.method == "rerouting":
                stacked = _stack_offsets(self.cache.get_many(contexts, self._adapt_rerouting))
                self.rm.set_row_offsets({idx: stacked.delta[:, j] for j, idx in enumerate(stacked.layers)})
                try:
                    logits = padded_logits(self.model, batch.input_ids, batch.attention_mask)[:, :-1]
                finally:
                    for idx in stacked.layers:
                        self.rm.layer(idx).row_offsets = None
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            else:
                assert self._scmoe is not None
                logprobs = self._scmoe.scoring_logprobs(batch.input_ids, batch.attention_mask)
        targets = batch.input_ids[:, 1:]
        mask = batch.target_mask[:, 1:]
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0].masked_fill(~mask, 0.0)
        greedy = ((logprobs.argmax(-1) == targets) | ~mask).all(-1)
        return [(float(s), bool(g)) for s, g in zip(token_lp.sum(-1).cpu(), greedy.cpu())]

    # ------------------------------------------------------------------------------------------ generation
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        # lm-eval asks for max_length = context + max_gen_toks, but a model's generation config may set
        # max_new_tokens, which generate() prefers (the testbed's does): ask for the new tokens explicitly
        new_tokens = max_length - context.shape[1]
        if self.method in ("base", "static"):
            return super()._model_generate(context, max_length, stop, max_new_tokens=new_tokens, **generation_kwargs)
        # imported by huggingface.py from wherever this lm-eval version keeps it
        from lm_eval.models.huggingface import stop_sequences_criteria

        kwargs = dict(generation_kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        # lm-eval's convention: no temperature (or 0.0) without do_sample means greedy decoding
        temperature = kwargs.pop("temperature", 0.0)
        if kwargs.get("do_sample") is None:
            kwargs["do_sample"] = temperature != 0.0
        if kwargs["do_sample"] and temperature:
            kwargs["temperature"] = temperature
        kwargs.update(
            max_new_tokens=new_tokens,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0]),
            pad_token_id=self._pad_id,
        )
        if self.method == "c3po":
            assert self._c3po is not None
            keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(context, attention_mask)]
            texts = {k: self.tok_decode(list(k)) for k in dict.fromkeys(keys)}
            entries = self.cache.get_many(keys, lambda missing: self._adapt_c3po(missing, texts))
            return self._c3po.generate(
                input_ids=context, attention_mask=attention_mask, adaptation=_stack_pathways(entries), **kwargs
            )
        if self.method == "rerouting":
            assert self._rerouting is not None
            method = _CachedRerouter(self.rm, self._rerouting, self.prefill_offsets)
            return method.generate(input_ids=context, attention_mask=attention_mask, **kwargs)
        assert self._scmoe is not None
        return self._scmoe.generate(input_ids=context, attention_mask=attention_mask, **kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["reroute_method"] = self.method
        info["reroute_method_args"] = {k: str(v) for k, v in self.method_args.items()}
        return info


_TASK_HEADER = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
target_delimiter: ""
"""
_TASK_BODIES = {
    "mc": """\
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "gen": """\
output_type: generate_until
doc_to_target: "{{answer | trim}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "sc": """\
output_type: generate_until
doc_to_target: "{{answer | trim}}"
repeats: {repeats}
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: true
  temperature: 1.0
filter_list:
  - name: maj@{repeats}
    filter:
      - function: majority_vote
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def write_testbed_tasks(
    folder: str | Path, split: str = "test_shift", n: int = 400, seed: int = 0, repeats: int = 8
) -> list[str]:
    """Write local lm-eval tasks over a testbed split to ``folder`` (for ``--include_path`` / ``TaskManager``).

    Three tasks on the same items (``data.jsonl``): ``reroute_testbed_mc`` (multiple choice, ``acc``: the same
    scoring as ``reroute eval --mode mc``), ``reroute_testbed_gen`` (greedy generation until a line break,
    ``exact_match``: as ``--mode gen``) and ``reroute_testbed_sc`` (self-consistency: ``repeats`` sampled answers
    per prompt, majority vote). Returns the task names. Nothing is downloaded: the data is a local JSONL file.
    """
    from reroute.testbed.suite import make_split, write_jsonl

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    write_jsonl(make_split(split, n=n, seed=seed), data)
    names = []
    for kind, body in _TASK_BODIES.items():
        name = f"reroute_testbed_{kind}"
        header = _TASK_HEADER.format(name=name, data=json.dumps(str(data.resolve())))
        (folder / f"{name}.yaml").write_text(header + body.replace("{repeats}", str(repeats)))
        names.append(name)
    return names


def usage() -> str:
    """The ``model_args`` of the ``reroute`` model, for ``reroute lm-eval --help``."""
    lines = [
        "reroute lm-eval: lm-evaluation-harness with the model 'reroute' registered (--model reroute is the default).",
        "",
        "model_args of --model reroute (besides HFLM's own: batch_size, device, dtype, max_length, ...):",
        "  pretrained=testbed|<folder or hub name>   the model ('testbed': the shipped trained testbed)",
        f"  method={'|'.join(METHODS)}   (default base)",
        "  state=<folder>                             routing state from RoutedModel.save (needed by method=static)",
        "  method_args={...}                          method options as a dict; or give them as plain keys:",
    ]
    for method in METHODS:
        names = method_options(method)
        if names:
            lines.append(f"    {method}: {', '.join(names)}")
    lines += [
        "",
        "example:",
        "  reroute lm-eval --model_args pretrained=testbed,method=rerouting,steps=3 --tasks <task> "
        "--include_path <dir> --device cpu --limit 8",
        "",
        "lm-eval's own arguments follow.",
    ]
    return "\n".join(lines)
