"""``surrogate="official"`` against a reference written from the authors' released algorithm (issue 18 item 5).

tianyi-lab/C3PO @e4e064a (``olmoe_optimizer.py``), as equations: retrieve the k most cosine-similar reference items
(no near-duplicate exclusion); per critical layer average their stored last-prompt-token routing distributions over
all experts with weights ``cos_i / sum cos``; renormalise; at the last token of every forward (under teacher forcing:
the last prompt token and every continuation token) replace the token's routing scores by that distribution, scaled
to the token's own routing mass (1 for a softmax), and let the family select its top-k as usual.

The reference below runs on the *unattached* transformers model, with the routers' forwards rewritten from the
families' rules in plain PyTorch; it shares no code with reroute's routing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.c3po.embed import CallableEmbedder
from reroute.scoring import choice_batch, continuation_logprobs
from reroute.testing import tiny_model, tiny_tokenizer

FAMILIES = ("olmoe", "mixtral", "deepseek_v3")


def _items(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, 96, (7 - i % 3,), generator=gen)]
        choices = ["".join(f" w{int(t)}" for t in torch.randint(3, 96, (2,), generator=gen)) for _ in range(4)]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4})
    return out


PROJECTION = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))


def _bag_of_words(texts: list[str]) -> torch.Tensor:
    """A fixed model-free embedding, word counts times a random projection (no ties in similarity); the authors
    use all-MiniLM-L6-v2, but retrieval is not what is compared here."""
    out = torch.zeros(len(texts), 96)
    for row, text in enumerate(texts):
        for word in text.split():
            out[row, int(word[1:]) % 96] += 1.0
    return out @ PROJECTION


def _gates(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> router module (the families' ``*TopKRouter``/``*TopkRouter``)."""
    gates = {}
    for idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if type(module).__name__.lower().endswith("topkrouter"):
                gates[idx] = module
    return gates


def _scores(family: str, gate: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits and per-expert routing scores, as the family computes them."""
    if family == "deepseek_v3":
        logits = F.linear(hidden.float(), gate.weight.float())
        return logits, logits.sigmoid()
    logits = F.linear(hidden, gate.weight)
    return logits, torch.softmax(logits.float(), dim=-1)


def _select(family: str, gate: torch.nn.Module, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's top-k selection and weights from per-expert scores ``[T, E]``."""
    if family == "deepseek_v3":
        choice = scores + gate.e_score_correction_bias
        groups = choice.view(len(choice), gate.num_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(gate.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        indices = choice.topk(gate.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * gate.routed_scaling_factor, indices
    weights, indices = scores.topk(gate.top_k, dim=-1)
    if family == "mixtral" or gate.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


def _reference_routing(family, model, layers, replace):
    """Patch the routers of ``layers``: where ``replace[layer]`` (``hit [T]``, ``p [T, E]``) says so, the token's
    scores become ``mass * p``. Returns the undo function."""
    undo = []
    for idx in layers:
        gate = _gates(model)[idx]
        hit, target = replace[idx]

        def forward(hidden, gate=gate, hit=hit, target=target):
            hidden = hidden.reshape(-1, gate.weight.shape[-1])
            logits, scores = _scores(family, gate, hidden)
            mass = scores.sum(-1, keepdim=True)
            scores = torch.where(hit[:, None], mass * target, scores)
            weights, indices = _select(family, gate, scores)
            return logits, weights.to(logits.dtype) if family == "olmoe" else weights, indices

        gate.forward = forward
        undo.append(gate)
    return lambda: [g.__dict__.pop("forward") for g in undo]


def _last_prompt_distributions(family, model, tok, prompts, layers) -> torch.Tensor:
    """Each prompt's routing scores at its last token in ``layers``: ``[N, Lc, E]`` (one prompt per forward)."""
    rows = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        seen = {}
        hooks = [
            _gates(model)[idx].register_forward_hook(
                lambda m, args, out, idx=idx, seen=seen: seen.__setitem__(
                    idx, _scores(family, m, args[0].reshape(-1, m.weight.shape[-1]))[1][-1]
                )
            )
            for idx in layers
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for hook in hooks:
            hook.remove()
        rows.append(torch.stack([seen[idx] for idx in layers]))
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_official_surrogate_matches_the_released_algorithm(family):
    tok = tiny_tokenizer()
    rm = reroute.attach(tiny_model(family))
    reference_model = tiny_model(family)  # same seed, same weights, never attached
    embedder = CallableEmbedder(_bag_of_words, "bag-of-words")
    index = ReferenceIndex.build(rm, tok, _items(40, 1), embedder=embedder, progress=False)
    test = _items(4, 2)
    k = 3
    c3po = C3PO(rm, index, tok, surrogate="official", k=k, critical_layers=2)
    layers = c3po.layers

    # the released algorithm, from its equations
    queries = F.normalize(_bag_of_words([t["prompt"] for t in test]), dim=-1)
    keys = F.normalize(_bag_of_words([t["prompt"] for t in index.items]), dim=-1)
    cos, ids = (queries @ keys.T).topk(k, dim=-1)
    stored = _last_prompt_distributions(family, reference_model, tok, [t["prompt"] for t in index.items], layers)
    average = (cos[..., None, None] * stored[ids]).sum(1) / cos.sum(-1)[:, None, None]  # [B, Lc, E]
    average = average / average.sum(-1, keepdim=True)

    adaptation = c3po.adapt(test)
    assert torch.equal(adaptation.neighbours.sort(-1).values, ids.sort(-1).values)
    for i, layer in enumerate(layers):
        diff = (adaptation.pathway.omega(layer) - average[:, i]).abs().max()
        assert diff <= 1e-6, f"layer {layer}: mixing weights differ by {diff}"
    assert not adaptation.abstained.any()  # the authors' code has no gate

    batch, n_choices = choice_batch(tok, test)
    c3po.apply(adaptation, batch.prompt_len, total_len=batch.input_ids.shape[1])
    try:
        with torch.no_grad(), rm.row_expansion(n_choices):  # each item's state covers its choices' rows
            ours = continuation_logprobs(rm.model, batch)
    finally:
        rm.clear_mixing()
    columns = torch.arange(batch.input_ids.shape[1])
    hit = (columns >= batch.prompt_len - 1).expand(len(batch.input_ids), -1).reshape(-1)
    replace = {
        layer: (hit, average[:, i].repeat_interleave(n_choices, 0).repeat_interleave(len(columns), 0))
        for i, layer in enumerate(layers)
    }
    undo = _reference_routing(family, reference_model, layers, replace)
    try:
        with torch.no_grad():
            theirs = continuation_logprobs(reference_model, batch)
    finally:
        undo()
    with torch.no_grad():
        base = continuation_logprobs(reference_model, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # summed log-probs near -9: 1 ulp is 9.5e-7
    assert (ours - base).abs().max() > 1e-3  # the re-mixing changes the scores: the comparison is not vacuous
    assert c3po.score_choices(test, adaptation) == theirs.view(len(test), n_choices).argmax(-1).tolist()
