"""``reroute.attach(model)``: put a routing controller on every MoE layer of a transformers model.

>>> rm = reroute.attach(model)           # model unchanged until state is set
>>> rm.set_offsets({3: torch.randn(64)})  # steer layer 3
>>> with rm.trace() as tr:
...     model(**batch)
>>> rm.detach()                           # the original modules, exactly
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from reroute import pretrained
from reroute.arch import FamilyAdapter, UnsupportedModelError, family_for
from reroute.compat import find_cache
from reroute.kernels import experts as kernel_experts
from reroute.routing.checks import check_tensor
from reroute.routing.layer import LayerRouting, Mixing, RoutingContext, execution_device
from reroute.routing.policy import ExpertMask, RoutingPolicy, as_integer, check_routing
from reroute.routing.replay import LayerReplay, Routes
from reroute.routing.trace import Trace

STATE_FILE = pretrained.STATE_NAME
CONFIG_FILE = pretrained.LEGACY_CONFIG_NAME  # the older rm.save layout, still readable

_LAYER_NAME = re.compile(r"^(?P<stack>.*)\.layers\.(?P<idx>\d+)\.")
_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the family's router class whose forward defers to the layer's controller.

    Being a subclass keeps ``isinstance`` checks (transformers' output recorders, peft) working.
    """
    if cls not in _ROUTED_CLASSES:

        def forward(self: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple:
            return self.__dict__["_reroute_layer"](hidden_states)

        _ROUTED_CLASSES[cls] = type(f"Routed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _ROUTED_CLASSES[cls]


def _output_order(router: nn.Module) -> tuple[int, int, int]:
    """Positions of (logits, weights, indices) in the router's output tuple (it changed across 5.x releases)."""
    was_training = router.training
    router.eval()
    try:
        with torch.no_grad():
            weight = router.weight
            probe = torch.zeros(2, weight.shape[-1], dtype=weight.dtype, device=execution_device(router))
            outputs = router(probe)
    finally:
        router.train(was_training)
    if len(outputs) != 3:
        raise UnsupportedModelError(f"{type(router).__name__} returns {len(outputs)} values; expected 3")
    index_pos = next(i for i, t in enumerate(outputs) if not t.is_floating_point())
    floats = [i for i in range(3) if i != index_pos]
    logits_pos = next((i for i in floats if outputs[i].shape[-1] == router.num_experts), floats[0])
    weights_pos = next(i for i in floats if i != logits_pos)
    order = [0, 0, 0]
    order[logits_pos], order[weights_pos], order[index_pos] = 0, 1, 2
    # order[j] = which of (logits, weights, indices) goes to output slot j
    return tuple(order)  # type: ignore[return-value]


class RoutedModel:
    """A transformers MoE model with a routing controller on every MoE layer.

    Attributes:
        model: the wrapped model (its forward, ``generate()`` and ``state_dict`` are the usual ones).
        family: the family's adapter.
        moe_layers: decoder-layer indices of the MoE layers, in order.
        layers: ``{layer_idx: LayerRouting}``.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, kernels: bool | str = "auto") -> None:
        # decided (and a bad request rejected) before the model is touched
        kernels_on = kernel_experts.should_enable(model, kernels)
        self._kernels_mode = kernels
        self._kernels_saved: list | None = None
        self.model = model
        self.family = adapter
        self.context = RoutingContext()
        self.layers: dict[int, LayerRouting] = {}
        self._routers: dict[int, tuple[nn.Module, type]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        router_cls = adapter.resolve_router_class()
        stacks: dict[str, nn.Module] = {}
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if not isinstance(module, router_cls):
                continue
            if "_reroute_layer" in module.__dict__:
                raise RuntimeError(
                    f"router {name} is already controlled by another RoutedModel (attached through another wrapper "
                    "of this model); use that one, or detach it first"
                )
            match = _LAYER_NAME.match(name)
            if match is None:
                raise UnsupportedModelError(f"router {name} is not inside a `layers.<i>` module list")
            idx = int(match["idx"])
            stacks[match["stack"]] = modules[match["stack"]]
            order = _output_order(module)
            self.layers[idx] = LayerRouting(idx, module, adapter, self.context, order)
            self._routers[idx] = (module, type(module))
        if not self.layers:
            raise UnsupportedModelError(f"no {adapter.display_name} router ({adapter.router_class}) found in the model")
        self.layers = dict(sorted(self.layers.items()))
        for stack in stacks.values():
            self._hooks.append(stack.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._hooks.append(stack.register_forward_hook(self._after_forward, always_call=True))
        self._hooked_forwards: dict[int, object] = {}
        for idx, (router, cls) in self._routers.items():
            router.__dict__["_reroute_layer"] = self.layers[idx]
            router.__class__ = _routed_class(cls)
            if "_old_forward" in router.__dict__:
                # accelerate's device-map hooks (one per module on a multi-device dispatch) call the forward they
                # saved when hooking, which would bypass the class swap: point it at the routed forward
                self._hooked_forwards[idx] = router.__dict__["_old_forward"]
                router._old_forward = types.MethodType(router.__class__.forward, router)
        # a peft wrapper and the transformers model inside it share one RoutedModel
        self._marked = [model] + ([] if _core_model(model) is model else [_core_model(model)])
        for marked in self._marked:
            marked.__dict__["_reroute_attached"] = self
        # one forward at a time: the routing state is shared, so a second thread's forward would run on (and could
        # change) the state of the first thread's call
        self._forward_lock = threading.Lock()
        self._forward_thread: int | None = None
        self._forward_depth = 0
        # a thread running a method that keeps routing state set across several forwards (see ``exclusive``)
        self._owner_thread: int | None = None
        self._owner_depth = 0
        self._owner_what = ""
        self._wrap_generate(_core_model(model))
        for marked in self._marked:
            self._wrap_save(marked)
        self._set_kernels(kernels_on)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def attached(self) -> bool:
        return bool(self._routers)

    def detach(self) -> nn.Module:
        """Restore the original router classes and remove every hook; returns the model. Detaching a detached
        RoutedModel does nothing (a stale one never touches a newer attachment of the same model); detaching while
        another thread holds the model (:meth:`exclusive`) raises."""
        if not self.attached:
            return self.model
        if self._owner_thread not in (None, threading.get_ident()):
            raise self._owned_error("detach it")
        self._set_kernels(False)
        core = _core_model(self.model)
        for name in ("generate", "_expand_inputs_for_generation"):
            core.__dict__.pop(name, None)
        for marked in self._marked:
            marked.__dict__.pop("save_pretrained", None)
        for idx, (router, cls) in self._routers.items():
            router.__class__ = cls
            router.__dict__.pop("_reroute_layer", None)
            if idx in self._hooked_forwards:
                router._old_forward = self._hooked_forwards.pop(idx)
            elif getattr(router.__dict__.get("_old_forward"), "__func__", None) is _routed_class(cls).forward:
                # dispatched by accelerate while attached: the forward its hook saved is ours; give it the original
                router._old_forward = types.MethodType(cls.forward, router)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._routers.clear()
        for marked in self._marked:
            marked.__dict__.pop("_reroute_attached", None)
        return self.model

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this RoutedModel was detached; call reroute.attach(model) again")
        owner = self._owner_thread
        if owner is not None and owner != threading.get_ident():
            raise self._owned_error("change its routing state")

    def _owned_error(self, action: str) -> RuntimeError:
        return RuntimeError(
            f"this RoutedModel is running {self._owner_what} in another thread, which keeps its own routing state on "
            f"the model until it returns, so this thread cannot {action} now; use one model (and one reroute.attach) "
            "per thread, or run the calls one after the other"
        )

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[RoutedModel]:
        """Within the block only the calling thread may run forwards of the model or change its routing state.

        For methods that keep temporary routing state on the model across several forwards (a ``Rerouter``'s δ
        between its steps and phases, SCMoE's weak routing): a forward or a setter call from another thread in
        the meantime would run on (or change) that state, so it raises a ``RuntimeError`` instead. Entering while
        another thread runs a forward or holds the model raises too. Re-entrant within one thread; ``what`` names
        the call in the error (``"Rerouter.generate"``).
        """
        me = threading.get_ident()
        with self._forward_lock:
            if self._owner_thread not in (None, me):
                raise self._owned_error(f"run {what}")
            if self._forward_thread not in (None, me):
                raise RuntimeError(
                    f"this RoutedModel is running a forward in another thread, so {what} cannot start now; use one "
                    "model (and one reroute.attach) per thread, or run the calls one after the other"
                )
            if self._owner_depth == 0:
                self._owner_thread, self._owner_what = me, what
            self._owner_depth += 1
        try:
            yield self
        finally:
            with self._forward_lock:
                self._owner_depth -= 1
                if self._owner_depth == 0:
                    self._owner_thread, self._owner_what = None, ""

    def _wrap_generate(self, core: nn.Module) -> None:
        """Record ``generate()``'s row expansion (``num_return_sequences`` / ``num_beams``) in the context, so that
        per-row state set for the prompt rows follows their copies, and nowhere else (see ``expand_rows``)."""
        if not callable(getattr(core, "_expand_inputs_for_generation", None)):
            return
        context, generate, expand = self.context, core.generate, core._expand_inputs_for_generation

        def expand_inputs(*args: object, expand_size: int = 1, **kwargs: object) -> tuple:
            context.expansion = int(expand_size)
            # the rows being expanded: generate()'s prompts (or, for a stream a method expands, its rows)
            rows = next((kwargs[k] for k in ("input_ids", "attention_mask") if kwargs.get(k) is not None), None)
            context.batch_rows = int(rows.shape[0]) if isinstance(rows, torch.Tensor) and rows.dim() >= 1 else None
            return expand(*args, expand_size=expand_size, **kwargs)

        def generate_with_rows(*args: object, **kwargs: object) -> object:
            saved = context.expansion, context.batch_rows
            context.expansion, context.batch_rows = 1, None
            try:
                return generate(*args, **kwargs)
            finally:
                context.expansion, context.batch_rows = saved

        generate_with_rows.__doc__ = generate.__doc__
        core.__dict__["_expand_inputs_for_generation"] = expand_inputs
        core.__dict__["generate"] = generate_with_rows

    def _wrap_save(self, module: nn.Module) -> None:
        """Make ``model.save_pretrained`` (transformers weights, or a peft adapter) warn when routing state is set:
        those files hold the weights only, and a reload would silently route as the original model."""
        save = getattr(module, "save_pretrained", None)
        if not callable(save):
            return

        def save_pretrained(*args: object, **kwargs: object) -> object:
            if self.attached and self.has_state():
                warnings.warn(
                    f"{type(module).__name__}.save_pretrained saves the weights only, not the routing state set on "
                    "this RoutedModel (offsets, policies, masks, re-mixing); save it too with "
                    "rm.save_pretrained(directory) and reload it with reroute.from_pretrained(model, directory)",
                    UserWarning,
                    stacklevel=2,
                )
            return save(*args, **kwargs)

        save_pretrained.__doc__ = save.__doc__
        module.__dict__["save_pretrained"] = save_pretrained

    def has_state(self) -> bool:
        """Whether any routing state differs from the original model's (non-zero offsets, or anything else set)."""
        return any(
            bool(layer.offsets.detach().ne(0).any())
            or any(v is not None for v in (layer.row_offsets, layer.policy, layer.mask, layer.mixing))
            for layer in self.layers.values()
        )

    def _enter_forward(self) -> None:
        if torch.compiler.is_compiling():
            return  # a compiled forward runs the check in the eager call around it
        me = threading.get_ident()
        with self._forward_lock:
            if self._owner_thread not in (None, me):
                raise self._owned_error("run a forward")
            if self._forward_thread not in (None, me):
                raise RuntimeError(
                    "this RoutedModel is running a forward in another thread and its routing state is shared; "
                    "use one model (and one reroute.attach) per thread, or run the calls one after the other"
                )
            self._forward_thread = me
            self._forward_depth += 1

    def _leave_forward(self) -> None:
        if torch.compiler.is_compiling():
            return
        with self._forward_lock:
            if self._forward_thread == threading.get_ident():
                self._forward_depth -= 1
                if self._forward_depth == 0:
                    self._forward_thread = None

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._enter_forward()
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        ctx = self.context
        if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
            ctx.batch_size, ctx.seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        else:
            ctx.batch_size = ctx.seq_len = None
        ctx.past_length = 0
        if any(layer.mixing is not None for layer in self.layers.values()):
            cache = find_cache(kwargs)
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = cache.get_seq_length()
                # a static cache counts on the device: keep a copy, without a host sync (the cache advances its
                # count in place while this forward runs)
                ctx.past_length = past.clone() if isinstance(past, torch.Tensor) else int(past)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs_or_output: object, *rest: object) -> None:
        self.context.clear()
        self._leave_forward()

    # ----------------------------------------------------------------------------------------------- access
    @property
    def moe_layers(self) -> list[int]:
        return list(self.layers)

    @property
    def num_experts(self) -> int:
        return next(iter(self.layers.values())).num_experts

    @property
    def top_k(self) -> int:
        return next(iter(self.layers.values())).top_k

    def layer(self, idx: int) -> LayerRouting:
        """The controller of decoder layer ``idx`` (negative indices count from the last MoE layer)."""
        try:
            idx = as_integer(idx, "layer index")
        except TypeError:
            raise TypeError(f"layer index must be an int, got {type(idx).__name__} {idx!r}") from None
        if idx < 0 and -len(self.layers) <= idx:
            return self.layers[self.moe_layers[idx]]
        if idx not in self.layers:
            raise KeyError(f"layer {idx} is not an MoE layer of this model; MoE layers: {self.moe_layers}")
        return self.layers[idx]

    def _select(self, layers: int | Sequence[int] | None) -> list[LayerRouting]:
        if layers is None:
            return list(self.layers.values())
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            layers = [layers]
        selected = [self.layer(i) for i in layers]
        if not selected:
            raise ValueError("layers is empty; pass layer indices, or None for every MoE layer")
        return selected

    @property
    def offsets(self) -> OffsetTable:
        """Learnable router-logit offsets, one ``[E]`` parameter per MoE layer, keyed by decoder-layer index."""
        return OffsetTable(self)

    # ----------------------------------------------------------------------------------------------- state
    def set_offsets(
        self, values: Mapping[int, torch.Tensor] | torch.Tensor, layers: Sequence[int] | None = None
    ) -> None:
        """Set layer offsets: ``{layer: [E]}``, or a ``[num_layers, E]`` tensor for ``layers`` (default: all MoE
        layers). Everything is validated before anything changes."""
        self._check_attached()
        pairs = self._pairs(values, layers, "offsets")
        for layer, value in pairs:
            check_tensor(
                value,
                f"offsets for layer {layer.layer_idx}",
                shape=(layer.num_experts,),
                device=layer.device,
                finite=True,
            )
        with torch.no_grad():
            for layer, value in pairs:
                layer.offsets.copy_(value)

    def set_row_offsets(
        self, values: Mapping[int, torch.Tensor] | torch.Tensor, layers: Sequence[int] | None = None
    ) -> None:
        """Per-row offsets ``[B, E]`` per layer (``{layer: [B, E]}`` or ``[B, num_layers, E]``). Differentiable:
        the tensors are used as given, so a leaf with ``requires_grad`` receives gradients."""
        self._check_attached()
        if isinstance(values, torch.Tensor):
            if values.dim() != 3:
                raise ValueError(f"row offsets tensor must be [B, num_layers, E], got {list(values.shape)}")
            values = values.transpose(0, 1)
        pairs = self._pairs(values, layers, "row offsets")
        for layer, value in pairs:
            check_tensor(
                value,
                f"row offsets for layer {layer.layer_idx}",
                shape=(None, layer.num_experts),
                device=layer.device,
                finite=True,
            )
            self._check_state_rows(f"row offsets for layer {layer.layer_idx}", count=value.shape[0])
        for layer, value in pairs:
            layer.row_offsets = value

    def _pairs(
        self, values: Mapping[int, torch.Tensor] | torch.Tensor, layers: Sequence[int] | None, what: str
    ) -> list[tuple[LayerRouting, torch.Tensor]]:
        if isinstance(values, Mapping):
            if layers is not None:
                raise ValueError(f"pass {what} either as a {{layer: tensor}} mapping or with layers=, not both")
            return [(self.layer(k), v) for k, v in values.items()]
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{what} must be a tensor or a {{layer: tensor}} mapping, got {type(values).__name__}")
        if values.dim() == 0:
            raise ValueError(f"{what} is a 0-d tensor; pass one row of [E] offsets per selected layer")
        selected = self._select(layers)
        if values.shape[0] != len(selected):
            raise ValueError(f"{what} has {values.shape[0]} layer rows but {len(selected)} layers are selected")
        return list(zip(selected, values))

    def set_policy(
        self,
        policy: RoutingPolicy | None,
        layers: int | Sequence[int] | None = None,
        rows: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """Routing policy for ``layers`` (default all), optionally only for batch ``rows`` (bool ``[B]`` or
        indices; the other rows keep the family's routing). ``None`` clears it. Rows that cannot fit the batch are
        refused here where the batch is known (inside ``generate()``, ``row_expansion(copies, rows=...)``), else at
        the forward."""
        self._check_attached()
        if policy is not None and not isinstance(policy, RoutingPolicy):
            raise TypeError(
                f"policy must be a reroute.RoutingPolicy or None, got {type(policy).__name__}; "
                "wrap settings as RoutingPolicy(**settings)"
            )
        selected = self._select(layers)
        row_mask = None
        if policy is not None:
            for layer in selected:
                check_routing(layer.rule, layer.router, layer.num_experts, layer.top_k, policy, layer.mask)
            if rows is not None:
                row_mask = self._row_mask(rows, selected[0].device)
                if row_mask.dtype == torch.bool:
                    self._check_state_rows("policy rows", count=row_mask.shape[0])
                else:
                    self._check_state_rows("policy rows", indices=row_mask)
        elif rows is not None:
            raise ValueError("rows= needs a policy; pass policy=None without rows to clear the policy")
        for layer in selected:
            layer.policy = policy
            layer.policy_rows = None if row_mask is None else row_mask.to(layer.device)

    @staticmethod
    def _row_mask(rows: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
        """Policy rows as given: a bool mask ``[B]`` (one entry per batch row) or long row indices ``[n]`` (rows
        of the batch, or of the prompts inside ``generate()``; checked against the batch at set time where it is
        known, see ``_check_state_rows``, and at each forward)."""
        if (
            isinstance(rows, (str, bytes))
            or not isinstance(rows, (torch.Tensor, Sequence))
            and not hasattr(rows, "__array__")
        ):
            raise TypeError(f"rows must be a bool mask [B] or a list of row indices, got {type(rows).__name__}")
        try:
            rows = torch.as_tensor(rows, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"rows must be a bool mask [B] or a list of row indices, got {rows!r}") from None
        if rows.dim() != 1:
            raise ValueError(f"rows must be one-dimensional (a bool mask [B] or row indices), got {list(rows.shape)}")
        if rows.numel() == 0:
            raise ValueError("rows is empty; pass the batch rows the policy applies to, or rows=None for all rows")
        if rows.dtype == torch.bool:
            if not rows.any():
                raise ValueError("the row mask selects no row; pass the batch rows the policy applies to")
            return rows
        if rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"rows must be integer row indices or a bool mask, got {rows.dtype} values")
        if (rows < 0).any():
            raise ValueError(f"rows must be non-negative batch row indices, got {rows.tolist()}")
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"rows repeat an index: {rows.tolist()}; name each batch row once")
        return rows.long()

    def set_mask(self, mask: ExpertMask | None, layers: int | Sequence[int] | None = None) -> None:
        """Ban / force experts in ``layers`` (default all); ``None`` clears."""
        self._check_attached()
        if mask is not None and not isinstance(mask, ExpertMask):
            raise TypeError(f"mask must be a reroute.ExpertMask or None, got {type(mask).__name__}")
        selected = self._select(layers)
        if mask is not None:
            for layer in selected:
                check_routing(layer.rule, layer.router, layer.num_experts, layer.top_k, layer.policy, mask)
        for layer in selected:
            layer.mask = mask

    def set_mixing(
        self,
        layer: int,
        experts: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        logits: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """C3PO re-mixing for one layer: at ``positions`` the core ``experts``' routing mass is redistributed as
        ``softmax(logits)`` (or in proportion to ``weights``), then top-k is re-selected.

        Shapes: ``experts [C]`` or ``[B, C]``; ``positions [n]`` or ``[B, n]`` absolute token positions (``-1``
        pads); ``logits``/``weights`` ``[C]`` or ``[B, C]``. Without either, the mixing logits start at zero
        (uniform over the core). Returns the logits tensor in use: pass a leaf with ``requires_grad=True`` to
        optimise it.
        """
        self._check_attached()
        target = self.layer(layer)
        device = target.device
        experts = torch.as_tensor(experts, device=device)
        positions = torch.as_tensor(positions, device=device)
        check_tensor(experts, "experts", kind="int", of="expert indices")
        check_tensor(positions, "positions", kind="int", of="token positions")
        for name, value in (("experts", experts), ("positions", positions)):
            if value.dim() > 2:
                raise ValueError(f"{name} must be [n] or [B, n], got a {value.dim()}-d tensor {list(value.shape)}")
        experts = experts.long().reshape(-1, experts.shape[-1]) if experts.dim() else experts.long().reshape(1, 1)
        positions = (
            positions.long().reshape(-1, positions.shape[-1]) if positions.dim() else positions.long().reshape(1, 1)
        )
        if experts.dim() != 2 or experts.shape[1] == 0:
            raise ValueError("experts must be [C] or [B, C] with C >= 1")
        if ((experts < 0) | (experts >= target.num_experts)).any():
            raise ValueError(f"experts out of range for a layer with {target.num_experts} experts")
        if (experts.sort(dim=-1).values.diff(dim=-1) == 0).any():
            raise ValueError("experts must not repeat within a row")
        if logits is not None and weights is not None:
            raise ValueError("pass either logits or weights, not both")
        if weights is not None:
            weights = weights[None] if weights.dim() == 1 else weights
            check_tensor(weights, "re-mixing weights", shape=(None, experts.shape[1]), device=device, finite=True)
            if (weights < 0).any() or (weights.sum(dim=-1) <= 0).any():
                raise ValueError("re-mixing weights must be non-negative with a positive sum per row")
            logits = weights.log()
        elif logits is None:
            logits = torch.zeros(experts.shape, device=device)
        else:
            if logits.dim() == 1:
                logits = logits[None]
            check_tensor(logits, "re-mixing logits", shape=(None, experts.shape[1]), device=device, finite=True)
        rows = {experts.shape[0], logits.shape[0], positions.shape[0]} - {1}
        if len(rows) > 1:
            raise ValueError(f"experts, logits and positions disagree on the number of rows: {sorted(rows)}")
        self._check_state_rows("re-mixing state", count=max(rows, default=1), shared=True)
        target.mixing = Mixing(experts=experts, logits=logits, positions=positions)
        return logits

    def clear_mixing(self, layers: int | Sequence[int] | None = None) -> None:
        self._check_attached()
        for layer in self._select(layers):
            layer.mixing = None

    def reset(self) -> None:
        """Back to the original routing on every layer (zero offsets, nothing else set)."""
        self._check_attached()
        for layer in self.layers.values():
            layer.reset()

    @contextlib.contextmanager
    def routing(
        self,
        policy: RoutingPolicy | None = None,
        mask: ExpertMask | None = None,
        layers: int | Sequence[int] | None = None,
        rows: torch.Tensor | Sequence[int] | None = None,
    ) -> Iterator[RoutedModel]:
        """Temporarily apply a policy and/or mask: ``with rm.routing(RoutingPolicy(rank=2)): model(...)``."""
        self._check_attached()
        selected = self._select(layers)
        saved = [(layer.policy, layer.policy_rows, layer.mask) for layer in selected]
        try:
            if mask is not None:
                self.set_mask(mask, [layer.layer_idx for layer in selected])
            if policy is not None:
                self.set_policy(policy, [layer.layer_idx for layer in selected], rows=rows)
            yield self
        finally:
            for layer, (p, r, m) in zip(selected, saved):
                layer.policy, layer.policy_rows, layer.mask = p, r, m

    @contextlib.contextmanager
    def row_expansion(self, copies: int, rows: int | None = None) -> Iterator[RoutedModel]:
        """Within the block, per-row state set for ``R`` rows serves forwards of ``R * copies`` rows, each row
        repeated ``copies`` times in place (``repeat_interleave``), as ``generate()`` lays out
        ``num_return_sequences``; e.g. scoring each item's ``copies`` answer choices as consecutive rows. Outside
        such a block (and ``generate()``), per-row state must have one row per batch row.

        ``rows``: ``R``, when known. Per-row state set inside the block is then checked against the batch at once
        (row indices below ``R``; ``R`` or ``R * copies`` rows), as inside ``generate()``, rather than at the
        first forward."""
        copies = as_integer(copies, "copies")
        if copies < 1:
            raise ValueError(f"copies must be a positive integer, got {copies}")
        if rows is not None:
            rows = as_integer(rows, "rows")
            if rows < 1:
                raise ValueError(f"rows must be a positive integer (the prompt rows of the batch), got {rows}")
        saved = self.context.expansion, self.context.batch_rows
        self.context.expansion = copies
        self.context.batch_rows = rows if rows is not None else saved[1]
        try:
            yield self
        finally:
            self.context.expansion, self.context.batch_rows = saved

    def _batch_in_flight(self) -> tuple[int, int] | None:
        """``(prompt rows, forward rows)`` of the batch this thread is running, where it is known before its forwards
        (inside ``generate()``, a ``row_expansion(copies, rows=...)`` block, or a forward); ``None`` elsewhere."""
        ctx = self.context
        if ctx.batch_rows is not None:
            return ctx.batch_rows, ctx.batch_rows * ctx.expansion
        if ctx.batch_size is not None:
            copies = ctx.expansion if ctx.batch_size % ctx.expansion == 0 else 1
            return ctx.batch_size // copies, ctx.batch_size
        return None

    def _check_state_rows(
        self, what: str, count: int | None = None, indices: torch.Tensor | None = None, shared: bool = False
    ) -> None:
        """Per-row state against the batch in flight, where it is known (see :meth:`_batch_in_flight`): row
        ``indices`` must name prompt rows, and ``count`` rows must be one per prompt row or per batch row (or 1
        where ``shared`` state serves every row). Elsewhere the forward checks it (``expand_rows``)."""
        known = self._batch_in_flight()
        if known is None:
            return
        prompts, rows = known
        if indices is not None and int(indices.max()) >= prompts:
            raise ValueError(
                f"{what} {indices.tolist()} name a row beyond the batch of {prompts} rows; pass row indices below "
                "the batch size"
            )
        if count is not None and count not in (prompts, rows) and not (shared and count == 1):
            copies = f" ({rows // prompts} sequences per prompt)" if rows != prompts else ""
            raise ValueError(
                f"{what} has {count} rows but the batch being run has {rows} rows{copies}; set per-row state with one "
                "row per batch row (or per prompt row inside generate() with num_return_sequences / num_beams)"
            )

    @contextlib.contextmanager
    def trace(self, detach: bool = True, device: str | torch.device | None = None) -> Iterator[Trace]:
        """Record routing while the block runs (see :class:`reroute.routing.trace.Trace`)."""
        self._check_attached()
        with self._recording(Trace(self.layers, detach=detach, device=device)) as recorder:
            yield recorder

    @contextlib.contextmanager
    def record(self) -> Iterator[Routes]:
        """Record the routes (experts, weights, renormalisation per layer and token) of every forward in the block:
        ``with rm.record() as routes: model.generate(...)``; replay them with :meth:`replay` or save them with
        ``routes.save(dir)`` (see :mod:`reroute.routing.replay`)."""
        self._check_attached()
        layers = self.layers.values()
        with self._recording(
            Routes(self.moe_layers, [layer.num_experts for layer in layers], self.fingerprint())
        ) as routes:
            yield routes

    @contextlib.contextmanager
    def _recording(self, recorder: Trace | Routes) -> Iterator[Trace | Routes]:
        """Every router call inside the block hands its routing to ``recorder.record``."""
        self.context.traces.append(recorder)
        try:
            yield recorder
        finally:
            self.context.traces.remove(recorder)

    @contextlib.contextmanager
    def replay(self, routes: Routes | str | Path) -> Iterator[dict[int, LayerReplay]]:
        """Force recorded routes (a :class:`Routes`, or a folder written by ``routes.save``) on the forwards of the
        block: every MoE layer uses the recorded experts and weights of the next tokens instead of its own choice.
        Checked against the model before anything changes; eager only (an error under ``torch.compile``)."""
        self._check_attached()
        if not isinstance(routes, Routes):
            routes = Routes.load(routes)
        routes.check(self.layers)
        if any(layer.replay is not None for layer in self.layers.values()):
            raise RuntimeError("a replay is already active on this model; nest no replays")
        cursors = {idx: LayerReplay(routes, idx, layer.device) for idx, layer in self.layers.items()}
        for idx, layer in self.layers.items():
            layer.replay = cursors[idx]
        try:
            yield cursors
        finally:
            for layer in self.layers.values():
                layer.replay = None

    def to(self, device: str | torch.device) -> RoutedModel:
        """Move the routing state of each layer to that layer's current device (after moving the model)."""
        self._check_attached()
        for layer in self.layers.values():
            with torch.no_grad():
                layer.offsets.data = layer.offsets.data.to(layer.device)
            layer.mark_static()
            layer.graph.to(layer.device)
            if layer.row_offsets is not None:
                layer.row_offsets = layer.row_offsets.to(layer.device)
            if layer.policy_rows is not None:
                layer.policy_rows = layer.policy_rows.to(layer.device)
            if layer.mixing is not None:
                m = layer.mixing
                layer.mixing = Mixing(
                    m.experts.to(layer.device), m.logits.to(layer.device), m.positions.to(layer.device)
                )
        self._update_kernels()
        return self

    # ----------------------------------------------------------------------------------------------- kernels
    @property
    def kernels(self) -> bool:
        """Whether the experts run the Triton dispatch (``reroute.kernels``) rather than the model's own."""
        return self._kernels_saved is not None

    def _update_kernels(self) -> None:
        """(Re)decide ``attach(..., kernels=...)`` for the model's current device (``"auto"``: on CUDA only)."""
        self._set_kernels(kernel_experts.should_enable(self.model, self._kernels_mode))

    def _set_kernels(self, on: bool) -> None:
        if on and self._kernels_saved is None:
            self._kernels_saved = kernel_experts.enable(self.model)
        elif not on and self._kernels_saved is not None:
            kernel_experts.restore(self._kernels_saved)
            self._kernels_saved = None
        for layer in self.layers.values():
            layer.kernels = on

    # ----------------------------------------------------------------------------------------------- save / load
    def fingerprint(self) -> dict[str, object]:
        """What an adaptation state must match: family, layer count, MoE layers, experts, top-k, hidden size."""
        config = self.model.config
        return {
            "model_type": self.family.model_type,
            "num_hidden_layers": int(config.num_hidden_layers),
            "hidden_size": int(config.hidden_size),
            "moe_layers": self.moe_layers,
            "num_experts": [layer.num_experts for layer in self.layers.values()],
            "top_k": [layer.top_k for layer in self.layers.values()],
        }

    def save_pretrained(self, directory: str | Path, method: object = None) -> Path:
        """Write the whole routing state (offsets, per-row offsets, policies and their rows, masks, re-mixing) as
        ``reroute_config.json`` + ``routing_state.safetensors``, atomically, with ``method``'s config (a registered
        method's config, or a method object holding one) if given. See :mod:`reroute.pretrained`."""
        return pretrained.save_pretrained(self, directory, method)

    def load_pretrained(self, directory: str | Path) -> RoutedModel:
        """Replace the routing state by one saved with :meth:`save_pretrained` (or the older :meth:`save`); all or
        nothing: on any error the routing state is left as it was."""
        return pretrained.load_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> RoutedModel:
        """``reroute.attach(model)`` and load the state saved in ``directory`` (see :func:`reroute.from_pretrained`)."""
        return from_pretrained(model, directory)

    def save(self, directory: str | Path) -> Path:
        """Deprecated alias of :meth:`save_pretrained` (the one save format; this used to drop per-row state)."""
        warnings.warn("RoutedModel.save is deprecated; use save_pretrained", DeprecationWarning, stacklevel=2)
        return self.save_pretrained(directory)

    def load(self, directory: str | Path) -> RoutedModel:
        """Deprecated alias of :meth:`load_pretrained` (which reads both layouts)."""
        warnings.warn("RoutedModel.load is deprecated; use load_pretrained", DeprecationWarning, stacklevel=2)
        return self.load_pretrained(directory)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"RoutedModel({self.family.display_name}, {len(self.layers)} MoE layers {self.moe_layers}, "
            f"{self.num_experts} experts, top-{self.top_k}, {state})"
        )


class OffsetTable(Mapping[int, nn.Parameter]):
    """``rm.offsets``: ``{decoder layer index: offsets [E]}``, with helpers for optimisers."""

    def __init__(self, routed: RoutedModel) -> None:
        self._routed = routed

    def __getitem__(self, idx: int) -> nn.Parameter:
        return self._routed.layer(idx).offsets

    def __iter__(self) -> Iterator[int]:
        return iter(self._routed.layers)

    def __len__(self) -> int:
        return len(self._routed.layers)

    def parameters(self) -> list[nn.Parameter]:
        """The offset parameters in layer order (``torch.optim.Adam(rm.offsets.parameters())``)."""
        return [layer.offsets for layer in self._routed.layers.values()]

    def stack(self) -> torch.Tensor:
        """Detached copy ``[num_moe_layers, E]`` on the CPU."""
        return torch.stack([p.detach().cpu() for p in self.parameters()])

    def zero_(self) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def norm(self) -> float:
        return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in self.parameters()))


