"""The Triton expert dispatch as a transformers experts implementation (``ExpertsInterface``).

transformers 5.x calls ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` on a fused
``*Experts`` module and dispatches by ``config._experts_implementation``. Importing this module registers
:func:`triton_experts_forward` under :data:`NAME`; :func:`enable` / :func:`restore` switch a model's experts
modules to it and back (what ``reroute.attach(model, kernels=...)`` does).

Supported: gated SiLU experts with concatenated ``gate_up_proj`` (``[E, 2I, H]``, or ``[E, H, 2I]`` when
``is_transposed``) and ``down_proj``, no biases, the default gate (OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-V2/3,
GLM-4-MoE, GraniteMoE, PhiMoE). Anything else (GPT-OSS: biases, interleaved gate/up and a clamped SwiGLU)
runs the class's own eager forward, explicitly: :func:`unsupported_reason` says why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from reroute.compat import set_experts_implementation
from reroute.kernels import available

NAME = "reroute_triton"
_SILU_NAMES = frozenset({"SiLU", "SiLUActivation"})


def _default_gate() -> Callable | None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - transformers without experts implementations
        return None
    return _default_apply_gate


def is_experts_module(module: nn.Module) -> bool:
    """A fused experts module dispatched through transformers' ``use_experts_implementation``."""
    return (
        hasattr(module, "down_proj")
        and hasattr(module, "has_gate")
        and hasattr(getattr(module, "config", None), "_experts_implementation")
        and hasattr(type(module).forward, "__wrapped__")
    )


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def unsupported_reason(experts: nn.Module) -> str | None:
    """Why the Triton kernels cannot run this experts module (``None``: they can)."""
    name = type(experts).__name__
    if not getattr(experts, "has_gate", False) or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return f"{name} has no fused gate_up_proj"
    if getattr(experts, "has_bias", False):
        return f"{name} has expert biases"
    if not getattr(experts, "is_concatenated", True):
        return f"{name} interleaves gate and up columns"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{name} applies a post-expert norm"
    if type(experts)._apply_gate is not _default_gate():
        return f"{name} has its own gate function (e.g. a clamped SwiGLU)"
    act = getattr(experts, "act_fn", None)
    if type(act).__name__ not in _SILU_NAMES:
        return f"{name} uses activation {type(act).__name__}; the kernels implement SiLU"
    if experts.gate_up_proj.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"{name} weights are {experts.gate_up_proj.dtype}; the kernels take bf16, fp16 or fp32"
    return None


def _eager_forward(experts: nn.Module) -> Callable:
    forward = getattr(type(experts).forward, "__wrapped__", None)
    if forward is None:  # pragma: no cover - is_experts_module guarantees it
        raise RuntimeError(f"{type(experts).__name__} has no eager forward to fall back to")
    return forward


_WARNED: set[str] = set()


@functools.cache
def _moe():
    from reroute.kernels import moe

    return moe


