"""Triton expert dispatch for transformers' fused MoE experts (``gate_up_proj`` + ``down_proj``).

Imported as ``reroute.kernels.moe`` (never as a top-level ``kernels`` package). One MoE layer, for
``T`` tokens each routed to ``K`` experts (``S = T * K`` token-expert pairs, pair ``p = t * K + j``):

1. **align**: group the pairs by expert. Decode-size inputs (``S <= SMALL_PAIRS``) use one single-program
   Triton kernel; larger ones a few device-side torch ops (stable sort, counts, cumsum, searchsorted).
   Neither synchronises with the host, so the forward is CUDA-graph capturable. The result is a list of
   pair ids in expert order and a table of row blocks (expert, first row, end row); blocks never span two
   experts and the activations are never padded (rows past an expert's end are masked, ScatterMoE-style).
2. **gate_up**: for every block, ``act(x W_gate^T) * (x W_up^T)`` with the token rows gathered on the fly
   (``x[p // K]``), gate and up tiles of the same columns accumulated together, fp32 accumulation.
3. **down**: ``a W_down^T`` times the routing weight in the epilogue, stored to the pair's own row.
4. **combine**: sum of the ``K`` rows of each token in fp32, cast to the hidden dtype (deterministic: no
   atomics).

Backward (expert weights frozen or not): gradients with respect to the hidden states and the routing
weights come from two more grouped kernels (``G = dout W_down`` with the routing-weight gradient
``<G, a>`` and ``d(gate, up)`` in the epilogue, then ``d(gate, up) W_gate_up``); if the expert weights
themselves require gradients, those are computed with plain torch matmuls per expert (correct, not fast).

Shapes: ``hidden [T, H]``; ``indices`` integer ``[T, K]`` (ids outside ``[0, E)`` are skipped, as
transformers' expert-parallel sentinels are); ``weights`` float ``[T, K]``; ``gate_up`` ``[E, 2I, H]``
(``[E, H, 2I]`` with ``transposed=True``), gate rows first then up rows; ``down`` ``[E, H, I]`` (``[E, I, H]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

if triton.knobs.runtime.interpret and type(tl.zeros).__name__ != "InterpretedFunction":
    # triton.language's own helpers were built before TRITON_INTERPRET was set: kernels would fail obscurely
    raise ImportError(
        "TRITON_INTERPRET=1 was set after triton.language was imported (torch._dynamo imports it); "
        "set it before importing transformers or torch._dynamo"
    )

# Pairs up to which the single-program align kernel is used (decode: 1-64 tokens x top-k).
SMALL_PAIRS = 1024
# Decode tiles while pairs <= this many rows per expert on average (so that most experts fit one SMALL block).
SMALL_ROWS_PER_EXPERT = 8


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the grouped GEMMs of one path (rows per block, output columns, reduction step)."""

    block_m: int
    gate_up_n: int
    gate_up_k: int
    down_n: int
    down_k: int
    warps: int
    stages: int


