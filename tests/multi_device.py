"""Shared by the device tests: split a model over devices with accelerate, and run every method on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.testing import tiny_tokenizer


def split_device_map(model: torch.nn.Module, devices: Sequence[Any]) -> dict[str, Any]:
    """A ``device_map`` placing the first half of the decoder layers (and the embeddings) on ``devices[0]`` and
    the rest (and the final norm and head) on ``devices[-1]`` — what ``device_map="auto"`` does to a model that
    does not fit one device."""
    layers = len(model.model.layers)
    device_map = {f"model.{name}": devices[0] for name, _ in model.model.named_children() if name != "layers"}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = devices[0] if i < (layers + 1) // 2 else devices[-1]
    device_map["model.norm"] = devices[-1]
    device_map["lm_head"] = devices[-1]
    return device_map


def items(n: int, seed: int) -> list[dict]:
    """Multiple-choice items in the tiny tokenizer's vocabulary (``w3 ... w95``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, 96, (5,), generator=gen)]
        choices = [f" w{int(t)}" for t in torch.randperm(90, generator=gen)[:4] + 3]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4, "answer": choices[i % 4]})
    return out


def run_methods(
    rm: reroute.RoutedModel,
    index: ReferenceIndex | None,
    device: torch.device,
    weak: Sequence[str] = ("rank2", "random1"),
) -> dict[str, Any]:
    """Every method's outputs on fixed inputs (``device``: where inputs go), as CPU tensors and plain lists, so that
    a split model's results can be compared with a single-device model's. Without an ``index`` (no faiss), C3PO
    runs its oracle surrogate only."""
    tok = tiny_tokenizer()
    tests = items(4, 7)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 31, 8, 12, 40]], device=device)
    mask = (ids != 0).long()
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["logits"] = rm.model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    with rm.trace() as trace:
        with torch.no_grad():
            rm.model(input_ids=ids, attention_mask=mask)
    out["usage"] = trace.expert_usage(mask).cpu()
    out["entropy"] = trace.entropy(mask).cpu()
    common = {"critical_layers": 2, "core_experts": 4, "k": 3, "min_gain": None, "steps": 3, "lr": 0.3}
    adaptation = None
    for surrogate in ("ngd", "kernel", "mode", "oracle") if index is not None else ("oracle",):
        c3po = C3PO(rm, index, tok, surrogate=surrogate, **common)
        adaptation = c3po.adapt(tests)
        out[f"c3po_{surrogate}_pathway"] = {k: v.cpu() for k, v in adaptation.pathway.logits.items()}
        out[f"c3po_{surrogate}_scores"] = c3po.score_choices(tests, adaptation)
    prompts = [t["prompt"] for t in tests]
    out["c3po_generate"] = c3po.generate(prompts=prompts, adaptation=adaptation, max_new_tokens=4).cpu()
    rerouter = reroute.Rerouter(rm, interval=2, steps=2, lr=0.1)
    out["rerouting"] = rerouter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False).cpu()
    out["rerouting_loss"] = [p.loss_after for p in rerouter.phases]
    confident = reroute.Rerouter(rm, interval=3, steps=1, layers="confidence", l2=0.1)
    out["rerouting_confidence"] = confident.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4).cpu()
    for design in ("one-batch", "two-pass"):
        for routing in weak:
            scmoe = reroute.SCMoE(rm, weak=routing, design=design, seed=3)
            torch.manual_seed(0)
            sampled = scmoe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=5)
            out[f"scmoe_{design}_{routing}"] = sampled.cpu()
    sampler = reroute.text_sampler(reroute.SCMoE(rm, weak=weak[0]).generate, tok, device=device, max_new_tokens=3)
    torch.manual_seed(0)
    votes = reroute.self_consistency(
        sampler, ["w5 w6 w7", "w9 w10"], n=3, extract_answer=lambda s: (s.split() or [None])[0]
    )
    out["self_consistency"] = [v.samples for v in votes]
    return out


def assert_same_results(split: dict[str, Any], single: dict[str, Any], atol: float = 1e-5) -> None:
    assert split.keys() == single.keys()
    for key in single:
        a, b = split[key], single[key]
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            torch.testing.assert_close(a, b, rtol=atol, atol=atol, msg=key)
        elif isinstance(b, dict):
            for layer in b:
                torch.testing.assert_close(a[layer], b[layer], rtol=1e-4, atol=1e-4, msg=f"{key}[{layer}]")
        elif isinstance(b, list) and b and isinstance(b[0], torch.Tensor):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=key)
        elif isinstance(b, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key
