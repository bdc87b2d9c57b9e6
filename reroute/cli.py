"""Command line: ``reroute demo | eval | families | lm-eval``.

``reroute demo`` runs base vs every method vs the oracle on the shipped trained testbed; ``--tiny FAMILY`` instead
shows routing move under an offset on a tiny random model of any supported family. ``reroute eval`` measures
accuracy with 95% intervals; ``reroute lm-eval`` is lm-evaluation-harness's command line with the ``reroute`` model.

Exit codes: 0 success, 1 a runtime failure (a one-line ``reroute: error: ...`` on stderr for expected errors such as
a missing file, an unknown method or an unsupported model; ``--traceback`` shows the whole trace), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Errors a user can cause and fix (bad path, bad option, unsupported model): reported in one line, not a traceback.
# UnsupportedModelError and ReferenceIndexError are ValueErrors.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, ImportError)


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


@contextlib.contextmanager
def _tables_to_stderr(enabled: bool) -> Iterator[None]:
    """While JSON goes to stdout, send the human-readable tables to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _emit_json(data: Any, target: str) -> None:
    """Write ``data`` as JSON to the file ``target``, or to stdout for ``-``."""
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def cmd_demo(args: argparse.Namespace) -> int:
    to_stdout = args.json == "-"
    if args.tiny is None:
        from reroute.testbed import demo as testbed_demo

        if not to_stdout:
            return testbed_demo.main(args)
        with tempfile.TemporaryDirectory() as folder:
            args.json = str(Path(folder) / "demo.json")
            with _tables_to_stderr(True):
                code = testbed_demo.main(args)
            _emit_json(json.loads(Path(args.json).read_text()), "-")
        return code
    result = demo_tiny(args.tiny, seed=args.seed)
    if args.json:
        _emit_json(result, args.json)
    with _tables_to_stderr(to_stdout):
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
        from reroute.testbed.reference import reference_index

        index = reference_index(
            rm,
            tokenizer,
            n=args.reference_size,
            seed=args.seed,
            embedder=args.embedder,
            query_field=args.query_field,
            mode=args.mode,
            progress=not args.quiet,
        )
    return {"index": index, "surrogate": args.surrogate}


def cmd_eval(args: argparse.Namespace) -> int:
    import reroute
    from reroute.eval import METHODS, make_method, plot_bars, print_table, run_eval

    names = [name.strip() for name in args.method.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown)) or repr(args.method)}; known: {', '.join(METHODS)}"
        )
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"no data file {args.data}")
    if args.index and not Path(args.index).is_dir():
        raise FileNotFoundError(f"no reference index folder {args.index}")
    model, tokenizer = _load_model(args.model, args.device, args.dtype)
    rm = reroute.attach(model)
    items = _load_data(args)
    split = "custom" if args.data else args.split
    results: list[Any] = []
    for name in names:
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
    with _tables_to_stderr(args.json == "-"):
        print_table(results, title=f"reroute eval · {args.model}")
    if args.json:
        _emit_json([r.to_json() for r in results], args.json)
    if args.png:
        plot_bars(results, args.png, title=f"{split} ({args.mode})")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    from rich.table import Table

    import reroute

    rows = [
        {"model_type": key, "family": name, "routing_rule": type(reroute.arch.family_for(key).rule).__name__}
        for key, name in reroute.supported_families().items()
    ]
    if args.json:
        _emit_json(rows, "-")
        return 0
    table = Table(title="supported MoE families")
    table.add_column("model_type")
    table.add_column("family")
    table.add_column("routing rule")
    for row in rows:
        table.add_row(row["model_type"], row["family"], row["routing_rule"])
    _console().print(table)
    return 0


LM_EVAL_COMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: Sequence[str], subcommands: bool = True) -> list[str]:
    """lm-eval's argv for ``reroute lm-eval ARGS``: ``--model reroute`` unless a model is named, and (for lm-eval
    versions with subcommands, 0.4.10 on) ``run`` when no subcommand is given, as lm-eval itself does."""
    argv = list(argv)
    command = argv.pop(0) if subcommands and argv and argv[0] in LM_EVAL_COMMANDS else "run"
    named = any(a in ("--model", "-M") or a.startswith("--model=") for a in argv)
    if command == "run" and not named:
        argv = ["--model", "reroute", *argv]
    return [command, *argv] if subcommands else argv


