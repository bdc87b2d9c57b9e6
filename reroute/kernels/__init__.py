"""Triton kernels, imported as ``reroute.kernels.<name>`` from the repository's top-level ``kernels/`` folder.

The folder has no ``__init__.py`` on purpose: a top-level ``kernels`` package would shadow Hugging Face's
``kernels`` package, which transformers imports. This package appends that folder to its ``__path__``, so
``reroute.kernels.moe`` loads ``kernels/moe.py``. Nothing here imports triton: ``import reroute`` works
without it, and :func:`available` says whether the kernels can run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

# a checkout (or editable install): the top-level folder; an installed wheel: the copy shipped as ``_sources``
_SOURCE = Path(__file__).resolve().parents[2] / "kernels"
if not (_SOURCE / "moe.py").is_file():
    _SOURCE = Path(__file__).resolve().parent / "_sources"
if _SOURCE.is_dir() and str(_SOURCE) not in __path__:
    __path__.append(str(_SOURCE))


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``), read when the kernels are first imported."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _installed() -> bool:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        found = False
    return found and (_SOURCE / "moe.py").is_file()


@functools.cache
def _runs_on(kind: str, interpret: bool) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available() and not interpret
    return kind == "cpu" and interpret


def available(device: str | object | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: CUDA); cheap enough to ask on every call.

    Needs triton and the kernel sources; CUDA devices need a GPU, the CPU needs the interpreter.
    """
    if not _installed():
        return False
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cuda")
    return _runs_on(kind, interpreted())
