"""Route record / replay: ``with rm.record() as routes: ...`` then ``with rm.replay(routes): ...``.

Recording captures, per MoE layer and token, the experts a run selected, their mixing weights and whether the
weights were renormalised, for any run (plain forwards, ``generate()``, any method's adapted routing). Replaying
makes every router return exactly those (weights, indices) instead of its own choice, so the experts see the
recorded routing: replaying an adapted run on the unadapted model reproduces that run's outputs bit for bit (the
router logits are still computed, with the current offsets, and returned for ``output_router_logits``).

Layout. Router calls run token-major (``T = batch * seq`` tokens per forward). Consecutive forwards with the same
batch size (a prefill, then decode steps; or several scoring batches of one size) form one *segment*, whose records
are concatenated along the sequence axis: per layer ``indices [B, S, w]`` (long, ``-1`` = no expert in this slot),
``weights [B, S, w]`` (the router's output dtype, ``0`` where the index is ``-1``) and ``renormalized [B, S]``
(bool). ``w`` is the widest selection of the segment; narrower forwards (e.g. a rank-k policy) are padded with
``-1``. A forward with another batch size starts a new segment.

Replay keeps one token cursor per layer: a forward of ``[B, S]`` takes the next ``S`` positions of the current
segment (which must have ``B`` rows), so a prefill and the decode steps that follow consume the recorded sequence
in order, and a full-sequence forward can replay a recorded ``generate()``. ``-1`` slots inside the forward's width
become zero-weight copies of the token's first expert (a no-op for every experts implementation, as for policies).

On disk (:meth:`Routes.save`): ``routes.safetensors`` with ``indices.{layer}.{segment}``,
``weights.{layer}.{segment}`` and ``renormalized.{layer}.{segment}``, and ``routes.json`` (see :data:`FORMAT`)::

    {"format": "reroute-routes", "version": 1, "moe_layers": [...], "num_experts": [...],
     "segments": [{"batch": B, "calls": [S_1, S_2, ...]}], "fingerprint": {...}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reroute.routing.checks import check_tensor

if TYPE_CHECKING:
    from reroute.routing.layer import LayerRouting

FORMAT = "reroute-routes"
FORMAT_VERSION = 1
TENSORS_NAME = "routes.safetensors"
CONFIG_NAME = "routes.json"


def renormalized_tokens(layer: LayerRouting, num_tokens: int) -> torch.Tensor:
    """Bool ``[T]``: whether each token's selected weights were renormalised to sum to one (before scaling).

    The family's flag, or the policy's where a policy applies (a rank-k policy renormalises its single expert
    unless ``renormalize=False``, see :func:`reroute.routing.policy.select`); tokens outside ``policy_rows``,
    masked or re-mixed tokens keep the family's rule.
    """
    family = layer.rule.renormalizes(layer.router)
    flags = torch.full((num_tokens,), family, dtype=torch.bool)
    policy = layer.policy
    if policy is None:
        return flags
    if policy.renormalize is not None:
        chosen = policy.renormalize
    else:
        chosen = True if policy.rank is not None else family
    if layer.policy_rows is None:
        return torch.full((num_tokens,), chosen, dtype=torch.bool)
    rows = layer.policy_tokens(num_tokens).cpu()
    return torch.where(rows, chosen, family)


@dataclass
class Segment:
    """Consecutive forwards of one batch size: ``batch`` rows, ``calls`` = the sequence length of each forward,
    and per layer ``indices [B, S, w]``, ``weights [B, S, w]``, ``renormalized [B, S]`` (``S = sum(calls)``)."""

    batch: int
    calls: list[int] = field(default_factory=list)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    renormalized: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return sum(self.calls)


class Routes:
    """Recorded routes of the MoE layers (see the module docstring for the layout).

    Made by ``rm.record()`` (filled while the block runs) or :meth:`load`; read by ``rm.replay(routes)``.

    Args:
        moe_layers: decoder-layer indices of the MoE layers, in order.
        num_experts: experts per MoE layer, in the same order.
        fingerprint: the recording model's :meth:`RoutedModel.fingerprint` (informational).
    """

    def __init__(self, moe_layers: list[int], num_experts: list[int], fingerprint: dict[str, Any] | None = None):
        self.moe_layers = list(moe_layers)
        self.num_experts = list(num_experts)
        self.fingerprint = dict(fingerprint or {})
        self.segments: list[Segment] = []
        # per layer: how many forwards it has recorded (every MoE layer runs once per forward)
        self._calls: dict[int, int] = {idx: 0 for idx in self.moe_layers}

    # ------------------------------------------------------------------------------------------- recording
    def record(self, layer: LayerRouting, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """Append one router call (the :class:`reroute.routing.trace.Trace` hook: called by every layer)."""
        batch, seq = layer.context.batch_size, layer.context.seq_len
        if batch is None or seq is None or batch * seq != indices.shape[0]:
            batch, seq = 1, indices.shape[0]
        idx = layer.layer_idx
        call = self._calls[idx]
        self._calls[idx] = call + 1
        flags = renormalized_tokens(layer, indices.shape[0]).view(batch, seq)
        indices = indices.detach().to("cpu").reshape(batch, seq, -1)
        weights = weights.detach().to("cpu").reshape(batch, seq, -1)
        segment = self._segment_for_call(call, batch, seq)
        if idx in segment.indices:
            width = max(segment.indices[idx].shape[-1], indices.shape[-1])
            old_i, old_w = _widen(segment.indices[idx], segment.weights[idx], width)
            new_i, new_w = _widen(indices, weights, width)
            segment.indices[idx] = torch.cat([old_i, new_i], dim=1)
            segment.weights[idx] = torch.cat([old_w, new_w.to(old_w.dtype)], dim=1)
            segment.renormalized[idx] = torch.cat([segment.renormalized[idx], flags], dim=1)
        else:
            segment.indices[idx], segment.weights[idx], segment.renormalized[idx] = indices, weights, flags

    def _segment_for_call(self, call: int, batch: int, seq: int) -> Segment:
        """The segment holding forward number ``call``; the first layer to see a forward opens it."""
        seen = 0
        for segment in self.segments:
            if call < seen + len(segment.calls):
                return segment
            seen += len(segment.calls)
        if not self.segments or self.segments[-1].batch != batch:
            self.segments.append(Segment(batch))
        self.segments[-1].calls.append(seq)
        return self.segments[-1]

    # ------------------------------------------------------------------------------------------- reading
    @property
    def num_tokens(self) -> int:
        """Routed token positions recorded (``batch * seq`` summed over segments)."""
        return sum(s.batch * s.length for s in self.segments)

    def indices(self, layer: int, segment: int = 0) -> torch.Tensor:
        """Selected experts ``[B, S, w]`` of ``layer`` in ``segment`` (``-1``: empty slot)."""
        return self._get("indices", layer, segment)

    def weights(self, layer: int, segment: int = 0) -> torch.Tensor:
        """Mixing weights ``[B, S, w]`` of the selected experts."""
        return self._get("weights", layer, segment)

    def renormalized(self, layer: int, segment: int = 0) -> torch.Tensor:
        """Bool ``[B, S]``: whether the token's weights were renormalised over its selected experts."""
        return self._get("renormalized", layer, segment)

    def _get(self, what: str, layer: int, segment: int) -> torch.Tensor:
        if layer not in self.moe_layers:
            raise KeyError(f"layer {layer} is not a recorded MoE layer; recorded: {self.moe_layers}")
        if not 0 <= segment < len(self.segments):
            raise IndexError(f"segment {segment} out of range: {len(self.segments)} recorded")
        return getattr(self.segments[segment], what)[layer]

    def routed_experts(self, segment: int = 0) -> torch.Tensor:
        """Expert ids in vLLM's ``routed_experts`` layout: ``[B, S, num_moe_layers, w]`` (one ``[S, L, k]`` array
        per row; vLLM's has no batch axis and splits prompt and generated tokens)."""
        widths = max(self.indices(layer, segment).shape[-1] for layer in self.moe_layers)
        parts = [_widen(self.indices(i, segment), self.weights(i, segment), widths)[0] for i in self.moe_layers]
        return torch.stack(parts, dim=2)

    # ------------------------------------------------------------------------------------------- checking
    def check(self, layers: dict[int, LayerRouting]) -> None:
        """Raise ``ValueError`` if these routes cannot be replayed on a model with ``layers``."""
        mine = list(layers)
        if self.moe_layers != mine:
            raise ValueError(
                f"the routes were recorded for MoE layers {self.moe_layers} ({len(self.moe_layers)} layers) but the "
                f"model has {mine} ({len(mine)}); replay routes recorded on this architecture"
            )
        if not self.segments:
            raise ValueError("the routes hold no tokens: run the model inside the `with rm.record()` block")
        for number, segment in enumerate(self.segments):
            where = f"segment {number}"
            if segment.batch < 1 or not segment.calls or any(s < 1 for s in segment.calls):
                raise ValueError(f"{where} has an invalid layout: batch {segment.batch}, calls {segment.calls}")
            for idx, layer in layers.items():
                missing = [n for n in ("indices", "weights", "renormalized") if idx not in getattr(segment, n)]
                if missing:
                    raise ValueError(f"{where} lacks {missing} for layer {idx}")
                ind, wts, ren = segment.indices[idx], segment.weights[idx], segment.renormalized[idx]
                shape = (segment.batch, segment.length)
                if ind.dim() != 3 or tuple(ind.shape[:2]) != shape or ind.shape[2] < 1:
                    raise ValueError(
                        f"{where}, layer {idx}: indices have shape {list(ind.shape)}, expected {[*shape, 'w']}"
                    )
                if tuple(wts.shape) != tuple(ind.shape) or tuple(ren.shape) != shape:
                    raise ValueError(
                        f"{where}, layer {idx}: weights {list(wts.shape)} / renormalized {list(ren.shape)} do not "
                        f"match indices {list(ind.shape)}"
                    )
                check_tensor(ind, f"{where}, layer {idx}: indices", kind="int", dtype_error=ValueError)
                check_tensor(wts, f"{where}, layer {idx}: weights", dtype_error=ValueError)
                if ((ind < -1) | (ind >= layer.num_experts)).any():
                    raise ValueError(
                        f"{where}, layer {idx}: expert ids out of range for a layer with {layer.num_experts} experts "
                        f"(found {int(ind.min())}..{int(ind.max())})"
                    )
                if (ind[..., 0] < 0).any():
                    raise ValueError(f"{where}, layer {idx}: some tokens have no expert in their first slot")
                if not torch.isfinite(wts).all() or (wts.masked_select(ind < 0) != 0).any():
                    raise ValueError(f"{where}, layer {idx}: weights must be finite and zero where the id is -1")

    # ------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Write ``routes.safetensors`` + ``routes.json`` to ``directory`` (created if needed); returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for number, segment in enumerate(self.segments):
            for idx in segment.indices:
                for what in ("indices", "weights", "renormalized"):
                    tensors[f"{what}.{idx}.{number}"] = getattr(segment, what)[idx].contiguous()
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "segments": [{"batch": s.batch, "calls": s.calls} for s in self.segments],
            "fingerprint": self.fingerprint,
        }
        save_file(tensors, str(directory / TENSORS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Routes:
        """Read routes written by :meth:`save` (checked against a model when replayed)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, tensor_path = directory / CONFIG_NAME, directory / TENSORS_NAME
        if not config_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(
                f"{directory} lacks {CONFIG_NAME} and/or {TENSORS_NAME} (write them with routes.save)"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not a reroute routes file (its 'format' is not {FORMAT!r})")
        if not isinstance(config.get("version"), int) or config["version"] > FORMAT_VERSION:
            raise ValueError(f"{config_path} has format version {config.get('version')}; this reroute reads 1")
        tensors = load_file(str(tensor_path))
        routes = cls(config["moe_layers"], config["num_experts"], config.get("fingerprint"))
        for number, entry in enumerate(config["segments"]):
            segment = Segment(int(entry["batch"]), [int(s) for s in entry["calls"]])
            for idx in routes.moe_layers:
                for what in ("indices", "weights", "renormalized"):
                    key = f"{what}.{idx}.{number}"
                    if key not in tensors:
                        raise ValueError(f"{tensor_path} lacks {key}")
                    getattr(segment, what)[idx] = tensors[key]
            routes.segments.append(segment)
        return routes

    def __repr__(self) -> str:
        layout = ", ".join(f"[{s.batch}, {s.length}]" for s in self.segments)
        return f"Routes({len(self.moe_layers)} MoE layers, segments {layout or 'none'})"


class LayerReplay:
    """One layer's replay state: the recorded segments (on the layer's device) and the token cursor."""

    def __init__(self, routes: Routes, layer_idx: int, device: torch.device) -> None:
        self.layer_idx = layer_idx
        self.indices = [s.indices[layer_idx].to(device=device, dtype=torch.long) for s in routes.segments]
        self.weights = [s.weights[layer_idx].to(device) for s in routes.segments]
        self.batches = [s.batch for s in routes.segments]
        self.segment = 0
        self.position = 0

    @property
    def tokens_left(self) -> int:
        """Token positions (per row) not yet replayed, over all segments."""
        rest = sum(i.shape[1] for i in self.indices[self.segment + 1 :])
        return rest + (self.indices[self.segment].shape[1] - self.position if self.segment < len(self.indices) else 0)

    def take(self, num_tokens: int, batch: int | None, seq: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded ``(weights [T, w], indices [T, w])`` for the next forward of ``T = batch * seq`` tokens."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "route replay runs eagerly only: replay outside torch.compile (or compile the model after replaying)"
            )
        if batch is None or seq is None or batch * seq != num_tokens:
            batch, seq = 1, num_tokens
        segment, position = self.segment, self.position
        if segment < len(self.indices) and position == self.indices[segment].shape[1]:
            segment, position = segment + 1, 0
        if segment >= len(self.indices):
            raise ValueError(
                f"layer {self.layer_idx}: the recorded routes are used up, but the run asks for {seq} more tokens "
                "per row; replay a run of the same length as the recorded one"
            )
        recorded = self.indices[segment]
        if self.batches[segment] != batch or position + seq > recorded.shape[1]:
            raise ValueError(
                f"layer {self.layer_idx}: the run forwards [{batch}, {seq}] tokens at position {position} of a "
                f"recorded segment of shape [{self.batches[segment]}, {recorded.shape[1]}]; replay the same batch "
                "and token count as the recorded run"
            )
        indices = recorded[:, position : position + seq].reshape(num_tokens, -1)
        weights = self.weights[segment][:, position : position + seq].reshape(num_tokens, -1)
        used = (indices >= 0).any(dim=0).nonzero()
        width = int(used.max()) + 1
        indices, weights = indices[:, :width], weights[:, :width]
        indices = torch.where(indices >= 0, indices, indices[:, :1])  # empty slot: zero-weight copy of the first
        self.segment, self.position = segment, position + seq
        return weights, indices


def _widen(indices: torch.Tensor, weights: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the last axis to ``width`` slots with id ``-1`` and weight ``0``."""
    extra = width - indices.shape[-1]
    if extra == 0:
        return indices, weights
    pad = torch.nn.functional.pad
    return pad(indices, (0, extra), value=-1), pad(weights, (0, extra), value=0.0)
