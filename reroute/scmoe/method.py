"""SCMoE self-contrast decoding (Shi et al., "Unchosen Experts Can Contribute Too", NeurIPS 2024, arXiv 2405.14507).

>>> scmoe = reroute.SCMoE(rm, beta=0.5, alpha=0.1, weak="rank2")
>>> out = scmoe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64)
>>> out = model.generate(**inputs, custom_generate=reroute.scmoe_generate, beta=0.5, weak="rank2")

Each step contrasts the next-token logits of the model's own ("strong") routing with those of a "weak" routing of
the same model (rank-k single expert, a smaller top-k, or one random expert) on the plausible tokens (§2.3,
Eq. 5-6); logits processors (temperature, top-k, top-p, ...) then act on the contrasted logits, and tokens are
chosen greedily or sampled as in ``generate()``.

Two designs compute the two logits per step (``SCMoEConfig.design``):

* ``"one-batch"`` (default): every row runs twice in one forward of ``2B`` rows — row ``2b`` strong, row
  ``2b + 1`` weak (the ``repeat_interleave`` layout, so per-row routing state set for ``B`` rows lines up) — with
  the weak policy on the odd rows only. One KV cache of ``2B`` rows (a static cache too: it allocates itself for
  ``2B`` rows at the prefill), one forward per step.
* ``"two-pass"``: two streams with two KV caches and two forwards per step, as the official implementation. It
  keeps a layer policy the user set for the strong pass.

With ``cache_implementation="static"`` both designs decode with the compiled step, as ``generate()`` does.

``benchmarks/bench_scmoe.py`` measures both. On CPU the one-batch design costs about 1.2-1.4x greedy's decode
time per token against 1.5-2.4x for two passes (batch 1 and 8, tiny and testbed-sized OLMoE), so it is the default.

Unlike the official code, EOS is not forced to ``-inf`` by default: generation stops at EOS (per row) and
``max_new_tokens`` exactly as ``generate()`` does. ``allow_eos=False`` reproduces the official code (EOS always
``-inf`` unless its ``--early_stop``); where EOS was a row's only plausible token, that row then takes the strong
logits' most likely token other than EOS (the official greedy loop would take token id 0).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from reroute.attach import RoutedModel, attach
from reroute.generation import DecodingMethod, ModelStream, check_prompt
from reroute.methods import RoutingMethod, register_method
from reroute.routing.policy import RoutingPolicy
from reroute.scmoe.config import SCMoEConfig
from reroute.scmoe.weak import RandomExperts, WeakRouting
from reroute.scoring import ContinuationBatch, padded_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer
    from transformers.generation.utils import GenerateDecoderOnlyOutput


def suppress_tokens(contrast: torch.Tensor, strong: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``contrast [B, V]`` with ``tokens`` (long ``[n]``) at ``-inf`` (the official code's EOS ban). A row left
    with no finite logit falls back to ``strong`` with the same tokens banned, so it never decodes from ``-inf``."""
    contrast = contrast.index_fill(-1, tokens, float("-inf"))
    empty = torch.isinf(contrast).all(dim=-1, keepdim=True)
    fallback = strong.float().index_fill(-1, tokens, float("-inf"))
    return torch.where(empty, fallback, contrast)


