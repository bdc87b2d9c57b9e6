"""``reroute.C3PO``: per-item expert re-mixing guided by successful neighbours (arXiv 2504.07964).

>>> index = reroute.ReferenceIndex.build(rm, tokenizer, reference_items)
>>> c3po = reroute.C3PO(rm, index, tokenizer, surrogate="ngd")
>>> predictions = c3po.score_choices(test_items)          # multiple choice
>>> out = c3po.generate(prompts=["..."], max_new_tokens=8) # generation; routing adapted at the prompt only

Per batch of test items: the router's own routing at the last prompt token gives each item's core experts and
starting pathway; the surrogate moves the pathway; a do-no-harm gate keeps the base routing for items whose
neighbours disagree or whose surrogate gain is too small; the pathway is then applied to the prompt's scored
positions only (decode steps route as usual).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from reroute.attach import RoutedModel
from reroute.c3po.config import KERNELS, SURROGATES, C3POConfig  # noqa: F401  (KERNELS, SURROGATES: re-exported)
from reroute.c3po.embed import HiddenStateEmbedder, embedder_name, make_embedder, prompt_forward
from reroute.c3po.index import Neighbours, ReferenceIndex, ReferenceIndexError
from reroute.c3po.oracle import optimise_oracle
from reroute.c3po.pathway import Pathway, core_size, critical_layers, own_pathway
from reroute.c3po.surrogates import (
    SurrogateResult,
    core_average,
    kernel_regression,
    kernel_weights,
    mode_finding,
    neighbour_loss,
    neighbourhood_gd,
    official_pathway,
)
from reroute.compat import CACHE_KWARG, cache_holding, find_cache
from reroute.data import Item
from reroute.methods import RoutingMethod, register_method, repeat_rows
from reroute.prefix import PrefixStore
from reroute.scoring import (
    ContinuationBatch,
    PromptKV,
    choice_batch,
    continuation_logprobs,
    continuation_logprobs_from,
    gold_batch,
    prompt_batch,
    shares_prompts,
)


@dataclass
class Adaptation:
    """The adapted routing of a batch of test items.

    Attributes:
        pathway: per-item pathway over the critical layers.
        abstained: ``[B]`` bool, True where the gate kept the base routing.
        neighbours: ``[B, k]`` reference ids (empty for ``mode``/``oracle``).
        gain: ``[B]`` relative fall of the surrogate loss (neighbours' loss for ``ngd``/``kernel``, own gold loss
            for ``oracle``; zero for ``mode``), the quantity the ``min_gain`` gate reads.
        agreement: ``[B]`` mean pairwise cosine similarity of the neighbours' pathways (1 without neighbours), the
            quantity the ``min_agreement`` gate reads.
        confidence: ``[B]`` the base model's largest next-token probability at the last prompt token, the quantity
            the ``max_confidence`` gate reads.
        stats: per-batch cost (forward/backward passes over the batch, seconds) and surrogate diagnostics.
        typicality: ``[B]`` the largest cosine similarity of the item's own pathway (critical layers, every expert)
            to a reference item's stored pathway, the quantity the ``max_typicality`` gate reads; ``None`` without an
            index (the oracle).
        holdout_gain: ``[B]`` the leave-one-out check over the neighbours (kernel regression; see
            :func:`~reroute.c3po.surrogates.holdout_gain`), the quantity the ``min_holdout_gain`` gate reads; ``None``
            for the other surrogates.
        gates: per item, the gate that kept the base routing (the first of :data:`GATES` that fired, in that order)
            or ``None`` where the item was adapted.
    """

    pathway: Pathway
    abstained: torch.Tensor
    neighbours: torch.Tensor
    stats: dict[str, float]
    gain: torch.Tensor | None = None
    agreement: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    gates: list[str | None] | None = None
    holdout_gain: torch.Tensor | None = None
    typicality: torch.Tensor | None = None


GATES = ("confidence", "typical", "agreement", "gain", "holdout")
"""C3PO's do-no-harm gates in the order they are checked (``max_confidence``, ``max_typicality``, ``min_agreement``,
``min_gain``, ``min_holdout_gain``); an item's reported gate is the first that fired (the confidence and typicality
gates skip the surrogate, so its gains are 0 too)."""


class C3PO(RoutingMethod):
    """Collaborative pathway optimisation for a batch of test items at a time (all items adapt in one pass)."""

    resources = {
        "index": "reference index: a ReferenceIndex, its folder, or 'testbed' (the testbed's, built and cached)",
        "embedder": "retrieval embedder when it is not the one the index records",
        "reference_size": "reference items run to build index='testbed' (default 800)",
    }

    def __init__(
        self,
        rm: RoutedModel,
        index: ReferenceIndex | None,
        tokenizer: Any,
        config: C3POConfig | None = None,
        embedder: Any = None,
        **overrides: Any,
    ) -> None:
        self.rm, self.index, self.tokenizer = rm, index, tokenizer
        self.config = replace(config, **overrides) if config is not None else C3POConfig(**overrides)
        self.layers = critical_layers(rm, self.config.critical_layers)
        self.n_core = core_size(rm.num_experts, self.config.core_experts)
        self.layer_pos = [rm.moe_layers.index(layer) for layer in self.layers]
        # the neighbours' prefix states across calls (neighbours recur from batch to batch)
        self.prefix_store = PrefixStore(int(self.config.prefix_cache_mib * 2**20))
        if self.config.surrogate != "oracle":
            if index is None:
                raise ValueError(f"surrogate {self.config.surrogate!r} needs a reference index")
            index.require_nonempty()
            spec = embedder if embedder is not None else _embedder_spec(index)
            index._check_compatible(rm.fingerprint(), embedder_name(spec))  # before anything is loaded
            self.embedder = make_embedder(spec)
            index._check_compatible(rm.fingerprint(), self.embedder.name)
            if self.config.k > len(index):
                raise ReferenceIndexError(f"k={self.config.k} exceeds the {len(index)} items in the reference index")

    # --------------------------------------------------------------------------------------------- adapt
    def adapt(
        self,
        items: Sequence[Item] | Sequence[str],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Adaptation:
        """Find each item's pathway (items: dicts with a prompt — and a label for the oracle — or prompt strings).

        ``input_ids``/``attention_mask`` (left-padded ``[B, P]``, optional): the prompts' tokens, used as given for
        the model's forwards instead of tokenizing the prompts (the prompt texts then serve retrieval only).
        """
        return self._adapt(items, input_ids, attention_mask)[0]

    def _adapt(
        self,
        items: Sequence[Item] | Sequence[str],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_columns: int | None = None,
    ) -> tuple[Adaptation, tuple[ContinuationBatch, PromptKV] | None]:
        """:meth:`adapt`; with ``prefix_columns``, also the prompt batch and the KV of its first ``prefix_columns``
        columns from the prompt forward (the routing there is the base model's, which the adaptation leaves as it
        is when it re-mixes from column ``prefix_columns`` on), for scoring to reuse."""
        items = [{"prompt": x} if isinstance(x, str) else x for x in items]
        start = time.perf_counter()
        cfg = self.config
        if input_ids is None:
            prompts = prompt_batch(self.tokenizer, [item["prompt"] for item in items])
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            prompts = ContinuationBatch(
                input_ids, mask, torch.zeros_like(input_ids, dtype=torch.bool), input_ids.shape[1]
            )
        retrieves = cfg.surrogate in ("ngd", "kernel", "official")
        # one prompt forward gives the pathway, the confidence and (hidden-state retrieval on the prompt) the query
        shared_query = (
            retrieves and self.embedder.name == HiddenStateEmbedder.name and self.index.query_field == "prompt"
        )
        with self.rm.exclusive("C3PO.adapt"):  # the optimised re-mixing stays on the model between steps
            state = prompt_forward(self.rm, prompts, hidden=shared_query, prefix_columns=prefix_columns)
            own_scores, confidence = state.pathways, state.confidence  # [B, L_all, E], [B]
            own = own_pathway(
                {layer: own_scores[:, p] for layer, p in zip(self.layers, self.layer_pos)}, self.layers, self.n_core
            )
            typicality = self._typicality(own_scores) if cfg.surrogate != "oracle" else None
            stats: dict[str, float] = {"forward_passes": 1.0, "backward_passes": 0.0}
            neighbours = torch.zeros(len(items), 0, dtype=torch.long)
            agreement = torch.ones(len(items))
            zeros = torch.zeros(len(items))
            try:
                if cfg.surrogate == "oracle":
                    result = optimise_oracle(
                        self.rm,
                        gold_batch(self.tokenizer, items),
                        self.layers,
                        self.n_core,
                        cfg.steps,
                        cfg.lr,
                        recompute=self._recompute,
                    )
                elif cfg.surrogate == "mode":
                    pathway, _ = mode_finding(
                        own, own_scores, self.index.pathways, self.layer_pos, cfg.k, cfg.mode_iterations, cfg.mode_alpha
                    )
                    result = SurrogateResult(pathway, zeros, zeros)
                else:
                    if not shared_query:
                        stats["forward_passes"] += 1  # the query embedding
                    found = self._neighbours(items, state.embedding)
                    neighbours = found.ids
                    if cfg.surrogate == "official":
                        stored = self.index.pathways[neighbours][:, :, self.layer_pos]  # [B, k, Lc, E]
                        result = SurrogateResult(official_pathway(stored, found.similarity, self.layers), zeros, zeros)
                    else:
                        agreement = self._agreement(neighbours)
                        result = self._neighbour_surrogate(own, found, self._skips(confidence, typicality))
                        stats["surrogate_items"] = result.extra.pop("items")
            finally:
                self.rm.clear_mixing(self.layers)
        gain = _relative_gain(result)
        gates = self._gate(gain, agreement, confidence, result.holdout_gain, typicality)
        abstained = torch.tensor([g is not None for g in gates], dtype=torch.bool)
        stats["forward_passes"] += result.forward_passes
        stats["backward_passes"] += result.backward_passes
        stats["seconds"] = time.perf_counter() - start
        stats["abstained"] = float(abstained.float().mean())
        stats.update(result.extra)
        adaptation = Adaptation(
            result.pathway,
            abstained,
            neighbours,
            stats,
            gain,
            agreement.cpu(),
            confidence,
            gates,
            result.holdout_gain,
            typicality,
        )
        return adaptation, None if state.prefix is None else (prompts, state.prefix)

    def _skips(self, confidence: torch.Tensor, typicality: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[B]``: items whose confidence or typicality gate fires before any surrogate work (they keep the base
        routing whatever the surrogate finds, so it is not run for them)."""
        skip = torch.zeros(len(confidence), dtype=torch.bool)
        if self.config.max_confidence is not None:
            skip |= confidence >= self.config.max_confidence
        if self.config.max_typicality is not None and typicality is not None:
            skip |= typicality >= self.config.max_typicality
        return skip

    def _typicality(self, own_scores: torch.Tensor) -> torch.Tensor:
        """Largest cosine similarity ``[B]`` of each item's pathway in the critical layers (``own_scores [B, L_all,
        E]``) to a stored reference pathway: near 1 where the model already routes the item as it routed an item it
        answered correctly."""
        own = torch.nn.functional.normalize(own_scores[:, self.layer_pos].flatten(1).float(), dim=-1)
        stored = self.index.pathways[:, self.layer_pos].flatten(1).float()
        return (own @ torch.nn.functional.normalize(stored, dim=-1).to(own.device).T).max(-1).values.cpu()

    def _neighbour_surrogate(self, own: Pathway, found: Neighbours, skip: torch.Tensor) -> SurrogateResult:
        """Kernel regression or NGD for the items not skipped; skipped items keep their own pathway (gain 0).
        Pass counts are per item of the whole batch (``k`` neighbour rows per adapted item)."""
        cfg = self.config
        todo = (~skip).nonzero()[:, 0]
        rows = len(skip)
        before, after = torch.zeros(rows), torch.zeros(rows)
        if len(todo) == 0:
            holdout = torch.zeros(rows) if cfg.surrogate == "kernel" else None
            return SurrogateResult(own, before, after, extra={"items": 0.0}, holdout_gain=holdout)
        sub_own = own.select(todo)
        neighbours = found.ids[todo]
        weights = kernel_weights(found.similarity[todo], cfg.kernel, cfg.bandwidth)
        batch, positions = self._neighbour_batch(neighbours)
        if cfg.surrogate == "kernel":
            stored = self.index.pathways[neighbours]  # [b, k, L_all, E]
            target = core_average(stored, self.layer_pos, sub_own.experts, self.layers, weights)
            result = kernel_regression(
                self.rm,
                sub_own,
                target,
                batch,
                weights,
                positions,
                cfg.kernel_alphas,
                self._recompute,
                self.prefix_store,
            )
        else:
            result = neighbourhood_gd(
                self.rm,
                sub_own,
                batch,
                weights,
                positions,
                cfg.steps,
                cfg.lr,
                recompute=self._recompute,
                store=self.prefix_store,
            )
        logits = {layer: own.logits[layer].clone() for layer in own.layers}
        for layer in own.layers:
            logits[layer][todo] = result.pathway.logits[layer].to(logits[layer].device)
        before[todo], after[todo] = result.loss_before.float(), result.loss_after.float()
        holdout = None
        if result.holdout_gain is not None:
            holdout = torch.zeros(rows)
            holdout[todo] = result.holdout_gain.float()
        share = cfg.k * len(todo) / rows
        return SurrogateResult(
            Pathway(list(own.layers), own.experts, logits),
            before,
            after,
            forward_passes=result.forward_passes * share,
            backward_passes=result.backward_passes * share,
            extra={**result.extra, "items": float(len(todo))},
            holdout_gain=holdout,
        )

    def clear_prefix_cache(self) -> None:
        """Drop the neighbours' prefix states kept across calls (``prefix_cache_mib``). Not needed after changes the
        cache sees (weights updated in place or replaced, the model moved, routing state changed); needed after
        editing weights through ``tensor.data``, which PyTorch does not track."""
        self.prefix_store.clear()

    @property
    def _recompute(self) -> str:
        return self.config.recompute if self.config.reuse_prefix else "full"

    def _neighbours(self, items: Sequence[Item], queries: torch.Tensor | None = None) -> Neighbours:
        if queries is None:
            queries = self.embedder(self.rm, self.tokenizer, self.index.query_texts(items))
        # the authors' released code keeps every neighbour, near-duplicates included
        exclude_above = float("inf") if self.config.surrogate == "official" else self.config.exclude_above
        found = self.index.search(queries, self.config.k, exclude_above)
        if (found.ids < 0).any():
            raise ReferenceIndexError(
                f"fewer than k={self.config.k} neighbours left after excluding near-duplicates "
                f"(similarity > {self.config.exclude_above}); lower k or grow the reference set"
            )
        return found

    def _agreement(self, neighbours: torch.Tensor) -> torch.Tensor:
        """Mean pairwise cosine similarity of the neighbours' pathways in the critical layers ``[B]``."""
        stored = self.index.pathways[neighbours][:, :, self.layer_pos].flatten(2)  # [B, k, Lc*E]
        unit = torch.nn.functional.normalize(stored, dim=-1)
        sim = unit @ unit.transpose(1, 2)
        k = sim.shape[-1]
        if k == 1:
            return torch.ones(len(sim))
        return (sim.sum((1, 2)) - k) / (k * (k - 1))

    def _neighbour_batch(self, neighbours: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Neighbours' prompts + gold answers, ``B * k`` rows item-major, and the re-mixed positions ``[1, n]``."""
        flat = [self.index.items[int(i)] for i in neighbours.reshape(-1)]
        batch = gold_batch(self.tokenizer, flat).to(self.rm.model.device)
        return batch, self._last_positions(batch.prompt_len)

    def _unmixed_columns(self, prompt_len: int) -> int | None:
        """How many first prompt columns no re-mixing touches (the prompt forward's KV of them serves the scoring
        or generation forward); ``None`` when the re-mixing starts at the first column."""
        first_remixed = int(self._last_positions(prompt_len)[0, 0])
        return first_remixed if first_remixed > 0 else None

    def _last_positions(self, prompt_len: int) -> torch.Tensor:
        n = min(self.config.last_tokens, prompt_len)
        return torch.arange(prompt_len - n, prompt_len)[None]

    def _gate(
        self,
        gain: torch.Tensor,
        agreement: torch.Tensor,
        confidence: torch.Tensor,
        holdout: torch.Tensor | None,
        typicality: torch.Tensor | None,
    ) -> list[str | None]:
        """Per item, the first of :data:`GATES` that fired (the item keeps the base routing), ``None`` elsewhere."""
        cfg = self.config
        rows = len(agreement)
        fired = {name: torch.zeros(rows, dtype=torch.bool) for name in GATES}
        if cfg.surrogate == "official":  # the authors' released code has no gate
            return [None] * rows
        if cfg.max_confidence is not None and cfg.surrogate != "oracle":
            fired["confidence"] = confidence.cpu() >= cfg.max_confidence
        if cfg.max_typicality is not None and typicality is not None and cfg.surrogate != "oracle":
            fired["typical"] = typicality >= cfg.max_typicality
        if cfg.min_agreement is not None:
            fired["agreement"] = agreement.cpu() < cfg.min_agreement
        if cfg.min_gain is not None and cfg.surrogate in ("ngd", "kernel"):
            fired["gain"] = gain <= cfg.min_gain
        if cfg.min_holdout_gain is not None and holdout is not None:
            fired["holdout"] = holdout <= cfg.min_holdout_gain
        return [next((name for name in GATES if bool(fired[name][i])), None) for i in range(rows)]

    # --------------------------------------------------------------------------------------------- apply
    def apply(self, adaptation: Adaptation, prompt_len: int, total_len: int | None = None) -> None:
        """Install the adapted routing for a batch whose prompts end at column ``prompt_len - 1`` (abstaining
        items get no re-mixing at all, so they route exactly as the base model).

        ``total_len``: the columns the batch will reach (prompt + continuation or generated tokens); the
        ``official`` surrogate re-mixes every token from the last prompt token up to there, as the authors' code
        re-mixes the last token of every forward.
        """
        if self.config.surrogate == "official" and total_len is not None:
            positions = torch.arange(prompt_len - 1, total_len)[None]
        else:
            positions = self._last_positions(prompt_len)
        positions = positions.expand(len(adaptation.abstained), -1).clone()
        positions[adaptation.abstained] = -1
        adaptation.pathway.apply(self.rm, positions)

    def score_choices(self, items: Sequence[Item], adaptation: Adaptation | None = None) -> list[int]:
        """Multiple-choice predictions with each item's adapted routing at its last prompt token(s)."""
        return self._choice_scores(items, adaptation).argmax(-1).tolist()

    def _choice_scores(self, items: Sequence[Item], adaptation: Adaptation | None = None) -> torch.Tensor:
        """Summed log-likelihood of each choice ``[B, n_choices]`` under each item's adapted routing.

        Without ``adaptation``, the scoring reuses the prompt forward's KV cache of the columns before the first
        re-mixed one (they route as the base model in both forwards), so each prompt passes through the model once:
        the scoring forward runs only the re-mixed column(s) and the choices."""
        batch, n_choices = choice_batch(self.tokenizer, items)
        self._check_context(batch.input_ids.shape[1], "a prompt with its longest choice")
        shared = None
        if adaptation is None:
            adaptation, shared = self._adapt(items, prefix_columns=self._unmixed_columns(batch.prompt_len))
        prefix = shared[1] if shared is not None and shares_prompts(batch, shared[0]) else None
        with self.rm.exclusive("C3PO.score_choices"):  # the re-mixing stays on the model for the forward
            self.apply(adaptation, batch.prompt_len, total_len=batch.input_ids.shape[1])
            try:
                with torch.no_grad(), self.rm.row_expansion(n_choices):  # each item's choices: consecutive rows
                    batch = batch.to(self.rm.model.device)
                    if prefix is None:
                        scores = continuation_logprobs(self.rm.model, batch)
                    else:
                        scores = continuation_logprobs_from(self.rm.model, batch, prefix)
            finally:
                self.rm.clear_mixing(self.layers)
        return scores.view(len(items), n_choices)

    def _check_context(self, length: int, what: str) -> None:
        limit = getattr(self.rm.model.config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"{what} takes {length} tokens; the model's context is {limit}: shorten the prompt or use fewer "
                "few-shot examples"
            )

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adaptation: Adaptation | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """``model.generate`` with each prompt's adapted routing at its last prompt token(s).

        Give ``prompts`` (left-padded here) or left-padded ``input_ids``/``attention_mask``, which the model runs as
        given (never decoded and re-encoded; a text embedder retrieves neighbours by their decoded text). Rows
        created by ``num_return_sequences`` share their prompt's adaptation (computed once per prompt).

        Without ``adaptation``, and where ``generate()`` would start from an empty dynamic cache (no cache, static
        cache or beams asked for, one sequence per prompt), it starts from the KV cache the adaptation's prompt
        forward kept of the columns before the first re-mixed one, so its prefill runs only the re-mixed column(s).
        """
        if prompts is None:
            if input_ids is None:
                raise ValueError("give prompts or input_ids")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "C3PO.generate needs left-padded input_ids (every row's prompt ends at the last column)"
                )
            # the model runs on input_ids as given; the decoded text only serves a text embedder's retrieval
            texts = [
                self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                for row, mask in zip(input_ids, attention_mask)
            ]
        else:
            batch = prompt_batch(self.tokenizer, prompts)
            input_ids, attention_mask = batch.input_ids, batch.attention_mask
            texts = list(prompts)
        prompt_len = input_ids.shape[1]
        shared = None
        if adaptation is None:
            reuse = self._starts_from_an_empty_dynamic_cache(generate_kwargs)
            tokens = {} if prompts is not None else {"input_ids": input_ids, "attention_mask": attention_mask}
            columns = self._unmixed_columns(prompt_len) if reuse else None
            adaptation, shared = self._adapt(texts, **tokens, prefix_columns=columns)
        device = self.rm.model.device
        if shared is not None:  # the prompt forward ran these very tokens
            generate_kwargs = {**generate_kwargs, CACHE_KWARG: cache_holding(shared[1])}
        with self.rm.exclusive("C3PO.generate"):  # the re-mixing stays on the model across generate()'s forwards
            self.apply(adaptation, prompt_len, total_len=prompt_len + self._new_tokens(prompt_len, generate_kwargs))
            try:
                with torch.no_grad():
                    return self.rm.model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **generate_kwargs
                    )
            finally:
                self.rm.clear_mixing(self.layers)

    def _starts_from_an_empty_dynamic_cache(self, generate_kwargs: dict[str, Any]) -> bool:
        """Whether ``generate(**generate_kwargs)`` would decode one sequence per prompt from an empty dynamic KV
        cache, so that a cache holding the prompt's first columns can stand in for it (not with a cache, a cache
        implementation, beams, several sequences per prompt, assisted or custom decoding)."""
        if find_cache(generate_kwargs) is not None:
            return False
        if any(generate_kwargs.get(name) is not None for name in ("assistant_model", "custom_generate")):
            return False
        config = generate_kwargs.get("generation_config") or self.rm.model.generation_config

        def setting(name: str, default: Any) -> Any:
            value = generate_kwargs.get(name, getattr(config, name, default))
            return default if value is None else value

        return (
            setting("use_cache", True) is True
            and setting("cache_implementation", "dynamic") == "dynamic"
            and setting("num_beams", 1) == 1
            and setting("num_return_sequences", 1) == 1
            and setting("prompt_lookup_num_tokens", 0) == 0
        )

    def _new_tokens(self, prompt_len: int, generate_kwargs: dict[str, Any]) -> int:
        """The most tokens ``generate`` will add (``max_new_tokens``, else ``max_length`` minus the prompt)."""
        if generate_kwargs.get("max_new_tokens") is not None:
            return int(generate_kwargs["max_new_tokens"])
        config = generate_kwargs.get("generation_config") or self.rm.model.generation_config
        if getattr(config, "max_new_tokens", None) is not None:
            return int(config.max_new_tokens)
        length = generate_kwargs.get("max_length") or getattr(config, "max_length", None) or prompt_len + 20
        return max(int(length) - prompt_len, 0)

    def neighbour_losses(self, items: Sequence[Item], adaptation: Adaptation) -> torch.Tensor:
        """The kernel-weighted neighbour loss ``[B]`` of an adaptation (diagnostics)."""
        if adaptation.neighbours.numel() == 0:
            raise ValueError("this adaptation has no neighbours (mode finding or oracle)")
        found = self.index.search(self.embedder(self.rm, self.tokenizer, self.index.query_texts(items)), self.config.k)
        weights = kernel_weights(found.similarity, self.config.kernel, self.config.bandwidth)
        batch, positions = self._neighbour_batch(adaptation.neighbours)
        with self.rm.exclusive("C3PO.neighbour_losses"):
            try:
                with torch.no_grad():
                    return neighbour_loss(self.rm, adaptation.pathway, batch, weights, positions).cpu()
            finally:
                self.rm.clear_mixing(self.layers)

    # --------------------------------------------------------------------------------------------- protocol
    @classmethod
    def from_config(
        cls,
        rm: RoutedModel,
        tokenizer: Any,
        config: C3POConfig,
        index: ReferenceIndex | str | Path | None = None,
        embedder: Any = None,
        reference_size: int = 800,
    ) -> C3PO:
        """C3PO for the registry: ``index`` a :class:`ReferenceIndex`, a folder holding one, or ``"testbed"``."""
        if isinstance(index, str) and index == "testbed":
            from reroute.testbed.reference import DEFAULT_EMBEDDER, reference_index

            embedder = DEFAULT_EMBEDDER if embedder is None else embedder
            if not isinstance(embedder, str):
                raise ValueError("index='testbed' builds the testbed's index: pass the embedder as a name")
            index = reference_index(rm, tokenizer, n=int(reference_size), embedder=embedder)
        elif index is not None and not isinstance(index, ReferenceIndex):
            index = ReferenceIndex.load(index, rm)
        return cls(rm, index, tokenizer, config, embedder=embedder)

    @classmethod
    def check_options(cls, config: C3POConfig, resources: dict[str, Any]) -> None:
        index = resources.get("index")
        if index is None and config.surrogate not in ("mode", "oracle"):
            raise ValueError("C3PO needs index=<reference index folder> (or index=testbed on the testbed)")
        if isinstance(index, (str, Path)) and str(index) != "testbed" and not Path(index).is_dir():
            raise FileNotFoundError(f"no reference index folder {index}")

    @classmethod
    def reads_labels(cls, config: C3POConfig) -> bool:
        return config.surrogate == "oracle"

    def adapt_contexts(self, items: Sequence[Item], prompts: ContinuationBatch) -> Adaptation:
        adaptation = self.adapt(items)
        rows = len(items)
        self.add_stats(
            forward_passes=adaptation.stats["forward_passes"] * rows,
            backward_passes=adaptation.stats["backward_passes"] * rows,
            abstained=float(adaptation.abstained.sum()),
        )
        return adaptation

    def split_state(self, state: Adaptation, rows: int) -> list[Adaptation]:
        def row(values: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if values is None else values[i : i + 1]

        return [
            Adaptation(
                state.pathway.select([i]),
                state.abstained[i : i + 1],
                state.neighbours[i : i + 1],
                state.stats,
                row(state.gain, i),
                row(state.agreement, i),
                row(state.confidence, i),
                None if state.gates is None else state.gates[i : i + 1],
                row(state.holdout_gain, i),
                row(state.typicality, i),
            )
            for i in range(rows)
        ]

    def stack_states(self, states: Sequence[Adaptation]) -> Adaptation:
        first = states[0].pathway
        pathway = Pathway(
            list(first.layers),
            {layer: torch.cat([s.pathway.experts[layer] for s in states]) for layer in first.layers},
            {layer: torch.cat([s.pathway.logits[layer] for s in states]) for layer in first.layers},
        )

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(s, name) for s in states]
            return None if any(v is None for v in values) else torch.cat(values)

        gates = None if any(s.gates is None for s in states) else [g for s in states for g in s.gates]
        return Adaptation(
            pathway,
            torch.cat([s.abstained for s in states]),
            torch.cat([s.neighbours for s in states]),
            {},
            cat("gain"),
            cat("agreement"),
            cat("confidence"),
            gates,
            cat("holdout_gain"),
            cat("typicality"),
        )

    def gate_report(self, state: Adaptation) -> dict[str, list[Any]] | None:
        """Per item: ``gate`` (the gate that kept the base routing, ``None`` where adapted) and what the gates read
        (``confidence``, ``typicality``, ``gain``, ``agreement``; ``holdout_gain`` for kernel regression)."""
        if state.gates is None:
            return None
        report: dict[str, list[Any]] = {"gate": list(state.gates)}
        for name in ("confidence", "typicality", "gain", "agreement", "holdout_gain"):
            values = getattr(state, name)
            if values is not None:
                report[name] = [float(v) for v in values.reshape(-1)]
        return report

    @contextlib.contextmanager
    def applied(self, state: Adaptation | None, batch: ContinuationBatch) -> Iterator[None]:
        if state is None:
            yield
            return
        copies = repeat_rows(len(state.abstained), batch.input_ids.shape[0])
        with self.rm.exclusive("C3PO.applied"):  # the re-mixing stays on the model for the block's forwards
            self.apply(state, batch.prompt_len)
            try:
                with self.rm.row_expansion(copies):  # each item's state covers its consecutive rows (item-major)
                    yield
            finally:
                self.rm.clear_mixing(self.layers)

    def generate_from(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any = None, **generate_kwargs: Any
    ) -> Any:
        return self.generate(input_ids=input_ids, attention_mask=attention_mask, adaptation=state, **generate_kwargs)


def _relative_gain(result: SurrogateResult) -> torch.Tensor:
    before, after = result.loss_before.detach().float().cpu(), result.loss_after.detach().float().cpu()
    return (before - after) / before.abs().clamp(min=1e-8)


def _embedder_spec(index: ReferenceIndex) -> Any:
    """The embedder to query ``index`` with when the caller passed none: the one given when the index was built or
    loaded, or a built-in one (the model itself or model-free). Never a model named only by the index's file."""
    if index.embedder is not None:
        return index.embedder
    if index.embedder_name in ("hidden-mean", "routing-pathway") or index.embedder_name.startswith("lexical-"):
        return index.embedder_name
    name = index.embedder_name.split(":", 1)[1] if ":" in index.embedder_name else index.embedder_name
    raise ReferenceIndexError(
        f"the index was built with the external embedder {index.embedder_name}; reroute does not load a model named "
        f"only by an index file: pass embedder={name!r} (or the embedder object) to confirm it"
    )


register_method("c3po", C3POConfig, C3PO)