def _check_reroute_model_args(argv: Sequence[str]) -> None:
    """Check ``--model_args`` of the reroute model before lm-eval loads anything (its task index alone takes
    seconds), so a bad method or option fails at once."""
    try:
        from lm_eval._cli.utils import key_val_to_dict, try_parse_json
    except ImportError:  # an lm-eval without this parser: the model's own checks still run, only later
        return
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--model", "-M")
    probe.add_argument("--model_args", "-a", nargs="+", action="append", default=[])
    known, _ = probe.parse_known_args(list(argv))
    if known.model not in (None, "reroute"):
        return
    merged: dict[str, Any] = {}
    for values in known.model_args:
        parsed = try_parse_json(values[0])
        if isinstance(parsed, dict):
            merged.update(parsed)
        else:
            for value in values:
                merged.update(key_val_to_dict(value))
    from reroute.lmeval import resolve_method

    method, method_args, state = (
        merged.pop("method", "base"),
        merged.pop("method_args", None),
        merged.pop("state", None),
    )
    resolve_method(method, method_args, merged, state)


def cmd_lm_eval(argv: Sequence[str]) -> int:
    """Run lm-eval's command line with the ``reroute`` model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise ImportError(
            f"reroute lm-eval needs lm-evaluation-harness: pip install 'reroute-moe[lm-eval]' ({exc})"
        ) from exc
    import reroute.lmeval

    try:
        import lm_eval._cli  # noqa: F401  (subcommands: lm-eval 0.4.10 and later)

        subcommands = True
    except ImportError:
        subcommands = False
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv) and not (argv and argv[0] in ("ls", "validate")):
        print(reroute.lmeval.usage() + "\n")
        argv = ["--help"]
    else:
        _check_reroute_model_args(argv)
    saved = sys.argv
    # lm-eval's entry point reads sys.argv (the workaround lm-eval issue #1621 suggests for external models)
    sys.argv = ["reroute lm-eval", *lm_eval_argv(argv, subcommands)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _sub(sub: Any, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary.replace('%%', '%')}.\n\n{textwrap.dedent(description).strip()}",
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    from reroute import __version__
    from reroute.testing import TINY_CONFIGS

    parser = argparse.ArgumentParser(
        prog="reroute",
        description="Test-time adaptation of the expert routing of transformers Mixture-of-Experts models "
        "(C3PO, continuous rerouting, SCMoE).",
        epilog=textwrap.dedent(
            """
            exit codes: 0 success, 1 runtime failure (one line on stderr), 2 usage error, 130 interrupted.
            'reroute COMMAND --help' describes each command.
            """
        ).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reroute {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full Python traceback of a failure, not one line"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _sub(
        sub,
        "demo",
        "show routing adaptation on the shipped testbed (or a tiny random model)",
        """
        On the shipped trained testbed: accuracy of the base routing, C3PO, rerouting, SCMoE and the oracle on the
        first test_shift items (the domain cue removed, so routing must come from content). With --tiny FAMILY: a
        tiny random model of that family, one expert pushed up by a router-logit offset, expert usage before and
        after, and a check that detach restores the original model.
        """,
        """
        reroute demo
        reroute demo --tiny mixtral --json -
        """,
    )
    demo.add_argument("--tiny", choices=sorted(TINY_CONFIGS), help="use a tiny random model of this family")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write the result as JSON to PATH; without PATH (or '-'), JSON on stdout and the table on stderr",
    )
    demo.set_defaults(func=cmd_demo)

    ev = _sub(
        sub,
        "eval",
        "accuracy of methods with 95%% intervals (testbed or your own data)",
        """
        Multiple choice (the choice with the highest log-likelihood) or exact-match generation, per method, with a
        percentile-bootstrap 95% interval, seconds per item and experts per token. Data: a testbed split or a
        JSONL file of items {"prompt", "choices", "label"} (generation: also "answer").
        """,
        """
        reroute eval --method base,c3po,rerouting,scmoe --split test_shift --limit 200
        reroute eval --model ./my-olmoe --data items.jsonl --method base,scmoe --json results.json --png acc.png
        reroute eval --method base --limit 50 --json - | jq '.[0].accuracy'
        """,
    )
    ev.add_argument("--method", default="base", help="base | oracle | c3po | rerouting | scmoe, comma-separated")
    ev.add_argument("--split", default="test_shift", help="testbed split: test | test_shift | test_fewshot | ...")
    ev.add_argument("--data", help="a JSONL file of items instead of a testbed split")
    ev.add_argument("--mode", choices=["mc", "gen"], default="mc", help="multiple choice or exact-match generation")
    ev.add_argument("--limit", type=_positive_int, help="evaluate the first N items")
    ev.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ev.add_argument("--batch-size", type=_positive_int, default=16, help="items per batch (default 16)")
    ev.add_argument("--model", default="testbed", help="'testbed' or a local from_pretrained folder")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument(
        "--surrogate", default="ngd", choices=["ngd", "kernel", "mode", "oracle", "official"], help="C3PO surrogate"
    )
    ev.add_argument(
        "--embedder",
        default="lexical",
        help="C3PO retrieval on the testbed: lexical (default), hidden, pathway or a sentence-transformers name",
    )
    ev.add_argument(
        "--query-field",
        default="question",
        help="item field embedded for C3PO retrieval on the testbed (default: the cue-free 'question')",
    )
    ev.add_argument("--index", help="C3PO reference index folder (default: built from the testbed's reference split)")
    ev.add_argument(
        "--reference-size", type=_positive_int, default=800, help="testbed reference items run to build the index"
    )
    ev.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write one JSON object per run (a list) to PATH; without PATH (or '-'), to stdout, the table on stderr",
    )
    ev.add_argument("--png", help="write a bar chart of accuracy with 95%% intervals here")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    families = _sub(
        sub,
        "families",
        "list the supported MoE families",
        "Each transformers model_type reroute.attach accepts, its family and its routing rule.",
        """
        reroute families
        reroute families --json
        """,
    )
    families.add_argument("--json", action="store_true", help="print the list as JSON")
    families.set_defaults(func=cmd_families)

    # Parsed by lm-eval itself (main() hands everything after "lm-eval" over); listed here for --help.
    _sub(
        sub,
        "lm-eval",
        "lm-evaluation-harness with the 'reroute' model (lm-eval's own arguments)",
        """
        lm-eval's command line cannot load models registered by other packages, so this runs it with the model
        'reroute' registered and '--model reroute' as the default. model_args: pretrained=testbed|<model>,
        method=base|static|c3po|rerouting|scmoe, state=<saved routing state>, and the method's options
        (method_args={...} or plain keys). 'reroute lm-eval --help' lists them with lm-eval's own arguments.
        """,
        """
        reroute lm-eval --model_args pretrained=testbed,method=rerouting,steps=3 --tasks my_task \\
            --include_path ./tasks --device cpu --limit 8
        reroute lm-eval --model_args pretrained=./olmoe,method=c3po,index=./index --tasks arc_easy --batch_size 8
        reroute lm-eval ls tasks
        """,
    )
    return parser


def _guarded(run: Callable[[], int], traceback: bool) -> int:
    """Run a command; expected failures become one line on stderr and exit code 1."""
    try:
        return int(run())
    except KeyboardInterrupt:
        print("reroute: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if traceback:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"reroute: error: {message}".splitlines()[0], file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = False
    while argv and argv[0] == "--traceback":
        traceback = True
        argv.pop(0)
    if argv and argv[0] == "lm-eval":
        rest = argv[1:]
        return _guarded(lambda: cmd_lm_eval(rest), traceback)
    args = build_parser().parse_args(argv)
    traceback = traceback or args.traceback
    return _guarded(lambda: args.func(args), traceback)


if __name__ == "__main__":
    sys.exit(main())
