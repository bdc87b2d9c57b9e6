"""Recording routing decisions: ``with rm.trace() as tr: model(**batch)``.

Every router call inside the block appends one record per MoE layer: the router logits it routed with
(offsets included), the chosen expert indices and their mixing weights, shaped ``[batch, seq, ...]``.
Several calls (a prefill then decode steps) concatenate along the sequence axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reroute.routing.layer import LayerRouting


@dataclass
class RoutingRecord:
    """One router call: ``logits [B, S, E]``, ``indices [B, S, k]``, ``weights [B, S, k]``."""

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


class Trace:
    """Per-layer routing records of the forwards run while the trace is active.

    Args:
        layers: the attached model's layer controllers (``{layer_idx: LayerRouting}``).
        detach: store detached tensors (default) or keep them in the autograd graph.
        device: move records there (e.g. ``"cpu"`` to save accelerator memory); default: where they are.
    """

    def __init__(
        self, layers: dict[int, LayerRouting], detach: bool = True, device: str | torch.device | None = None
    ) -> None:
        self._layers = layers
        self.detach = detach
        self.device = device
        self.records: dict[int, list[RoutingRecord]] = {idx: [] for idx in layers}

    def record(self, layer: LayerRouting, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        batch, seq = layer.context.batch_size, layer.context.seq_len
        if batch is None or seq is None or batch * seq != logits.shape[0]:
            batch, seq = 1, logits.shape[0]
        tensors = []
        for tensor in (logits, indices, weights):
            tensor = tensor.detach() if self.detach else tensor
            if self.device is not None:
                tensor = tensor.to(self.device)
            tensors.append(tensor.reshape(batch, seq, -1))
        self.records[layer.layer_idx].append(RoutingRecord(*tensors))

    @property
    def layers(self) -> list[int]:
        """Decoder-layer indices of the MoE layers, in order."""
        return list(self.records)

    def _stack(self, layer: int, field: str) -> torch.Tensor:
        if layer not in self.records:
            raise KeyError(f"layer {layer} is not an MoE layer; MoE layers: {self.layers}")
        records = self.records[layer]
        if not records:
            raise ValueError("the trace recorded nothing: run the model inside the `with rm.trace()` block")
        parts = [getattr(r, field) for r in records]
        if len({p.shape[0] for p in parts}) > 1:
            raise ValueError(
                "recorded calls have different batch sizes; read trace.records[layer] call by call instead"
            )
        width = max(p.shape[-1] for p in parts)
        if any(p.shape[-1] != width for p in parts):
            # variable-width policies between calls: pad with zero weight / expert -1
            fill = -1 if field == "indices" else 0.0
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=fill) for p in parts]
        return torch.cat(parts, dim=1)

    def logits(self, layer: int) -> torch.Tensor:
        """Router logits ``[B, S, E]`` of ``layer`` over all recorded calls."""
        return self._stack(layer, "logits")

    def indices(self, layer: int) -> torch.Tensor:
        """Chosen experts ``[B, S, k]``."""
        return self._stack(layer, "indices")

    def weights(self, layer: int) -> torch.Tensor:
        """Mixing weights of the chosen experts ``[B, S, k]``."""
        return self._stack(layer, "weights")

    def scores(self, layer: int) -> torch.Tensor:
        """Full per-expert routing scores ``[B, S, E]`` (softmax probabilities, or sigmoid scores for
        DeepSeek-V3/GLM), computed from the recorded logits with the family's rule."""
        controller = self._layers[layer]
        logits = self.logits(layer)
        flat = controller.rule.scores(controller.router, logits.reshape(-1, logits.shape[-1]).to(controller.device))
        return flat.reshape(logits.shape).to(logits.device)

    def expert_usage(self, attention_mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Expert usage ``[num_moe_layers, E]``: how often each expert is chosen (with non-zero weight).

        ``attention_mask [B, S]`` excludes padding tokens. ``normalize``: fractions of the layer's (token,
        slot) assignments instead of counts.
        """
        rows = []
        for layer in self.layers:
            indices, weights = self.indices(layer), self.weights(layer)
            used = weights != 0
            if attention_mask is not None:
                used = used & _token_mask(attention_mask, used)[..., None].bool()
            num_experts = self._layers[layer].num_experts
            counts = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
            counts.index_add_(0, indices[used].clamp(min=0), torch.ones_like(indices[used], dtype=torch.float32))
            rows.append(counts / counts.sum().clamp(min=1) if normalize else counts)
        return torch.stack([row.to(rows[0].device) for row in rows])  # layers may sit on several devices

    def entropy(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean routing entropy per layer ``[num_moe_layers]`` (nats) of the normalised per-expert scores."""
        values = []
        for layer in self.layers:
            scores = self.scores(layer)
            probs = scores / scores.sum(dim=-1, keepdim=True)
            ent = -(probs * probs.clamp(min=1e-30).log()).sum(dim=-1)
            if attention_mask is None:
                values.append(ent.mean())
            else:
                mask = _token_mask(attention_mask, ent).float()
                values.append((ent * mask).sum() / mask.sum().clamp(min=1))
        return torch.stack([value.to(values[0].device) for value in values])


def _token_mask(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if attention_mask.shape != like.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the trace holds {tuple(like.shape[:2])} tokens"
        )
    return attention_mask.to(like.device)