# Decode: few rows per expert, weight streaming; prefill: larger row blocks for tensor-core reuse. Chosen by
# `benchmarks/kernels/bench.py --tune` on an H100 (OLMoE, Mixtral and Qwen3 shapes; see kernels/README.md).
SMALL = TileConfig(block_m=16, gate_up_n=64, gate_up_k=256, down_n=64, down_k=256, warps=4, stages=3)
LARGE = TileConfig(block_m=128, gate_up_n=128, gate_up_k=64, down_n=128, down_k=64, warps=8, stages=3)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _align_kernel(
    ids_ptr,
    plan_ptr,
    S,
    NB,
    E,
    BM: tl.constexpr,
    E_PAD: tl.constexpr,
    CH: tl.constexpr,
):
    """One program: counting sort of the pair ids by expert (stable) and the row-block table."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    # while, not range(): the interpreter cannot iterate up to a run-time scalar
    s0 = 0
    while s0 < S:
        offs = s0 + tl.arange(0, CH)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)
        counts += tl.sum(hit.to(tl.int32), axis=0)
        s0 += CH
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    running = tl.zeros([E_PAD], dtype=tl.int32)
    s0 = 0
    while s0 < S:
        offs = s0 + tl.arange(0, CH)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit
        pos = tl.sum(hit * (before + running[None, :] + starts[None, :]), axis=1)
        valid = tl.sum(hit, axis=1) > 0
        tl.store(plan_ptr + pos, offs, mask=valid)
        running += tl.sum(hit, axis=0)
        s0 += CH
    blocks = (counts + BM - 1) // BM
    bends = tl.cumsum(blocks, axis=0)
    bstarts = bends - blocks
    b0 = 0
    while b0 < NB:
        b = b0 + tl.arange(0, CH)
        own = ((b[:, None] >= bstarts[None, :]) & (b[:, None] < bends[None, :])).to(tl.int32)
        has = tl.sum(own, axis=1) > 0
        expert = tl.sum(own * experts[None, :], axis=1)
        row0 = tl.sum(own * (starts[None, :] + (b[:, None] - bstarts[None, :]) * BM), axis=1)
        rowend = tl.sum(own * ends[None, :], axis=1)
        inside = b < NB
        tl.store(plan_ptr + S + b, tl.where(has, expert, -1), mask=inside)
        tl.store(plan_ptr + S + NB + b, row0, mask=inside)
        tl.store(plan_ptr + S + 2 * NB + b, rowend, mask=inside)
        b0 += CH


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST: in float32 (the interpreter's bf16 dot is wrong), IEEE: no tf32 for float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    plan_ptr,
    S,
    NB,
    a_ptr,
    gu_ptr,
    H: tl.constexpr,
    INTER: tl.constexpr,
    K_TOP: tl.constexpr,
    stride_xt,
    stride_we,
    stride_wk,
    stride_wn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SAVE_GU: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """a[row, n] = silu(x[tok] . W_gate[e, n]) * (x[tok] . W_up[e, n]) for the rows of one block."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(INTER, BN)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(plan_ptr + S + blk)
    if e < 0:
        return
    row0 = tl.load(plan_ptr + S + NB + blk)
    rowend = tl.load(plan_ptr + S + 2 * NB + blk)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < rowend
    pair = tl.load(plan_ptr + rows, mask=rmask, other=0)
    tok = (pair // K_TOP).to(tl.int64)
    offs_n = nt * BN + tl.arange(0, BN)
    nmask = offs_n < INTER
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < H
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        wg = tl.load(w_base + w_offs, mask=wmask, other=0.0)
        wu = tl.load(w_base + w_offs + INTER * stride_wn, mask=wmask, other=0.0)
        acc_g = _mma(x, wg, acc_g, IEEE, UPCAST)
        acc_u = _mma(x, wu, acc_u, IEEE, UPCAST)
    out = _silu(acc_g) * acc_u
    omask = rmask[:, None] & nmask[None, :]
    rows64 = rows.to(tl.int64)
    tl.store(a_ptr + rows64[:, None] * INTER + offs_n[None, :], out.to(a_ptr.dtype.element_ty), mask=omask)
    if SAVE_GU:
        gu_offs = rows64[:, None] * (2 * INTER) + offs_n[None, :]
        tl.store(gu_ptr + gu_offs, acc_g.to(gu_ptr.dtype.element_ty), mask=omask)
        tl.store(gu_ptr + gu_offs + INTER, acc_u.to(gu_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grouped_scatter_kernel(
    a_ptr,
    w_ptr,
    plan_ptr,
    S,
    NB,
    scale_ptr,
    y_ptr,
    N: tl.constexpr,
    KD: tl.constexpr,
    stride_we,
    stride_wk,
    stride_wn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    MUL_SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[pair, n] = scale[pair] * sum_k a[row, k] W[e, k, n]: rows in expert order in, pair order out."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(plan_ptr + S + blk)
    if e < 0:
        return
    row0 = tl.load(plan_ptr + S + NB + blk)
    rowend = tl.load(plan_ptr + S + 2 * NB + blk)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < rowend
    rows64 = rows.to(tl.int64)
    offs_n = nt * BN + tl.arange(0, BN)
    nmask = offs_n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, KD, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < KD
        a = tl.load(a_ptr + rows64[:, None] * KD + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(
            w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        )
        acc = _mma(a, w, acc, IEEE, UPCAST)
    pair = tl.load(plan_ptr + rows, mask=rmask, other=0).to(tl.int64)
    if MUL_SCALE:
        scale = tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    tl.store(
        y_ptr + pair[:, None] * N + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.jit
def _combine_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    T,
    H,
    K_TOP,
    E,
    KP: tl.constexpr,
    BH: tl.constexpr,
):
    """out[t] = sum of y[t * K + j] over the token's slots j whose expert is routable."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    j = tl.arange(0, KP)
    ids = tl.load(ids_ptr + t * K_TOP + j, mask=j < K_TOP, other=-1)
    jmask = (j < K_TOP) & (ids >= 0) & (ids < E)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H
    y = tl.load(y_ptr + (t * K_TOP + j)[:, None] * H + offs_h[None, :], mask=jmask[:, None] & hmask[None, :], other=0.0)
    total = tl.sum(y.to(tl.float32), axis=0)
    tl.store(out_ptr + t * H + offs_h, total.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _bwd_down_kernel(
    dout_ptr,
    w_ptr,
    gu_ptr,
    scale_ptr,
    plan_ptr,
    S,
    NB,
    dgu_ptr,
    dscale_ptr,
    T,
    H: tl.constexpr,
    INTER: tl.constexpr,
    K_TOP: tl.constexpr,
    stride_we,
    stride_wk,
    stride_wn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """G = dout[tok] W_down[e] (over H); d scale = <G, a>; d(gate, up) from G * scale."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(INTER, BN)
    blk = pid // n_tiles
    nt = pid % n_tiles
    e = tl.load(plan_ptr + S + blk)
    if e < 0:
        return
    row0 = tl.load(plan_ptr + S + NB + blk)
    rowend = tl.load(plan_ptr + S + 2 * NB + blk)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < rowend
    rows64 = rows.to(tl.int64)
    pair = tl.load(plan_ptr + rows, mask=rmask, other=0).to(tl.int64)
    drow = pair // K_TOP
    offs_n = nt * BN + tl.arange(0, BN)
    nmask = offs_n < INTER
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < H
        d = tl.load(dout_ptr + drow[:, None] * H + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(
            w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        )
        acc = _mma(d.to(w.dtype), w, acc, IEEE, UPCAST)
    omask = rmask[:, None] & nmask[None, :]
    gu_offs = rows64[:, None] * (2 * INTER) + offs_n[None, :]
    g = tl.load(gu_ptr + gu_offs, mask=omask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + gu_offs + INTER, mask=omask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    partial = tl.sum(acc * act * u, axis=1)
    tl.store(dscale_ptr + nt.to(tl.int64) * S + pair, partial, mask=rmask)
    scale = tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    da = acc * scale[:, None]
    dg = da * u * (sig * (1.0 + g * (1.0 - sig)))
    du = da * act
    tl.store(dgu_ptr + gu_offs, dg.to(dgu_ptr.dtype.element_ty), mask=omask)
    tl.store(dgu_ptr + gu_offs + INTER, du.to(dgu_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------- launchers
_COMPILED: dict[tuple, tuple] = {}


def _spec(arg: object) -> object:
    """What Triton specialises a kernel on for one argument: dtype and 16-byte alignment of tensors; whether
    integers are 1, multiples of 16, and fit in 32 bits."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    return arg


def _launch(kernel: triton.JITFunction, grid: tuple[int, ...], *args: object, **meta: object) -> None:
    """``kernel[grid](*args, **meta)``, launching the compiled kernel directly when the same specialisation ran
    before: Triton's per-call argument binding costs tens of µs of host time on slow hosts, several times the
    GPU time of a decode-size layer. The cache key holds everything Triton specialises on (see :func:`_spec`)."""
    if triton.knobs.runtime.interpret or triton.knobs.runtime.launch_enter_hook is not None:
        kernel[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, tuple(map(_spec, args)), tuple(meta.items()))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        compiled._init_handles()
        constexprs = tuple(meta[name] for name in kernel.arg_names[len(args) :])
        _COMPILED[key] = (compiled, constexprs)
        return
    compiled, constexprs = hit
    grid = tuple(grid) + (1,) * (3 - len(grid))
    stream = triton.runtime.driver.active.get_current_stream(device)
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *constexprs)


@dataclass
class Plan:
    """Pairs grouped by expert, in one int32 buffer ``ws`` (one allocation, one kernel argument):
    ``sorted_pair [S]`` (pair ids in expert order), then the row-block table ``blk_expert``, ``blk_row0`` and
    ``blk_rowend``, ``[NB]`` each (expert ``-1``: unused block)."""

    ws: torch.Tensor
    pairs: int
    num_blocks: int
    tiles: TileConfig

    @property
    def args(self) -> tuple[torch.Tensor, int, int]:
        return self.ws, self.pairs, self.num_blocks

    @property
    def sorted_pair(self) -> torch.Tensor:
        return self.ws[: self.pairs]

    def _table(self, i: int) -> torch.Tensor:
        return self.ws[self.pairs + i * self.num_blocks : self.pairs + (i + 1) * self.num_blocks]

    @property
    def blk_expert(self) -> torch.Tensor:
        return self._table(0)

    @property
    def blk_row0(self) -> torch.Tensor:
        return self._table(1)

    @property
    def blk_rowend(self) -> torch.Tensor:
        return self._table(2)


def choose_tiles(pairs: int, num_experts: int) -> TileConfig:
    """Decode tiles while an expert gets about one row block; prefill tiles beyond (weights re-read per block)."""
    return SMALL if pairs <= SMALL_ROWS_PER_EXPERT * num_experts else LARGE


def plan_dispatch(ids: torch.Tensor, num_experts: int, tiles: TileConfig | None = None) -> Plan:
    """Group the pair ids (``[T, K]`` or flat ``[S]``, contiguous) by expert without a host synchronisation."""
    S = ids.numel()
    tiles = choose_tiles(S, num_experts) if tiles is None else tiles
    bm = tiles.block_m
    nb = triton.cdiv(S, bm) + min(num_experts, S)
    device = ids.device
    if S <= SMALL_PAIRS:
        ws = torch.empty(S + 3 * nb, dtype=torch.int32, device=device)
        e_pad = _pow2(num_experts + 1)
        # chunks of about 8K (pair, expert) cells: decode sizes align in one or two loop trips
        ch = max(16, min(_pow2(S), 8192 // e_pad))
        _launch(_align_kernel, (1,), ids, ws, S, nb, num_experts, BM=bm, E_PAD=e_pad, CH=ch, num_warps=8)
        return Plan(ws, S, nb, tiles)
    ids = ids.reshape(-1)
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, num_experts)
    _, perm = torch.sort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key, dtype=torch.int64))
    counts = counts[:num_experts]
    ends = counts.cumsum(0)
    starts = ends - counts
    blocks = (counts + bm - 1) // bm
    bends = blocks.cumsum(0)
    b = torch.arange(nb, device=device)
    expert = torch.searchsorted(bends, b, right=True)
    owner = expert.clamp(max=num_experts - 1)
    row0 = starts[owner] + (b - (bends - blocks)[owner]) * bm
    blk_expert = torch.where(expert < num_experts, expert, -1)
    ws = torch.cat([perm, blk_expert, row0, ends[owner]]).to(torch.int32)
    return Plan(ws, S, nb, tiles)


def _options(tiles: TileConfig, dtype: torch.dtype) -> dict:
    """Launch options shared by the GEMM kernels."""
    return {
        "IEEE": dtype == torch.float32,
        "UPCAST": dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret),
        "num_warps": tiles.warps,
        "num_stages": tiles.stages,
    }


def _layout(gate_up: torch.Tensor, down: torch.Tensor, transposed: bool) -> tuple[int, int, tuple, tuple]:
    """(H, INTER, gate_up (e, h, n) strides, down (e, i, h) strides) for either storage layout."""
    if transposed:
        E, H, two_i = gate_up.shape
        gu = (gate_up.stride(0), gate_up.stride(1), gate_up.stride(2))
        dn = (down.stride(0), down.stride(1), down.stride(2))
        expect_down = (E, two_i // 2, H)
    else:
        E, two_i, H = gate_up.shape
        gu = (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1))
        dn = (down.stride(0), down.stride(2), down.stride(1))
        expect_down = (E, H, two_i // 2)
    if two_i % 2 or tuple(down.shape) != expect_down:
        raise ValueError(
            f"expert weights do not match: gate_up {list(gate_up.shape)}, down {list(down.shape)} "
            f"(expected down {list(expect_down)}{', transposed layout' if transposed else ''})"
        )
    return H, two_i // 2, gu, dn


def _forward(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    transposed: bool,
    save: bool,
) -> tuple[torch.Tensor, Plan, torch.Tensor | None]:
    """Outputs ``[T, H]``, the plan and (when ``save``) gate/up ``[S, 2I]``."""
    T, K = ids.shape
    E = gate_up.shape[0]
    H, INTER, gu_s, dn_s = _layout(gate_up, down, transposed)
    S = ids.numel()
    plan = plan_dispatch(ids, E)
    tiles = plan.tiles
    dtype = gate_up.dtype
    opts = _options(tiles, dtype)
    x = hidden if hidden.dtype == dtype else hidden.to(dtype)
    a = torch.empty(S, INTER, dtype=dtype, device=hidden.device)
    gu = torch.empty(S, 2 * INTER, dtype=dtype, device=hidden.device) if save else a
    bn, bk = min(tiles.gate_up_n, _pow2(INTER)), min(tiles.gate_up_k, _pow2(H))
    _launch(_gate_up_kernel, (plan.num_blocks * triton.cdiv(INTER, bn),),
        x, gate_up, *plan.args, a, gu,
        H, INTER, K, x.stride(0), *gu_s,
        BM=tiles.block_m, BN=bn, BK=bk, SAVE_GU=save, **opts,
    )  # fmt: skip
    y = torch.empty(S, H, dtype=torch.float32, device=hidden.device)
    bn, bk = min(tiles.down_n, _pow2(H)), min(tiles.down_k, _pow2(INTER))
    _launch(_grouped_scatter_kernel, (plan.num_blocks * triton.cdiv(H, bn),),
        a, down, *plan.args, weights, y,
        H, INTER, *dn_s,
        BM=tiles.block_m, BN=bn, BK=bk, MUL_SCALE=True, **opts,
    )  # fmt: skip
    out = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)
    _combine(y, ids, out, E)
    return out, plan, (gu if save else None)


def _combine(y: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, num_experts: int) -> None:
    T, K = ids.shape
    H = y.shape[-1]
    if T == 0:
        return
    bh = min(1024, _pow2(H))
    grid = (T, triton.cdiv(H, bh))
    _launch(_combine_kernel, grid, y, ids, out, T, H, K, num_experts, KP=_pow2(K, floor=1), BH=bh)


def _backward(
    dout: torch.Tensor,
    hidden: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gu: torch.Tensor,
    plan: Plan,
    transposed: bool,
    need_weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden [T, H], d weights [T, K], d gate_up or None, d down or None) from ``dout [T, H]``."""
    T, K = ids.shape
    E = gate_up.shape[0]
    S = T * K
    H, INTER, gu_s, dn_s = _layout(gate_up, down, transposed)
    tiles = plan.tiles
    dtype = gate_up.dtype
    opts = _options(tiles, dtype)
    dout = dout.contiguous()
    bn, bk = min(tiles.gate_up_n, _pow2(INTER)), min(tiles.down_k, _pow2(H))
    n_tiles = triton.cdiv(INTER, bn)
    dgu = torch.empty(S, 2 * INTER, dtype=dtype, device=hidden.device)
    dscale = torch.zeros(n_tiles, S, dtype=torch.float32, device=hidden.device)
    # d(y) / d(a) uses W_down with (k = H, n = INTER): the forward's down strides swapped
    _launch(_bwd_down_kernel, (plan.num_blocks * n_tiles,),
        dout, down, gu, weights, *plan.args, dgu, dscale,
        T, H, INTER, K, dn_s[0], dn_s[2], dn_s[1],
        BM=tiles.block_m, BN=bn, BK=bk, **opts,
    )  # fmt: skip
    dx_pairs = torch.empty(S, H, dtype=torch.float32, device=hidden.device)
    bn, bk = min(tiles.down_n, _pow2(H)), min(tiles.gate_up_k, _pow2(2 * INTER))
    _launch(_grouped_scatter_kernel, (plan.num_blocks * triton.cdiv(H, bn),),
        dgu, gate_up, *plan.args, weights, dx_pairs,
        H, 2 * INTER, gu_s[0], gu_s[2], gu_s[1],
        BM=tiles.block_m, BN=bn, BK=bk, MUL_SCALE=False, **opts,
    )  # fmt: skip
    dx = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)
    _combine(dx_pairs, ids, dx, E)
    dweights = dscale.sum(0).view(T, K).to(weights.dtype)
    d_gate_up = d_down = None
    if need_weight_grads:
        d_gate_up, d_down = _expert_weight_grads(dout, hidden, weights, ids, gate_up, down, gu, dgu, plan)
        if transposed:
            d_gate_up, d_down = d_gate_up.transpose(1, 2), d_down.transpose(1, 2)
    return dx, dweights, d_gate_up, d_down


def _expert_weight_grads(
    dout: torch.Tensor,
    hidden: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gu: torch.Tensor,
    dgu: torch.Tensor,
    plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-weight gradients in the ``[E, 2I, H]`` / ``[E, H, I]`` layout, per expert with torch (syncs once)."""
    T, K = ids.shape
    E = gate_up.shape[0]
    INTER = gu.shape[1] // 2
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid].long(), minlength=E).tolist()
    pairs = plan.sorted_pair[: sum(counts)].long()
    tok = pairs // K
    x = hidden.reshape(T, -1)[tok].float()
    d = dout.reshape(-1, dout.shape[-1])[tok].float() * weights.reshape(-1)[pairs].float()[:, None]
    g, u = gu[: len(pairs), :INTER].float(), gu[: len(pairs), INTER:].float()
    a = torch.nn.functional.silu(g) * u
    dg_u = dgu[: len(pairs)].float()
    d_gate_up = torch.zeros(gate_up.shape[0], 2 * INTER, x.shape[1], dtype=torch.float32, device=hidden.device)
    d_down = torch.zeros(E, x.shape[1], INTER, dtype=torch.float32, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            d_gate_up[e] = dg_u[rows].T @ x[rows]
            d_down[e] = d[rows].T @ a[rows]
            start += n
    return d_gate_up.to(gate_up.dtype), d_down.to(down.dtype)


class _ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weights, ids, gate_up, down, transposed):  # type: ignore[override]
        save = any(ctx.needs_input_grad)
        out, plan, gu = _forward(hidden, weights, ids, gate_up, down, transposed, save)
        if save:
            ctx.save_for_backward(hidden, weights, ids, gate_up, down, gu)
            ctx.plan, ctx.transposed = plan, transposed
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        hidden, weights, ids, gate_up, down, gu = ctx.saved_tensors
        need_w = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, dw, dgu_w, ddown_w = _backward(
            dout, hidden, weights, ids, gate_up, down, gu, ctx.plan, ctx.transposed, need_w
        )
        return (
            dx.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
            dw if ctx.needs_input_grad[1] else None,
            None,
            dgu_w if ctx.needs_input_grad[3] else None,
            ddown_w if ctx.needs_input_grad[4] else None,
            None,
        )


def _check(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden states must be [tokens, hidden], got {list(hidden.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(
            f"indices and weights must both be [tokens, k] with tokens = {hidden.shape[0]}: "
            f"got {list(ids.shape)} and {list(weights.shape)}"
        )
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"expert indices must be an integer tensor, got {ids.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"routing weights must be floating point, got {weights.dtype}")
    if gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"expert weights must be bf16, fp16 or fp32, got {gate_up.dtype}")
    devices = {t.device for t in (hidden, ids, weights, gate_up)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _run(hidden, weights, ids, gate_up, down, transposed) -> torch.Tensor:
    hidden, weights, ids = hidden.contiguous(), weights.contiguous(), ids.contiguous()
    tracked = (hidden, weights, gate_up, down)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    if ids.numel() == 0:
        out = hidden.new_zeros(hidden.shape)
        return out + sum(t.sum() for t in tracked if t.requires_grad) * 0 if grad else out
    if grad:
        return _ExpertsFunction.apply(hidden, weights, ids, gate_up, down, transposed)
    return _forward(hidden, weights, ids, gate_up, down, transposed, save=False)[0]


def moe_experts(
    hidden: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    transposed: bool = False,
) -> torch.Tensor:
    """``sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with ``e = indices[t, j]``: ``[T, H]``.

    Differentiable in ``hidden`` and ``weights`` (and, through a slow torch path, in the expert weights).
    """
    _check(hidden, indices, weights, gate_up)
    return _run(hidden, weights, indices, gate_up, down, transposed)


def reference_moe(
    hidden: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    transposed: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-PyTorch reference, computed in ``dtype`` one expert at a time (differentiable everywhere; syncs)."""
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    E, two_i, H = gate_up.shape
    INTER = two_i // 2
    T, K = indices.shape
    flat = indices.reshape(-1).long()
    x = hidden.to(dtype)
    w = weights.reshape(-1).to(dtype)
    out = torch.zeros(T, H, dtype=dtype, device=hidden.device)
    for e in flat[(flat >= 0) & (flat < E)].unique().tolist():
        pairs = (flat == e).nonzero()[:, 0]
        tok = pairs // K
        gu = x[tok] @ gate_up[e].to(dtype).T
        a = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
        out = out.index_add(0, tok, (a @ down[e].to(dtype).T) * w[pairs, None])
    return out
