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
    for name in ("OLMoE", "Mixtral", "DeepSeek-V3", "GPT-OSS", "PhiMoE"):
        assert name in printed


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
        (["eval", "--method", "base,nope"], "unknown method 'nope'"),
        (["eval", "--method", "c3po", "--index", "/no/such/index"], "no reference index folder"),
        (["eval", "--model", "/no/such/model"], "/no/such/model"),
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


def test_traceback_flag_shows_the_exception():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["--traceback", "eval", "--method", "nope"])


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
    assert failed.returncode == 1
    assert failed.stderr == "reroute: error: unknown method 'x'; known: base, oracle, c3po, rerouting, scmoe\n"
