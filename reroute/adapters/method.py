"""Amortised routing adapters: per-layer router-logit offsets learned once on a reference set, and the ``adapter``
evaluation method that serves them (alone or under another method).

RoMA (arXiv 2511.07419) shows that routing learned offline on successful reference samples carries most of
test-time routing adaptation's gain at no inference cost. The adapter here is the smallest such form: one additive
offset vector ``[E]`` per MoE layer (``rm.offsets``), fitted by Adam on the summed log-likelihood of the reference
items' gold answers, the model's weights frozen. It is saved and loaded as ordinary routing state
(``rm.save_pretrained`` / ``reroute.from_pretrained``), and C3PO or rerouting run on top of it unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from reroute.adapters.config import AdapterConfig, AdapterMethodConfig
from reroute.attach import RoutedModel
from reroute.data import Item, gold_text
from reroute.frozen import frozen_weights
from reroute.methods import RoutingMethod, get_method, register_method
from reroute.scoring import ContinuationBatch, build_batch, continuation_logprobs, encode_pair

FIT_RECORD = "adapter_fit.json"
"""File written beside the routing state by :meth:`AdapterFit.save_pretrained`: the config and the fit's losses."""


def gold_loss(rm: RoutedModel, tokenizer: Any, items: Sequence[Item], prompt_field: str = "prompt") -> torch.Tensor:
    """Negative log-likelihood of each item's gold answer after its prompt ``[B]`` (summed over the answer's
    tokens; differentiable with respect to the routing state)."""
    pairs = [encode_pair(tokenizer, str(item[prompt_field]), gold_text(item)) for item in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = build_batch([p for p, _ in pairs], [c for _, c in pairs], int(pad)).to(rm.model.device)
    return -continuation_logprobs(rm.model, batch)


def _mean_loss(rm: RoutedModel, tokenizer: Any, items: Sequence[Item], config: AdapterConfig) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            total += float(gold_loss(rm, tokenizer, batch, config.prompt_field).sum())
    return total / len(items)


@dataclass
class AdapterFit:
    """A fitted adapter: the offsets (CPU copies, ``{layer: [E]}``) and how the fit went.

    Attributes:
        config: the hyperparameters.
        offsets: the fitted offsets of the fitted layers.
        loss_before, loss_after: mean gold-answer NLL over the reference items, before and after.
        history: mini-batch loss per step.
        items: reference items used; seconds: wall time of the fit.
    """

    config: AdapterConfig
    offsets: dict[int, torch.Tensor]
    loss_before: float
    loss_after: float
    history: list[float] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "layers": sorted(self.offsets),
            "offset_norms": {str(i): float(v.norm()) for i, v in sorted(self.offsets.items())},
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "history": self.history,
            "items": self.items,
            "seconds": self.seconds,
        }

    def save_pretrained(self, rm: RoutedModel, directory: str | Path) -> Path:
        """``rm.save_pretrained(directory)`` (the routing state, loaded back by ``reroute.from_pretrained``) plus
        :data:`FIT_RECORD` with this fit's config and losses; returns the folder."""
        directory = Path(rm.save_pretrained(directory))
        (directory / FIT_RECORD).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return directory


def _check_items(items: Sequence[Item], config: AdapterConfig) -> None:
    for position, item in enumerate(items):
        if config.prompt_field not in item:
            raise ValueError(f"reference item {position} has no {config.prompt_field!r} field (config.prompt_field)")
        if "answer" not in item and not ("choices" in item and "label" in item):
            raise ValueError(f"reference item {position} has no gold answer ('answer', or 'choices' and 'label')")


