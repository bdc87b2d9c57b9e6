"""Graph-safe routing: the path ``torch.compile`` traces, reading every changing routing state from device tensors.

Under ``torch.compile`` (a user's ``torch.compile(model)``, or ``generate(cache_implementation="static")``, which
compiles the decode step and replays it as a CUDA graph) every Python value the forward reads becomes a constant
that the compiled graph guards on: changing it recompiles, and a replayed CUDA graph cannot see it at all. So the
compiled path reads the values of the routing state only from fixed-shape tensors that the setters update in place
(:class:`GraphState`, plus the offsets and re-mixing tensors themselves), and the only Python values it reads are
structural: which kinds of state are switched on (row offsets, mask, policy, policy rows, re-mixing) and the slot
width. Changing any value — offsets, masks, a policy's ``top_k`` / ``top_p`` / ``rank`` (one kind to another
included), re-mixing weights and positions — reuses the compiled graph; switching a kind of state on for the first
time compiles one more graph, which dynamo keeps (clearing the state goes back to the earlier graph, and with
nothing set it is the family's own rule: bit-identical to the unattached model).

Policies that change the number of experts use a fixed width with masking: the compiled graph selects
``GraphState.width`` slots (the family's top-k, grown to the widest policy ever set on the layer; growing it is a
structural change) and gives unused slots weight 0 and the token's first expert (a no-op for every experts
implementation).

The eager path (:meth:`LayerRouting._reroute` and :func:`reroute.routing.policy.select`) stays the reference; the
tests check this path against it on every family.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from reroute.routing.policy import MASK_BANNED, MASK_FORCED, ExpertMask, RoutingPolicy, mask_codes, pad_slots

if TYPE_CHECKING:
    from reroute.routing.layer import LayerRouting, Mixing

TOP_P_OFF = 2.0
"""``top_p`` value that keeps every slot (the normalised mass before a slot never reaches 2)."""


class GraphState:
    """The device tensors one layer's compiled routing reads, updated in place by the setters.

    Attributes:
        width: slots per token in the compiled graph (a Python int: structural; only grows).
        mask_codes: int8 ``[E]``: 0 free, 1 banned, 2 forced.
        policy_ints: long ``[3]``: experts to select (top-k, top-p's cap, or the rank), rank (0: not rank-k),
            renormalisation (-1: as the family, 0: no, 1: yes).
        policy_top_p: float32 ``[1]``: top-p threshold (:data:`TOP_P_OFF`: not top-p).
        row_offsets, policy_rows, mixing: what the compiled path reads for the layer's per-row offsets, policy
            rows and re-mixing: copies held at fixed addresses (see :meth:`hold`), kept in step by the layer's
            setters.

    Dynamo treats every tensor attribute of a module as a static input of a CUDA graph: a replay reads it at the
    address it had when the graph was recorded, and a tensor at a new address makes cudagraph trees record the
    graph again (on every change: those re-recordings are not even counted towards its limit). So the setters never
    hand the compiled path a new tensor where the old one has the same shape: they copy the values into it.
    """

    def __init__(self, num_experts: int, top_k: int, device: torch.device) -> None:
        self.num_experts = num_experts
        self.width = top_k
        self.mask_codes = torch.zeros(num_experts, dtype=torch.int8, device=device)
        self.policy_ints = torch.tensor([top_k, 0, -1], dtype=torch.long, device=device)
        self.policy_top_p = torch.full((1,), TOP_P_OFF, dtype=torch.float32, device=device)
        self.row_offsets: torch.Tensor | None = None
        self.policy_rows: torch.Tensor | None = None
        self.mixing: Mixing | None = None
        self._held: dict[str, torch.Tensor] = {}
        self._mark_static()

    def hold(self, name: str, value: Any) -> Any:
        """``value``'s values in this state's buffer ``name``: the same tensor at the same address on every call
        with the same shape, dtype and device (a new buffer otherwise). ``None`` stays ``None``; a tensor that
        requires grad is returned as it is (an optimisation loop differentiates through it; it runs eager); a
        re-mixing state (a dataclass of tensors) is held field by field, or returned as it is where one of its
        tensors requires grad.

        The buffer is never handed out to callers that keep it (the layer's attributes keep the caller's value),
        so copying into it cannot change a tensor someone saved."""
        if dataclasses.is_dataclass(value):
            values = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            if any(v.requires_grad for v in values.values()):
                return value  # an optimisation step (C3PO's NGD): eager, and no copies per step
            return dataclasses.replace(value, **{key: self.hold(f"{name}.{key}", v) for key, v in values.items()})
        if value is None or value.requires_grad:
            return value
        buffer = self._held.get(name)
        layout = (value.shape, value.dtype, value.device)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != layout:
            buffer = torch.empty(value.shape, dtype=value.dtype, device=value.device)
            if buffer.is_cuda:
                torch._dynamo.mark_static_address(buffer)
            self._held[name] = buffer
        with torch.no_grad():
            buffer.copy_(value)
        return buffer

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.mask_codes, self.policy_ints, self.policy_top_p

    def _mark_static(self) -> None:
        # fixed addresses: a CUDA graph replays reading them in place instead of copying them in before each replay
        if self.mask_codes.is_cuda:
            for tensor in self.tensors():
                torch._dynamo.mark_static_address(tensor)

    def to(self, device: torch.device) -> None:
        if self.mask_codes.device != device:
            self.mask_codes, self.policy_ints, self.policy_top_p = (t.to(device) for t in self.tensors())
            self._mark_static()
            self._held = {name: buffer for name, buffer in self._held.items() if buffer.device == device}

    def write_mask(self, mask: ExpertMask | None) -> None:
        with torch.no_grad():
            self.mask_codes.copy_(mask_codes(mask, self.num_experts))

    def write_policy(self, policy: RoutingPolicy | None, top_k: int) -> None:
        if policy is None:
            values, top_p = [top_k, 0, -1], TOP_P_OFF
        else:
            select = policy.rank if policy.rank is not None else policy.width(self.num_experts, top_k)
            renorm = -1 if policy.renormalize is None else int(policy.renormalize)
            values, top_p = [select, policy.rank or 0, renorm], policy.top_p or TOP_P_OFF
            self.width = max(self.width, select)
        with torch.no_grad():
            self.policy_ints.copy_(torch.tensor(values, dtype=torch.long))
            self.policy_top_p.fill_(float(top_p))


def route(
    layer: LayerRouting, logits: torch.Tensor, input_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits + offsets [T, E], weights [T, w], indices [T, w])`` for ``logits [T, E]`` (the router projection),
    reading routing state only from tensors (see the module docstring)."""
    router, rule, graph = layer.router, layer.rule, layer.graph
    num_tokens = logits.shape[0]
    logits = logits + layer.offsets.to(logits.dtype)
    if graph.row_offsets is not None:
        batch, seq = layer.batch_shape(num_tokens)
        rows = layer.expand_state_rows(graph.row_offsets, batch, "row offsets").to(logits.dtype)
        logits = (logits.view(batch, seq, -1) + rows[:, None, :]).view(num_tokens, -1)
    weights, indices = rule.route(router, logits, input_dtype)
    policy, mask, mixing = layer.policy, layer.mask, graph.mixing
    if policy is None and mask is None and mixing is None:
        return logits, weights, indices

    scores = rule.scores(router, logits)
    mixed = core = omega = None
    if mixing is not None:
        mixed = layer._mixing_tokens(num_tokens, mixing)
        scores, core, omega = layer._apply_mixing(scores, mixed, mixing)
    choice = rule.choice(router, scores)
    if mask is not None:
        codes = graph.mask_codes
        choice = torch.where(
            codes == MASK_BANNED, float("-inf"), torch.where(codes == MASK_FORCED, float("inf"), choice)
        )
    width = graph.width
    ranked, selected = torch.topk(choice, width, dim=-1)
    slot = torch.arange(width, device=logits.device)
    blocked = ranked == float("-inf")

    # per token: the policy's parameters where it applies, the family's elsewhere
    family_renorm = torch.tensor(rule.renormalizes(router), device=logits.device)
    on = torch.zeros(num_tokens, dtype=torch.bool, device=logits.device)
    if policy is not None:
        on = torch.ones_like(on) if graph.policy_rows is None else layer.policy_tokens(num_tokens, graph.policy_rows)
    count, rank, renorm_code = graph.policy_ints.unbind()
    count = torch.where(on, count, layer.top_k)
    rank = torch.where(on, rank, 0)
    top_p = torch.where(on, graph.policy_top_p, TOP_P_OFF)
    renorm = torch.where(on & (renorm_code >= 0), renorm_code == 1, family_renorm)
    raw_rank = on & (renorm_code == 0)  # RoutingPolicy(rank=r, renormalize=False): the expert's raw p_r

    gathered = scores.gather(1, selected)
    mass = gathered.masked_fill(blocked, 0.0) / scores.sum(dim=-1, keepdim=True)
    reaches = ((mass.cumsum(dim=-1) - mass) < top_p[:, None]) | (slot == 0)
    keep = (slot < count[:, None]) & reaches & ~blocked
    generic_w = gathered * keep
    generic_w = torch.where(renorm[:, None], generic_w / (generic_w.sum(dim=-1, keepdim=True) + 1e-20), generic_w)
    scale = rule.scaling(router)
    if scale != 1.0:
        generic_w = generic_w * scale
    # rank-k: the rank-th expert alone in slot 0 (weight = the family's scaling), copies of it elsewhere
    is_rank = (rank > 0)[:, None]
    pick = (rank - 1).clamp(min=0)[:, None]
    rank_ok = ~blocked.gather(1, pick)
    rank_p = torch.where(raw_rank[:, None], gathered.gather(1, pick), 1.0)
    rank_w = torch.where(slot == 0, rank_ok * rank_p * scale, 0.0)
    generic_w = torch.where(is_rank, rank_w, generic_w)
    keep = torch.where(is_rank, slot == 0, keep)
    selected = torch.where(is_rank, selected.gather(1, pick).expand(-1, width), selected)
    selected = torch.where(keep, selected, selected[:, :1])

    generic = on
    if mask is not None:
        generic = torch.ones_like(on)
    elif mixed is not None:
        generic = on | mixed
    weights, indices = pad_slots(weights, indices, width)
    weights = torch.where(generic[:, None], generic_w.to(weights.dtype), weights)
    indices = torch.where(generic[:, None], selected.to(indices.dtype), indices)
    if (
        omega is not None
        and torch.is_grad_enabled()
        and mixing.logits.requires_grad
        and rule.renormalizes(router)
        and not layer.exact_mixing_gradient
    ):
        weights, indices = layer._core_gradient_slots(weights, indices, mixed, core, omega)
    return logits, weights, indices
