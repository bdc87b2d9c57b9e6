"""Command line: ``reroute demo | eval | families``.

``reroute demo`` runs base vs every method vs the oracle on the shipped trained testbed; ``--tiny FAMILY`` instead
shows routing move under an offset on a tiny random model of any supported family.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _console():
    from rich.console import Console

    return Console()


def demo_tiny(family: str, seed: int = 0) -> dict[str, object]:
    """Attach to a tiny random ``family`` model, push one expert up with an offset, report usage and tokens."""
    import reroute
    from reroute.testing import tiny_model

    model = tiny_model(family, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        plain = model.generate(tokens, max_new_tokens=8, do_sample=False)
    with reroute.attach(model) as rm:
        layer = rm.moe_layers[-1]
        with torch.no_grad(), rm.trace() as before:
            model(tokens)
        usage_before = before.expert_usage()[-1]
        expert = int(usage_before.argmin())  # the least used expert of the last MoE layer
        offsets = torch.zeros(rm.num_experts)
        offsets[expert] = 4.0
        rm.set_offsets({layer: offsets})
        with torch.no_grad(), rm.trace() as after:
            model(tokens)
        usage_after = after.expert_usage()[-1]
        with torch.no_grad():
            steered = model.generate(tokens, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        restored = model.generate(tokens, max_new_tokens=8, do_sample=False)
    return {
        "family": family,
        "moe_layers": rm.moe_layers,
        "layer": layer,
        "expert": expert,
        "usage_before": usage_before.tolist(),
        "usage_after": usage_after.tolist(),
        "tokens_changed": int((steered != plain).sum()),
        "detach_restores": bool(torch.equal(restored, plain)),
    }


def _print_tiny(result: dict[str, object]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"{result['family']}: expert usage in MoE layer {result['layer']} (share of assignments)")
    table.add_column("expert", justify="right")
    table.add_column("before", justify="right")
    table.add_column(f"offset +4 on expert {result['expert']}", justify="right")
    for e, (b, a) in enumerate(zip(result["usage_before"], result["usage_after"])):
        style = "bold green" if e == result["expert"] else None
        table.add_row(str(e), f"{b:.3f}", f"{a:.3f}", style=style)
    console.print(table)
    console.print(
        f"generated tokens changed by the offset: {result['tokens_changed']}; "
        f"after detach the model is the original again: {result['detach_restores']}"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    if args.tiny is None:
        from reroute.testbed import demo as testbed_demo

        return testbed_demo.main(args)
    result = demo_tiny(args.tiny, seed=args.seed)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    _print_tiny(result)
    return 0


def _load_model(spec: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``"testbed"``: the shipped trained testbed; otherwise a local ``from_pretrained`` folder."""
    torch_dtype = getattr(torch, dtype)
    if spec == "testbed":
        from reroute.testbed import load_testbed

        return load_testbed(dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(spec)


def _load_data(args: argparse.Namespace) -> list[dict[str, Any]]:
    from reroute.data import load_items

    if args.data:
        items = load_items(args.data)
    else:
        from reroute.testbed.suite import make_split

        items = make_split(args.split, n=args.limit or 400, seed=args.seed)
    return items[: args.limit] if args.limit else items


def _method_options(args: argparse.Namespace, rm: Any, tokenizer: Any) -> dict[str, Any]:
    if args.method != "c3po":
        return {}
    from reroute.c3po import ReferenceIndex

    if args.index:
        index = ReferenceIndex.load(args.index, rm)
    else:
        from reroute.testbed.suite import make_split

        cache = Path.home() / ".cache" / "reroute" / f"testbed-reference-{args.reference_size}-seed{args.seed}"
        index = ReferenceIndex.build(
            rm, tokenizer, make_split("reference", n=args.reference_size, seed=args.seed), path=cache, mode=args.mode
        )
    return {"index": index, "surrogate": args.surrogate}


def cmd_eval(args: argparse.Namespace) -> int:
    import reroute
    from reroute.eval import make_method, plot_bars, print_table, run_eval, write_json

    model, tokenizer = _load_model(args.model, args.device, args.dtype)
    rm = reroute.attach(model)
    items = _load_data(args)
    split = "custom" if args.data else args.split
    results: list[Any] = []
    for name in args.method.split(","):
        args.method = name
        method = make_method(name, **_method_options(args, rm, tokenizer))
        results.append(
            run_eval(
                rm,
                tokenizer,
                items,
                method,
                split=split,
                mode=args.mode,
                batch_size=args.batch_size,
                seed=args.seed,
                progress=not args.quiet,
            )
        )
    print_table(results, title=f"reroute eval · {args.model}")
    if args.json:
        write_json(results, args.json)
    if args.png:
        plot_bars(results, args.png, title=f"{split} ({args.mode})")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    from rich.table import Table

    import reroute

    table = Table(title="supported MoE families")
    table.add_column("model_type")
    table.add_column("family")
    table.add_column("routing rule")
    for key, name in reroute.supported_families().items():
        table.add_row(key, name, type(reroute.arch.family_for(key).rule).__name__)
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from reroute.testing import TINY_CONFIGS

    parser = argparse.ArgumentParser(prog="reroute", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show routing adaptation on the shipped testbed (or a tiny random model)")
    demo.add_argument("--tiny", choices=sorted(TINY_CONFIGS), help="use a tiny random model of this family")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the result as JSON to this path")
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("eval", help="accuracy of methods with 95%% intervals (testbed or your own data)")
    ev.add_argument("--method", default="base", help="base | oracle | c3po | rerouting | scmoe, comma-separated")
    ev.add_argument("--split", default="test_shift", help="testbed split: test | test_shift | test_fewshot | ...")
    ev.add_argument("--data", help="a JSONL file of items instead of a testbed split")
    ev.add_argument("--mode", choices=["mc", "gen"], default="mc", help="multiple choice or exact-match generation")
    ev.add_argument("--limit", type=int, help="evaluate the first N items")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--model", default="testbed", help="'testbed' or a local from_pretrained folder")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--surrogate", default="ngd", choices=["ngd", "kernel", "mode", "oracle"], help="C3PO surrogate")
    ev.add_argument("--index", help="C3PO reference index folder (default: built from the testbed's reference split)")
    ev.add_argument("--reference-size", type=int, default=800, help="testbed reference items run to build the index")
    ev.add_argument("--json", help="write one JSON object per run (a list) here")
    ev.add_argument("--png", help="write a bar chart of accuracy with 95%% intervals here")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)
    families = sub.add_parser("families", help="list the supported MoE families")
    families.set_defaults(func=cmd_families)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