def _fit_gold(
    rm: RoutedModel,
    tokenizer: Any,
    items: Sequence[Item],
    params: list[torch.Tensor],
    config: AdapterConfig,
    max_norm: float | None,
) -> tuple[float, float, list[float]]:
    """Adam on ``params`` over shuffled mini-batches of ``items``' gold-answer loss (plus ``config.l2``), each
    tensor's norm clipped to ``max_norm`` after every step. Returns (mean loss before, after, per-step losses)."""
    order = list(range(len(items)))
    rng = random.Random(config.seed)
    history: list[float] = []
    loss_before = _mean_loss(rm, tokenizer, items, config)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    cursor = len(order)
    for _ in range(config.steps):
        if cursor + config.batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        batch = [items[i] for i in order[cursor : cursor + config.batch_size]]
        cursor += config.batch_size
        loss = gold_loss(rm, tokenizer, batch, config.prompt_field).mean()
        if config.l2 > 0:
            loss = loss + config.l2 * sum(p.pow(2).sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if max_norm is not None:
            with torch.no_grad():
                for p in params:
                    p.mul_(torch.clamp(max_norm / (p.norm() + 1e-12), max=1.0))
        history.append(float(loss.detach()))
    for p in params:
        p.grad = None
    return loss_before, _mean_loss(rm, tokenizer, items, config), history


def fit_adapter(
    rm: RoutedModel, tokenizer: Any, items: Sequence[Item], config: AdapterConfig | None = None, **overrides: Any
) -> AdapterFit:
    """Fit ``rm``'s offsets on the gold answers of ``items`` and leave them set on ``rm``.

    Starts from the current offsets of the fitted layers (zero after ``attach``); other layers and other state are
    untouched. Items need ``config.prompt_field`` and a gold answer (``answer``, or ``choices`` + ``label``).
    Checked before anything changes; if the fit fails the offsets are restored.
    """
    config = dataclasses.replace(config or AdapterConfig(), **overrides) if overrides else config or AdapterConfig()
    rm._check_attached()
    if not items:
        raise ValueError("no reference items to fit the adapter on")
    _check_items(items, config)
    layers = rm._select(None if config.layers == "all" else list(config.layers))
    params = [layer.offsets for layer in layers]
    saved = [p.detach().clone() for p in params]
    start = time.perf_counter()
    try:
        with frozen_weights(rm.model):
            loss_before, loss_after, history = _fit_gold(rm, tokenizer, items, params, config, config.max_norm)
    except BaseException:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None
        raise
    return AdapterFit(
        config=config,
        offsets={layer.layer_idx: layer.offsets.detach().cpu().clone() for layer in layers},
        loss_before=loss_before,
        loss_after=loss_after,
        history=history,
        items=len(items),
        seconds=time.perf_counter() - start,
    )


def load_adapter(
    rm: RoutedModel, source: str | Path | AdapterFit | Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """An adapter's offsets ``{layer: [E]}`` (float32, on each layer's device) from a folder written by
    :meth:`AdapterFit.save_pretrained` / ``rm.save_pretrained`` (offsets only), an :class:`AdapterFit`, or a mapping.
    Checked against ``rm`` (family, architecture, layers, shapes); ``rm`` is not changed."""
    from reroute.pretrained import _check_fingerprint, read_pretrained

    if isinstance(source, AdapterFit):
        values = dict(source.offsets)
    elif isinstance(source, Mapping):
        values = dict(source)
    else:
        directory = Path(source)
        config, tensors = read_pretrained(directory)
        _check_fingerprint(rm, config, directory)
        other = [key for key in ("row_offsets", "policies", "masks", "mixing") if config.state.get(key)]
        if other:
            raise ValueError(
                f"{directory} holds routing state besides layer offsets ({', '.join(other)}); an adapter is offsets "
                "only: save it from a model with nothing else set"
            )
        values = {idx: tensors[f"offsets.{idx}"] for idx in rm.moe_layers if f"offsets.{idx}" in tensors}
    offsets = {}
    for idx, value in values.items():
        layer = rm.layer(int(idx))
        value = torch.as_tensor(value)
        if value.shape != (layer.num_experts,) or not value.is_floating_point() or not bool(value.isfinite().all()):
            raise ValueError(
                f"adapter offsets for layer {idx} must be finite floats of shape [{layer.num_experts}], got "
                f"{value.dtype} {tuple(value.shape)}"
            )
        offsets[layer.layer_idx] = value.to(device=layer.device, dtype=torch.float32)
    return offsets


def testbed_adapter(rm: RoutedModel, tokenizer: Any, config: AdapterMethodConfig) -> Path:
    """The adapter fitted with ``config.fit`` on ``config.reference_size`` items of the testbed's ``reference`` split
    (seed: the fit's), cached under ``~/.cache/reroute`` per config and model; returns its folder. ``rm``'s
    routing state is as it was afterwards."""
    from reroute.pretrained import _restore, _snapshot
    from reroute.testbed.reference import cache_folder, fingerprint_key, is_testbed
    from reroute.testbed.suite import make_split

    if not is_testbed(rm):
        raise ValueError(
            "the adapter method needs adapter=<folder written by AdapterFit.save_pretrained> on a model other than "
            "the testbed (the testbed's reference set fits the testbed only)"
        )
    fit_config = config.fit_config()
    key = json.dumps([dataclasses.asdict(fit_config), config.reference_size], sort_keys=True, default=str)
    folder = cache_folder() / f"testbed-adapter-{hashlib.sha256(key.encode()).hexdigest()[:12]}-{fingerprint_key(rm)}"
    if (folder / FIT_RECORD).is_file():
        return folder
    snapshot = _snapshot(rm)
    try:
        rm.reset()  # the adapter is fitted from the model's own routing: a delta over zero state
        items = make_split("reference", n=config.reference_size, seed=fit_config.seed)
        fit = fit_adapter(rm, tokenizer, items, fit_config)
        fit.save_pretrained(rm, folder)
    finally:
        _restore(snapshot)
    return folder


class Adapter(RoutingMethod):
    """A fitted adapter's offsets added to the layer offsets while an inner registered method (``config.inner``)
    adapts, scores and generates on top of them; the offsets are as they were afterwards.

    With ``inner="base"`` this is the adapter alone: the model's own forward with fixed offsets, no per-item work (the
    same cost, and under ``torch.compile`` the same graph, as zero state). ``inner="c3po"`` is C3PO on the adapter:
    its own pathway, confidence and surrogate all see the adapted routing (its reference index is built from the
    model's own routing).

    Resource ``adapter``: a folder written by :meth:`AdapterFit.save_pretrained`, an :class:`AdapterFit` or
    ``{layer: [E]}``; default on the testbed: one fitted with ``config.fit`` (cached). The inner method's
    own resources go in ``inner_options`` (on the testbed an inner C3PO gets ``index="testbed"`` unless given).
    """

    resources: ClassVar[dict[str, str]] = {
        "adapter": "the adapter: a folder written by AdapterFit.save_pretrained (default on the testbed: fit one)",
    }

    def __init__(self, rm: RoutedModel, inner: RoutingMethod, offsets: Mapping[int, torch.Tensor],
                 config: AdapterMethodConfig | None = None) -> None:  # fmt: skip
        self.rm, self.inner, self.config = rm, inner, config or AdapterMethodConfig()
        self.offsets = dict(offsets)

    @staticmethod
    def _inner_options(config: AdapterMethodConfig) -> tuple[Any, dict[str, Any]]:
        """The inner method's ``(config, resources)`` from ``config.inner_options`` (checked, nothing loaded)."""
        entry = get_method(config.inner)
        fields, resources = entry.split_options(dict(config.inner_options))
        inner_config = entry.make_config(fields)
        if "index" in entry.method_cls.resources and "index" not in resources:
            resources["index"] = "testbed"
        entry.method_cls.check_options(inner_config, resources)
        return inner_config, resources

    @classmethod
    def from_config(cls, rm: RoutedModel, tokenizer: Any, config: AdapterMethodConfig, adapter: Any = None) -> Adapter:
        inner_config, resources = cls._inner_options(config)
        inner = get_method(config.inner).method_cls.from_config(rm, tokenizer, inner_config, **resources)
        inner.name = config.inner
        source = testbed_adapter(rm, tokenizer, config) if adapter is None else adapter
        return cls(rm, inner, load_adapter(rm, source), config)

    @classmethod
    def check_options(cls, config: AdapterMethodConfig, resources: dict[str, Any]) -> None:
        cls._inner_options(config)  # a bad inner method or option fails here, before any model work
        adapter = resources.get("adapter")
        if isinstance(adapter, (str, Path)) and not Path(adapter).is_dir():
            raise FileNotFoundError(f"no adapter folder {adapter}")

    @classmethod
    def reads_labels(cls, config: AdapterMethodConfig) -> bool:
        return get_method(config.inner).method_cls.reads_labels(cls._inner_options(config)[0])

    @property
    def stats(self) -> dict[str, float]:
        return self.inner.stats

    @property
    def batch_adapt(self) -> bool:
        return self.inner.batch_adapt

    @property
    def reports_ties(self) -> bool:  # type: ignore[override]
        return self.inner.reports_ties

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The adapter's offsets added to the current layer offsets, which are put back exactly on exit."""
        saved = {idx: self.rm.layer(idx).offsets.detach().clone() for idx in self.offsets}
        self.rm.set_offsets({idx: saved[idx] + delta for idx, delta in self.offsets.items()})
        try:
            yield
        finally:
            self.rm.set_offsets(saved)

    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> Any:
        with self.installed():
            return self.inner.adapt_contexts(items, prompts)

    def split_state(self, state: Any, rows: int) -> list[Any]:
        return self.inner.split_state(state, rows)

    def stack_states(self, states: Sequence[Any]) -> Any:
        return self.inner.stack_states(states)

    def gate_report(self, state: Any) -> dict[str, list[Any]] | None:
        return self.inner.gate_report(state)

    @contextlib.contextmanager
    def applied(self, state: Any, batch: ContinuationBatch) -> Iterator[None]:
        with self.installed(), self.inner.applied(state, batch):
            yield

    def next_token_logits(self, batch: ContinuationBatch, state: Any) -> torch.Tensor:
        with self.installed():
            return self.inner.next_token_logits(batch, state)

    def next_token_logprobs(self, batch: ContinuationBatch, state: Any) -> torch.Tensor:
        with self.installed():
            return self.inner.next_token_logprobs(batch, state)

    def generate_from(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any = None, **generate_kwargs: Any
    ) -> Any:
        with self.installed():
            return self.inner.generate_from(input_ids, attention_mask, state, **generate_kwargs)


register_method("adapter", AdapterMethodConfig, Adapter)


@dataclass
class RouterLoraFit:
    """A fitted low-rank router delta: the peft model (LoRA ``B @ A`` on each MoE layer's router weight) and how the
    fit went (mean gold-answer NLL over the reference items before and after, mini-batch losses, wall time)."""

    model: Any
    loss_before: float
    loss_after: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit_router_lora(
    model: Any, tokenizer: Any, items: Sequence[Item], config: AdapterConfig | None = None, rank: int = 4
) -> RouterLoraFit:
    """Fit a rank-``rank`` LoRA delta on every MoE router weight (peft, ``target_parameters``) on the gold answers of
    ``items``, as :func:`fit_adapter` fits offsets (``config``: steps, lr, batch size, L2 on the LoRA factors, prompt
    field, seed). The delta starts at zero (peft's ``B = 0``), so the fit starts from the model's own routing.
    Default config: :class:`AdapterConfig` with ``lr=2e-3`` (the offsets' 0.05 diverges on the LoRA factors: on the
    testbed's reference set the gold NLL rose from 0.010 to 1.339).

    ``model``: a plain transformers MoE model (not attached; it is wrapped, not copied). Returns the peft model,
    attached; ``fit.model.save_pretrained(folder)`` writes peft's adapter files and ``peft.PeftModel.from_pretrained``
    loads them back. The delta costs one small ``[E, r] @ [r, H]`` product per router per forward;
    ``merge_and_unload()`` folds it into the router weight (then no cost at all).
    """
    import peft

    from reroute.attach import attach

    config = config or AdapterConfig(lr=2e-3)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not items:
        raise ValueError("no reference items to fit the router delta on")
    _check_items(items, config)
    rm = attach(model)
    routers = {id(rm.layer(i).router) for i in rm.moe_layers}
    names = [name for name, module in model.named_modules() if id(module) in routers]
    rm.detach()
    # peft matches parameter names by suffix: the router's path inside its decoder layer
    suffixes = sorted({name.split(".layers.", 1)[-1].split(".", 1)[-1] + ".weight" for name in names})
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=[], target_parameters=suffixes)
    wrapped = peft.get_peft_model(model, lora)
    rm = attach(wrapped)
    params = [p for name, p in wrapped.named_parameters() if "lora_" in name and p.requires_grad]
    start = time.perf_counter()
    loss_before, loss_after, history = _fit_gold(rm, tokenizer, items, params, config, max_norm=None)
    return RouterLoraFit(wrapped, loss_before, loss_after, history, time.perf_counter() - start)
