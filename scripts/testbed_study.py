"""The measurements behind the methods' defaults, on the trained testbed (one JSON file per study).

* ``c3po``: neighbour domain agreement per retrieval choice (embedder x embedded field); per item, for every
  surrogate and retrieval choice with the gate off, base and adapted correctness, the gate's two quantities (relative
  neighbour-loss gain, neighbours' pathway agreement) and the neighbours' domains, so any gate threshold can be
  evaluated afterwards exactly (an abstaining item answers as base); base and oracle through the harness.
* ``rerouting``: generation accuracy and time on ``test_fewshot`` for the layer choices (all, the most uncertain
  half, the most confident half), base beside them.
* ``scmoe``: multiple choice and generation per weak routing and beta, the weak routing alone, and the mechanism
  check: on items the strong routing gets wrong, does the weak routing favour the strong model's wrong answer more
  than the gold one (so that the contrast pushes towards gold)?

    python scripts/testbed_study.py --device cuda --out study/   # all studies
    python scripts/testbed_study.py --only scmoe --limit 100     # one study, fewer items
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import reroute
from reroute.c3po import C3PO, ReferenceIndex
from reroute.c3po.embed import make_embedder
from reroute.eval import make_method, run_eval
from reroute.scoring import choice_batch, continuation_logprobs
from reroute.testbed import load_testbed
from reroute.testbed.suite import make_split

RETRIEVAL = [("hidden", "prompt"), ("pathway", "prompt"), ("pathway", "question"), ("lexical", "question")]
SPLITS = ["test_shift", "test_fewshot", "test"]


def _chunks(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _summary(result) -> dict:
    out = result.to_json()
    out.pop("correct", None)
    return {**out, "correct": [bool(c) for c in result.correct]}


def c3po_study(rm, tok, args) -> dict:
    reference = make_split("reference", args.reference, seed=0)
    indexes = {
        (emb, field): ReferenceIndex.build(rm, tok, reference, embedder=emb, query_field=field, progress=False)
        for emb, field in RETRIEVAL
    }
    out: dict = {"reference_seen": len(reference), "reference_successful": len(next(iter(indexes.values()))),
                 "splits": {}}  # fmt: skip
    for split in SPLITS:
        items = make_split(split, args.limit, seed=0)
        record: dict = {"agreement": {}, "runs": {}}
        for (emb, field), index in indexes.items():
            embedder = make_embedder(emb)
            queries = embedder(rm, tok, index.query_texts(items))
            found = index.search(queries, 3)
            same = [
                sum(index.items[int(j)]["domain"] == item["domain"] for j in row) / 3
                for item, row in zip(items, found.ids)
            ]
            record["agreement"][f"{emb}:{field}"] = sum(same) / len(same)
        base = run_eval(rm, tok, items, make_method("base"), split=split, progress=False)
        oracle = run_eval(rm, tok, items, make_method("oracle"), split=split, batch_size=args.batch, progress=False)
        record["base"], record["oracle"] = _summary(base), _summary(oracle)
        runs = [("mode", ("hidden", "prompt"))] + [
            (surrogate, retrieval) for surrogate in ("kernel", "ngd") for retrieval in RETRIEVAL
        ]
        for surrogate, retrieval in runs:
            index = indexes[retrieval]
            c3po = C3PO(rm, index, tok, surrogate=surrogate, min_gain=None, min_agreement=None)
            rows, start, fwd, bwd = [], time.perf_counter(), 0.0, 0.0
            for batch in _chunks(items, args.batch):
                adaptation = c3po.adapt(batch)
                preds = c3po.score_choices(batch, adaptation)
                fwd += adaptation.stats["forward_passes"] * len(batch)
                bwd += adaptation.stats["backward_passes"] * len(batch)
                for i, item in enumerate(batch):
                    ids = adaptation.neighbours[i].tolist()
                    rows.append({
                        "correct": preds[i] == item["label"],
                        "gain": float(adaptation.gain[i]),
                        "agreement": float(adaptation.agreement[i]),
                        "neighbour_domains": [index.items[j]["domain"] for j in ids],
                        "domain": item["domain"],
                    })  # fmt: skip
            seconds = time.perf_counter() - start
            key = f"{surrogate}" if surrogate == "mode" else f"{surrogate}@{retrieval[0]}:{retrieval[1]}"
            record["runs"][key] = {
                "items": rows,
                "seconds_per_item": seconds / len(items),
                "forward_passes_per_item": fwd / len(items),
                "backward_passes_per_item": bwd / len(items),
            }
            acc = sum(r["correct"] for r in rows) / len(rows)
            print(f"c3po {split:<13} {key:<28} ungated {100 * acc:5.1f}  base {100 * base.accuracy:5.1f}", flush=True)
        out["splits"][split] = record
    return out


def rerouting_study(rm, tok, args) -> dict:
    out: dict = {}
    variants = {
        "all layers": {"layers": "all"},
        "uncertain half": {"layers": "confidence", "prefer": "uncertain"},
        "confident half": {"layers": "confidence", "prefer": "confident"},
    }
    for split, mode in [("test_fewshot", "gen"), ("test_shift", "gen"), ("test_fewshot", "mc")]:
        items = make_split(split, args.limit, seed=0)
        record = {"base": _summary(run_eval(rm, tok, items, make_method("base"), split=split, mode=mode,
                                            batch_size=args.batch, progress=False))}  # fmt: skip
        for name, options in variants.items():
            method = make_method("rerouting", options=options)
            record[name] = _summary(
                run_eval(rm, tok, items, method, split=split, mode=mode, batch_size=args.batch, progress=False)
            )
            print(f"rerouting {split} {mode} {name:<16} {100 * record[name]['accuracy']:5.1f} "
                  f"(base {100 * record['base']['accuracy']:5.1f})", flush=True)  # fmt: skip
        out[f"{split}:{mode}"] = record
    return out


def _choice_logprobs(rm, tok, items, weak=None) -> torch.Tensor:
    """Summed log-probabilities of every choice ``[N, C]`` under the strong routing or a weak one."""
    batch, n_choices = choice_batch(tok, items)
    batch = batch.to(rm.model.device)
    with torch.no_grad(), weak.applied(rm, batch.input_ids.shape[0]) if weak else contextlib.nullcontext():
        scores = continuation_logprobs(rm.model, batch)
    return scores.view(len(items), n_choices).cpu()


def scmoe_study(rm, tok, args) -> dict:
    from reroute.scmoe import SCMoE

    top_k = rm.top_k
    weaks = ["rank2", "top1", f"top{top_k // 2}", "random1"]
    out: dict = {"weak": weaks, "splits": {}}
    for split in ["test", "test_shift"]:
        items = make_split(split, args.limit, seed=0)
        record: dict = {"base": {}, "weak_alone": {}, "mechanism": {}, "runs": {}}
        for mode in ("mc", "gen"):
            record["base"][mode] = _summary(run_eval(rm, tok, items, make_method("base"), split=split, mode=mode,
                                                     batch_size=args.batch, progress=False))  # fmt: skip
        strong = torch.cat([_choice_logprobs(rm, tok, b) for b in _chunks(items, args.batch)])
        labels = torch.tensor([item["label"] for item in items])
        strong_pred = strong.argmax(-1)
        for weak in weaks:
            if weak != "random1":  # weak alone (MC) and the mechanism check need a deterministic weak routing
                resolved = SCMoE(rm, weak=weak).weak
                lp = torch.cat([_choice_logprobs(rm, tok, b, resolved) for b in _chunks(items, args.batch)])
                record["weak_alone"][weak] = float((lp.argmax(-1) == labels).float().mean())
                wrong = strong_pred != labels
                shift = lp - strong  # how much more (log) the weak routing likes a choice than the strong one
                rows = torch.arange(len(items))
                gap = shift[rows, strong_pred] - shift[rows, labels]  # > 0: contrast moves from the error to gold
                record["mechanism"][weak] = {
                    "strong_wrong": int(wrong.sum()),
                    "share_contrast_towards_gold": float((gap[wrong] > 0).float().mean()) if wrong.any() else None,
                    "mean_gap_on_wrong": float(gap[wrong].mean()) if wrong.any() else None,
                    "share_right_kept": float((gap[~wrong] <= 0).float().mean()) if (~wrong).any() else None,
                }
            for beta in args.betas:
                for mode in ("mc", "gen") if beta == 0.5 else ("gen",):
                    method = make_method("scmoe", options={"weak": weak, "beta": beta, "seed": 0})
                    result = run_eval(rm, tok, items, method, split=split, mode=mode, batch_size=args.batch,
                                      progress=False)  # fmt: skip
                    record["runs"][f"{weak}|beta={beta}|{mode}"] = _summary(result)
                    print(f"scmoe {split:<11} {weak:<8} beta {beta:<4} {mode:<3} {100 * result.accuracy:5.1f} "
                          f"(base {100 * record['base'][mode]['accuracy']:5.1f})", flush=True)  # fmt: skip
        out["splits"][split] = record
    return out


def self_consistency_study(rm, tok, args) -> dict:
    """Majority vote over ``n`` samples (temperature 1) per prompt, plain sampling vs SCMoE sampling, beside each
    method's greedy answer; generation mode on ``test_shift``."""
    from reroute import SCMoE, self_consistency, text_sampler
    from reroute.scoring import normalise_answer, predicted_answer

    items = make_split("test_shift", args.sc_limit, seed=0)
    prompts = [item["prompt"] for item in items]
    gold = [normalise_answer(item["answer"]) for item in items]
    out: dict = {"n": args.sc_n, "items": len(items)}
    generators = {"plain": rm.model.generate, "scmoe (rank2, beta 0.5)": SCMoE(rm, weak="rank2").generate}
    for name, generate in generators.items():
        torch.manual_seed(0)
        sampler = text_sampler(generate, tok, device=rm.model.device, max_new_tokens=4, temperature=1.0,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        votes = self_consistency(sampler, prompts, args.sc_n, lambda text: predicted_answer(text) or None)
        greedy = text_sampler(generate, tok, device=rm.model.device, do_sample=False, max_new_tokens=4,
                              pad_token_id=tok.pad_token_id)  # fmt: skip
        greedy_answers = [predicted_answer(greedy(prompt, 1)[0]) for prompt in prompts]
        out[name] = {
            "greedy": sum(a == g for a, g in zip(greedy_answers, gold)) / len(items),
            f"maj@{args.sc_n}": sum(v.winner == g for v, g in zip(votes, gold)) / len(items),
            "sample_accuracy": sum(a == g for v, g in zip(votes, gold) for a in v.answers) / (len(items) * args.sc_n),
        }
        print(f"self-consistency {name:<24} {out[name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--reference", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--only", choices=["c3po", "rerouting", "scmoe", "self_consistency"], nargs="+")
    parser.add_argument("--sc-limit", type=int, default=200, help="items in the self-consistency study")
    parser.add_argument("--sc-n", type=int, default=8, help="samples per prompt in the self-consistency study")
    parser.add_argument("--out", default="study")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_testbed(device=args.device)
    rm = reroute.attach(model)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    studies = [("c3po", c3po_study), ("rerouting", rerouting_study), ("scmoe", scmoe_study),
               ("self_consistency", self_consistency_study)]  # fmt: skip
    for name, study in studies:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        result = study(rm, tok, args)
        result.update(device=device, seconds=time.perf_counter() - start, limit=args.limit)
        (folder / f"{name}.json").write_text(json.dumps(result))
        print(f"{name}: {result['seconds']:.0f} s on {device}", flush=True)


if __name__ == "__main__":
    main()
