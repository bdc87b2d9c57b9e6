"""Reference-set recipes on local stand-in data of each hub dataset's schema (no network)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import datasets
import pytest

from reroute import recipes
from reroute.data import load_items, validate_item
from reroute.recipes import (
    PAIRINGS,
    RECIPES,
    RecipeError,
    build_items,
    build_reference_items,
    get_recipe,
    reference_sources,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


def _keyed(texts: list[str]) -> dict:
    return {"text": texts, "label": [chr(ord("A") + i) for i in range(len(texts))]}


# (recipe, config) -> rows of the hub dataset's schema, each with the text of its correct option under "_gold"
# (None: the recipe must skip the row). Column names and label encodings follow the dataset cards.
STANDIN: dict[tuple[str, str | None], list[dict]] = {
    ("mmlu", "all"): [
        {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "22"], "answer": 1, "_gold": "4"},
        {"question": "Capital of France?", "subject": "geo", "choices": ["Paris", "Rome", "Oslo", "Bern"],
         "answer": 0, "_gold": "Paris"},
    ],
    ("bigbench", None): [
        {"idx": 0, "inputs": "Q: Is fire hot?\nA:", "targets": ["yes"], "multiple_choice_targets": ["no", "yes"],
         "multiple_choice_scores": [0, 1], "_gold": "yes"},
        {"idx": 1, "inputs": "Translate: chat", "targets": ["cat"], "multiple_choice_targets": [],
         "multiple_choice_scores": [], "_gold": None},  # generative row
        {"idx": 2, "inputs": "Pick both", "targets": ["a", "b"], "multiple_choice_targets": ["a", "b", "c"],
         "multiple_choice_scores": [1, 1, 0], "_gold": None},  # two correct answers
    ],
    ("superglue", "boolq"): [
        {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1, "_gold": "yes"},
    ],
    ("superglue", "cb"): [
        {"premise": "It rained.", "hypothesis": "It was dry", "idx": 0, "label": 1, "_gold": "False"},
    ],
    ("superglue", "copa"): [
        {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
         "idx": 0, "label": 0, "_gold": "He slipped."},
    ],
    ("superglue", "multirc"): [
        {"paragraph": "Ann has a dog.", "question": "What does Ann have?", "answer": "a dog",
         "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1, "_gold": "yes"},
    ],
    ("superglue", "rte"): [
        {"premise": "Tom is a cat.", "hypothesis": "Tom is an animal", "idx": 0, "label": 0, "_gold": "True"},
    ],
    ("superglue", "wic"): [
        {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank lends money.", "start1": 10,
         "start2": 4, "end1": 14, "end2": 8, "idx": 0, "label": 0, "_gold": "no"},
    ],
    ("commonsense_qa", None): [
        {"id": "a", "question": "Where do fish live?", "question_concept": "fish",
         "choices": _keyed(["desert", "water", "sky", "tree", "road"]), "answerKey": "B", "_gold": "water"},
    ],
    ("social_iqa", None): [
        {"context": "Jo gave Al a gift.", "question": "How would Al feel?", "answerA": "angry",
         "answerB": "bored", "answerC": "grateful", "label": "3\n", "_gold": "grateful"},
    ],
    ("openbookqa", "main"): [
        {"id": "7", "question_stem": "The sun is a", "choices": _keyed(["planet", "star", "moon", "comet"]),
         "answerKey": " B", "_gold": "star"},
    ],
    ("sciq", None): [
        {"question": f"Question number {i}?", "distractor1": f"d1-{i}", "distractor2": f"d2-{i}",
         "distractor3": f"d3-{i}", "correct_answer": f"right-{i}", "support": "" if i % 2 else "Some support.",
         "_gold": f"right-{i}"}
        for i in range(8)
    ],
    ("arc_challenge", "ARC-Challenge"): [
        {"id": "x", "question": "Which is a metal?", "choices": {"text": ["wood", "iron", "glass"],
                                                                 "label": ["1", "2", "3"]},
         "answerKey": "2", "_gold": "iron"},
    ],
    ("arc_easy", "ARC-Easy"): [
        {"id": "y", "question": "Water freezes at", "choices": _keyed(["0 C", "50 C", "100 C", "200 C"]),
         "answerKey": "A", "_gold": "0 C"},
    ],
    ("hellaswag", None): [
        {"ind": 4, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "then he",
         "ctx": "A man mixes flour. then he", "endings": ["bakes a cake [title] now.", "flies", "swims", "sleeps"],
         "source_id": "s", "split": "val", "split_type": "indomain", "label": "0", "_gold": "bakes a cake. now."},
    ],
    ("piqa", None): [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the jar.", "label": 0,
         "_gold": "Twist the lid."},
    ],
    ("winogrande", "winogrande_xl"): [
        {"sentence": "The cup did not fit in the box because _ was too big.", "option1": "cup",
         "option2": "box", "answer": "1", "_gold": "cup"},
    ],
    ("knowref", None): [
        {"annotation_strength": "5", "candidate0": "Marc", "candidate1": "Greg",
         "original_sentence": "Greg thanked Marc because he had helped .",
         "swapped_sentence": "Marc thanked Greg because [he] had helped .", "correct_candidate": "candidate_1",
         "_gold": "Greg"},
    ],
}  # fmt: skip


def _standin(name: str, config: str | None) -> list[dict]:
    key = (name, config)
    if name == "bigbench":
        key = ("bigbench", None)
    return STANDIN[key]


class FakeHub:
    """``datasets.load_dataset`` stand-in: serves the stand-in rows as a ``Dataset`` and records the calls."""

    def __init__(self, overrides: dict[str, list[dict]] | None = None) -> None:
        self.calls: list[tuple[str, str | None, str]] = []
        self.by_hub = {r.hub: r.name for r in RECIPES.values() if r.name not in ("arc_easy",)}
        self.overrides = overrides or {}

    def __call__(self, path: str, name: str | None = None, split: str | None = None) -> datasets.Dataset:
        self.calls.append((path, name, split))
        recipe = "arc_easy" if name == "ARC-Easy" else self.by_hub[path]
        rows = self.overrides.get(recipe, _standin(recipe, name))
        return datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "_gold"} for r in rows])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse():
        raise AssertionError("a test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(recipes, "_default_loader", refuse)


def _golds(name: str) -> list[str]:
    configs = get_recipe(name).configs
    return [r["_gold"] for c in configs for r in _standin(name, c) if r["_gold"] is not None]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_maps_its_schema_to_valid_items_with_the_right_label(name):
    hub = FakeHub()
    letters = build_items(name, loader=hub, style="letters")
    cloze = build_items(name, loader=hub, style="cloze")
    recipe = get_recipe(name)
    assert {c[0] for c in hub.calls} == {recipe.hub}
    assert {c[1] for c in hub.calls} == set(recipe.configs)
    assert {c[2] for c in hub.calls} == {recipe.split}
    golds = _golds(name)
    assert len(letters) == len(cloze) == len(golds)
    for i, (item, twin, gold) in enumerate(zip(letters, cloze, golds)):
        validate_item(item, i)
        validate_item(twin, i)
        assert item["choices"] == [f" {chr(ord('A') + j)}" for j in range(len(item["choices"]))]
        assert item["prompt"].endswith("\nAnswer:")
        option_lines = [line for line in item["prompt"].split("\n") if line[:3] == f"{line[:1]}. "]
        assert len(option_lines) == len(item["choices"])
        assert option_lines[item["label"]] == f"{chr(ord('A') + item['label'])}. {gold}"  # the gold option's line
        assert twin["choices"][twin["label"]] == f" {gold}" and twin["label"] == item["label"]
        assert item["answer"] == item["choices"][item["label"]]
        assert item["source"] == name and item["id"].startswith(f"{name}/")
    assert len({item["id"] for item in letters}) == len(letters)


def test_skipped_rows_and_shuffled_sciq_options():
    hub = FakeHub()
    per_task = len(build_items("bigbench", loader=hub, configs=["anachronisms_zero_shot"]))
    assert per_task == 1  # the generative and the two-answer rows are not multiple choice items
    sciq = build_items("sciq", loader=hub, style="cloze")
    assert len({item["label"] for item in sciq}) > 1  # the hub's always-last answer is moved around
    again = build_items("sciq", loader=FakeHub(), style="cloze")
    assert [i["choices"] for i in sciq] == [i["choices"] for i in again]  # by content hash, run to run
    with_support = [i for i in sciq if i["prompt"].startswith("Some support.\n")]
    assert len(with_support) == 4


def test_knowref_accepts_the_card_spelling_of_candidate_columns():
    row = dict(STANDIN[("knowref", None)][0])
    row["candidate_0"], row["candidate_1"] = row.pop("candidate0"), row.pop("candidate1")
    items = build_items("knowref", loader=FakeHub({"knowref": [row]}), style="cloze")
    assert items[0]["choices"] == [" Marc", " Greg"] and items[0]["label"] == 1
    assert "Marc thanked Greg because [he] had helped." in items[0]["prompt"]


def test_reference_items_follow_the_c3po_pairing_with_a_limit_per_source():
    assert reference_sources("mmlu") == ("bigbench", "superglue")
    assert reference_sources("arc_challenge") == reference_sources("arc_easy") == ("openbookqa", "sciq")
    assert reference_sources("piqa") == reference_sources("hellaswag") == ("commonsense_qa", "social_iqa")
    assert reference_sources("winogrande") == ("knowref",)
    assert set(PAIRINGS) <= set(RECIPES) and all(set(s) <= set(RECIPES) for s in PAIRINGS.values())
    hub = FakeHub()
    items = build_reference_items("arc_challenge", limit=3, loader=hub)
    assert [i["source"] for i in items] == ["openbookqa"] + ["sciq"] * 3
    assert {c[2] for c in hub.calls} == {"train"}
    mmlu_refs = build_reference_items("mmlu", limit=5, loader=FakeHub(), split="validation")
    assert [i["source"] for i in mmlu_refs] == ["bigbench"] * 5 + ["superglue"] * 5
    assert all("/validation/" in i["id"] for i in mmlu_refs)


def test_limit_samples_reproducibly_across_configs():
    a = build_items("superglue", limit=4, loader=FakeHub(), seed=1)
    b = build_items("superglue", limit=4, loader=FakeHub(), seed=1)
    c = build_items("superglue", limit=6, loader=FakeHub(), seed=2)
    assert [i["id"] for i in a] == [i["id"] for i in b]
    assert len(a) == 4 and len(c) == 6 and len({i["config"] for i in c}) == 6
    everything = build_items("superglue", loader=FakeHub())
    assert [i["config"] for i in everything] == list(recipes.SUPERGLUE_CONFIGS)  # no limit: dataset order
    with pytest.raises(ValueError, match="limit"):
        build_items("superglue", limit=0, loader=FakeHub())


def test_unknown_names_and_style_are_clear_errors():
    with pytest.raises(RecipeError, match="unknown recipe 'mmlu_pro'.*known recipes: arc_challenge"):
        build_items("mmlu_pro", loader=FakeHub())
    with pytest.raises(RecipeError, match="no reference pairing for 'gsm8k'.*targets: arc_challenge"):
        build_reference_items("gsm8k", loader=FakeHub())
    with pytest.raises(ValueError, match="style"):
        build_items("piqa", loader=FakeHub(), style="chat")


def test_wrong_schema_unlabelled_splits_and_empty_data_are_clear_errors():
    wrong = [{"question": "q", "options": ["a", "b"], "answer": 0}]
    with pytest.raises(RecipeError, match=r"allenai/openbookqa \(main\) split 'train' lacks columns"):
        build_items("openbookqa", loader=FakeHub({"openbookqa": wrong}))
    test_split = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}]
    with pytest.raises(RecipeError, match="no label"):
        build_items("winogrande", loader=FakeHub({"winogrande": test_split}), split="test")
    glue_test = [dict(STANDIN[("superglue", "rte")][0], label=-1)]
    with pytest.raises(RecipeError, match="no label"):
        build_items("superglue", configs=["rte"], loader=FakeHub({"superglue": glue_test}))
    bad_key = [dict(STANDIN[("openbookqa", "main")][0], answerKey="E")]
    with pytest.raises(RecipeError, match="answer key 'E' is not one of"):
        build_items("openbookqa", loader=FakeHub({"openbookqa": bad_key}))
    with pytest.raises(RecipeError, match="empty"):
        build_items("piqa", loader=lambda path, name=None, split=None: [])
    only_generative = [STANDIN[("bigbench", None)][1]]
    with pytest.raises(RecipeError, match="no row could be used"):
        build_items("bigbench", configs=["x"], loader=FakeHub({"bigbench": only_generative}))
    with pytest.raises(RecipeError, match="several splits"):
        build_items("piqa", loader=lambda path, name=None, split=None: datasets.DatasetDict(
            {"train": datasets.Dataset.from_list([{"goal": "g"}])}))  # fmt: skip


def test_plain_row_lists_and_jsonl_round_trip(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "_gold"} for r in STANDIN[("piqa", None)]]
    items = build_items("piqa", loader=lambda path, name=None, split=None: rows, style="cloze")
    path = write_jsonl(items, tmp_path / "sub" / "piqa.jsonl")
    assert load_items(path) == items
    assert json.loads(path.read_text().splitlines()[0])["choices"] == [" Twist the lid.", " Eat the jar."]
    with pytest.raises(ValueError, match="no prompt"):
        write_jsonl([{"prompt": "", "answer": "x"}], tmp_path / "bad.jsonl")


def _build_script():
    spec = importlib.util.spec_from_file_location("reference_sets_build", ROOT / "reference_sets" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_build_script_writes_a_reference_set_and_an_index(tmp_path, capsys):
    from reroute.c3po import ReferenceIndex
    from reroute.testing import tiny_model, tiny_tokenizer

    build = _build_script()
    model_dir = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "arc.jsonl"
    four = STANDIN[("openbookqa", "main")][0]
    three = dict(four, choices=_keyed(["planet", "star", "moon"]), question_stem="Three options")
    hub = FakeHub({"openbookqa": [four, three]})
    args = ["--target", "arc_easy", "--out", str(out), "--limit", "5", "--index", str(tmp_path / "index")]
    assert build.main(args + ["--model", str(model_dir), "--no-progress"], loader=hub) == 0
    items = load_items(out)
    assert [i["source"] for i in items] == ["openbookqa"] * 2 + ["sciq"] * 5
    index = ReferenceIndex.load(tmp_path / "index")
    assert len(index.seen) == len(items)  # every item was scored, whatever its number of choices
    printed = capsys.readouterr().out
    assert "7 items" in printed and "reference index" in printed
    assert build.main(["--list"], loader=FakeHub()) == 0
    listing = capsys.readouterr().out
    assert "winogrande" in listing and "coref-data/knowref_60k_raw" in listing
    with pytest.raises(SystemExit):
        build.main(["--target", "nope", "--out", str(out)], loader=FakeHub())


def test_build_script_reads_a_source_from_a_local_file(tmp_path, capsys):
    build = _build_script()
    local = tmp_path / "knowref.jsonl"
    rows = [{k: v for k, v in r.items() if k != "_gold"} for r in STANDIN[("knowref", None)]]
    local.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    out = tmp_path / "wino.jsonl"
    args = ["--target", "winogrande", "--out", str(out), "--local", f"knowref={local}", "--style", "cloze"]
    assert build.main(args, loader=FakeHub({"knowref": []})) == 0  # the hub stand-in would be empty
    items = load_items(out)
    assert len(items) == 3 and items[0]["choices"] == [" Marc", " Greg"] and items[0]["label"] == 1
    assert "3 items" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build.main(["--target", "winogrande", "--out", str(out), "--local", "nope=x.jsonl"], loader=FakeHub())