def _core_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``PeftModel.get_base_model()``), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def from_pretrained(model: nn.Module, directory: str | Path) -> RoutedModel:
    """Attach routing control to ``model`` (a transformers MoE model, or a peft model wrapping one) and load the
    state saved in ``directory``. If this call attached the model and loading fails, the model is detached again."""
    fresh = all(m.__dict__.get("_reroute_attached") is None for m in (model, _core_model(model)))
    rm = attach(model)
    try:
        return pretrained.load_pretrained(rm, directory)
    except Exception:
        if fresh:
            rm.detach()
        raise


def attach(model: nn.Module, kernels: bool | str = "auto") -> RoutedModel:
    """Attach routing control to a transformers MoE model (or a peft model wrapping one).

    Returns the model's :class:`RoutedModel`; attaching an already attached model returns the same object.
    Raises :class:`UnsupportedModelError` naming the supported families for any other model.
    ``kernels``: ``"auto"`` runs the experts through the Triton dispatch (``reroute.kernels``) when the model
    is on CUDA and every experts module is supported; ``False`` keeps the model's own experts implementation;
    ``True`` requires the kernels and raises if they cannot run. Detaching restores the original choice.
    A model spread over devices (``from_pretrained(..., device_map="auto")``, accelerate's ``dispatch_model``,
    offloaded layers included) works: each layer's routing state lives on that layer's ``rm.layer(i).device``.
    peft: a ``PeftModel`` and the model inside it (``get_base_model()``) share one RoutedModel. LoRA on the router
    (peft wraps it in a ``ParamWrapper`` that adds ``B @ A`` to its weight during the forward) is honoured: the
    controller sits on the router inside the wrapper, so the logits it routes with include the LoRA update.
    """
    existing = model.__dict__.get("_reroute_attached") or _core_model(model).__dict__.get("_reroute_attached")
    if existing is not None:
        return existing
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; reroute.attach expects a transformers model"
        )
    return RoutedModel(model, family_for(model_type), kernels=kernels)
