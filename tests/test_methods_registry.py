"""The method registry: a toy method registered from this file runs through the harness, lm-eval, save/load and
the CLI unchanged (none of them names a method)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import reroute
from reroute.eval import make_method, run_eval
from reroute.methods import (
    RoutingMethod,
    available_methods,
    get_method,
    register_method,
    repeat_rows,
    unregister_method,
)
from reroute.scoring import ContinuationBatch, build_batch, choice_batch, continuation_logprobs, prompt_batch
from reroute.testing import tiny_model, tiny_tokenizer


@dataclass
class BoostConfig:
    """Push one expert up in every MoE layer, by ``strength`` times the prompt's share of the longest prompt."""

    expert: int = 0
    strength: float = 4.0

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")


class Boost(RoutingMethod):
    """A toy method whose state differs per row: per-row offsets ``[rows, E]``."""

    def __init__(self, rm: reroute.RoutedModel, config: BoostConfig | None = None) -> None:
        self.rm, self.config = rm, config or BoostConfig()

    def adapt_contexts(self, items, prompts: ContinuationBatch) -> torch.Tensor:
        lengths = prompts.attention_mask.sum(-1).float()
        state = torch.zeros(len(items), self.rm.num_experts)
        state[:, self.config.expert] = self.config.strength * lengths / lengths.max()
        self.add_stats(forward_passes=0.0)
        return state

    def split_state(self, state: torch.Tensor, rows: int) -> list[torch.Tensor]:
        return [state[i : i + 1] for i in range(rows)]

    def stack_states(self, states) -> torch.Tensor:
        return torch.cat(list(states))

    @contextlib.contextmanager
    def applied(self, state: torch.Tensor | None, batch: ContinuationBatch) -> Iterator[None]:
        rows = state.repeat_interleave(repeat_rows(len(state), batch.input_ids.shape[0]), dim=0)
        self.rm.set_row_offsets({idx: rows for idx in self.rm.moe_layers})
        try:
            yield
        finally:
            for idx in self.rm.moe_layers:
                self.rm.layer(idx).row_offsets = None


@pytest.fixture
def boost():
    register_method("boost", BoostConfig, Boost)
    yield
    unregister_method("boost")


@pytest.fixture(scope="module")
def setup():
    return reroute.attach(tiny_model("olmoe")), tiny_tokenizer()


