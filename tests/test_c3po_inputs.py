"""C3PO and its reference index under bad or unusual input: issue 14 items 6, 11, 12, 16a, 16b, 18."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import random_mc_items

import reroute
from reroute.c3po import C3PO, ReferenceIndex, ReferenceIndexError
from reroute.c3po import pathway as pathway_module
from reroute.c3po.embed import CallableEmbedder, HiddenStateEmbedder
from reroute.eval import run_eval
from reroute.eval.methods import make_method
from reroute.scoring import prompt_batch
from reroute.testing import tiny_model, tiny_tokenizer


def _items(n: int, seed: int, length: int = 6) -> list[dict]:
    return random_mc_items(n, seed, length)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rm = reroute.attach(tiny_model("olmoe"))
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("index") / "index"
    index = ReferenceIndex.build(rm, tok, _items(64, 1), path=path, progress=False)
    return rm, tok, index, path


def _copy(index: ReferenceIndex, path) -> ReferenceIndex:
    index.save(path)
    return ReferenceIndex.load(path)


def test_index_refuses_a_faiss_file_replaced_by_other_vectors_of_the_same_shape(setup, tmp_path):
    """Item 12: same shape, other vectors: the digest in index.json no longer matches."""
    rm, tok, index, _ = setup
    import faiss

    _copy(index, tmp_path / "a")
    other = faiss.IndexFlatIP(index.dim)
    other.add(torch.nn.functional.normalize(torch.randn(len(index), index.dim), dim=-1).numpy())
    faiss.write_index(other, str(tmp_path / "a" / "embeddings.faiss"))
    with pytest.raises(ReferenceIndexError, match="replaced after saving"):
        ReferenceIndex.load(tmp_path / "a", rm)
    _copy(index, tmp_path / "b")
    tensors = tmp_path / "b" / "pathways.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last float
    tensors.write_bytes(bytes(data))
    with pytest.raises(ReferenceIndexError, match="pathways.safetensors is corrupted"):
        ReferenceIndex.load(tmp_path / "b", rm)
    _copy(index, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "index.json").read_text())
    del meta["files"]
    (tmp_path / "c" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ReferenceIndexError, match="lacks the digests"):
        ReferenceIndex.load(tmp_path / "c", rm)
    (tmp_path / "c" / "index.json").write_text("[1, 2]")
    with pytest.raises(ReferenceIndexError, match="not a reroute reference index"):
        ReferenceIndex.load(tmp_path / "c", rm)


def test_nan_query_raises(setup):
    _, _, index, _ = setup
    query = index.embeddings[:2].clone()
    query[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        index.search(query, k=1)


def test_failed_save_leaves_the_previous_index_whole(setup, tmp_path, monkeypatch):
    """Item 11: the JSON write fails after the tensors were written: the folder still holds the old index."""
    rm, tok, index, _ = setup
    target = tmp_path / "index"
    index.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    smaller = ReferenceIndex.build(rm, tok, _items(20, 5), progress=False)
    real = json.dumps

    def failing(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "reroute-reference-index":
            raise OSError("disk full")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr("reroute.c3po.index.json.dumps", failing)
    with pytest.raises(OSError, match="disk full"):
        smaller.save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no staging folder left behind
    assert len(ReferenceIndex.load(target, rm)) == len(index)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReferenceIndexError, match="is a file"):
        index.save(tmp_path / "file")


def test_loading_an_index_never_loads_an_embedder_named_only_by_the_file(setup, tmp_path, monkeypatch):
    """Item 16b: a tampered index.json naming a sentence-transformers model makes C3PO ask, not load it."""
    rm, tok, index, _ = setup
    index.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    meta["embedder"] = "sentence-transformers:/some/where/evil"
    (tmp_path / "i" / "index.json").write_text(json.dumps(meta))
    loaded_models = []
    monkeypatch.setattr(
        "reroute.c3po.embed.SentenceTransformerEmbedder.__init__", lambda self, name: loaded_models.append(name)
    )
    loaded = ReferenceIndex.load(tmp_path / "i")  # the data files are intact; the recorded name is just a name
    with pytest.raises(ReferenceIndexError, match="pass embedder='/some/where/evil'"):
        C3PO(rm, loaded, tok, critical_layers=1, core_experts=4)
    with pytest.raises(ReferenceIndexError, match="pass embedder="):
        run_eval(rm, tok, _items(1, 2), make_method("c3po", index=str(tmp_path / "i")))
    assert loaded_models == []


def test_c3po_asks_for_an_external_embedder_and_checks_its_name(setup, tmp_path, monkeypatch):
    """Item 16b: an index built with an external embedder needs it named by the user; names are checked first."""
    rm, tok, _, _ = setup
    fixed = CallableEmbedder(lambda texts: torch.randn(len(texts), 16, generator=torch.Generator().manual_seed(0)), "r")
    index = ReferenceIndex.build(rm, tok, _items(48, 1), embedder=fixed, progress=False)
    index.save(tmp_path / "ext")
    loaded = ReferenceIndex.load(tmp_path / "ext", rm)
    with pytest.raises(ReferenceIndexError, match="pass embedder="):
        C3PO(rm, loaded, tok, critical_layers=1, core_experts=4)
    loaded_models = []
    monkeypatch.setattr(
        "reroute.c3po.embed.SentenceTransformerEmbedder.__init__", lambda self, name: loaded_models.append(name)
    )
    with pytest.raises(ReferenceIndexError, match="cannot use embedder"):
        C3PO(rm, loaded, tok, embedder="another/encoder", critical_layers=1, core_experts=4)
    assert loaded_models == []  # the mismatch is found before anything is loaded
    C3PO(rm, loaded, tok, embedder=fixed, critical_layers=1, core_experts=4)  # the user's own: accepted
    C3PO(rm, index, tok, critical_layers=1, core_experts=4)  # the object it was built with, still in memory


def test_generate_runs_input_ids_as_given(setup):
    """Item 6: a prompt whose tokens do not survive decode + encode (an explicit BOS) is adapted on its own ids."""
    rm, tok, index, _ = setup
    c3po = C3PO(rm, index, tok, surrogate="mode", critical_layers=1, core_experts=4)
    ids = prompt_batch(tok, ["w5 w9 w11 w7"]).input_ids
    with_bos = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)  # decode(skip_special) drops the BOS
    adapted = c3po.adapt(["w5 w9 w11 w7"], input_ids=with_bos)
    text_only = c3po.adapt(["w5 w9 w11 w7"])
    assert not torch.equal(adapted.pathway.logits[2], text_only.pathway.logits[2])  # the BOS changed the routing
    out = c3po.generate(input_ids=with_bos, max_new_tokens=2, do_sample=False, pad_token_id=0)
    again = c3po.generate(input_ids=with_bos, adaptation=adapted, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out, again) and torch.equal(out[:, : with_bos.shape[1]], with_bos)


def test_clamped_layers_and_experts_warn_once(setup, monkeypatch):
    rm, tok, index, _ = setup
    monkeypatch.setattr(pathway_module, "_WARNED", set())
    with pytest.warns(UserWarning) as record:
        C3PO(rm, index, tok, surrogate="mode", critical_layers=7, core_experts=30)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "core_experts=30 exceeds the model's 8 experts per layer; using all of them",
        "critical_layers=7 exceeds the model's 3 MoE layers; using all of them",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C3PO(rm, index, tok, surrogate="mode", critical_layers=7, core_experts=30)  # once only
        C3PO(rm, index, tok, surrogate="mode", critical_layers=3, core_experts=8)  # exact sizes: no warning


def test_score_choices_refuses_a_prompt_longer_than_the_context(setup):
    """Item 18: a clear error before any work (the tiny model's context is 64 tokens)."""
    rm, tok, index, _ = setup
    c3po = C3PO(rm, index, tok, surrogate="mode", critical_layers=1, core_experts=4)
    limit = rm.model.config.max_position_embeddings
    long_item = dict(_items(1, 3)[0], prompt=" ".join(["w5"] * limit))
    with pytest.raises(ValueError, match=f"the model's context is {limit}"):
        c3po.score_choices([long_item])


def test_the_confidence_gate_skips_the_surrogate(setup, monkeypatch):
    """Items whose confidence gate fires are not optimised; the others get what they get alone."""
    rm, tok, index, _ = setup
    test = _items(4, 7)
    kwargs = dict(surrogate="ngd", critical_layers=1, core_experts=4, steps=3, lr=0.3, min_gain=None)
    free = C3PO(rm, index, tok, max_confidence=None, **kwargs).adapt(test)
    threshold = float(free.confidence.sort().values[2])  # the two most confident items abstain
    gated = C3PO(rm, index, tok, max_confidence=threshold, **kwargs).adapt(test)
    skipped = free.confidence >= threshold
    assert gated.stats["surrogate_items"] == 2 and torch.equal(gated.abstained, skipped)
    for layer in gated.pathway.layers:
        own = C3PO(rm, index, tok, max_confidence=None, **{**kwargs, "steps": 0}).adapt(test).pathway
        torch.testing.assert_close(gated.pathway.logits[layer][skipped], own.logits[layer][skipped])
        torch.testing.assert_close(
            gated.pathway.omega(layer)[~skipped], free.pathway.omega(layer)[~skipped], rtol=0, atol=1e-5
        )
    assert gated.stats["forward_passes"] < free.stats["forward_passes"]


def test_one_prompt_forward_gives_the_hidden_state_query(setup, monkeypatch):
    """With the hidden-state embedder on the prompt, retrieval reuses the prompt forward: same neighbours, one
    forward fewer."""
    rm, tok, index, _ = setup
    test = _items(3, 8)
    calls = []
    real = HiddenStateEmbedder.__call__
    monkeypatch.setattr(HiddenStateEmbedder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    c3po = C3PO(rm, index, tok, surrogate="kernel", critical_layers=1, core_experts=4)
    adapted = c3po.adapt(test)
    assert calls == []
    expected = index.search(real(c3po.embedder, rm, tok, [t["prompt"] for t in test]), 3, 0.95).ids
    assert torch.equal(adapted.neighbours, expected)


def test_no_gradient_left_on_user_offsets_after_c3po(setup):
    """Item 16a: the README's own offsets example is not disturbed by a C3PO call."""
    rm, tok, index, _ = setup
    optimizer = torch.optim.SGD(list(rm.offsets.parameters()), lr=0.1)
    C3PO(rm, index, tok, critical_layers=1, core_experts=4, steps=2, max_confidence=None).adapt(_items(2, 4))
    assert all(p.grad is None for p in rm.offsets.parameters())
    optimizer.step()  # no gradient: nothing moves
    assert all(float(p.abs().max()) == 0.0 for p in rm.offsets.parameters())
