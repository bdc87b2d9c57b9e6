"""Re-scored routing in one Triton kernel: router logits -> (weights, indices), one program per token.

What :class:`reroute.routing.layer.LayerRouting` does in a dozen PyTorch ops (each a kernel launch at decode
time), done in one launch with the token's ``E <= 256`` logits held in registers:

1. logits (+ offsets ``[E]`` + per-row offsets ``[R, E]``, each added in the logits' dtype as PyTorch does);
2. the family's score function: softmax, or sigmoid (+ ``e_score_correction_bias`` for the choice only);
3. C3PO re-mixing at the chosen tokens (paper §3): the core experts' mass redistributed by ``omega``;
4. the choice ranking: group limit (DeepSeek-V2: group score = max; V3/GLM: sum of the group's top 2),
   banned/forced experts (``ExpertMask``);
5. selection: the family's top-k, a policy's top-k, top-p with a cap, or rank-k;
6. the weights: renormalise, ``routed_scaling_factor``, zero for slots chosen from ``-inf``; padding to a fixed
   width with zero-weight copies of the token's first expert.

Each token takes the same branch as the PyTorch path: the family's exact rule (``rule.route``) where nothing
applies to it, the generic selection (``policy.select``) where a mask or re-mixing does, and the policy's selection
on the policy's rows.

Ties: among equal choice values the lowest expert index is taken first. ``torch.topk`` leaves the order of equal
values unspecified (CPU and CUDA differ), so with ties the two paths may pick different but equally ranked
experts. Rules whose ``route`` uses ``topk(sorted=False)`` (DeepSeek-V2/V3, GLM) get their experts in descending
choice order here: the same (expert, weight) pairs, possibly in another order.

Which rules the kernel can express, and what it reads off a router, is plain Python in ``reroute/kernels/spec.py``
(:class:`RoutingSpec`, :func:`spec_for`; re-exported here): rules it cannot express (PhiMoE's SparseMixer,
user-registered rules) have no spec, and the caller keeps the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reroute.kernels import interpreted
from reroute.kernels.spec import MAX_EXPERTS, KernelMixing, RoutingSpec, spec_for
from reroute.routing.policy import ExpertMask, RoutingPolicy, mask_codes

__all__ = ["MAX_EXPERTS", "KernelMixing", "RoutingSpec", "offset_and_route", "route", "runs_on", "spec_for"]

_SOFTMAX, _SIGMOID = 0, 1
_GROUP_NONE, _GROUP_MAX, _GROUP_TOP2 = 0, 1, 2
_EXACT_SCORES, _EXACT_LOGITS_SOFTMAX = 0, 1
_POLICY_NONE, _POLICY_TOP_K, _POLICY_TOP_P, _POLICY_RANK = 0, 1, 2, 3


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether the kernel can run on ``tensor``'s device: CUDA, or anywhere under the interpreter."""
    return tensor.is_cuda or interpreted()


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), kept in float32.

    What ``x.to(tl.bfloat16)`` does on the GPU, spelled out because Triton's interpreter truncates instead.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _routing_rows(
    logits_ptr,
    stride_logits,
    offsets_ptr,
    row_offsets_ptr,
    stride_row_offsets,
    row_index_ptr,
    tokens_per_row,
    rep_offsets,
    rep_policy,
    rep_mixing,
    bias_ptr,
    mask_ptr,
    core_ptr,
    omega_ptr,
    mixed_ptr,
    policy_rows_ptr,
    logits_out_ptr,
    weights_ptr,
    indices_ptr,
    num_experts,
    top_k,
    policy_select,
    policy_width,
    out_width,
    group_size,
    top_p,
    scaling,
    route_eps,
    renorm_family,
    renorm_policy,
    SCORE: tl.constexpr,
    EXACT: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO_FILL: tl.constexpr,
    POLICY: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_ROW_OFFSETS: tl.constexpr,
    ROW_FROM_TENSOR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_MASK_CODES: tl.constexpr,
    HAS_MIXING: tl.constexpr,
    HAS_POLICY_ROWS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    LOGITS_BF16: tl.constexpr,
    WEIGHTS_BF16: tl.constexpr,
    NUM_CORE: tl.constexpr,
    NUM_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    MAX_SELECT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    neg_inf = float("-inf")
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    logit_dtype = logits_ptr.dtype.element_ty

    if ROW_FROM_TENSOR:
        row = tl.load(row_index_ptr + token)
    else:
        row = token // tokens_per_row

    # 1. logits + offsets, each sum rounded to the logits' dtype like PyTorch's `logits + offsets.to(dtype)`
    x = tl.load(logits_ptr + token * stride_logits + e, mask=valid, other=0.0).to(tl.float32)
    if HAS_OFFSETS:
        off = tl.load(offsets_ptr + e, mask=valid, other=0.0).to(tl.float32)
        if LOGITS_BF16:
            x = _round_bf16(x + _round_bf16(off))
        else:
            x = (x + off.to(logit_dtype).to(tl.float32)).to(logit_dtype).to(tl.float32)
    if HAS_ROW_OFFSETS:
        row_off_ptr = row_offsets_ptr + (row // rep_offsets) * stride_row_offsets
        off = tl.load(row_off_ptr + e, mask=valid, other=0.0).to(tl.float32)
        if LOGITS_BF16:
            x = _round_bf16(x + _round_bf16(off))
        else:
            x = (x + off.to(logit_dtype).to(tl.float32)).to(logit_dtype).to(tl.float32)
    if STORE_LOGITS:
        tl.store(logits_out_ptr + token * num_experts + e, x.to(logit_dtype), mask=valid)

    # 2. scores over all experts
    if SCORE == 0:
        x_max = tl.max(tl.where(valid, x, neg_inf), axis=0)
        num = tl.where(valid, tl.exp(x - x_max), 0.0)
        score = num / tl.sum(num, axis=0)
    else:
        score = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)

    # which branch of LayerRouting this token takes
    is_policy = tl.full([], POLICY, tl.int32) != 0
    if HAS_POLICY_ROWS:
        is_policy = tl.load(policy_rows_ptr + row // rep_policy).to(tl.int32) != 0
    is_generic = tl.full([], MASKED, tl.int32) != 0
    # 3. C3PO re-mixing at the chosen tokens: the core's mass, redistributed by omega
    if HAS_MIXING:
        mixed = tl.load(mixed_ptr + token).to(tl.int32) != 0
        is_generic = is_generic | mixed
        core_row = (row // rep_mixing) * NUM_CORE
        is_core = e < 0
        omega = tl.zeros([BLOCK_E], dtype=tl.float32)
        for c in range(NUM_CORE):
            expert = tl.load(core_ptr + core_row + c)
            hit = e == expert
            is_core = is_core | hit
            omega = tl.where(hit, tl.load(omega_ptr + core_row + c), omega)
        core_mass = tl.sum(tl.where(is_core, score, 0.0), axis=0)
        score = tl.where(is_core & mixed, core_mass * omega, score)
    is_exact = (is_policy == 0) & (is_generic == 0)

    # 4. choice ranking: correction bias, group limit, mask
    base = score
    if HAS_BIAS:
        base = score + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    allowed = valid
    if GROUP != 0:
        gid = e // group_size
        g = tl.arange(0, BLOCK_G)
        group_score = tl.full([BLOCK_G], neg_inf, tl.float32)
        for j in range(NUM_GROUP):
            vals = tl.where((gid == j) & valid, base, neg_inf)
            best = tl.max(vals, axis=0)
            if GROUP == 2:
                first = tl.min(tl.where((gid == j) & (vals == best), e, BLOCK_E), axis=0)
                best = best + tl.max(tl.where(e == first, neg_inf, vals), axis=0)
            group_score = tl.where(g == j, best, group_score)
        group_free = g < NUM_GROUP
        allowed = e < 0
        for _ in range(TOPK_GROUP):
            best = tl.max(tl.where(group_free, group_score, neg_inf), axis=0)
            pick = tl.min(tl.where(group_free & (group_score == best), g, BLOCK_G), axis=0)
            allowed = allowed | (gid == pick)
            group_free = group_free & (g != pick)
        allowed = allowed & valid
    choice = tl.where(allowed, base, neg_inf)
    if EXACT == 1:
        exact_choice = tl.where(valid, x, neg_inf)
    elif ZERO_FILL:
        exact_choice = tl.where(allowed, base, 0.0)
    else:
        exact_choice = choice
    if HAS_MASK_CODES:
        code = tl.load(mask_ptr + e, mask=valid, other=0)
        choice = tl.where(code == 1, neg_inf, choice)
        choice = tl.where(code == 2, float("inf"), choice)
    choice = tl.where(is_exact, exact_choice, choice)
    # what the weights are made of: the scores, except where the family's exact rule says otherwise
    if EXACT == 1:
        source = tl.where(is_exact, x, score)
    elif ZERO_FILL:
        source = tl.where(is_exact, exact_choice, score)
    else:
        source = score

    # 5. selection: repeated arg-max, lowest index first among ties
    use_policy = is_policy.to(tl.int32)
    num_select = top_k + (policy_select - top_k) * use_policy
    slot = tl.arange(0, BLOCK_W)
    sel_idx = tl.zeros([BLOCK_W], dtype=tl.int32)
    sel_choice = tl.full([BLOCK_W], neg_inf, tl.float32)
    sel_src = tl.zeros([BLOCK_W], dtype=tl.float32)
    keep = (slot < num_select).to(tl.int32)  # int, not bool: the interpreter's where() mangles bool scalars
    free = valid
    total = tl.sum(score, axis=0)
    cumulative = tl.full([], 0.0, tl.float32)
    # a constant trip count (the interpreter cannot loop to a runtime bound); slots past num_select stay unused
    for i in range(MAX_SELECT):
        active = i < num_select
        best = tl.max(tl.where(free, choice, neg_inf), axis=0)
        idx = tl.min(tl.where(free & (choice == best), e, BLOCK_E), axis=0)
        hit = e == idx
        put = (slot == i) & active
        value = tl.sum(tl.where(hit, source, 0.0), axis=0)
        sel_idx = tl.where(put, idx, sel_idx)
        sel_choice = tl.where(put, best, sel_choice)
        sel_src = tl.where(put, value, sel_src)
        if POLICY == 2:
            # top-p: keep expert i while the mass ranked before it is still below p (at least one)
            mass = tl.where(best == neg_inf, 0.0, value) / total
            cumulative = cumulative + mass
            kept = ((cumulative - mass) < top_p) & (best != neg_inf)
            keep = tl.where(put & is_policy, kept.to(tl.int32), keep)
        free = free & ((e != idx) | (i >= num_select))
    if POLICY == 2:
        keep = tl.where((slot == 0) & is_policy, (sel_choice != neg_inf).to(tl.int32), keep)
    selected = slot < num_select

    # 6. weights
    if EXACT == 1:
        top = tl.max(tl.where(selected, sel_src, neg_inf), axis=0)
        num = tl.where(selected, tl.exp(sel_src - top), 0.0)
        exact_w = num / tl.sum(num, axis=0)
    else:
        exact_w = tl.where(selected, sel_src, 0.0)
        if renorm_family != 0:
            exact_w = exact_w / (tl.sum(exact_w, axis=0) + route_eps)
        exact_w = exact_w * scaling
    # generic selection: a slot filled from a -inf choice (fewer selectable experts than slots) is no expert
    keep = tl.where((sel_choice == neg_inf) & (is_exact == 0), 0, keep)
    generic_w = tl.where(keep != 0, sel_src, 0.0)
    renorm = (renorm_family + (renorm_policy - renorm_family) * use_policy) != 0
    generic_w = tl.where(renorm, generic_w / (tl.sum(generic_w, axis=0) + 1e-20), generic_w)
    generic_w = tl.where(sel_choice == neg_inf, 0.0, generic_w * scaling)
    weights = tl.where(is_exact, exact_w, generic_w)
    first = tl.sum(tl.where(slot == 0, sel_idx, 0), axis=0)
    width = top_k + (policy_width - top_k) * use_policy
    indices = tl.where((slot < width) & (keep != 0), sel_idx, first)
    if POLICY == 3:
        # rank-r: only the r-th ranked expert, weight = the family's scaling factor
        last = slot == num_select - 1
        rank_idx = tl.sum(tl.where(last, sel_idx, 0), axis=0)
        rank_choice = tl.max(tl.where(last, sel_choice, neg_inf), axis=0)
        rank_w = tl.where(slot == 0, scaling, 0.0)
        rank_w = tl.where(rank_choice == neg_inf, 0.0, rank_w)
        weights = tl.where(is_policy, rank_w, weights)
        indices = tl.where(is_policy, rank_idx, indices)
    weights = tl.where(slot < width, weights, 0.0)
    if WEIGHTS_BF16:
        weights = _round_bf16(weights)
    out = slot < out_width
    tl.store(weights_ptr + token * out_width + slot, weights.to(weights_ptr.dtype.element_ty), mask=out)
    tl.store(indices_ptr + token * out_width + slot, indices.to(indices_ptr.dtype.element_ty), mask=out)


_MASK_CODES: dict[tuple, torch.Tensor] = {}


def _mask_codes(mask: ExpertMask, num_experts: int, device: torch.device) -> torch.Tensor:
    """int8 ``[E]``: 0 free, 1 banned, 2 forced; cached so that decode steps copy nothing from the host."""
    key = (mask.banned, mask.forced, num_experts, device)
    codes = _MASK_CODES.get(key)
    if codes is None:
        codes = _MASK_CODES[key] = mask_codes(mask, num_experts).to(device)
    return codes


def _rows_per_state(state_rows: int, rows: int, what: str) -> int:
    """How many batch rows share one row of a per-row state (``expand_rows``' broadcast and repeat rules)."""
    if state_rows == 1:
        return max(rows, 1)
    if state_rows > 0 and rows % state_rows == 0:
        return rows // state_rows
    raise ValueError(
        f"{what} has {state_rows} rows but the forward has {rows} rows (not a multiple); "
        "set per-row state for the batch you run"
    )


def _check(tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device, what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{what} is on {tensor.device} but the logits are on {device}")


def route(logits: torch.Tensor, spec: RoutingSpec, **state: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``logits [T, E]`` in one kernel launch: ``(weights [T, w], indices [T, w])``.

    The output is what ``LayerRouting`` produces for the same state: width ``w`` is the family's top-k, the
    policy's width, or the larger of the two when the policy applies to some rows only; weights have
    ``rule.route``'s dtype.

    Args:
        logits: router logits ``[T, E]`` before offsets, token-major (``T = rows * seq``).
        spec: the family's rule, from :func:`spec_for`.
        offsets: per-layer offsets ``[E]``.
        row_offsets: per-row offsets ``[R, E]``; ``R`` is 1, ``rows`` or divides ``rows`` (each state row then
            covers consecutive batch rows, the ``num_return_sequences`` layout).
        rows: number of batch rows; token ``t`` belongs to row ``t // (T // rows)`` unless ``row_index`` is given.
        row_index: batch row of each token, int ``[T]``.
        mask: banned / forced experts (any mask, even an empty one, sends every token to the generic selection,
            as in ``LayerRouting``).
        mixing: C3PO re-mixing resolved for this call.
        policy: routing policy (top-k, top-p with ``max_experts``, rank); ``None`` keeps the family's top-k.
        policy_rows: bool ``[R]``: the rows the policy applies to (``None``: all).
        input_dtype: dtype of the hidden states (GraniteMoE's weights take it); default the logits' dtype.
        index_dtype: ``torch.int64`` (as ``torch.topk``) or ``torch.int32``.
    """
    _, weights, indices = _route(logits, spec, **state)
    return weights, indices


def offset_and_route(
    logits: torch.Tensor, spec: RoutingSpec, **state: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route` (same keyword arguments) that also returns the logits with the offsets added ``[T, E]``,
    rounded to the logits' dtype exactly as ``logits + offsets.to(logits.dtype)`` is: the router's first output."""
    return _route(logits, spec, store_logits=True, **state)


def _route(
    logits: torch.Tensor,
    spec: RoutingSpec,
    *,
    offsets: torch.Tensor | None = None,
    row_offsets: torch.Tensor | None = None,
    rows: int = 1,
    row_index: torch.Tensor | None = None,
    mask: ExpertMask | None = None,
    mixing: KernelMixing | None = None,
    policy: RoutingPolicy | None = None,
    policy_rows: torch.Tensor | None = None,
    input_dtype: torch.dtype | None = None,
    index_dtype: torch.dtype = torch.int64,
    store_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {list(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    num_tokens, num_experts = logits.shape
    device = logits.device
    if not runs_on(logits):
        raise RuntimeError(f"the routing kernel runs on CUDA (or under TRITON_INTERPRET=1); logits are on {device}")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the routing kernel holds at most {MAX_EXPERTS} experts per token, got {num_experts}")
    if spec.top_k > num_experts:
        raise ValueError(f"top_k={spec.top_k} exceeds the {num_experts} experts")
    if spec.group is not None and num_experts % spec.num_group:
        raise ValueError(f"{num_experts} experts do not split into {spec.num_group} groups")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()

    width = spec.top_k
    policy_kind, policy_select, policy_width = _POLICY_NONE, spec.top_k, spec.top_k
    if policy is not None:
        policy.check(num_experts)
        policy_width = policy.width(num_experts, spec.top_k)
        if policy.rank is not None:
            policy_kind, policy_select = _POLICY_RANK, policy.rank
        elif policy.top_p is not None:
            policy_kind, policy_select = _POLICY_TOP_P, policy_width
        else:
            policy_kind, policy_select = _POLICY_TOP_K, policy_width
        width = policy_width if policy_rows is None else max(policy_width, spec.top_k)
    elif policy_rows is not None:
        raise ValueError("policy_rows needs a policy")
    if mask is not None:
        mask.check(num_experts, width)

    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    if row_index is not None:
        _check(row_index, (num_tokens,), device, "row_index")
    elif num_tokens % rows:
        raise ValueError(f"{num_tokens} tokens do not split into {rows} rows")
    tokens_per_row = max(num_tokens // rows, 1)
    rep_offsets = rep_policy = rep_mixing = 1
    if offsets is not None:
        _check(offsets, (num_experts,), device, "offsets")
    if row_offsets is not None:
        _check(row_offsets, (row_offsets.shape[0], num_experts), device, "row offsets")
        row_offsets = row_offsets.contiguous()
        rep_offsets = _rows_per_state(row_offsets.shape[0], rows, "row offsets")
    if policy_rows is not None:
        _check(policy_rows, (policy_rows.shape[0],), device, "policy rows")
        rep_policy = _rows_per_state(policy_rows.shape[0], rows, "policy rows")
    core = omega = mixed = None
    num_core = 0
    if mixing is not None:
        core, omega, mixed = mixing
        if core.dim() != 2:
            raise ValueError(f"re-mixing experts must be [R, C], got shape {list(core.shape)}")
        _check(omega, tuple(core.shape), device, "re-mixing omega")
        _check(mixed, (num_tokens,), device, "re-mixed tokens")
        num_core = core.shape[1]
        core, omega = core.contiguous(), omega.float().contiguous()
        rep_mixing = _rows_per_state(core.shape[0], rows, "re-mixing experts")
    bias = spec.correction_bias
    if bias is not None:
        _check(bias, (num_experts,), device, "e_score_correction_bias")
    codes = _mask_codes(mask, num_experts, device) if mask is not None and (mask.banned or mask.forced) else None

    weights_dtype = spec.output_dtype(logits.dtype, input_dtype or logits.dtype)
    weights = torch.empty(num_tokens, width, dtype=weights_dtype, device=device)
    indices = torch.empty(num_tokens, width, dtype=index_dtype, device=device)
    logits_out = torch.empty_like(logits) if store_logits else None
    if num_tokens == 0:
        return (logits_out if store_logits else logits), weights, indices

    block_e = triton.next_power_of_2(num_experts)
    block_w = triton.next_power_of_2(max(width, policy_select, spec.top_k))
    group_size = num_experts // spec.num_group if spec.group is not None else num_experts
    renorm_policy = spec.renormalize if policy is None or policy.renormalize is None else policy.renormalize
    _routing_rows[(num_tokens,)](
        logits,
        logits.stride(0),
        offsets,
        row_offsets,
        row_offsets.stride(0) if row_offsets is not None else 0,
        row_index,
        tokens_per_row,
        rep_offsets,
        rep_policy,
        rep_mixing,
        bias,
        codes,
        core,
        omega,
        mixed,
        policy_rows,
        logits_out,
        weights,
        indices,
        num_experts,
        spec.top_k,
        policy_select,
        policy_width,
        width,
        group_size,
        float(policy.top_p) if policy is not None and policy.top_p is not None else 1.0,
        spec.scaling,
        spec.route_eps,
        int(spec.renormalize),
        int(renorm_policy),
        SCORE=_SIGMOID if spec.score == "sigmoid" else _SOFTMAX,
        EXACT=_EXACT_LOGITS_SOFTMAX if spec.exact == "logits_softmax" else _EXACT_SCORES,
        GROUP={None: _GROUP_NONE, "max": _GROUP_MAX, "top2": _GROUP_TOP2}[spec.group],
        ZERO_FILL=spec.zero_fill and spec.group is not None,
        POLICY=policy_kind,
        HAS_OFFSETS=offsets is not None,
        HAS_ROW_OFFSETS=row_offsets is not None,
        ROW_FROM_TENSOR=row_index is not None,
        HAS_BIAS=bias is not None,
        MASKED=mask is not None,
        HAS_MASK_CODES=codes is not None,
        HAS_MIXING=mixing is not None,
        HAS_POLICY_ROWS=policy_rows is not None,
        STORE_LOGITS=store_logits,
        LOGITS_BF16=logits.dtype == torch.bfloat16,
        WEIGHTS_BF16=weights_dtype == torch.bfloat16,
        NUM_CORE=num_core,
        NUM_GROUP=spec.num_group,
        TOPK_GROUP=spec.topk_group,
        MAX_SELECT=max(policy_select, spec.top_k),
        BLOCK_E=block_e,
        BLOCK_W=block_w,
        BLOCK_G=triton.next_power_of_2(spec.num_group),
        num_warps=1 if block_e <= 128 else 2,
    )
    return (logits_out if store_logits else logits), weights, indices
