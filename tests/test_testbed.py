"""The trained testbed: suite generator, tokenizer, shipped checkpoint, scoring primitives."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from transformers import OlmoeForCausalLM, PreTrainedTokenizerFast

from reroute.testbed import (
    DOMAINS,
    build_tokenizer,
    checkpoint_path,
    exact_match,
    generate_greedy,
    load_items,
    load_split,
    load_testbed,
    make_split,
    score_choices,
    write_jsonl,
)
from reroute.testbed.suite import (
    DOMAIN_BY_NAME,
    EQUALS,
    FEWSHOT_TEST_SHOTS,
    NUM_CHOICES,
    SEPARATOR,
    SHIPPED_SPLIT_SIZES,
    _pool,
)

ROOT = Path(__file__).resolve().parents[1]
CUES = {d.name for d in DOMAINS}
# Quality bounds of the shipped checkpoint on the first 96 items (seed 0) of a split. Measured on CPU (fp32): test
# 1.00 multiple choice and 1.00 exact match, test_shift 0.26 multiple choice; the bounds leave a margin.
TEST_FLOOR = 0.95
SHIFT_CEILING = 0.50


def numbers_of(line: str) -> list[int]:
    """The input list of the last ``... =`` line of a prompt."""
    words = line.split(SEPARATOR)[-1].split()
    return [int(w) for w in words if w.isdigit()]


@pytest.fixture(scope="module")
def testbed() -> tuple[OlmoeForCausalLM, PreTrainedTokenizerFast]:
    return load_testbed()


@pytest.mark.parametrize("split", ["train", "reference", "test", "test_shift", "test_fewshot"])
def test_generator_is_deterministic_per_seed(split: str) -> None:
    assert make_split(split, 40, seed=3) == make_split(split, 40, seed=3)
    assert make_split(split, 40, seed=3) != make_split(split, 40, seed=4)


@pytest.mark.parametrize("split", ["train", "reference", "test", "test_shift", "test_fewshot"])
def test_items_are_well_formed(split: str) -> None:
    for item in make_split(split, 64):
        domain = DOMAIN_BY_NAME[item["domain"]]
        assert len(item["choices"]) == NUM_CHOICES == len(set(item["choices"]))
        assert item["choices"][item["label"]] == item["answer"] == f" {domain.rule(numbers_of(item['prompt']))}"
        assert item["prompt"].endswith(EQUALS)


def test_splits_use_disjoint_inputs() -> None:
    seen = {
        split: {(i["domain"], tuple(numbers_of(i["prompt"]))) for i in make_split(split, 800)}
        for split in ("train", "reference", "test", "test_shift")
    }
    assert all(_pool(DOMAIN_BY_NAME[d], xs) == "test" for d, xs in seen["test"])
    assert all(_pool(DOMAIN_BY_NAME[d], xs) == "test_shift" for d, xs in seen["test_shift"])
    assert all(_pool(DOMAIN_BY_NAME[d], xs) == "train" for d, xs in seen["train"] | seen["reference"])
    assert not seen["test"] & seen["test_shift"]


def test_shift_removes_the_cue_and_fewshot_adds_own_domain_demonstrations() -> None:
    test = make_split("test", 64)
    assert all(i["prompt"].split()[0] == i["domain"] for i in test)
    shift, fewshot = make_split("test_shift", 64), make_split("test_fewshot", 64)
    for plain, shots in zip(shift, fewshot):
        assert not CUES & set(plain["prompt"].split()) and not CUES & set(shots["prompt"].split())
        assert (shots["id"], shots["answer"], shots["label"]) == (plain["id"], plain["answer"], plain["label"])
        demos = shots["prompt"].split(SEPARATOR)
        assert demos[-1] == plain["prompt"] and len(demos) == FEWSHOT_TEST_SHOTS + 1
        rule = DOMAIN_BY_NAME[plain["domain"]].rule
        for demo in demos[:-1]:
            question, answer = demo.split(f" {EQUALS} ")
            assert int(answer) == rule([int(w) for w in question.split()])
    train = make_split("train", 200)
    assert any(i["shots"] for i in train) and any(not i["shots"] for i in train)
    assert all(line.split()[0] == i["domain"] for i in train for line in i["prompt"].split(SEPARATOR))


def test_jsonl_and_dataset_round_trip(tmp_path: Path) -> None:
    items = make_split("test_fewshot", 30)
    write_jsonl(items, tmp_path / "items.jsonl")
    assert load_items(tmp_path / "items.jsonl") == items
    assert load_items(load_split("test_fewshot", 30)) == items
    broken = dict(items[0], label=(items[0]["label"] + 1) % NUM_CHOICES)
    with pytest.raises(ValueError, match="label"):
        load_items([broken])


@pytest.mark.parametrize("split", sorted(SHIPPED_SPLIT_SIZES))
def test_shipped_jsonl_copies_match_the_generator(split: str) -> None:
    path = ROOT / "reference_sets" / "testbed" / f"{split}.jsonl"
    assert load_items(path) == make_split(split, SHIPPED_SPLIT_SIZES[split], seed=0)


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for item in make_split("train", 50) + make_split("test_fewshot", 20):
        ids = tokenizer(item["prompt"] + item["answer"])["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        # BOS, one token per word and per line break, the answer
        assert len(ids) == len(item["prompt"].split()) + item["prompt"].count(SEPARATOR) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == item["prompt"] + item["answer"]
        assert reloaded(item["prompt"])["input_ids"] == ids[:-1]
    assert [reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id] == [0, 1, 2, 3]


def test_checkpoint_loads_with_from_pretrained_and_has_headroom(
    testbed: tuple[OlmoeForCausalLM, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = testbed
    assert {p.name for p in checkpoint_path().iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert model.config.model_type == "olmoe" and model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    test = make_split("test", 96)
    assert score_choices(model, tokenizer, test).accuracy >= TEST_FLOOR
    assert exact_match(model, tokenizer, test).float().mean() >= TEST_FLOOR
    assert score_choices(model, tokenizer, make_split("test_shift", 96)).accuracy <= SHIFT_CEILING


def test_multiple_choice_matches_hand_computed_loglikelihood(
    testbed: tuple[OlmoeForCausalLM, PreTrainedTokenizerFast],
) -> None:
    model, tokenizer = testbed
    items = make_split("test_fewshot", 3)  # different prompt lengths, so the batch is padded
    scores = score_choices(model, tokenizer, items, batch_size=3)
    for row, item in enumerate(items):
        for column, choice in enumerate(item["choices"]):
            ids = torch.tensor([tokenizer(item["prompt"] + choice)["input_ids"]])
            n_prompt = len(tokenizer(item["prompt"])["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            expected = sum(logprobs[t - 1, ids[0, t]] for t in range(n_prompt, ids.shape[1]))
            assert scores.loglikelihoods[row, column].item() == pytest.approx(expected.item(), abs=1e-4)
    assert scores.predictions.tolist() == scores.loglikelihoods.argmax(-1).tolist()


def test_greedy_generation_is_batch_independent(testbed: tuple[OlmoeForCausalLM, PreTrainedTokenizerFast]) -> None:
    model, tokenizer = testbed
    items = make_split("test", 8) + make_split("test_fewshot", 4)
    batched = generate_greedy(model, tokenizer, [i["prompt"] for i in items], batch_size=12)
    single = [generate_greedy(model, tokenizer, [i["prompt"]])[0] for i in items]
    assert batched == single
    first_lines = [text.split(SEPARATOR, 1)[0].strip() for text in batched]
    assert exact_match(model, tokenizer, items).tolist() == [
        t == i["answer"].strip() for t, i in zip(first_lines, items)
    ]


def test_training_script_smoke_run(tmp_path: Path) -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "train_testbed.py"), run_name="testbed_training")
    args = script["parse_args"](["--smoke", "--out", str(tmp_path)])
    args.steps, args.eval_every, args.train_items = 4, 2, 200
    script["train"](args)
    model = OlmoeForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_experts == 8
    assert json.loads((tmp_path / "training_log.json").read_text())["history"][-1]["step"] == 4


def test_reroute_demo_on_the_testbed(tmp_path, capsys):
    import json

    from reroute.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--json", str(out)]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"base", "c3po (ngd)", "rerouting", "scmoe", "oracle"}
    assert records["oracle"]["accuracy"] >= records["base"]["accuracy"] + 0.15  # the headroom the testbed exists for
    assert "reroute eval" in capsys.readouterr().out
