"""A decoding loop for methods that compute their own next-token logits (SCMoE, continuous rerouting).

transformers 5.x lets ``generate()`` hand its prepared inputs to a Python callable
(``model.generate(**inputs, custom_generate=fn, ...)``): it validates the generation config, expands the batch for
``num_return_sequences`` (``repeat_interleave`` layout), builds the logits processors (temperature, top-k, top-p,
repetition penalty, ...) and the stopping criteria (``max_new_tokens``, EOS, stop strings), creates an empty KV
cache, then calls ``fn(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=...,
**extra_kwargs, **model_kwargs)``. A method only has to say how the next-token logits of each row are computed:

* :class:`ModelStream` is one stream of forwards with its own KV cache, the per-step model work of
  ``GenerationMixin._sample`` (prefill, then one token per step). Methods run one (rerouting), fork a second one
  with its own cache (SCMoE, two passes) or double its rows (SCMoE, one batch).
* :func:`decode` is the rest of ``_sample``: processors, greedy or multinomial choice, padding of finished rows,
  stopping criteria, streamer, and the same return value as ``generate()``.

A minimal method, equal to plain sampling/greedy decoding::

    def plain(model, input_ids, logits_processor, stopping_criteria, generation_config,
              token_streamer=None, **model_kwargs):
        stream = ModelStream(model, generation_config, model_kwargs)
        return decode(model, input_ids, stream, logits_processor, stopping_criteria, generation_config,
                      streamer=token_streamer)

    model.generate(**inputs, custom_generate=plain, max_new_tokens=32)

Streamers: ``generate()`` (checked in 5.17, 5.24 and 5.25) does not pass its ``streamer=`` argument to a callable
``custom_generate`` — it only puts the prompt into it. :func:`decode` therefore reads that streamer from the running
``generate()`` call (its frame) and streams the new tokens into it and ends it, so ``model.generate(**inputs,
streamer=s, custom_generate=fn)`` streams as it does without ``custom_generate``. Methods also take a streamer as
``token_streamer=`` (an extra keyword that ``generate()`` does forward, see :data:`STREAMER_KWARG`); :func:`decode`
then puts the prompt into it first, as ``generate()`` does for its own streamer. Passing two different streamers
is an error.

Beam search is not implemented by :func:`decode` (``num_beams > 1`` raises); per-row routing state expands under
beam search only in the model's own ``generate()``.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import torch
import transformers.generation.utils
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from reroute.compat import CACHE_NAMES, OUTPUT_CACHE_FIELD, find_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer

STREAMER_KWARG = "token_streamer"
"""Name under which ``custom_generate`` methods of this package take a streamer (``generate()`` keeps its own)."""


class NextTokenScorer(Protocol):
    """What :func:`decode` asks of a method: next-token logits ``[B, V]`` (float32) for every row.

    ``prefill`` is called once with the prompt ``input_ids [B, S]``; ``step`` after each chosen token, with all ids
    so far ``[B, S + t]`` (the new token is the last column). Rows never leave the batch: finished rows keep being
    fed the pad token, as in ``generate()``. ``cache`` is what ``generate()`` returns as the cache when
    ``return_dict_in_generate=True`` (``None`` where no single cache describes the rows).

    A scorer may set ``late_stop = True`` when one step beyond the last is harmless (nothing but the logits comes
    out of a step, or ``drop_last_step()`` undoes the rest): :func:`decode` then learns that every row has finished
    one step late (see :class:`LateStop`), and calls the scorer's ``drop_last_step()``, where it has one, when it
    drops that step.
    """

    cache: Any

    def prefill(self, input_ids: torch.LongTensor) -> torch.Tensor: ...

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor: ...


class ModelStream:
    """One stream of model forwards over a growing batch, with its own KV cache (the model work of one
    ``_sample`` loop).

    Args:
        model: the generating model (decoder-only).
        generation_config: the config ``generate()`` prepared.
        model_kwargs: what ``generate()`` passes on to its decoding method (attention mask, position ids, an empty
            cache, ``use_cache``, ``logits_to_keep``, the user's model kwargs). The stream owns them from now on.
    """

    def __init__(
        self, model: PreTrainedModel, generation_config: GenerationConfig, model_kwargs: dict[str, Any]
    ) -> None:
        self.model = model
        self.generation_config = generation_config
        self.model_kwargs = dict(model_kwargs)
        self.started = False
        self._step_forward: Any = None

    @property
    def cache(self) -> Any:
        """The stream's KV cache (``None`` without one)."""
        return find_cache(self.model_kwargs)

    def _require_fresh(self, what: str) -> None:
        cache = self.cache
        if self.started or (cache is not None and cache.get_seq_length() > 0):
            raise RuntimeError(f"a stream can only {what} before its prefill, from an empty cache")

    def fork(self) -> ModelStream:
        """A second stream over the same rows with its own empty cache of the same kind (before the prefill)."""
        self._require_fresh("fork")
        kwargs = dict(self.model_kwargs)
        for key in CACHE_NAMES:
            if kwargs.get(key) is not None:
                kwargs[key] = copy.deepcopy(kwargs[key])
        return ModelStream(self.model, self.generation_config, kwargs)

    def expand(self, factor: int) -> ModelStream:
        """This stream with every row repeated ``factor`` times in place (row ``b`` becomes rows
        ``b * factor ... b * factor + factor - 1``: the ``repeat_interleave`` layout ``generate()`` uses for
        ``num_return_sequences``), with its own empty cache. Before the prefill only; the cache must size itself
        on first use (a ``DynamicCache``, or a static cache that has not allocated its tensors yet)."""
        self._require_fresh("expand")
        cache = self.cache
        if cache is not None and not isinstance(cache, DynamicCache) and not _sizes_itself(cache):
            raise ValueError(
                f"cannot run {factor}x the rows in a {type(cache).__name__} allocated for the original batch; "
                "use the default dynamic cache"
            )
        _, kwargs = self.model._expand_inputs_for_generation(
            expand_size=factor, is_encoder_decoder=False, **self.fork().model_kwargs
        )
        return ModelStream(self.model, self.generation_config, kwargs)

    def prefill(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Run the prompt ``[B, S]``; next-token logits ``[B, V]`` (float32)."""
        self._require_fresh("prefill")
        outputs = self.model._prefill(input_ids, self.generation_config, self.model_kwargs)
        self.started = True
        return self._consume(outputs)

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Run the last column of ``input_ids [B, T]`` (all of it without a cache); logits ``[B, V]``."""
        if not self.started:
            raise RuntimeError("call prefill() before step()")
        next_sequence_length = 1 if self.model_kwargs.get("use_cache") else None
        inputs = self.model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **self.model_kwargs
        )
        return self._consume(self.step_forward(**inputs, return_dict=True))

    @property
    def step_forward(self) -> Any:
        """The forward of decode steps: as in ``generate()``, the compiled one (``model.get_compiled_call``, a CUDA
        graph replay under the default ``reduce-overhead`` mode) when the cache is compilable (a static cache) and
        the generation config allows it (``compile_config``, ``disable_compile``); the prefill stays eager."""
        if self._step_forward is None:
            compiled = self.model._valid_auto_compile_criteria(self.model_kwargs, self.generation_config)
            self._step_forward = (
                self.model.get_compiled_call(self.generation_config.compile_config) if compiled else self.model.__call__
            )
        return self._step_forward

    def restart(self) -> ModelStream:
        """A stream over the same rows and attention mask with an empty KV cache, to prefill the whole context
        again. A static cache is emptied in place (same tensors: a captured CUDA graph stays valid); any other
        cache is replaced by a new dynamic one."""
        kwargs = dict(self.model_kwargs)
        for key in CACHE_NAMES:
            cache = kwargs.get(key)
            if cache is None:
                continue
            if getattr(cache, "is_compileable", False) and hasattr(cache, "reset"):
                cache.reset()
            else:
                kwargs[key] = DynamicCache(config=self.model.config)
        restarted = ModelStream(self.model, self.generation_config, kwargs)
        restarted._step_forward = self._step_forward
        return restarted

    def _consume(self, outputs: Any) -> torch.Tensor:
        self.model_kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.model_kwargs, is_encoder_decoder=False
        )
        # a copy, so that the (possibly [B, S, V]) prefill logits are not kept alive
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32)


