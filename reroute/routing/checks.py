"""The one validator for tensors handed to the routing state: by the public setters (offsets, row offsets, re-mixing),
by saved state folders (:mod:`reroute.pretrained`) and by recorded routes (:mod:`reroute.routing.replay`).

Validation happens once, where a tensor enters from outside; optimisation loops install their own tensors through
unchecked internal setters (``Pathway.install``, ``install_row_offsets(..., checked=False)``), since the finiteness
check reads a value back to the host.
"""

from __future__ import annotations

import torch

KINDS = {"float": "a floating-point", "int": "an integer", "index": "a bool or integer"}
"""Accepted dtype families: ``"float"``; ``"int"`` (integer, not bool); ``"index"`` (bool or integer)."""


def _is_kind(value: torch.Tensor, kind: str) -> bool:
    if kind == "float":
        return value.is_floating_point()
    integer = not value.is_floating_point() and not value.is_complex()
    return integer and (kind == "index" or value.dtype != torch.bool)


def check_tensor(
    value: object,
    what: str,
    kind: str = "float",
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    finite: bool = False,
    of: str | None = None,
    dtype_error: type[Exception] = TypeError,
) -> torch.Tensor:
    """Return ``value`` if it is a tensor of ``kind`` (see :data:`KINDS`), else raise a one-sentence error naming
    ``what`` (e.g. ``"offsets for layer 3"``).

    Args:
        shape: the expected shape; a ``None`` entry takes any size of at least 1 (``(None, E)``: ``[rows, E]``).
        device: where the tensor must be (the layer's device).
        finite: reject NaN and inf (reads one value back to the host: keep it out of optimisation loops).
        of: what the entries are, for the message (``"token positions"``).
        dtype_error: the exception for a wrong dtype (``TypeError`` for arguments, ``ValueError`` for file content).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if not _is_kind(value, kind):
        entries = f" of {of}" if of else ""
        raise dtype_error(f"{what} must be {KINDS[kind]} tensor{entries}, got {value.dtype}")
    if shape is not None:
        fits = value.dim() == len(shape) and all(
            size >= 1 if want is None else size == want for size, want in zip(value.shape, shape)
        )
        if not fits:
            want = "[" + ", ".join("rows" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{what} must have shape {want}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{what} is on {value.device} but the layer is on {device}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return value
