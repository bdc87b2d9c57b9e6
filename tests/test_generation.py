"""The reusable decoding loop (reroute/generation.py) against transformers' own ``generate()``."""

from __future__ import annotations

import pytest
import torch
from conftest import Collect

import reroute
from reroute.generation import ModelStream, decode
from reroute.testing import tiny_model

FAMILIES = [
    "olmoe",
    "mixtral",
    "deepseek_v3",
    "gpt_oss",
]  # plain softmax, float32 router, MLA + dense layer, sliding window


def plain(
    model, input_ids, logits_processor, stopping_criteria, generation_config, token_streamer=None, **model_kwargs
):
    """The loop with one stream: must be ``generate()``'s greedy decoding / sampling exactly."""
    stream = ModelStream(model, generation_config, model_kwargs)
    return decode(
        model, input_ids, stream, logits_processor, stopping_criteria, generation_config, streamer=token_streamer
    )


@pytest.fixture
def padded() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.7, top_p=0.9),
        dict(do_sample=True, top_k=5, num_return_sequences=3),
        dict(do_sample=False, repetition_penalty=1.3, use_cache=False),
    ],
    ids=["greedy", "top-p", "top-k-n3", "penalty-nocache"],
)
def test_loop_equals_generate(family, settings, padded):
    model = tiny_model(family)
    torch.manual_seed(0)
    expected = model.generate(**padded, max_new_tokens=6, **settings)
    torch.manual_seed(0)
    actual = model.generate(**padded, max_new_tokens=6, custom_generate=plain, **settings)
    assert torch.equal(actual, expected)


def test_eos_pads_finished_rows_as_generate_does(padded):
    model = tiny_model("olmoe")
    free = model.generate(**padded, max_new_tokens=8, do_sample=False)
    eos = int(free[0, padded["input_ids"].shape[1] + 1])  # row 0 stops after its second token
    expected = model.generate(**padded, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    actual = model.generate(
        **padded, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0, custom_generate=plain
    )
    assert torch.equal(actual, expected)
    prompt = padded["input_ids"].shape[1]
    assert (actual[0, prompt + 2 :] == 0).all()  # padded after EOS


def test_dict_output_scores_logits_and_cache(padded):
    model = tiny_model("mixtral")
    kwargs = dict(
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        repetition_penalty=1.5,
    )
    expected = model.generate(**padded, **kwargs)
    actual = model.generate(**padded, custom_generate=plain, **kwargs)
    assert type(actual) is type(expected)
    assert torch.equal(actual.sequences, expected.sequences)
    for ours, theirs in zip(actual.scores + actual.logits, expected.scores + expected.logits, strict=True):
        torch.testing.assert_close(ours, theirs)
    cache = getattr(actual, "cache", getattr(actual, "past_key_values", None))
    assert cache.get_seq_length() == actual.sequences.shape[1] - 1


def test_streamer_gets_prompt_tokens_and_end_through_token_streamer():
    _streams_like_generate("token_streamer")


def _streams_like_generate(keyword: str) -> None:
    """A custom method built on :func:`decode`, given a streamer as ``keyword``, generates and streams exactly what
    ``generate(streamer=...)`` does: the prompt, each of the 4 tokens, one end."""
    model = tiny_model("olmoe")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    theirs, ours = Collect(), Collect()
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)  # EOS suppressed: exactly 4 tokens
    expected = model.generate(ids, streamer=theirs, **kwargs)
    actual = model.generate(ids, custom_generate=plain, **{keyword: ours}, **kwargs)
    assert torch.equal(actual, expected)
    assert len(ours.puts) == len(theirs.puts) == 5 and ours.ended == theirs.ended == 1
    for a, b in zip(ours.puts, theirs.puts):
        assert torch.equal(a, b)


def test_generate_does_not_pass_its_streamer_to_a_callable():
    """The transformers behaviour that :func:`decode` works around (5.17 to 5.25): the callable never sees
    ``streamer=``, which only receives the prompt. If this starts failing, transformers forwards the streamer now and
    the note in reroute/generation.py should say from which version."""
    model = tiny_model("olmoe")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    streamer, seen = Collect(), {}

    def bare(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.update(model_kwargs)
        return input_ids

    model.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=bare, streamer=streamer)
    assert len(streamer.puts) == 1 and torch.equal(streamer.puts[0], ids) and streamer.ended == 0
    assert "streamer" not in seen


