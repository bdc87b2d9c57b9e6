"""Command line: ``reroute demo | families``.

``reroute demo`` runs on the shipped trained testbed when it is installed, and otherwise (or with
``--tiny FAMILY``) on a tiny random model of any supported family, showing routing move under an offset.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    family = args.tiny
    if family is None:
        try:
            from reroute.testbed import demo as testbed_demo
        except ImportError:
            testbed_demo = None
        if testbed_demo is not None:
            return testbed_demo.main(args)
        family = "olmoe"
    result = demo_tiny(family, seed=args.seed)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    _print_tiny(result)
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
    families = sub.add_parser("families", help="list the supported MoE families")
    families.set_defaults(func=cmd_families)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