@functools.cache
def _ops() -> object:
    """Register the dispatch as the custom ops ``reroute::moe_experts`` (+ its backward) on first use.

    Inside a compiled graph the dispatch must be one opaque op with a fake (shape-only) implementation: Inductor
    then neither traces into the Triton launcher's Python nor re-compiles its kernels, and a CUDA graph captures
    the launches (the dispatch never synchronises with the host). Outside compilation the launcher is called
    directly (a custom op's dispatch costs host time that eager decoding cannot spare).
    """
    moe = _moe()

    @torch.library.custom_op("reroute::moe_experts", mutates_args=())
    def moe_experts(
        hidden: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        transposed: bool,
    ) -> torch.Tensor:
        with torch.no_grad():
            return moe.moe_experts(hidden, indices, weights, gate_up, down, transposed=transposed)

    @moe_experts.register_fake
    def _(hidden, indices, weights, gate_up, down, transposed):  # noqa: ANN001, ANN202
        return torch.empty_like(hidden)

    @torch.library.custom_op("reroute::moe_experts_backward", mutates_args=())
    def moe_experts_backward(
        dout: torch.Tensor,
        hidden: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        transposed: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = hidden.detach().requires_grad_(True)
            w = weights.detach().requires_grad_(True)
            out = moe.moe_experts(x, indices, w, gate_up.detach(), down.detach(), transposed=transposed)
            dx, dw = torch.autograd.grad(out, (x, w), dout)
        return dx, dw

    @moe_experts_backward.register_fake
    def _(dout, hidden, indices, weights, gate_up, down, transposed):  # noqa: ANN001, ANN202
        return torch.empty_like(hidden), torch.empty_like(weights)

    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        hidden, indices, weights, gate_up, down, transposed = inputs
        ctx.save_for_backward(hidden, indices, weights, gate_up, down)
        ctx.transposed = transposed

    def backward(ctx, dout):  # noqa: ANN001, ANN202
        hidden, indices, weights, gate_up, down = ctx.saved_tensors
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            raise NotImplementedError(
                "expert-weight gradients through reroute's kernels inside torch.compile are not implemented; "
                "freeze the expert weights, run eagerly, or attach(model, kernels=False)"
            )
        dx, dw = torch.ops.reroute.moe_experts_backward(dout, hidden, indices, weights, gate_up, down, ctx.transposed)
        return dx, None, dw, None, None, None

    moe_experts.register_autograd(backward, setup_context=setup_context)
    return torch.ops.reroute.moe_experts


def prepare(module: nn.Module) -> str | None:
    """Why the kernels cannot run ``module`` (``None``: they can), cached on the module for the forward.

    The check depends on the module and its weights' dtype only. :func:`enable` fills the cache before any
    forward, so that a compiled forward only reads it.
    """
    cached = module.__dict__.get("_reroute_kernel_support")
    if cached is None or cached[0] is not module.gate_up_proj.dtype:
        cached = (module.gate_up_proj.dtype, unsupported_reason(module))
        module.__dict__["_reroute_kernel_support"] = cached
    return cached[1]


def triton_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]``."""
    transposed = bool(getattr(self, "is_transposed", False))
    if torch.compiler.is_compiling():
        cached = self.__dict__.get("_reroute_kernel_support")
        if cached is not None and cached[1] is None and cached[0] is self.gate_up_proj.dtype:
            # registered by enable(), before any compilation
            return torch.ops.reroute.moe_experts(
                hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, transposed
            )
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    reason = prepare(self)
    if reason is None and not available(hidden_states.device):
        reason = f"the Triton kernels cannot run on {hidden_states.device}"
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"reroute kernels: {reason}; using the eager experts forward", stacklevel=2)
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return _moe().moe_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, transposed=transposed
    )


def register() -> None:
    """Register :data:`NAME` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, triton_experts_forward)


def enable(model: nn.Module) -> list[tuple[object, str | None]]:
    """Switch every experts module of ``model`` to :data:`NAME`; returns what :func:`restore` needs.

    Sets the config attribute the experts forward reads (``config._experts_implementation``), config by config,
    so nested configs (a VLM's text model) and any earlier choice are restored exactly.
    """
    register()
    _ops()
    saved: dict[int, tuple[object, str | None]] = {}
    for module in experts_modules(model):
        prepare(module)
        config = module.config
        if id(config) not in saved:
            saved[id(config)] = (config, config._experts_implementation)
            set_experts_implementation(config, NAME)
    return list(saved.values())


def restore(saved: list[tuple[object, str | None]]) -> None:
    for config, implementation in saved:
        set_experts_implementation(config, implementation)


def should_enable(model: nn.Module, mode: bool | str) -> bool:
    """Whether ``attach(model, kernels=mode)`` turns the kernels on.

    ``"auto"``: when every experts module is on CUDA, supported and triton works; ``False``: never; ``True``:
    always, raising a clear error when impossible (on the CPU it needs ``TRITON_INTERPRET=1``).
    """
    if mode not in ("auto", True, False):
        raise ValueError(f"kernels must be 'auto', True or False, got {mode!r}")
    if mode is False:
        return False
    modules = experts_modules(model)
    devices = {m.down_proj.device for m in modules}
    if mode == "auto" and (not modules or any(d.type != "cuda" for d in devices)):
        return False
    problems = [] if modules else ["the model has no fused experts modules (transformers' use_experts_implementation)"]
    problems += [f"the Triton kernels cannot run on {d} (triton missing, no GPU, or TRITON_INTERPRET unset on CPU)"
                 for d in sorted(devices, key=str) if not available(d)]  # fmt: skip
    problems += sorted({r for r in map(unsupported_reason, modules) if r is not None})
    if problems and mode is True:
        raise RuntimeError("reroute kernels requested but unavailable: " + "; ".join(problems))
    return not problems
