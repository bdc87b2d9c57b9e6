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
