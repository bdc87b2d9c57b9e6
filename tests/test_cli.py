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