def test_streamer_given_to_generate_streams_through_a_custom_method():
    """``generate(streamer=s, custom_generate=fn)`` with ``fn`` built on :func:`decode`: the same puts and one end as
    ``generate(streamer=s)`` alone; two different streamers are an error."""
    _streams_like_generate("streamer")
    model, ids = tiny_model("olmoe"), torch.randint(3, 96, (1, 5))
    with pytest.raises(ValueError, match="pass one streamer"):
        model.generate(
            ids, custom_generate=plain, streamer=Collect(), token_streamer=Collect(), max_new_tokens=4, do_sample=False
        )


def test_methods_take_streamer_or_token_streamer():
    rm = reroute.attach(tiny_model("olmoe"))
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for method in (reroute.SCMoE(rm), reroute.Rerouter(rm, steps=1)):
        by_name, by_token, by_generate = Collect(), Collect(), Collect()
        out = method.generate(input_ids=ids, streamer=by_name, **kwargs)
        method.generate(input_ids=ids, token_streamer=by_token, **kwargs)
        rm.model.generate(ids, custom_generate=method.decoding_method, streamer=by_generate, **kwargs)
        for collected in (by_name, by_token, by_generate):
            assert torch.equal(torch.cat([p.reshape(1, -1) for p in collected.puts], 1), out)
            assert collected.ended == 1
        with pytest.raises(ValueError, match="pass one streamer"):
            method.generate(input_ids=ids, streamer=Collect(), token_streamer=Collect(), **kwargs)


@pytest.mark.parametrize("method", ["scmoe", "rerouter"])
def test_prompts_the_model_cannot_run_are_clear_errors(method):
    rm = reroute.attach(tiny_model("olmoe"))
    run = reroute.SCMoE(rm) if method == "scmoe" else reroute.Rerouter(rm, steps=1)
    vocab = rm.model.config.vocab_size
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        run.generate(input_ids=torch.tensor([[5, vocab]]), max_new_tokens=1)
    too_long = torch.randint(3, 96, (1, rm.model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="context"):
        run.generate(input_ids=too_long, max_new_tokens=1)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.warns(UserWarning, match="right-padding"):
        run.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)
    if method == "scmoe":
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            run.scoring_logprobs(torch.tensor([[5, vocab]]), torch.ones(1, 2, dtype=torch.long))


def _stream(model, ids, **overrides):
    """A ModelStream over ``ids`` with the model kwargs generate() would prepare (via a capturing callable)."""
    captured = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        captured.update(config=generation_config, kwargs=model_kwargs)
        return input_ids

    model.generate(ids, max_new_tokens=3, custom_generate=capture, **overrides)
    return ModelStream(model, captured["config"], captured["kwargs"])


def test_fork_and_expand(padded):
    model = tiny_model("qwen2_moe")
    ids = padded["input_ids"]
    stream = _stream(model, ids, attention_mask=padded["attention_mask"])
    fork, doubled = stream.fork(), stream.expand(2)
    first = stream.prefill(ids)
    assert fork.cache is not stream.cache and fork.cache.get_seq_length() == 0
    torch.testing.assert_close(fork.prefill(ids), first)
    both = doubled.prefill(ids.repeat_interleave(2, dim=0))
    torch.testing.assert_close(both[0::2], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1::2], first, rtol=1e-5, atol=1e-5)
    nxt = torch.cat([ids, first.argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(
        doubled.step(nxt.repeat_interleave(2, dim=0))[1::2], stream.step(nxt), rtol=1e-5, atol=1e-5
    )


def test_misuse_is_a_clear_error(padded):
    model = tiny_model("olmoe")
    ids = padded["input_ids"]
    with pytest.raises(RuntimeError, match="prefill"):
        _stream(model, ids).step(ids)
    stream = _stream(model, ids)
    stream.prefill(ids)
    with pytest.raises(RuntimeError, match="before its prefill"):
        stream.fork()
    with pytest.raises(RuntimeError, match="before its prefill"):
        stream.prefill(ids)
    doubled = _stream(model, ids, cache_implementation="static").expand(2)  # allocates itself at the prefill
    assert doubled.prefill(ids.repeat_interleave(2, dim=0)).shape[0] == 2 * ids.shape[0]
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, custom_generate=plain)
    with pytest.raises(ValueError, match="attentions"):
        model.generate(
            ids, max_new_tokens=2, custom_generate=plain, return_dict_in_generate=True, output_attentions=True
        )
