"""Plain-PyTorch reference routing, written token by token from the families' papers/configs.

Independent of ``reroute.arch.rules``: a score function per family, a ranking, a selection and a weight rule,
computed in float64 with Python loops, so the tests compare the library against arithmetic a reader can check.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SIGMOID_FAMILIES = {"deepseek_v3", "glm4_moe"}
ALWAYS_RENORM = {"mixtral", "gpt_oss", "granitemoe", "phimoe"}


def router_logits(family: str, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` float64 logits of the router on ``hidden [T, H]``."""
    weight = router.weight.detach().double()
    logits = hidden.detach().double().reshape(-1, weight.shape[1]) @ weight.T
    bias = getattr(router, "bias", None)
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.detach().double()
    return logits


def scores(family: str, logits: torch.Tensor) -> torch.Tensor:
    return logits.sigmoid() if family in SIGMOID_FAMILIES else logits.softmax(-1)


def choice(family: str, router: nn.Module, s: torch.Tensor) -> list[list[float]]:
    """Per token, the ranking score of each expert (``-inf`` for experts outside the chosen groups)."""
    out = []
    num_experts = s.shape[-1]
    for row in s.tolist():
        if family in SIGMOID_FAMILIES:
            bias = router.e_score_correction_bias.double().tolist()
            row = [v + b for v, b in zip(row, bias)]
            group_size = num_experts // router.num_group
            groups = [sorted(row[g * group_size : (g + 1) * group_size])[-2:] for g in range(router.num_group)]
            group_score = [sum(g) for g in groups]
        elif family == "deepseek_v2" and router.topk_method == "group_limited_greedy":
            group_size = num_experts // router.num_group
            group_score = [max(row[g * group_size : (g + 1) * group_size]) for g in range(router.num_group)]
        else:
            out.append(row)
            continue
        keep = sorted(range(router.num_group), key=lambda g: -group_score[g])[: router.topk_group]
        out.append([v if e // group_size in keep else -math.inf for e, v in enumerate(row)])
    return out


def renormalizes(family: str, router: nn.Module) -> bool:
    if family in ALWAYS_RENORM:
        return True
    if family == "deepseek_v2":
        return False
    return bool(router.norm_topk_prob)


def scaling(family: str, router: nn.Module) -> float:
    return float(getattr(router, "routed_scaling_factor", 1.0))


def route(
    family: str,
    router: nn.Module,
    logits: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    rank: int | None = None,
    banned: tuple[int, ...] = (),
    forced: tuple[int, ...] = (),
) -> list[dict[int, float]]:
    """Per token ``{expert: weight}`` of the experts with non-zero weight."""
    s = scores(family, logits)
    result = []
    for t, ranking in enumerate(choice(family, router, s)):
        ranking = [(-math.inf if e in banned else math.inf if e in forced else v) for e, v in enumerate(ranking)]
        order = sorted(range(len(ranking)), key=lambda e: -ranking[e])
        row = s[t].tolist()
        if rank is not None:
            result.append({order[rank - 1]: 1.0 * scaling(family, router)})
            continue
        if top_p is not None:
            total, chosen = sum(row), []
            for e in order:
                if ranking[e] == -math.inf:
                    break
                chosen.append(e)
                if sum(row[c] for c in chosen) / total >= top_p:
                    break
        else:
            chosen = [e for e in order[: top_k or router.top_k] if ranking[e] != -math.inf]
        weights = {e: row[e] for e in chosen}
        if renormalizes(family, router):
            norm = sum(weights.values())
            weights = {e: w / norm for e, w in weights.items()}
        result.append({e: w * scaling(family, router) for e, w in weights.items()})
    return result


def as_dicts(indices: torch.Tensor, weights: torch.Tensor) -> list[dict[int, float]]:
    """Library output ``[T, k]`` to per-token ``{expert: weight}`` (zero-weight padding dropped, duplicates summed)."""
    out = []
    for idx_row, w_row in zip(
        indices.reshape(-1, indices.shape[-1]).tolist(), weights.reshape(-1, weights.shape[-1]).tolist()
    ):
        token: dict[int, float] = {}
        for e, w in zip(idx_row, w_row):
            if w != 0.0:
                token[e] = token.get(e, 0.0) + w
        out.append(token)
    return out


def assert_same_routing(actual: list[dict[int, float]], expected: list[dict[int, float]], tol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        assert set(a) == set(e), f"token {t}: experts {sorted(a)} != expected {sorted(e)}"
        for expert in e:
            assert abs(a[expert] - e[expert]) <= tol * max(1.0, abs(e[expert])), (
                f"token {t} expert {expert}: weight {a[expert]} != expected {e[expert]}"
            )
