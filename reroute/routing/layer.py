"""Per-MoE-layer routing control: the state that changes routing and the router forward that applies it.

An attached router's class is swapped for a subclass whose ``forward`` calls :class:`LayerRouting`; the
module object, its parameters, its hooks (transformers' ``output_router_logits`` recorder included) and the
model's ``state_dict`` stay exactly as they were. With all state at zero the forward is the family's rule op
for op, so the model is bit-identical to the unattached one.

Order of operations for a call on ``T = batch * seq`` tokens:

1. ``logits = rule.logits(hidden)`` (the family's projection) ``+ offsets[E] + row_offsets[row, E]``;
2. ``rule.route(logits)`` — the family's own top-k, used as is when nothing else is set;
3. where a policy, a mask or re-mixing weights apply, the generic path (``policy.select``) replaces the
   affected tokens' selection: scores -> C3PO re-mixing at the chosen positions -> choice (+mask) -> selection
   -> weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reroute.arch import FamilyAdapter
from reroute.routing import graph
from reroute.routing.graph import GraphState
from reroute.routing.policy import ExpertMask, RoutingPolicy, pad_slots, select

if TYPE_CHECKING:
    from reroute.routing.replay import LayerReplay, Routes
    from reroute.routing.trace import Trace


class RoutingContext(threading.local):
    """Facts about the current model forward that a router cannot see from its flattened input.

    Filled by a forward pre-hook on the decoder stack: ``batch_size`` and ``seq_len`` of the call, and the
    number of tokens already in the KV cache (``past_length``, computed only when re-mixing needs positions).
    Thread-local: each thread sees the facts of its own forward (and its own traces); the routing state itself
    is shared, which is why :class:`reroute.RoutedModel` refuses a forward from a second thread while one runs.
    """

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        self.past_length: int | torch.Tensor = 0  # a 0-d device tensor under a static cache
        self.traces: list[Trace | Routes] = []  # recorders: anything with Trace.record
        # rows per prompt row inside ``generate()`` (num_return_sequences / num_beams); 1 outside it
        self.expansion = 1
        # prompt rows of the batch this thread is running, where known before its forwards (inside ``generate()``,
        # ``rm.row_expansion(copies, rows=...)``): per-row state set then is checked against it at once
        self.batch_rows: int | None = None

    def clear(self) -> None:
        self.batch_size = None
        self.seq_len = None
        self.past_length = 0


@dataclass
class Mixing:
    """C3PO re-mixing state for one layer (paper §3): at the given positions, the routing mass of the core
    experts is redistributed as ``softmax(logits)``.

    Shapes: ``experts`` long ``[R, C]``, ``logits`` float ``[R, C]``, ``positions`` long ``[R, n]`` (absolute
    token positions in the sequence, counting padding; ``-1`` pads). ``R`` is 1 (shared by all rows) or the
    number of batch rows.
    """

    experts: torch.Tensor
    logits: torch.Tensor
    positions: torch.Tensor


def held_state(name: str) -> property:
    """A :class:`LayerRouting` attribute (per-row offsets, policy rows, re-mixing) that keeps the value assigned to
    it, while ``layer.graph`` gets a copy of it at a fixed address for the compiled path (:meth:`GraphState.hold`:
    a CUDA graph replay reads its inputs where they were when it was recorded). A ``property`` (not a descriptor
    class, whose ``__get__`` torch 2.11's dynamo re-enters until the recursion limit)."""
    key = f"_{name}"

    def get(layer: LayerRouting) -> Any:
        return getattr(layer, key)

    def put(layer: LayerRouting, value: Any) -> None:
        setattr(layer.graph, name, layer.graph.hold(name, value))
        setattr(layer, key, value)

    return property(get, put, doc=f"held routing state ``{name}`` (see :func:`held_state`)")


def execution_device(router: nn.Module) -> torch.device:
    """The device a router computes on: its weight's, or, where accelerate offloads the weight (kept on the meta
    device between forwards, loaded by the module's hook), the hook's execution device. A model spread over
    several devices (``device_map``) thus keeps each layer's routing state beside that layer."""
    device = router.weight.device
    if device.type == "meta":
        hook = getattr(router, "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):  # a SequentialHook chains several
            if getattr(part, "execution_device", None) is not None:
                return torch.device(part.execution_device)
    return device


def expand_rows(state: torch.Tensor, rows: int, what: str, expansion: int = 1, broadcast: bool = False) -> torch.Tensor:
    """Match per-row state ``[R, ...]`` to a forward of ``rows`` batch rows.

    ``R == rows``: as is. ``R * expansion == rows``: each row repeated in place (``repeat_interleave``), the layout
    ``generate()`` makes for ``num_return_sequences`` / ``num_beams`` (``expansion`` is that factor, 1 outside
    such a ``generate()``). ``R == 1`` with ``broadcast``: shared by every row (re-mixing set with ``[C]``
    experts). Any other shape is an error: per-row state never spreads to rows it was not set for.
    """
    count = state.shape[0]
    if count == rows:
        return state
    if broadcast and count == 1:
        return state.expand(rows, *state.shape[1:])
    if expansion > 1 and count * expansion == rows:
        return state.repeat_interleave(expansion, dim=0)
    copies = f" ({expansion} sequences per prompt)" if expansion > 1 else ""
    raise ValueError(
        f"{what} has {count} rows but the forward has {rows} batch rows{copies}; set per-row state with one row "
        "per batch row (or per prompt row inside generate() with num_return_sequences / num_beams)"
    )


class LayerRouting:
    """Routing state and forward of one MoE layer.

    Attributes:
        layer_idx: index of the decoder layer in ``model.model.layers``.
        offsets: learnable additive router-logit offsets ``[E]`` (float32, zero at attach).
        row_offsets: per-row offsets ``[B, E]`` or ``None``.
        policy: routing policy or ``None`` (the family's own top-k); ``policy_rows`` (bool ``[B]``) limits it to rows.
        mask: expert mask or ``None``.
        mixing: C3PO re-mixing state or ``None``.
        exact_mixing_gradient: back-propagate the exact gradient of the re-mixed routing to the mixing logits
            (``False``, the default: the straight-through estimate of :meth:`_core_gradient_slots`, which reaches
            every core expert). Only differs where the family renormalises the selected weights.
        kernels: route with the Triton routing kernel (``reroute.kernels.routing``) where it applies: on CUDA (or
            under Triton's interpreter), no gradient wanted, a rule the kernel expresses. Same result as the
            PyTorch path (ties aside); set by ``attach``.
        replay: recorded routes forced on this layer (``rm.replay``, :mod:`reroute.routing.replay`) or ``None``.
    """

    def __init__(
        self,
        layer_idx: int,
        router: nn.Module,
        adapter: FamilyAdapter,
        context: RoutingContext,
        output_order: tuple[int, int, int],
    ) -> None:
        self.layer_idx = layer_idx
        self.router = router
        self.adapter = adapter
        self.rule = adapter.rule
        self.context = context
        self.output_order = output_order
        self.num_experts = int(router.num_experts)
        self.top_k = int(router.top_k)
        device = execution_device(router)
        self.offsets = nn.Parameter(torch.zeros(self.num_experts, device=device, dtype=torch.float32))
        self.graph = GraphState(self.num_experts, self.top_k, device)
        self.mark_static()
        self.row_offsets: torch.Tensor | None = None
        self._policy: RoutingPolicy | None = None
        self.policy_rows: torch.Tensor | None = None
        self._mask: ExpertMask | None = None
        self.mixing: Mixing | None = None
        self.exact_mixing_gradient = False
        self.kernels = False
        self.replay: LayerReplay | None = None

    # policy and mask are read by the eager path as Python objects and by the compiled path from ``graph``'s
    # tensors: assigning either keeps both in step, whoever assigns (setters, context managers, methods)
    @property
    def policy(self) -> RoutingPolicy | None:
        return self._policy

    @policy.setter
    def policy(self, policy: RoutingPolicy | None) -> None:
        self.graph.write_policy(policy, self.top_k)
        self._policy = policy

    @property
    def mask(self) -> ExpertMask | None:
        return self._mask

    @mask.setter
    def mask(self, mask: ExpertMask | None) -> None:
        self.graph.write_mask(mask)
        self._mask = mask

    # per-row state and re-mixing: the attribute keeps the assigned value (callers save and restore it), and the
    # compiled path reads ``graph``'s copy of it at a fixed address (GraphState.hold), which CUDA graphs replay
    row_offsets = held_state("row_offsets")
    policy_rows = held_state("policy_rows")
    mixing = held_state("mixing")

    def mark_static(self) -> None:
        """Give the offsets a fixed address for CUDA graphs (replays then read them in place, no copy per step)."""
        if self.offsets.is_cuda:
            torch._dynamo.mark_static_address(self.offsets)

    @property
    def device(self) -> torch.device:
        """Where the router runs, and so where this layer's routing state lives (see :func:`execution_device`)."""
        return execution_device(self.router)

    @property
    def width(self) -> int:
        """Experts per token under the current policy (the family's top-k without one)."""
        return self.policy.width(self.num_experts, self.top_k) if self.policy is not None else self.top_k

    def reset(self) -> None:
        """Back to the original routing: zero offsets, no per-row state, policy, mask or re-mixing."""
        with torch.no_grad():
            self.offsets.zero_()
        self.row_offsets = None
        self.policy = None
        self.policy_rows = None
        self.mask = None
        self.mixing = None

    def expand_state_rows(self, state: torch.Tensor, rows: int, what: str, broadcast: bool = False) -> torch.Tensor:
        """Per-row state ``[R, ...]`` matched to a forward of ``rows`` rows (see :func:`expand_rows`)."""
        return expand_rows(state, rows, what, self.context.expansion, broadcast)

    def policy_row_mask(self, batch: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[batch]``: the batch rows ``policy_rows`` (or ``rows``) selects (a bool ``[B]`` mask, or long row
        indices)."""
        rows = self.policy_rows if rows is None else rows
        assert rows is not None
        if rows.dtype != torch.bool:
            # row indices name prompt rows; generate() repeats each prompt row ``expansion`` times
            expansion = self.context.expansion if batch % self.context.expansion == 0 else 1
            prompts = batch // expansion
            if not torch.compiler.is_compiling() and int(rows.max()) >= prompts:
                raise ValueError(
                    f"layer {self.layer_idx}: policy rows {rows.tolist()} name a row beyond the batch of {prompts} "
                    "rows; pass row indices below the batch size"
                )
            rows = (torch.arange(prompts, device=rows.device)[:, None] == rows[None, :]).any(dim=-1)
        return self.expand_state_rows(rows, batch, "policy rows")

    def policy_tokens(self, num_tokens: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[T]``: the tokens of the rows the policy applies to (see :meth:`policy_row_mask`)."""
        batch, seq = self.batch_shape(num_tokens)
        return self.policy_row_mask(batch, rows).repeat_interleave(seq, dim=0)

    def batch_shape(self, num_tokens: int) -> tuple[int, int]:
        """``(batch, seq)`` of the current call; only known inside a model forward."""
        batch, seq = self.context.batch_size, self.context.seq_len
        if batch is None or seq is None or batch * seq != num_tokens:
            raise RuntimeError(
                f"layer {self.layer_idx}: per-row routing state needs the batch layout, which is only known when "
                "the router runs inside a forward of the attached model"
            )
        return batch, seq

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router, rule = self.router, self.rule
        logits = rule.logits(router, hidden_states)
        if self.replay is not None:
            # recorded routes (rm.replay) replace the whole selection of this forward's tokens; eager only
            context = self.context
            weights, indices = self.replay.take(logits.shape[0], context.batch_size, context.seq_len)
            routed = (self._add_offsets(logits), weights, indices)
        elif torch.compiler.is_compiling():
            # inside a compiled graph: state from tensors only, so that changing it neither recompiles nor
            # goes stale in a replayed CUDA graph (see reroute.routing.graph)
            logits, weights, indices = graph.route(self, logits, hidden_states.dtype)
            routed = (logits, weights, indices)
        else:
            routed = self._kernel_route(logits, hidden_states.dtype) if self.kernels else None
        if routed is not None:
            logits, weights, indices = routed
        else:
            logits = self._add_offsets(logits)
            weights, indices = rule.route(router, logits, hidden_states.dtype)
            if self.policy is not None or self.mask is not None or self.mixing is not None:
                weights, indices = self._reroute(logits, weights, indices)
        for trace in self.context.traces:
            trace.record(self, logits, weights, indices)
        out = (logits, weights, indices)
        return tuple(out[i] for i in self.output_order)

    def _kernel_route(
        self, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(logits + offsets, weights, indices)`` from one Triton launch, or ``None`` where the PyTorch path must
        run: another device, gradients wanted (the kernel has no backward), a rule the kernel cannot express."""
        from reroute.kernels import routing as kernel  # triton is optional: imported only when asked for

        mixing = self.mixing
        if not kernel.runs_on(logits) or self.offsets.device != logits.device:
            return None
        state = (logits, self.offsets, self.row_offsets, None if mixing is None else mixing.logits)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in state):
            return None
        spec = kernel.spec_for(self.rule, self.router)
        if spec is None:
            return None
        if self.policy is not None and self.policy.rank is not None and self.policy.renormalize is False:
            return None  # the kernel's rank-k weight is the scaling factor; the raw p_k needs the PyTorch path
        num_tokens = logits.shape[0]
        rows = 1
        row_offsets = policy_rows = None
        if self.row_offsets is not None or mixing is not None or self.policy_rows is not None:
            rows = self.batch_shape(num_tokens)[0]
        # per-row state resolved to exactly one row per batch row here, so the kernel's own broadcast never applies
        if self.row_offsets is not None:
            row_offsets = self.expand_state_rows(self.row_offsets, rows, "row offsets")
        if self.policy_rows is not None:
            policy_rows = self.policy_row_mask(rows)
        resolved = None
        if mixing is not None:
            experts, omega = mixing.experts, torch.softmax(mixing.logits.float(), dim=-1)
            if experts.shape[0] != omega.shape[0]:
                experts = self.expand_state_rows(experts, rows, "re-mixing experts", broadcast=True)
                omega = self.expand_state_rows(omega, rows, "re-mixing logits", broadcast=True)
            resolved = kernel.KernelMixing(experts, omega, self._mixing_tokens(num_tokens))
        return kernel.offset_and_route(
            logits,
            spec,
            offsets=self.offsets,
            row_offsets=row_offsets,
            rows=rows,
            mask=self.mask,
            mixing=resolved,
            policy=self.policy,
            policy_rows=policy_rows,
            input_dtype=input_dtype,
        )

    def _add_offsets(self, logits: torch.Tensor) -> torch.Tensor:
        if self.offsets.device != logits.device:
            raise RuntimeError(
                f"layer {self.layer_idx}: routing state is on {self.offsets.device} but the layer runs on "
                f"{logits.device}; call rm.to(device) after moving the model"
            )
        # Same dtype as the logits, so that zero offsets are an exact no-op.
        logits = logits + self.offsets.to(logits.dtype)
        if self.row_offsets is not None:
            batch, seq = self.batch_shape(logits.shape[0])
            rows = self.expand_state_rows(self.row_offsets, batch, "row offsets").to(logits.dtype)
            logits = (logits.view(batch, seq, -1) + rows[:, None, :]).view(batch * seq, -1)
        return logits

    def _token_rows(self, state: torch.Tensor, num_tokens: int, what: str) -> torch.Tensor:
        """Per-row state ``[R, ...]`` spread to tokens ``[T, ...]``."""
        if state.shape[0] == 1:
            return state.expand(num_tokens, *state.shape[1:])
        batch, seq = self.batch_shape(num_tokens)
        return self.expand_state_rows(state, batch, what, broadcast=True).repeat_interleave(seq, dim=0)

    def _mixing_tokens(self, num_tokens: int, mixing: Mixing | None = None) -> torch.Tensor:
        """Bool ``[T]``: tokens whose absolute position is one of their row's re-mixing positions (of ``mixing``,
        by default the layer's)."""
        mixing = self.mixing if mixing is None else mixing
        assert mixing is not None
        batch, seq = self.batch_shape(num_tokens)
        positions = self.expand_state_rows(mixing.positions, batch, "re-mixing positions", broadcast=True)
        absolute = self.context.past_length + torch.arange(seq, device=positions.device)
        hit = (absolute[None, :, None] == positions[:, None, :]).any(dim=-1)
        return hit.reshape(num_tokens)

    def _apply_mixing(
        self, scores: torch.Tensor, tokens: torch.Tensor, mixing: Mixing | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-mixed scores ``[T, E]``, and per token the core experts ``[T, C]`` and their mixture ``omega [T, C]``."""
        mixing = self.mixing if mixing is None else mixing
        assert mixing is not None
        num_tokens = scores.shape[0]
        core = self._token_rows(mixing.experts, num_tokens, "re-mixing experts")
        omega = torch.softmax(self._token_rows(mixing.logits, num_tokens, "re-mixing logits").float(), dim=-1)
        mass = scores.gather(1, core).sum(dim=-1, keepdim=True)
        mixed = scores.scatter(1, core, mass * omega)
        return torch.where(tokens[:, None], mixed, scores), core, omega

    def _core_gradient_slots(
        self,
        weights: torch.Tensor,
        indices: torch.Tensor,
        tokens: torch.Tensor,
        core: torch.Tensor,
        omega: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through slots so that every core expert's mixing logit gets a gradient.

        Where the family renormalises the selected weights, the softmax normaliser over the core cancels and the
        exact gradient reaches only the selected experts (``exact_mixing_gradient=True`` keeps that exact gradient:
        autograd through the forward as it is, no extra slots). We append the core experts with weight
        ``omega - omega.detach()``: zero in the forward (outputs unchanged bit for bit), and in the backward the
        gradient of a dense mixture of the core. Costs C extra expert slots per token of this layer while
        gradients are being taken.
        """
        dense = omega * self.rule.scaling(self.router)
        straight_through = (dense - dense.detach()) * tokens[:, None]
        return torch.cat([weights, straight_through.to(weights.dtype)], 1), torch.cat([indices, core], 1)

    def _reroute(
        self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        router, rule = self.router, self.rule
        num_tokens = logits.shape[0]
        scores = rule.scores(router, logits)
        mixed_tokens = core = omega = None
        if self.mixing is not None:
            mixed_tokens = self._mixing_tokens(num_tokens)
            scores, core, omega = self._apply_mixing(scores, mixed_tokens)
        out_dtype = weights.dtype
        policy_tokens = None
        if self.policy is not None and self.policy_rows is not None:
            policy_tokens = self.policy_tokens(num_tokens)
        # Tokens outside the policy keep the family's top-k; they need the generic path only if a mask or
        # re-mixing touches them.
        if (self.mask is not None or mixed_tokens is not None) and (self.policy is None or policy_tokens is not None):
            generic_w, generic_i = select(rule, router, scores, None, self.mask)
            use = mixed_tokens if self.mask is None else None
            weights, indices = _merge(use, generic_w.to(out_dtype), generic_i, weights, indices)
        if self.policy is not None:
            policy_w, policy_i = select(rule, router, scores, self.policy, self.mask)
            weights, indices = _merge(policy_tokens, policy_w.to(out_dtype), policy_i, weights, indices)
        if (
            omega is not None
            and torch.is_grad_enabled()
            and self.mixing.logits.requires_grad
            and self.rule.renormalizes(router)
            and not self.exact_mixing_gradient
        ):
            weights, indices = self._core_gradient_slots(weights, indices, mixed_tokens, core, omega)
        return weights, indices


def _merge(
    use: torch.Tensor | None,
    new_w: torch.Tensor,
    new_i: torch.Tensor,
    old_w: torch.Tensor,
    old_i: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take ``new`` where ``use`` (bool ``[T]``, ``None`` = everywhere) else ``old``; widths may differ."""
    if use is None:
        return new_w, new_i
    width = max(new_w.shape[1], old_w.shape[1])
    new_w, new_i = pad_slots(new_w, new_i, width)
    old_w, old_i = pad_slots(old_w, old_i, width)
    return torch.where(use[:, None], new_w, old_w), torch.where(use[:, None], new_i, old_i)
