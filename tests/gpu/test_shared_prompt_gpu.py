"""Scoring on the prompt's KV cache with reroute's Triton kernels on CUDA: equal to scoring full rows (fp32), for
plain scoring and for C3PO's re-mixed scoring. The CPU side (every family, every surrogate) is
``tests/test_shared_prompt.py``.

Run on a GPU machine: ``python -m pytest tests/gpu/test_shared_prompt_gpu.py -q``. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import reroute
from reroute.scoring import choice_batch, continuation_logprobs, continuation_logprobs_shared
from reroute.testing import tiny_model, tiny_tokenizer

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_shared_prompt_scoring_with_kernels_equals_full_rows(family: str) -> None:
    from conftest import random_mc_items

    rm = reroute.attach(tiny_model(family).cuda().eval())
    batch, n = choice_batch(tiny_tokenizer(), random_mc_items(6, 0, 20))
    batch = batch.to("cuda")
    with torch.no_grad():
        full = continuation_logprobs(rm.model, batch)
        shared = continuation_logprobs_shared(rm.model, batch, n)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("surrogate", ["mode", "kernel", "ngd"])
def test_c3po_scoring_on_the_prompt_cache_with_kernels_equals_the_full_forward(surrogate: str) -> None:
    pytest.importorskip("faiss")
    from conftest import random_mc_items

    from reroute.c3po import C3PO, ReferenceIndex

    rm, tok = reroute.attach(tiny_model("olmoe").cuda().eval()), tiny_tokenizer()
    index = ReferenceIndex.build(rm, tok, random_mc_items(32, 1, 12), progress=False)
    c3po = C3PO(rm, index, tok, surrogate=surrogate, critical_layers=2, core_experts=6, lr=0.3, min_gain=None,
                max_confidence=None, max_typicality=None)  # fmt: skip
    test = random_mc_items(4, 2, 12)
    adaptation = c3po.adapt(test)
    full = c3po._choice_scores(test, adaptation)
    torch.testing.assert_close(c3po._choice_scores(test), full, rtol=0, atol=1e-4)