def _sizes_itself(cache: Any) -> bool:
    """Whether ``cache`` allocates its tensors on first use (transformers' static cache does: its batch size comes
    from the first update), so that it can serve a batch of any size before then."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(getattr(layer, "is_initialized", True) is False for layer in layers)


def check_supported(model: PreTrainedModel, generation_config: GenerationConfig) -> None:
    """Raise for generation settings :func:`decode` does not implement (beam search, encoder-decoder models,
    per-step attentions / hidden states)."""
    if model.config.is_encoder_decoder:
        raise ValueError("reroute's decoding loop supports decoder-only models")
    if generation_config.num_beams > 1:
        raise ValueError(
            f"reroute's decoding loop does greedy decoding or sampling, not beam search (num_beams=1); "
            f"got num_beams={generation_config.num_beams}"
        )
    if generation_config.return_dict_in_generate and (
        generation_config.output_attentions or generation_config.output_hidden_states
    ):
        raise ValueError(
            "reroute's decoding loop returns sequences, scores and logits; not attentions or hidden states"
        )


_GENERATE_FILE = os.path.normcase(os.path.abspath(transformers.generation.utils.__file__))


def generate_streamer() -> BaseStreamer | None:
    """The ``streamer=`` of the ``generate()`` call this code runs inside (``None`` without one or outside
    ``generate()``): ``generate()`` keeps it from a callable ``custom_generate`` after putting the prompt into it."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            code = frame.f_code
            if code.co_name == "generate" and os.path.normcase(os.path.abspath(code.co_filename)) == _GENERATE_FILE:
                return frame.f_locals.get("streamer")
            frame = frame.f_back
        return None
    finally:
        del frame


