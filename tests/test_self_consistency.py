"""Self-consistency: vote counting, deterministic ties, once-per-prompt preparation, and generate-style samplers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import reroute
from reroute import SCMoE, majority_vote, self_consistency, text_sampler
from reroute.testing import tiny_model, tiny_tokenizer


def test_majority_vote_counts_and_breaks_ties_by_first_appearance():
    votes, winner = majority_vote(["b", "a", None, "a", "b", "c"])
    assert votes == Counter({"a": 2, "b": 2, "c": 1})
    assert winner == "b"  # tied with "a", drawn first
    assert majority_vote(["a", "b", "b"])[1] == "b"
    assert majority_vote([3, 3, 1, 1, 1])[1] == 1
    assert majority_vote([None, None]) == (Counter(), None)
    assert majority_vote([]) == (Counter(), None)


def test_votes_per_prompt_from_a_scripted_sampler():
    scripted = {"p": iter(["x=1", "x=2", "x=2", "none", "x=1"]), "q": iter(["x=7"] * 5)}

    def generate_fn(prompt, k):
        return [next(scripted[prompt]) for _ in range(k)]

    def extract(sample):
        return int(sample[2:]) if sample.startswith("x=") else None

    p, q = self_consistency(generate_fn, ["p", "q"], n=5, extract_answer=extract, samples_per_call=2)
    assert p.samples == ["x=1", "x=2", "x=2", "none", "x=1"]
    assert p.answers == [1, 2, 2, None, 1]
    assert p.votes == Counter({1: 2, 2: 2}) and p.winner == 1
    assert q.votes == Counter({7: 5}) and q.winner == 7


def test_prepare_runs_once_per_prompt_and_reaches_every_call():
    prepared, calls = [], []

    def prepare(prompt):
        prepared.append(prompt)
        return f"state-{prompt}"

    def generate_fn(prompt, k, state):
        calls.append((prompt, k, state))
        return [f"{prompt}:{len(calls)}"] * k

    votes = self_consistency(generate_fn, ["a", "b"], n=5, extract_answer=str, prepare=prepare, samples_per_call=2)
    assert prepared == ["a", "b"]
    assert calls == [
        ("a", 2, "state-a"),
        ("a", 2, "state-a"),
        ("a", 1, "state-a"),
        ("b", 2, "state-b"),
        ("b", 2, "state-b"),
        ("b", 1, "state-b"),
    ]
    assert [len(v.samples) for v in votes] == [5, 5]
    assert votes[0].winner == "a:1" and votes[0].votes["a:1"] == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n=0), "n must be"), (dict(n=2.0), "n must be"), (dict(n=2, samples_per_call=0), "samples_per_call")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        self_consistency(lambda p, k: ["s"] * k, ["p"], extract_answer=str, **kwargs)


def test_a_sampler_returning_the_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="returned 1 samples for a request of 3"):
        self_consistency(lambda p, k: ["s"], ["p"], n=3, extract_answer=str)


@pytest.mark.parametrize("method", ["generate", "scmoe"])
def test_text_sampler_with_generate_and_scmoe(method):
    model = tiny_model("olmoe")
    tokenizer = tiny_tokenizer()
    generate = model.generate if method == "generate" else SCMoE(reroute.attach(model), weak="rank3").generate
    sample = text_sampler(generate, tokenizer, max_new_tokens=4, min_new_tokens=4, top_k=5)
    torch.manual_seed(0)
    texts = sample("w5 w9 w13", 6)
    assert len(texts) == 6 and all(len(t.split()) == 4 for t in texts)
    assert len(set(texts)) > 1, "sampling should give different continuations"

    def first_word(text):
        return text.split()[0]

    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(self_consistency(sample, ["w5 w9", "w20 w21"], n=6, extract_answer=first_word, samples_per_call=4))
    votes = runs[0]
    assert [v.samples for v in runs[1]] == [v.samples for v in votes]  # reproducible under torch.manual_seed
    for vote in votes:
        assert sum(vote.votes.values()) == 6
        assert vote.votes[vote.winner] == max(vote.votes.values())
