"""``reroute.attach(model)``: put a routing controller on every MoE layer of a transformers model.

>>> rm = reroute.attach(model)           # model unchanged until state is set
>>> rm.set_offsets({3: torch.randn(64)})  # steer layer 3
>>> with rm.trace() as tr:
...     model(**batch)
>>> rm.detach()                           # the original modules, exactly
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from reroute.arch import FamilyAdapter, UnsupportedModelError, family_for
from reroute.kernels import experts as kernel_experts
from reroute.routing.layer import LayerRouting, Mixing, RoutingContext, execution_device
from reroute.routing.policy import ExpertMask, RoutingPolicy
from reroute.routing.replay import LayerReplay, Routes
from reroute.routing.trace import Trace

STATE_FILE = "routing_state.safetensors"
CONFIG_FILE = "routing_config.json"
FORMAT_VERSION = 1

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


def _check_tensor(
    value: torch.Tensor, shape: tuple[int, ...], device: torch.device, what: str, allow_rows: bool = False
) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {value.dtype}")
    expected = tuple(shape)
    if allow_rows:
        ok = value.dim() == len(shape) and tuple(value.shape[1:]) == expected[1:] and value.shape[0] >= 1
    else:
        ok = tuple(value.shape) == expected
    if not ok:
        want = "[rows, " + ", ".join(map(str, expected[1:])) + "]" if allow_rows else str(list(expected))
        raise ValueError(f"{what} must have shape {want}, got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{what} is on {value.device} but the layer is on {device}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} contains NaN or inf")


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
        self._set_kernels(kernels_on)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def attached(self) -> bool:
        return bool(self._routers)

    def detach(self) -> nn.Module:
        """Restore the original router classes and remove every hook; returns the model."""
        self._set_kernels(False)
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

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
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
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = cache.get_seq_length()
                # a static cache counts on the device: keep a copy, without a host sync (the cache advances its
                # count in place while this forward runs)
                ctx.past_length = past.clone() if isinstance(past, torch.Tensor) else int(past)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs_or_output: object, *rest: object) -> None:
        self.context.clear()

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
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"layer index must be an int, got {type(idx).__name__}")
        if idx < 0 and -len(self.layers) <= idx:
            return self.layers[self.moe_layers[idx]]
        if idx not in self.layers:
            raise KeyError(f"layer {idx} is not an MoE layer of this model; MoE layers: {self.moe_layers}")
        return self.layers[idx]

    def _select(self, layers: int | Sequence[int] | None) -> list[LayerRouting]:
        if layers is None:
            return list(self.layers.values())
        if isinstance(layers, int):
            layers = [layers]
        return [self.layer(i) for i in layers]

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
            _check_tensor(value, (layer.num_experts,), layer.device, f"offsets for layer {layer.layer_idx}")
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
            _check_tensor(
                value, (0, layer.num_experts), layer.device, f"row offsets for layer {layer.layer_idx}", allow_rows=True
            )
        for layer, value in pairs:
            layer.row_offsets = value

    def _pairs(
        self, values: Mapping[int, torch.Tensor] | torch.Tensor, layers: Sequence[int] | None, what: str
    ) -> list[tuple[LayerRouting, torch.Tensor]]:
        if isinstance(values, Mapping):
            if layers is not None:
                raise ValueError(f"pass {what} either as a {{layer: tensor}} mapping or with layers=, not both")
            return [(self.layer(int(k)), v) for k, v in values.items()]
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{what} must be a tensor or a {{layer: tensor}} mapping, got {type(values).__name__}")
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
        indices; the other rows keep the family's routing). ``None`` clears it."""
        self._check_attached()
        selected = self._select(layers)
        row_mask = None
        if policy is not None:
            for layer in selected:
                policy.check(layer.num_experts)
                if layer.mask is not None:
                    layer.mask.check(layer.num_experts, policy.width(layer.num_experts, layer.top_k))
            if rows is not None:
                row_mask = self._row_mask(rows, selected[0].device)
        for layer in selected:
            layer.policy = policy
            layer.policy_rows = None if row_mask is None else row_mask.to(layer.device)

    @staticmethod
    def _row_mask(rows: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
        rows = torch.as_tensor(rows, device=device)
        if rows.dtype == torch.bool:
            if rows.dim() != 1:
                raise ValueError(f"row mask must be [B], got {list(rows.shape)}")
            return rows
        if rows.dim() != 1 or (rows < 0).any():
            raise ValueError("rows must be a bool mask [B] or a list of non-negative row indices")
        mask = torch.zeros(int(rows.max()) + 1 if rows.numel() else 0, dtype=torch.bool, device=device)
        mask[rows] = True
        return mask

    def set_mask(self, mask: ExpertMask | None, layers: int | Sequence[int] | None = None) -> None:
        """Ban / force experts in ``layers`` (default all); ``None`` clears."""
        self._check_attached()
        selected = self._select(layers)
        if mask is not None:
            for layer in selected:
                mask.check(layer.num_experts, layer.width)
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
        if experts.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError("experts must be integer expert indices")
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
            _check_tensor(weights, (0, experts.shape[1]), device, "re-mixing weights", allow_rows=True)
            if (weights < 0).any() or (weights.sum(dim=-1) <= 0).any():
                raise ValueError("re-mixing weights must be non-negative with a positive sum per row")
            logits = weights.log()
        elif logits is None:
            logits = torch.zeros(experts.shape, device=device)
        else:
            if logits.dim() == 1:
                logits = logits[None]
            _check_tensor(logits, (0, experts.shape[1]), device, "re-mixing logits", allow_rows=True)
        rows = {experts.shape[0], logits.shape[0], positions.shape[0]} - {1}
        if len(rows) > 1:
            raise ValueError(f"experts, logits and positions disagree on the number of rows: {sorted(rows)}")
        target.mixing = Mixing(experts=experts, logits=logits, positions=positions)
        return logits

    def clear_mixing(self, layers: int | Sequence[int] | None = None) -> None:
        for layer in self._select(layers):
            layer.mixing = None

    def reset(self) -> None:
        """Back to the original routing on every layer (zero offsets, nothing else set)."""
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
    def trace(self, detach: bool = True, device: str | torch.device | None = None) -> Iterator[Trace]:
        """Record routing while the block runs (see :class:`reroute.routing.trace.Trace`)."""
        self._check_attached()
        recorder = Trace(self.layers, detach=detach, device=device)
        self.context.traces.append(recorder)
        try:
            yield recorder
        finally:
            self.context.traces.remove(recorder)

    @contextlib.contextmanager
    def record(self) -> Iterator[Routes]:
        """Record the routes (experts, weights, renormalisation per layer and token) of every forward in the block:
        ``with rm.record() as routes: model.generate(...)``; replay them with :meth:`replay` or save them with
        ``routes.save(dir)`` (see :mod:`reroute.routing.replay`)."""
        self._check_attached()
        layers = self.layers.values()
        routes = Routes(self.moe_layers, [layer.num_experts for layer in layers], self.fingerprint())
        self.context.traces.append(routes)
        try:
            yield routes
        finally:
            self.context.traces.remove(routes)

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

    def save(self, directory: str | Path) -> Path:
        """Write the layer-level adaptation state (offsets, policies, masks) as safetensors + JSON."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"offsets.{idx}": layer.offsets.detach().cpu().contiguous() for idx, layer in self.layers.items()}
        config = {
            "format": "reroute-routing-state",
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "policies": {str(i): c.policy.to_dict() for i, c in self.layers.items() if c.policy is not None},
            "masks": {str(i): c.mask.to_dict() for i, c in self.layers.items() if c.mask is not None},
        }
        save_file(tensors, str(directory / STATE_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    def load(self, directory: str | Path) -> RoutedModel:
        """Load a state written by :meth:`save`; a different architecture is an error and changes nothing."""
        from safetensors.torch import load_file

        self._check_attached()
        directory = Path(directory)
        config_path, state_path = directory / CONFIG_FILE, directory / STATE_FILE
        if not config_path.is_file() or not state_path.is_file():
            raise FileNotFoundError(f"{directory} lacks {CONFIG_FILE} and/or {STATE_FILE}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if config.get("format") != "reroute-routing-state":
            raise ValueError(f"{config_path} is not a reroute routing state")
        if config.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format version {config['version']}; this reroute reads {FORMAT_VERSION}"
            )
        saved, mine = config.get("fingerprint"), self.fingerprint()
        if saved != mine:
            diff = {
                k: (saved.get(k) if isinstance(saved, dict) else None, v)
                for k, v in mine.items()
                if not isinstance(saved, dict) or saved.get(k) != v
            }
            raise ValueError(
                f"routing state in {directory} was saved for another architecture: (saved, this model) = {diff}"
            )
        tensors = load_file(str(state_path))
        offsets = {}
        for idx, layer in self.layers.items():
            key = f"offsets.{idx}"
            if key not in tensors:
                raise ValueError(f"{state_path} lacks {key}")
            offsets[idx] = tensors[key].to(device=layer.device, dtype=torch.float32)
        policies = {int(k): RoutingPolicy(**v) for k, v in config.get("policies", {}).items()}
        masks = {int(k): ExpertMask(**{f: tuple(x) for f, x in v.items()}) for k, v in config.get("masks", {}).items()}
        # validate everything before changing anything
        for idx, layer in self.layers.items():
            _check_tensor(offsets[idx], (layer.num_experts,), layer.device, f"offsets.{idx} in {state_path}")
            policy, mask = policies.get(idx), masks.get(idx)
            if policy is not None:
                policy.check(layer.num_experts)
            if mask is not None:
                width = policy.width(layer.num_experts, layer.top_k) if policy is not None else layer.top_k
                mask.check(layer.num_experts, width)
        self.reset()
        self.set_offsets(offsets)
        for idx, layer in self.layers.items():
            layer.policy, layer.mask = policies.get(idx), masks.get(idx)
        return self

    def save_pretrained(self, directory: str | Path, method: object = None) -> Path:
        """peft-style save of the whole routing state (``reroute_config.json`` + ``routing_state.safetensors``),
        with ``method``'s config (C3PO / Rerouter / SCMoE, or their config) if given. See :mod:`reroute.pretrained`."""
        from reroute.pretrained import save_pretrained

        return save_pretrained(self, directory, method)

    def load_pretrained(self, directory: str | Path) -> RoutedModel:
        """Replace the routing state by one saved with :meth:`save_pretrained` (or :meth:`save`); all or nothing."""
        from reroute.pretrained import load_pretrained

        return load_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> RoutedModel:
        """``reroute.attach(model)`` and load the state saved in ``directory`` (see :func:`reroute.from_pretrained`)."""
        from reroute.pretrained import from_pretrained

        return from_pretrained(model, directory)

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