def check_prompt(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Clear errors for prompts ``[B, S]`` the model cannot run — a token id outside its vocabulary, more tokens
    than its context (``max_position_embeddings``) — and transformers' warning for a right-padded batch (a row
    whose last position is padding), before anything runs."""
    vocab = model.get_input_embeddings().num_embeddings
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        bad = int(input_ids.max()) if int(input_ids.max()) >= vocab else int(input_ids.min())
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary of {vocab} tokens; encode with the model's tokenizer"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[-1] > limit:
        raise ValueError(
            f"the prompt has {input_ids.shape[-1]} tokens but the model's context is {limit}; shorten the prompt"
        )
    if attention_mask is not None and attention_mask.dim() == 2 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer.",
            UserWarning,
            stacklevel=3,
        )


LATE_STOP_DEVICES = ("cuda",)
"""Devices where :func:`decode` reads the "every row has finished" flag one step late (where reading it now would
make the host wait for the device every step)."""


class LateStop:
    """Whether every row has finished, read one step late, so that the host never waits for the device.

    Reading a device flag (``bool(unfinished.any())``) blocks the host until the device has run everything queued,
    every step: the host's work for the next step (Python, guards, launches) then never overlaps the device's.
    Here step ``t``'s flag is copied to pinned host memory without waiting and read at step ``t + 1``, when the
    device is already running step ``t + 1`` (transformers' ``generate()`` does the same). The cost: when every row
    finishes before the length limit, one more step runs, whose column :func:`decode` drops. Off CUDA the flag is
    the tensor itself, read one step late the same way (so the CPU tests run the same control flow).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps = 0
        self.pending: torch.Tensor | None = None
        if self.cuda:
            self.slots = [
                (torch.zeros((), dtype=torch.bool, pin_memory=True), torch.cuda.Event(blocking=True)) for _ in range(2)
            ]

    def finished_before(self, finished: torch.Tensor) -> bool:
        """Record this step's flag (a 0-d bool tensor); return the previous step's (``False`` at the first)."""
        first = self.steps == 0
        self.steps += 1
        if not self.cuda:
            previous, self.pending = self.pending, finished
            return previous is not None and bool(previous)
        flag, event = self.slots[self.steps % 2]
        flag.copy_(finished, non_blocking=True)
        event.record()
        if first:
            return False
        flag, event = self.slots[(self.steps + 1) % 2]
        event.synchronize()
        return bool(flag)


def decode(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    scorer: NextTokenScorer,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: BaseStreamer | None = None,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Greedy decoding or sampling with next-token logits from ``scorer`` (the loop of ``GenerationMixin._sample``).

    Per step: ``logits [B, V]`` from the scorer -> ``logits_processor(input_ids, logits)`` (warpers included when
    sampling) -> arg-max or a multinomial draw -> finished rows get the pad token -> stopping criteria. The scorer
    runs again only while some row is unfinished, so no forward is wasted after the last token.

    Args:
        input_ids: ``[B, S]`` prompts, already expanded for ``num_return_sequences`` by ``generate()``.
        scorer: the method's next-token logits (see :class:`NextTokenScorer`).
        logits_processor, stopping_criteria, generation_config: as ``generate()`` passes them.
        streamer: receives the prompt, then each step's tokens ``[B]``, then ``end()``. Inside ``generate()``, its
            own ``streamer=`` is used when this is ``None`` (it already holds the prompt; see the module docstring).

    Returns:
        ``[B, S + new]`` token ids, or a ``GenerateDecoderOnlyOutput`` (sequences, ``scores`` = processed scores,
        ``logits`` = the scorer's logits, the scorer's cache) when ``return_dict_in_generate=True``.

    On CUDA, for a scorer with ``late_stop`` and no streamer, the end is detected one step late (:class:`LateStop`);
    the output is the same.
    """
    check_supported(model, generation_config)
    return_dict = generation_config.return_dict_in_generate
    scores: tuple[torch.Tensor, ...] | None = () if return_dict and generation_config.output_scores else None
    raw_logits: tuple[torch.Tensor, ...] | None = () if return_dict and generation_config.output_logits else None
    pad_token = generation_config._pad_token_tensor
    pads_finished_rows = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    if pad_token is not None:
        pad_token = pad_token.to(input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    outer = generate_streamer()
    if outer is not None and streamer is not None and streamer is not outer:
        raise ValueError("generate() got both streamer= and token_streamer=; pass one streamer")
    if outer is not None:
        streamer = outer  # generate() has put the prompt into it already
    elif streamer is not None:
        streamer.put(input_ids.cpu())

    # a streamer needs each step's tokens on the host (a wait anyway); a returned cache would hold the extra step
    late = (
        getattr(scorer, "late_stop", False)
        and input_ids.device.type in LATE_STOP_DEVICES
        and streamer is None
        and not (return_dict and scorer.cache is not None)
    )
    stop = LateStop(input_ids.device) if late else None
    max_length = stopping_criteria.max_length

    logits = scorer.prefill(input_ids).to(input_ids.device)
    # generate() switches the experts implementation for small decode batches on accelerators inside this context
    with model._optimize_model_for_decode():
        while True:
            next_scores = logits_processor(input_ids, logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (logits,)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if pads_finished_rows:
                next_tokens = torch.where(unfinished, next_tokens, pad_token)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if stop is None:
                if not bool(unfinished.any()):
                    break
            elif stop.finished_before(~unfinished.any()):
                # every row had finished at the step before: this column is padding the loop would not have made
                input_ids = input_ids[:, :-1]
                scores = None if scores is None else scores[:-1]
                raw_logits = None if raw_logits is None else raw_logits[:-1]
                if hasattr(scorer, "drop_last_step"):
                    scorer.drop_last_step()
                break
            elif max_length is not None and input_ids.shape[1] >= max_length:
                break  # the length limit ends every row now, known without the device
            logits = scorer.step(input_ids).to(input_ids.device)

    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids, scores=scores, logits=raw_logits, **{OUTPUT_CACHE_FIELD: scorer.cache}
    )


class DecodingMethod:
    """Base of the method objects that decode through ``generate(custom_generate=...)`` (SCMoE, Rerouter).

    A subclass sets ``self.rm`` and implements :meth:`scorer`; :meth:`generate` and :meth:`decoding_method` are
    shared. :meth:`finish` runs after every call, whether it succeeded or not (to clear per-call routing state).
    A call holds the model for its thread (``rm.exclusive``): another thread's forward meanwhile is an error.
    """

    rm: Any  # the attached model (reroute.RoutedModel)

    def scorer(self, stream: ModelStream) -> NextTokenScorer:
        """The method's next-token logits over ``stream``."""
        raise NotImplementedError

    def finish(self, scorer: NextTokenScorer) -> None:
        """Called after each decoding call."""

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        streamer: BaseStreamer | None = None,
        **generate_kwargs: Any,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """``model.generate`` with this method's next-token logits; takes and returns what ``generate()`` does
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``num_return_sequences``,
        ``eos_token_id``, ``return_dict_in_generate``, ...). Batches must be left-padded.

        ``input_ids [B, S]`` -> ``[B * num_return_sequences, S + new]``. ``streamer=`` (or ``token_streamer=``)
        receives the prompt, the new tokens and ``end()``. Raises ``ValueError`` for a token id outside the
        vocabulary or a prompt longer than the model's context; warns for right padding.
        """
        token_streamer = generate_kwargs.pop(STREAMER_KWARG, None)
        if streamer is not None and token_streamer is not None and streamer is not token_streamer:
            raise ValueError(f"got both streamer= and {STREAMER_KWARG}=; pass one streamer")
        return self.rm.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            custom_generate=self.decoding_method,
            **{STREAMER_KWARG: streamer if streamer is not None else token_streamer},
            **generate_kwargs,
        )

    def decoding_method(
        self,
        model: PreTrainedModel,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        token_streamer: BaseStreamer | None = None,
        **model_kwargs: Any,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """The ``custom_generate`` callable ``generate()`` calls with its prepared inputs."""
        if model.__dict__.get("_reroute_attached") is not self.rm:  # rm.model, or the model inside its peft wrapper
            raise ValueError(f"this {type(self).__name__} belongs to another model")
        check_prompt(model, input_ids, model_kwargs.get("attention_mask"))
        # the method's routing state stays on the model between its forwards: no other thread may run one meanwhile
        with self.rm.exclusive(f"{type(self).__name__}.generate"):
            scorer = self.scorer(ModelStream(model, generation_config, model_kwargs))
            try:
                return decode(
                    model,
                    input_ids,
                    scorer,
                    logits_processor,
                    stopping_criteria,
                    generation_config,
                    streamer=token_streamer,
                )
            finally:
                self.finish(scorer)