def self_contrast(strong: torch.Tensor, weak: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE's next-token logits (paper §2.3, Eq. 5-6), ``[B, V]`` in float32.

    ``(1 + beta) * strong - beta * weak`` where ``strong >= log(alpha) + max(strong)`` (the tokens whose strong
    probability is at least ``alpha`` times the most likely one's), ``-inf`` elsewhere. Raw logits are used, not
    log-probabilities: per row the two differ by a constant, so arg-max and softmax are the same.
    """
    strong, weak = strong.float(), weak.float()
    cutoff = strong.max(dim=-1, keepdim=True).values + math.log(alpha)
    contrast = (1.0 + beta) * strong - beta * weak
    return contrast.masked_fill(strong < cutoff, float("-inf"))


class _Contrast:
    """Shared by both designs: the weak routing, random-1's draws, the contrast."""

    cache = None  # the strong and weak caches together describe the rows; generate() gets neither
    late_stop = True  # a step yields only its contrast: one beyond the end is harmless (decode's LateStop)

    def __init__(self, method: SCMoE, generation_config: GenerationConfig) -> None:
        self.rm, self.weak, self.config = method.rm, method.weak, method.config
        self.draws = method.new_draws()
        eos = generation_config._eos_token_tensor if not self.config.allow_eos else None
        self.banned = None if eos is None else eos.reshape(-1)

    def close(self) -> None:
        """Called by the method's ``finish`` after each call: undo what the scorer left on the layers."""

    def contrast(self, strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
        contrast = self_contrast(strong, weak, self.config.beta, self.config.alpha)
        if self.banned is not None:
            contrast = suppress_tokens(contrast, strong, self.banned.to(contrast.device))
        return contrast


class _TwoPass(_Contrast):
    """Strong and weak passes as two streams with two KV caches (the official implementation's layout)."""

    def __init__(self, method: SCMoE, stream: ModelStream) -> None:
        super().__init__(method, stream.generation_config)
        self.strong, self.weak_stream = stream, stream.fork()

    def _weak(self, run: Callable[[torch.LongTensor], torch.Tensor], input_ids: torch.LongTensor) -> torch.Tensor:
        with self.weak.applied(self.rm, input_ids.shape[0], draws=self.draws):
            return run(input_ids)

    def prefill(self, input_ids: torch.LongTensor) -> torch.Tensor:
        strong = self.strong.prefill(input_ids)
        return self.contrast(strong, self._weak(self.weak_stream.prefill, input_ids))

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        strong = self.strong.step(input_ids)
        return self.contrast(strong, self._weak(self.weak_stream.step, input_ids))


class _OneBatch(_Contrast):
    """Strong row ``2b`` and weak row ``2b + 1`` of every row ``b`` in one forward (one KV cache of 2B rows).

    The rows never change during a call, so the weak routing is set once, at the prefill, and stays until
    :meth:`close` (the method's ``finish``): a decode step then runs the model and the contrast, with no routing
    state written between steps (on the compiled path every write would be host work per token)."""

    def __init__(self, method: SCMoE, stream: ModelStream) -> None:
        super().__init__(method, stream.generation_config)
        try:
            self.stream = stream.expand(2)
        except ValueError as exc:
            raise ValueError(f"{exc}, or SCMoE's design='two-pass'") from exc
        self._weak_state = contextlib.ExitStack()

    def _run(self, run: Callable[[torch.LongTensor], torch.Tensor], input_ids: torch.LongTensor) -> torch.Tensor:
        logits = run(input_ids.repeat_interleave(2, dim=0))
        return self.contrast(logits[0::2], logits[1::2])

    def prefill(self, input_ids: torch.LongTensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        weak_rows = torch.tensor([False, True], device=input_ids.device).repeat(rows)
        self._weak_state.enter_context(self.weak.applied(self.rm, 2 * rows, rows=weak_rows, draws=self.draws))
        return self._run(self.stream.prefill, input_ids)

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self._run(self.stream.step, input_ids)

    def close(self) -> None:
        """Put the layers' routing back as it was before the prefill."""
        self._weak_state.close()


class SCMoE(DecodingMethod, RoutingMethod):
    """Self-contrast decoding on an attached model.

    Args:
        rm: the attached model; its current routing (offsets, masks, per-row state) is the strong routing.
        config: an :class:`SCMoEConfig`; or pass its fields as keyword arguments (``beta=0.3, weak="rank3"``),
            which also override a given config's fields.

    Raises ``ValueError`` for a weak routing the model cannot run (rank or top-k beyond its experts, weak top-k
    above the strong top-k) and warns when the weak routing equals the strong one.
    """

    reports_ties = True  # a continuation's implausible tokens score by the strong routing: choices may still tie

    def __init__(self, rm: RoutedModel, config: SCMoEConfig | None = None, **overrides: Any) -> None:
        self.rm = rm
        self.config = replace(config, **overrides) if config is not None else SCMoEConfig(**overrides)
        self.weak = WeakRouting.resolve(rm, self.config.weak, self.config.layers)

    def scorer(self, stream: ModelStream) -> _OneBatch | _TwoPass:
        return _OneBatch(self, stream) if self.config.design == "one-batch" else _TwoPass(self, stream)

    def finish(self, scorer: _OneBatch | _TwoPass) -> None:
        scorer.close()

    def new_draws(self) -> RandomExperts | None:
        """random-1's experts for one call (a generator seeded from ``config.seed``); ``None`` for other weak
        routings."""
        return RandomExperts(self.rm, self.weak.layers, self.config.seed) if self.weak.random else None

    def _teacher_forced(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Strong and weak next-token logits ``[B, T - 1, V]`` of a padded batch ``[B, T]``, no gradient."""
        check_prompt(self.rm.model, input_ids)
        with torch.no_grad():
            strong = padded_logits(self.rm.model, input_ids, attention_mask)[:, :-1]
            with self.weak.applied(self.rm, input_ids.shape[0], draws=self.new_draws()):
                weak = padded_logits(self.rm.model, input_ids, attention_mask)[:, :-1]
        return strong.float(), weak.float()

    def contrasted_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced contrast of a padded batch ``[B, T]``: the next-token logits ``[B, T - 1, V]`` after each
        position, from a strong and a weak forward of the whole rows (``-inf`` outside the plausible set); no
        gradient. To score given continuations use :meth:`scoring_logprobs`, which is finite everywhere."""
        strong, weak = self._teacher_forced(input_ids, attention_mask)
        rows, vocab = strong.shape[0], strong.shape[-1]
        beta, alpha = self.config.beta, self.config.alpha
        contrast = self_contrast(strong.reshape(-1, vocab), weak.reshape(-1, vocab), beta, alpha)
        return contrast.view(rows, -1, vocab)

    def scoring_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[B, T - 1, V]`` for scoring given continuations (multiple choice, log-likelihood) of
        a padded batch ``[B, T]``: the log-softmax of the contrast where a token is plausible, the strong
        log-probability where it is not (the contrastive-decoding literature's scoring rule). Finite everywhere,
        so a choice with an implausible token scores low instead of ``-inf`` and choices are never ranked by
        ``-inf`` (with ``-inf`` scores every choice ties and arg-max picks the first)."""
        strong, weak = self._teacher_forced(input_ids, attention_mask)
        rows, vocab = strong.shape[0], strong.shape[-1]
        beta, alpha = self.config.beta, self.config.alpha
        contrast = self_contrast(strong.reshape(-1, vocab), weak.reshape(-1, vocab), beta, alpha).view(rows, -1, vocab)
        return torch.where(
            torch.isfinite(contrast), torch.log_softmax(contrast, dim=-1), torch.log_softmax(strong, dim=-1)
        )

    def next_token_logits(self, batch: ContinuationBatch, state: Any = None) -> torch.Tensor:
        """The contrast of :meth:`contrasted_logits` (SCMoE adapts nothing, so ``state`` is ``None``)."""
        return self.contrasted_logits(batch.input_ids, batch.attention_mask)

    def next_token_logprobs(self, batch: ContinuationBatch, state: Any = None) -> torch.Tensor:
        """The protocol's scoring: :meth:`scoring_logprobs` (finite everywhere, unlike the contrast)."""
        return self.scoring_logprobs(batch.input_ids, batch.attention_mask)

    def generate_from(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: Any = None, **generate_kwargs: Any
    ) -> Any:
        return self.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def __repr__(self) -> str:
        c = self.config
        layers = list(self.weak.layers)
        return f"SCMoE(beta={c.beta}, alpha={c.alpha}, weak={c.weak!r}, layers={layers}, design={c.design!r})"


register_method("scmoe", SCMoEConfig, SCMoE)


def scmoe_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    beta: float = 0.5,
    alpha: float = 0.1,
    weak: str | RoutingPolicy = "rank2",
    layers: Sequence[int] | None = None,
    design: str = "one-batch",
    seed: int | None = None,
    allow_eos: bool = True,
    scmoe_config: SCMoEConfig | None = None,
    token_streamer: BaseStreamer | None = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """SCMoE as a ``custom_generate`` callable:
    ``model.generate(**inputs, custom_generate=reroute.scmoe_generate, beta=0.5, alpha=0.1, weak="rank2")``.

    ``generate()`` forwards the keyword arguments this function declares beyond its standard decoding-method
    signature (``beta``, ``alpha``, ``weak``, ``layers``, ``design``, ``seed``, ``allow_eos``, ``scmoe_config``,
    ``token_streamer``; transformers 5.17 to 5.25); ``scmoe_config`` replaces the separate hyperparameters. A
    streamer works as ``streamer=`` or ``token_streamer=`` (see :mod:`reroute.generation`). The model is attached
    with :func:`reroute.attach` if it is not yet, and stays attached (with no routing state it computes exactly
    what the original model does).
    """
    config = scmoe_config or SCMoEConfig(
        beta=beta, alpha=alpha, weak=weak, layers=layers, design=design, seed=seed, allow_eos=allow_eos
    )
    method = SCMoE(attach(model), config)
    return method.decoding_method(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        token_streamer=token_streamer,
        **model_kwargs,
    )
