"""lm-evaluation-harness model ``reroute``: any task's requests through a routing-adaptation method.

>>> import lm_eval, reroute.lmeval                    # the import registers the model name "reroute"
>>> lm_eval.simple_evaluate(model="reroute", model_args="pretrained=testbed,method=rerouting,steps=3", tasks=[...])
>>> lm = reroute.lmeval.RoutedLM(model, tokenizer=tokenizer, method="c3po", index="path/to/index")

From the shell, ``reroute lm-eval ...`` takes lm-eval's own arguments (lm-eval's command line cannot see models
registered by other packages) with ``--model reroute`` as the default.

Methods (``method=``): every method of the registry (:mod:`reroute.methods`) whose adaptation reads no label, with
its config fields and resources as options (``method_args={...}`` or plain ``model_args`` keys); ``static`` is
``base`` with a required ``state=`` folder (written by :meth:`reroute.RoutedModel.save_pretrained`). ``state=`` works
under every method (the adaptation then starts from that routing). A ``model_args`` key that is neither an option
of the method nor an argument of ``HFLM`` is an error.

Log-likelihood requests are ``(context, continuation)`` pairs. A method's adaptation depends on the context only,
so requests are grouped by context and each context is adapted once (:meth:`RoutingMethod.adapt_contexts`); the
one-row state is kept in an LRU cache keyed by the context's tokens, so repeated requests (every choice of a
multiple-choice question, the up to 64 repeats of a self-consistency task, a second evaluation) reuse it. Each
(context, continuation) row is then scored under its context's state (:meth:`RoutingMethod.continuation_logprobs`),
exactly as ``reroute eval`` scores it (SCMoE: :meth:`reroute.SCMoE.scoring_logprobs`, the contrast where a token is
plausible and the strong log-probability otherwise, never ``-inf``). The model's own routing (``plain_routing``)
goes through ``HFLM``'s own code.

Generation requests (``generate_until``) go through :meth:`RoutingMethod.generate_from` with each prompt's cached
state and the task's ``until``, ``max_gen_toks``, ``do_sample`` and ``temperature``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from reroute.attach import attach
from reroute.lmeval_tasks import TASK_KINDS, task_yaml
from reroute.methods import RoutingMethod, available_methods, get_method
from reroute.scoring import ContinuationBatch, build_batch

logger = logging.getLogger(__name__)

STATIC = "static"
"""``method=static``: the base routing with a required ``state=`` folder."""

MODEL_KWARGS = (
    "attn_implementation",
    "low_cpu_mem_usage",
    "device_map",
    "quantization_config",
    "cache_dir",
    "local_files_only",
    "token",
    "torch_dtype",
)
"""transformers ``from_pretrained`` arguments that ``HFLM`` passes on through its ``**kwargs``; any other key that
is neither a method option nor an ``HFLM`` argument is an error (lm-eval would ignore it silently)."""


def lm_eval_methods() -> tuple[str, ...]:
    """Values of ``method=``: the registered methods that read no labels, and ``static``."""
    names = available_methods(lambda e: not e.method_cls.needs_labels)
    return (names[0], STATIC, *names[1:]) if names else (STATIC,)


def _entry(method: str) -> Any:
    if method not in lm_eval_methods():
        raise ValueError(f"unknown method {method!r}; known: {', '.join(lm_eval_methods())}")
    return get_method("base" if method == STATIC else method)


def method_options(method: str) -> tuple[str, ...]:
    """The option names ``method`` accepts (its config dataclass's fields, then its resources)."""
    return _entry(method).option_names()


def _all_options() -> dict[str, list[str]]:
    """``{option: [methods taking it]}`` over every method."""
    owners: dict[str, list[str]] = {}
    for method in lm_eval_methods():
        for name in method_options(method):
            owners.setdefault(name, []).append(method)
    return owners


def _lm_arguments() -> set[str]:
    """The keyword arguments of :class:`RoutedLM` and ``HFLM`` (besides the method's options)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = set(MODEL_KWARGS)
    for cls in (RoutedLM, HFLM):
        names |= {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in named}
    return names - {"self"}


def resolve_method(
    method: str,
    method_args: dict[str, Any] | str | None = None,
    kwargs: dict[str, Any] | None = None,
    state: str | Path | None = None,
) -> dict[str, Any]:
    """Check a method and its options before any model is loaded; returns the options.

    Options come from ``method_args`` (a dict or a JSON object string) and from the keys of ``kwargs`` that name one
    of the method's options (those are removed from ``kwargs``; the rest stay for ``HFLM``). Raises ``ValueError``
    for an unknown method, an option of another method (naming the method it belongs to), a key that is no option
    and no ``HFLM`` argument, a bad option value (the method's config dataclass validates it), a method that reads
    labels and missing required options; ``FileNotFoundError`` for a missing ``state`` or resource folder.
    """
    kwargs = {} if kwargs is None else kwargs
    entry = _entry(method)
    known = entry.option_names()
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
    stray = sorted(k for k in kwargs if k not in _lm_arguments())
    if stray:
        raise ValueError(
            f"model_args key {', '.join(map(repr, stray))} is neither an option of method {method!r} "
            f"({', '.join(known) or 'none'}) nor an argument of lm-eval's HFLM"
        )
    if method == STATIC and state is None:
        raise ValueError("method='static' needs state=<folder written by RoutedModel.save_pretrained>")
    if state is not None and not Path(state).is_dir():
        raise FileNotFoundError(f"no routing state folder {state}")
    config_options, resources = entry.split_options(options)
    config = entry.make_config(config_options)
    if entry.method_cls.reads_labels(config):
        raise ValueError(f"method {method!r} with these options reads each item's label, which lm-eval requests lack")
    entry.method_cls.check_options(config, resources)
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


@register_model("reroute")
class RoutedLM(HFLM):
    """:class:`~lm_eval.models.huggingface.HFLM` whose requests run through a registered routing method.

    Args:
        pretrained: a model name/folder (as for ``HFLM``), ``"testbed"`` (the shipped trained testbed with its
            tokenizer) or an already built model object.
        method: one of :func:`lm_eval_methods`.
        method_args: the method's options as a dict (or a JSON object string); they may also be given as plain
            keyword arguments (``model_args`` keys), e.g. ``steps=3``.
        state: a folder written by :meth:`reroute.RoutedModel.save_pretrained` (or the older ``save``) loaded
            before anything runs (``static`` requires it).
        cache_size: contexts whose adaptation is kept (LRU).
        **kwargs: ``HFLM``'s arguments (``tokenizer``, ``batch_size``, ``device``, ``dtype``, ``max_length``, ...).

    Attributes:
        rm: the attached :class:`~reroute.RoutedModel`.
        routing_method: the :class:`~reroute.methods.RoutingMethod` answering the requests.
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
            self.rm.load_pretrained(state)
        entry = _entry(method)
        config_options, resources = entry.split_options(options)
        self.routing_method: RoutingMethod = entry.method_cls.from_config(
            self.rm, self.tokenizer, entry.make_config(config_options), **resources
        )

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

    # ------------------------------------------------------------------------------------------ adaptation
    def _adapt(self, keys: list[tuple[int, ...]], texts: dict[tuple[int, ...], str]) -> list[Any]:
        """One-row states for ``keys`` (contexts), adapted together unless the method's result would then depend
        on the batch-mates (``batch_adapt``)."""
        method = self.routing_method
        groups = [keys] if method.batch_adapt else [[k] for k in keys]
        states: list[Any] = []
        for group in groups:
            prompts = build_batch(list(group), [[] for _ in group], self._pad_id)
            state = method.adapt_contexts([{"prompt": texts[k]} for k in group], prompts)
            states += method.split_state(state, len(group))
        return states

    def _states(self, keys: list[tuple[int, ...]], texts: dict[tuple[int, ...], str]) -> Any:
        """The stacked state of ``keys`` (cached per context)."""
        entries = self.cache.get_many(keys, lambda missing: self._adapt(missing, texts))
        return self.routing_method.stack_states(entries)

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
        if self.routing_method.plain_routing:  # fixed routing: HFLM's own scoring is exact
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
        scores = self.routing_method.continuation_logprobs(batch, self._states(contexts, texts))
        return [(float(s), bool(g)) for s, g in zip(scores.logprob, scores.greedy)]

    # ------------------------------------------------------------------------------------------ generation
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        # lm-eval asks for max_length = context + max_gen_toks, but a model's generation config may set
        # max_new_tokens, which generate() prefers (the testbed's does): ask for the new tokens explicitly
        new_tokens = max_length - context.shape[1]
        if self.routing_method.plain_routing:
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
        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(context, attention_mask)]
        texts = {k: self.tok_decode(list(k)) for k in dict.fromkeys(keys)}
        state = self._states(keys, texts)
        return self.routing_method.generate_from(context, attention_mask, state, **kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["reroute_method"] = self.method
        info["reroute_method_args"] = {k: str(v) for k, v in self.method_args.items()}
        return info


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # values of method= (registered methods change it)
        return lm_eval_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_testbed_tasks(
    folder: str | Path, split: str = "test_shift", n: int = 400, seed: int = 0, repeats: int = 8
) -> list[str]:
    """Write local lm-eval tasks over a testbed split to ``folder`` (for ``--include_path`` / ``TaskManager``).

    Three tasks on the same items (``data.jsonl``): ``reroute_testbed_mc`` (multiple choice, ``acc``: the same
    scoring as ``reroute eval --mode mc``), ``reroute_testbed_gen`` (greedy generation until a line break,
    ``exact_match``: as ``--mode gen``) and ``reroute_testbed_sc`` (self-consistency: ``repeats`` sampled answers
    per prompt, majority vote). Returns the task names. Nothing is downloaded: the data is a local JSONL file.
    """
    from reroute.data import write_jsonl
    from reroute.testbed.suite import make_split

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    write_jsonl(make_split(split, n=n, seed=seed), data)
    names = []
    for kind in TASK_KINDS:
        name = f"reroute_testbed_{kind}"
        (folder / f"{name}.yaml").write_text(task_yaml(name, data, kind, repeats=repeats))
        names.append(name)
    return names


def usage() -> str:
    """The ``model_args`` of the ``reroute`` model, for ``reroute lm-eval --help``."""
    lines = [
        "reroute lm-eval: lm-evaluation-harness with the model 'reroute' registered (--model reroute is the default).",
        "",
        "model_args of --model reroute (besides HFLM's own: batch_size, device, dtype, max_length, ...):",
        "  pretrained=testbed|<folder or hub name>   the model ('testbed': the shipped trained testbed)",
        f"  method={'|'.join(lm_eval_methods())}   (default base)",
        "  state=<folder>                             routing state from RoutedModel.save_pretrained (method=static)",
        "  method_args={...}                          method options as a dict; or give them as plain keys:",
    ]
    for method in lm_eval_methods():
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