def _items(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = 3 + i % 4
        prompt = " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (length,), generator=gen))
        choices = [f" w{int(t)}" for t in torch.randperm(90, generator=gen)[:4] + 3]
        items.append({"prompt": prompt, "choices": choices, "label": i % 4, "answer": choices[i % 4].strip()})
    return items


def _by_hand(rm, tok, items, strength: float) -> list[bool]:
    """The toy's multiple-choice answers with the row offsets set by hand on the plain controller."""
    prompts = prompt_batch(tok, [item["prompt"] for item in items])
    lengths = prompts.attention_mask.sum(-1).float()
    batch, n_choices = choice_batch(tok, items)
    offsets = torch.zeros(len(items), rm.num_experts)
    offsets[:, 0] = strength * lengths / lengths.max()
    rm.set_row_offsets({idx: offsets.repeat_interleave(n_choices, 0) for idx in rm.moe_layers})
    try:
        with torch.no_grad():
            scores = continuation_logprobs(rm.model, batch).view(len(items), n_choices)
    finally:
        rm.reset()
    return [int(p) == item["label"] for p, item in zip(scores.argmax(-1).tolist(), items)]


def test_builtins_are_registered_and_names_are_checked():
    assert available_methods()[:4] == ("base", "c3po", "rerouting", "scmoe") and "oracle" in available_methods()
    assert (
        get_method("c3po").config_cls is reroute.C3POConfig and get_method("rerouting").method_cls is reroute.Rerouter
    )
    assert "index" in get_method("c3po").option_names() and "beta" in get_method("scmoe").option_names()
    with pytest.raises(ValueError, match="unknown method 'nope'; known: base, c3po"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method("c3po", BoostConfig, Boost)
    with pytest.raises(TypeError, match="must subclass reroute.methods.RoutingMethod"):
        register_method("plain", BoostConfig, object)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_method("plain", dict, Boost)
    with pytest.raises(ValueError, match="has no option 'strenght'"):
        make_method("c3po", strenght=1)


def test_a_registered_method_runs_through_the_harness(boost, setup):
    rm, tok = setup
    items = _items(6)
    result = run_eval(rm, tok, items, make_method("boost", strength=6.0), mode="mc", batch_size=4, progress=False)
    assert result.method == "boost" and result.correct == _by_hand(rm, tok, items[:4], 6.0) + _by_hand(
        rm, tok, items[4:], 6.0
    )
    base = run_eval(rm, tok, items, make_method("base"), mode="mc", batch_size=4, progress=False)
    zero = run_eval(rm, tok, items, make_method("boost", strength=0.0), mode="mc", batch_size=4, progress=False)
    assert zero.correct == base.correct  # zero offsets are the model's own routing
    gen = run_eval(rm, tok, items, make_method("boost"), mode="gen", progress=False)
    assert gen.n == 6 and all(layer.row_offsets is None for layer in rm.layers.values())
    with pytest.raises(ValueError, match="strength must be >= 0"):
        make_method("boost", strength=-1.0)


def test_a_registered_method_runs_through_lm_eval(boost, setup):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    import reroute.lmeval as rl

    rm, tok = setup
    items = _items(4)
    assert "boost" in rl.lm_eval_methods() and "oracle" not in rl.lm_eval_methods()
    lm = rl.RoutedLM(rm.model, tokenizer=tok, method="boost", strength=6.0, batch_size=16)
    requests = [
        Instance("loglikelihood", item, (item["prompt"], choice), i)
        for item in items
        for i, choice in enumerate(item["choices"])
    ]
    scores = torch.tensor([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]).view(len(items), 4)
    answers = [int(p) == item["label"] for p, item in zip(scores.argmax(-1).tolist(), items)]
    assert answers == run_eval(rm, tok, items, make_method("boost", strength=6.0), progress=False).correct
    assert lm.cache.misses == len(items) and lm.cache.hits == 3 * len(items)
    with pytest.raises(ValueError, match="has no option 'beta'"):
        rl.RoutedLM(rm.model, tokenizer=tok, method="boost", method_args={"beta": 1})


def test_a_registered_config_saves_and_loads(boost, setup, tmp_path):
    rm, _ = setup
    rm.save_pretrained(tmp_path, method=BoostConfig(expert=2, strength=1.5))
    assert reroute.RerouteConfig.from_pretrained(tmp_path).method_config() == BoostConfig(expert=2, strength=1.5)
    rm.save_pretrained(tmp_path / "object", method=Boost(rm, BoostConfig(strength=0.5)))
    assert reroute.RerouteConfig.from_pretrained(tmp_path / "object").method_config() == BoostConfig(strength=0.5)


def test_a_registered_method_runs_through_the_cli(boost, tmp_path):
    from reroute.cli import main

    folder = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in _items(4)))
    out = tmp_path / "out.json"
    argv = ["eval", "--model", str(folder), "--data", str(data), "--method", "base,boost", "--quiet", "--device", "cpu"]
    assert main([*argv, "--set", "boost.strength=6", "--json", str(out)]) == 0
    base, boosted = json.loads(out.read_text())
    assert boosted["provenance"]["method_config"] == {"expert": 0, "strength": 6}
    rm = reroute.attach(tiny_model("olmoe"))
    assert boosted["correct"] == _by_hand(rm, tiny_tokenizer(), _items(4), 6.0)
    assert "vs_base" in boosted


def test_build_batch_rows_expand_item_major():
    """The protocol's row rule: a state of R rows covers a batch of R * c rows, each state row c times in a row."""
    assert repeat_rows(2, 8) == 4
    with pytest.raises(ValueError, match="cannot cover a batch of 5 rows"):
        repeat_rows(2, 5)
    batch = build_batch([[5, 6], [7]], [[8], [9]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 8], [0, 7, 9]]
