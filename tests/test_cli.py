"""The command line on tiny models (the testbed demo is tested with the testbed)."""

from __future__ import annotations

import json

import pytest

from reroute.cli import main


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_demo_tiny_shows_routing_move_and_detach_restore(family, tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--tiny", family, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    expert = result["expert"]
    assert result["usage_after"][expert] > result["usage_before"][expert]
    assert result["detach_restores"] is True
    assert "expert usage" in capsys.readouterr().out


def test_families_lists_every_family(capsys):
    assert main(["families"]) == 0
    printed = capsys.readouterr().out
    for name in ("OLMoE", "Mixtral", "DeepSeek-V3", "GPT-OSS", "PhiMoE", "sigmoid + e_score_correction_bias"):
        assert name in printed


def test_families_prints_the_readme_table(capsys):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert main(["families", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.startswith("| family | `model_type` | routing rule |") and table in readme


def test_unknown_subcommand_exits_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2


def test_eval_on_a_local_checkpoint_and_jsonl(tmp_path, capsys):
    import torch

    from reroute.testing import tiny_model, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_model("qwen2_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "items.jsonl"
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(6):
        prompt = " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (4,), generator=gen))
        lines.append(json.dumps({"prompt": prompt, "choices": [" w5", " w6", " w7", " w8"], "label": i % 4}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    code = main(
        [
            "eval",
            "--model",
            str(folder),
            "--data",
            str(data),
            "--method",
            "base,oracle,scmoe",
            "--json",
            str(out),
            "--png",
            str(png),
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["base", "oracle", "scmoe"]
    assert all(r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "scmoe" in capsys.readouterr().out
    # --json without a path: the records on stdout (parseable as a whole), the table on stderr
    assert main(["eval", "--model", str(folder), "--data", str(data), "--json", "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    (record,) = json.loads(captured.out)
    assert record["method"] == "base" and record["accuracy"] == records[0]["accuracy"]
    assert "reroute eval" in captured.err


# ---------------------------------------------------------------------------------------------------- help, --json
@pytest.mark.parametrize("command", ["demo", "eval", "families", "lm-eval"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert command in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "usage:" in printed
    if command != "lm-eval":  # lm-eval's help is lm-eval's own, after reroute's model arguments
        assert f"reroute {command}" in printed and "examples:" in printed


def test_families_json_on_stdout(capsys):
    import reroute

    assert main(["families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["model_type"] for row in rows} == set(reroute.supported_families())
    assert all(row["routing_rule"] for row in rows)


def test_demo_tiny_json_on_stdout_keeps_the_table_on_stderr(capsys):
    assert main(["demo", "--tiny", "mixtral", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["family"] == "mixtral" and result["detach_restores"] is True
    assert "expert usage" in captured.err


@pytest.fixture
def dense_checkpoint(tmp_path):
    """A tiny dense (not MoE) Llama saved with from_pretrained's layout: an unsupported model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reroute.testing import tiny_tokenizer

    config = LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    folder = tmp_path / "dense"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def items_file(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [json.dumps({"prompt": f"w{i} w{i + 1}", "choices": [" w5", " w6"], "label": i % 2}) for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--data", "/no/such/items.jsonl"], "no data file /no/such/items.jsonl"),
        (["eval", "--method", "c3po", "--index", "/no/such/index"], "no reference index folder"),
        (["eval", "--model", "/no/such/model"], "no such folder /no/such/model"),
        (["eval", "--method", "c3po", "--reference", "/no/such/ref.jsonl"], "no reference data file"),
    ],
)
def test_expected_failures_exit_1_with_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("reroute: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unsupported_model_exits_1(dense_checkpoint, items_file, capsys):
    code = main(["eval", "--model", str(dense_checkpoint), "--data", str(items_file), "--device", "cpu", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err  # after transformers' own "Loading weights" bar
    (line,) = [line for line in err.splitlines() if "reroute: error:" in line]
    assert "llama" in line.lower() and "Traceback" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_flag_shows_the_exception_wherever_it_is(where):
    argv = ["eval", "--method", "nope"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["--traceback", *argv] if where == "before" else [*argv, "--traceback"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    assert main(["eval", "--device", "cuda", "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "reroute: error: --device cuda: CUDA is not available on this machine; use --device cpu\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--method", "base,nope"], "unknown method 'nope'"),
        (["eval", "--method", "scmoe", "--set", "scmoe.betta=0.3"], "scmoe has no setting 'betta'"),
        (["eval", "--method", "scmoe", "--set", "rerouting.lr=0.1"], "'rerouting' is not among the evaluated"),
        (["eval", "--method", "scmoe", "--set", "beta=0.3"], "write METHOD.KEY=VALUE"),
        (["eval", "--method", "rerouting", "--set", "rerouting.lr=-1"], "rerouting: lr must be positive"),
        (["eval", "--device", "gpu0"], "is not a device"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: reroute eval") and err[-1].startswith("reroute eval: error:")
    assert message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "argv",
    [[], ["eval", "--limit", "0"], ["eval", "--batch-size", "-1"], ["eval", "--mode", "essay"], ["families", "x"]],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: reroute" in capsys.readouterr().err


def test_exit_code_reaches_the_shell():
    import subprocess
    import sys

    failed = subprocess.run(
        [sys.executable, "-c", "import sys; from reroute.cli import main; sys.exit(main())", "eval", "--method", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (
        "reroute eval: error: unknown method 'x'; known: base, c3po, rerouting, scmoe, adapter, oracle"
    )
    missing = subprocess.run(
        [sys.executable, "-c", "import sys; from reroute.cli import main; sys.exit(main())", "eval", "--data", "/no"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and missing.stderr == "reroute: error: no data file /no\n"


# ---------------------------------------------------------------------------------------------------- eval JSON, index
def _items_jsonl(path, n, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        prompt = " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (4,), generator=gen))
        lines.append(json.dumps({"prompt": prompt, "choices": [" w5", " w6", " w7", " w8"], "label": i % 4}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    from reroute.testing import tiny_model, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_eval_json_carries_provenance_and_the_paired_difference_to_base(tiny_folder, tmp_path):
    data = _items_jsonl(tmp_path / "items.jsonl", 8, seed=0)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_folder), "--data", str(data), "--method", "base,scmoe,oracle", "--quiet"]
    argv += ["--set", "scmoe.beta=0.0", "--set", 'scmoe.weak="top1"', "--set", "oracle.steps=3", "--json", str(out)]
    assert main([*argv, "--device", "cpu", "--seed", "3"]) == 0
    base, scmoe, oracle = json.loads(out.read_text())
    provenance = scmoe["provenance"]
    assert provenance["model"] == str(tiny_folder.resolve()) and provenance["seed"] == 3
    assert provenance["method_config"]["beta"] == 0.0 and provenance["method_config"]["weak"] == "top1"
    assert oracle["provenance"]["method_config"]["steps"] == 3
    assert provenance["fingerprint"]["model_type"] == "olmoe" and "torch" in provenance["versions"]
    assert "vs_base" not in base
    for record in (scmoe, oracle):
        diff = [float(a) - float(b) for a, b in zip(record["correct"], base["correct"])]
        assert record["vs_base"]["difference"] == pytest.approx(sum(diff) / len(diff))
        low, high = record["vs_base"]["ci95"]
        assert low <= record["vs_base"]["difference"] <= high
    # beta 0 scores with the strong logits alone (every choice plausible at the default alpha or not): base's ranking
    # wherever the gold continuation stays plausible; the interval of a zero difference is [0, 0]
    if scmoe["correct"] == base["correct"]:
        assert scmoe["vs_base"]["ci95"] == [0.0, 0.0]


def test_index_build_and_c3po_on_a_model_that_is_not_the_testbed(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = _items_jsonl(tmp_path / "items.jsonl", 6, seed=0)
    reference = _items_jsonl(tmp_path / "reference.jsonl", 24, seed=1)
    common = ["--model", str(tiny_folder), "--device", "cpu", "--quiet"]
    # without an index or reference items: a usage error, and nothing of the testbed's is read or cached
    assert main(["eval", *common, "--data", str(data), "--method", "c3po"]) == 2
    assert "needs --index DIR" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()
    # reroute index build, then eval with it
    assert main(["index", "build", *common, "--data", str(reference), "--out", str(tmp_path / "idx")]) == 0
    assert "reference items" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    c3po = ["--method", "base,c3po", "--set", "c3po.k=1", "--set", "c3po.min_gain=null", "--json", str(out)]
    assert main(["eval", *common, "--data", str(data), "--index", str(tmp_path / "idx"), *c3po]) == 0
    with_index = json.loads(out.read_text())
    assert with_index[1]["provenance"]["method_config"]["k"] == 1
    # --reference builds the same index into a cache keyed by the model's fingerprint, the data and the embedder
    assert main(["eval", *common, "--data", str(data), "--reference", str(reference), *c3po]) == 0
    (cached,) = (tmp_path / "home" / ".cache" / "reroute").iterdir()
    assert cached.name.startswith("index-") and (cached / "index.json").is_file()
    assert json.loads(out.read_text())[1]["correct"] == with_index[1]["correct"]
