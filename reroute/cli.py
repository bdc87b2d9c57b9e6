"""Command line: ``reroute demo | eval | index build | families | lm-eval``.

``reroute demo`` runs base vs every method vs the oracle on the shipped trained testbed; ``--tiny FAMILY`` instead
shows routing move under an offset on a tiny random model of any supported family. ``reroute eval`` measures
accuracy with 95% intervals for any registered method (:mod:`reroute.methods`; ``--set METHOD.FIELD=VALUE`` reaches
every config field); ``reroute index build`` builds a C3PO reference index from a JSONL file; ``reroute lm-eval`` is
lm-evaluation-harness's command line with the ``reroute`` model.

Exit codes: 0 success, 1 a runtime failure (a one-line ``reroute: error: ...`` on stderr for expected errors such as
a missing file or an unsupported model; ``--traceback``, anywhere on the line, shows the whole trace), 2 a usage
error (a bad flag or value, an unknown method or setting: the usage line and one error line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import platform
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


class UsageError(ValueError):
    """A bad command line (unknown method or setting, a value its config rejects): exit code 2 with the usage."""


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


def _check_device(device: str) -> None:
    """A device this machine has, or one clear line (torch's own error is a traceback deep in ``.to``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _load_model(spec: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``"testbed"``: the shipped trained testbed; otherwise a local ``from_pretrained`` folder."""
    _check_device(device)
    torch_dtype = getattr(torch, dtype)
    if spec == "testbed":
        from reroute.testbed import load_testbed

        return load_testbed(dtype=torch_dtype, device=device)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder {spec} (--model takes 'testbed' or a local from_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec} holds no config.json: --model needs a folder written by save_pretrained")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _load_data(args: argparse.Namespace) -> list[dict[str, Any]]:
    from reroute.data import load_items

    if args.data:
        items = load_items(args.data)
    else:
        from reroute.testbed.suite import make_split

        items = make_split(args.split, n=args.limit or 400, seed=args.seed)
    return items[: args.limit] if args.limit else items


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false/null, lists, quoted strings), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_settings(names: Sequence[str], assignments: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` from ``--set METHOD.KEY=VALUE`` assignments (config fields or resources of
    registered methods among ``names``); a :class:`UsageError` names what is wrong."""
    from reroute.methods import get_method

    settings: dict[str, dict[str, Any]] = {name: {} for name in names}
    for assignment in assignments:
        target, sep, value = assignment.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise UsageError(f"--set {assignment!r}: write METHOD.KEY=VALUE, e.g. --set c3po.steps=5")
        if method not in settings:
            raise UsageError(
                f"--set {assignment!r}: {method!r} is not among the evaluated methods ({', '.join(names)})"
            )
        options = get_method(method).option_names()
        if key not in options:
            raise UsageError(
                f"--set {assignment!r}: {method} has no setting {key!r}; its settings: {', '.join(options)}"
            )
        settings[method][key] = _parse_value(value)
    return settings


def _cache_name(rm: Any, data: Path, embedder: str | None, query_field: str, mode: str) -> str:
    """Index cache folder name: the model's fingerprint, the data's content, the embedder (as resolved: ``"text"``
    names whichever text retriever is installed) and the query field."""
    from reroute.c3po.embed import embedder_name

    content = hashlib.sha256(data.read_bytes()).hexdigest()
    parts = [rm.fingerprint(), content, embedder_name(embedder), query_field, mode]
    return f"index-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}"


def _reference_index(args: argparse.Namespace, rm: Any, tokenizer: Any) -> Any:
    """C3PO's index: ``--index``, else built from ``--reference`` (cached per model fingerprint, data, embedder and
    query field), else the testbed's own (testbed model only)."""
    from reroute.c3po import ReferenceIndex

    if args.index:
        return ReferenceIndex.load(args.index, rm)
    if args.reference:
        from reroute.testbed.reference import cache_folder

        reference = Path(args.reference)
        path = cache_folder() / _cache_name(rm, reference, args.embedder, args.query_field or "prompt", args.mode)
        return ReferenceIndex.build(
            rm,
            tokenizer,
            str(reference),
            embedder=args.embedder,
            mode=args.mode,
            path=path,
            query_field=args.query_field or "prompt",
            progress=not args.quiet,
        )
    if args.model != "testbed":
        raise UsageError(
            "C3PO on a model other than the testbed needs --index DIR (see 'reroute index build') or --reference "
            "FILE (reference items to build it from); the testbed's reference set does not fit another model"
        )
    from reroute.testbed.reference import DEFAULT_EMBEDDER, DEFAULT_QUERY_FIELD, reference_index

    return reference_index(
        rm,
        tokenizer,
        n=args.reference_size,
        seed=args.seed,
        embedder=args.embedder or DEFAULT_EMBEDDER,
        query_field=args.query_field or DEFAULT_QUERY_FIELD,
        mode=args.mode,
        progress=not args.quiet,
    )


def _specs(args: argparse.Namespace) -> list[Any]:
    """One :class:`~reroute.eval.MethodSpec` per ``--method`` name, with its ``--set`` settings (checked before
    any model is loaded). Resources a method needs from the model (C3PO's index) are added later."""
    from reroute.eval import MethodSpec
    from reroute.methods import available_methods, get_method

    names = [name.strip() for name in args.method.split(",") if name.strip()]
    unknown = [name for name in names if name not in available_methods()]
    if unknown or not names:
        raise UsageError(
            f"unknown method {', '.join(map(repr, unknown)) or repr(args.method)}; "
            f"known: {', '.join(available_methods())}"
        )
    assignments = list(args.set or [])
    if args.surrogate is not None:  # the older flag, kept as a shorthand
        assignments = [f"c3po.surrogate={args.surrogate}"] + assignments if "c3po" in names else assignments
    settings = method_settings(names, assignments)
    specs = []
    for name in names:
        entry = get_method(name)
        try:  # config fields now (a bad value is a usage error); resources once the model is loaded
            config_options, resources = entry.split_options(settings[name])
            specs.append(MethodSpec(name, entry.make_config(config_options), resources))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{name}: {exc}") from exc
    return specs


def _versions() -> dict[str, str]:
    names = ("reroute-moe", "torch", "transformers", "numpy", "lm_eval", "faiss-cpu")
    versions = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    import reroute

    versions["reroute"] = reroute.__version__
    return versions


def _jsonable_config(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def cmd_eval(args: argparse.Namespace) -> int:
    import reroute
    from reroute.eval import plot_bars, print_table, run_eval

    specs = _specs(args)
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"no data file {args.data}")
    if args.index and not Path(args.index).is_dir():
        raise FileNotFoundError(f"no reference index folder {args.index}")
    if args.reference and not Path(args.reference).is_file():
        raise FileNotFoundError(f"no reference data file {args.reference}")
    model, tokenizer = _load_model(args.model, args.device, args.dtype)
    rm = reroute.attach(model)
    items = _load_data(args)
    split = "custom" if args.data else args.split
    index = None
    results: list[Any] = []
    for spec in specs:
        if "index" in _method_resources(spec.name) and "index" not in spec.resources:
            index = index if index is not None else _reference_index(args, rm, tokenizer)
            spec.resources["index"] = index
        results.append(
            run_eval(
                rm,
                tokenizer,
                items,
                spec,
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
        _emit_json(_records(args, rm, specs, results), args.json)
    if args.png:
        plot_bars(results, args.png, title=f"{split} ({args.mode})")
    return 0


def _method_resources(name: str) -> dict[str, str]:
    from reroute.methods import get_method

    return get_method(name).method_cls.resources


def _records(args: argparse.Namespace, rm: Any, specs: Sequence[Any], results: Sequence[Any]) -> list[dict]:
    """The per-run records with provenance (model, fingerprint, method config, versions, seed, data) and, when
    ``base`` ran too, each method's paired difference to it."""
    from reroute.eval import paired_difference

    base = next((r for r in results if r.method == "base"), None)
    model = args.model if args.model == "testbed" else str(Path(args.model).resolve())
    records = []
    for spec, result in zip(specs, results):
        record = result.to_json()
        record["provenance"] = {
            "model": model,
            "fingerprint": rm.fingerprint(),
            "method": spec.name,
            "method_config": _jsonable_config(spec.config),
            "resources": {k: repr(v) for k, v in spec.resources.items()},
            "reference": args.index or args.reference or ("testbed:reference" if args.model == "testbed" else None),
            "data": str(Path(args.data).resolve()) if args.data else f"testbed:{args.split}",
            "seed": args.seed,
            "batch_size": args.batch_size,
            "device": args.device,
            "dtype": args.dtype,
            "versions": _versions(),
        }
        if base is not None and result is not base:
            record["vs_base"] = paired_difference(result.correct, base.correct, seed=args.seed)
        records.append(record)
    return records


def cmd_index_build(args: argparse.Namespace) -> int:
    """Build a C3PO reference index from a JSONL file of items the model is run on."""
    import reroute

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no data file {args.data}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    model, tokenizer = _load_model(args.model, args.device, args.dtype)
    rm = reroute.attach(model)
    index = reroute.ReferenceIndex.build(
        rm,
        tokenizer,
        args.data,
        embedder=args.embedder,
        mode=args.mode,
        batch_size=args.batch_size,
        path=out,
        query_field=args.query_field,
        progress=not args.quiet,
    )
    print(f"reroute: index of {len(index)} reference items (answered correctly) in {out}", file=sys.stderr)
    return 0


def _rule_text(rule: Any) -> str:
    """The routing rule in the README's words (a registered family's own rule: its docstring's first line)."""
    from reroute.arch import rules

    texts = {
        rules.TopKSoftmax: "top-k on logits → softmax over the k",
        rules.DeepseekV2Softmax: "softmax → (group-limited) greedy → `routed_scaling_factor`",
        rules.SigmoidGroupLimited: "sigmoid + `e_score_correction_bias` → group-limited top-k → renormalise → "
        "`routed_scaling_factor`; dense first layers skipped",
        rules.SparseMixer: "SparseMixer top-2 (transformers' own function)",
    }
    if isinstance(rule, rules.SoftmaxTopK):
        if rule.renorm_attr is None:
            return "softmax (float32) → top-k → renormalise"
        return f"softmax → top-k → renormalise if `{rule.renorm_attr}`"
    if type(rule) in texts:
        return texts[type(rule)]
    return (type(rule).__doc__ or type(rule).__name__).strip().splitlines()[0]


def family_rows() -> list[dict[str, Any]]:
    """The README's table: the families sharing a routing rule in one row (rows in the order of their first
    family by ``model_type``)."""
    import reroute

    rows: dict[str, dict[str, Any]] = {}
    for key, name in reroute.supported_families().items():
        rule = _rule_text(reroute.arch.family_for(key).rule)
        row = rows.setdefault(rule, {"families": [], "model_types": [], "routing_rule": rule})
        row["families"].append(name)
        row["model_types"].append(key)
    return list(rows.values())


def families_markdown() -> str:
    """:func:`family_rows` as the markdown table in the README."""
    lines = ["| family | `model_type` | routing rule |", "|---|---|---|"]
    for row in family_rows():
        types = ", ".join(f"`{t}`" for t in row["model_types"])
        lines.append(f"| {', '.join(row['families'])} | {types} | {row['routing_rule']} |")
    return "\n".join(lines)


def cmd_families(args: argparse.Namespace) -> int:
    from rich.table import Table

    import reroute

    if args.json:
        rows = [
            {"model_type": key, "family": name, "routing_rule": _rule_text(reroute.arch.family_for(key).rule)}
            for key, name in reroute.supported_families().items()
        ]
        _emit_json(rows, "-")
        return 0
    if args.markdown:
        print(families_markdown())
        return 0
    table = Table(title="supported MoE families")
    for column in ("family", "model_type", "routing rule"):
        table.add_column(column)
    for row in family_rows():
        table.add_row(", ".join(row["families"]), ", ".join(row["model_types"]), row["routing_rule"].replace("`", ""))
    console = _console()
    if not console.is_terminal:  # pipes and logs: wide enough that no rule is cut
        console = type(console)(width=max(console.width, 140))
    console.print(table)
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
    try:
        resolve_method(method, method_args, merged, state)
    except FileNotFoundError:
        raise
    except ValueError as exc:  # a bad --model_args is a usage error
        raise UsageError(f"--model_args: {exc}") from exc


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


def _methods_help() -> str:
    """One line per registered method: its settings (config fields and resources)."""
    from reroute.methods import available_methods, get_method

    lines = []
    for name in available_methods():
        options = get_method(name).option_names()
        lines.append(f"  {name}: {', '.join(options) if options else '(no settings)'}")
    return "\n".join(lines)


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
        percentile-bootstrap 95% interval, seconds per item and experts per token; the JSON adds each run's
        provenance and its paired difference to base with a 95% interval. Data: a testbed split or a JSONL file
        of items {"prompt", "choices", "label"} (generation: also "answer").
        Methods and their settings (--set METHOD.KEY=VALUE):
        {methods}
        """,
        """
        reroute eval --method base,c3po,rerouting,scmoe --split test_shift --limit 200
        reroute eval --method base,c3po,scmoe --set c3po.steps=5 --set scmoe.beta=0.3 --set scmoe.weak=rank3
        reroute eval --model ./my-olmoe --data items.jsonl --method base,c3po --reference ref.jsonl --json r.json
        reroute eval --method base --limit 50 --json - | jq '.[0].accuracy'
        """,
    )
    ev.add_argument("--method", default="base", help="comma-separated method names (listed above; default base)")
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
        "--set",
        action="append",
        metavar="METHOD.KEY=VALUE",
        help="a method setting (any config field, e.g. c3po.steps=5, rerouting.lr=0.01, scmoe.weak=rank3, "
        "c3po.min_agreement=0.5); values are JSON or plain strings; repeatable",
    )
    ev.add_argument(
        "--surrogate",
        choices=["ngd", "kernel", "mode", "oracle", "official"],
        help="C3PO surrogate (= --set c3po.surrogate=S)",
    )
    ev.add_argument("--index", help="C3PO reference index folder (see 'reroute index build')")
    ev.add_argument(
        "--reference",
        help="C3PO: a JSONL file of reference items to build the index from (cached per model fingerprint, data, "
        "embedder and query field)",
    )
    ev.add_argument(
        "--embedder",
        help="C3PO retrieval embedder for --reference or the testbed: hidden | pathway | lexical | minilm | text "
        "(minilm where installed, else lexical) | a sentence-transformers name (default: lexical on the testbed, "
        "else hidden, as ReferenceIndex.build)",
    )
    ev.add_argument(
        "--query-field",
        help="item field embedded for C3PO retrieval (default: the cue-free 'question' on the testbed, else 'prompt', "
        "as ReferenceIndex.build)",
    )
    ev.add_argument(
        "--reference-size", type=_positive_int, default=800, help="testbed reference items run to build its index"
    )
    ev.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write one JSON object per run (a list, each with its provenance and its paired difference to base) to "
        "PATH; without PATH (or '-'), to stdout, the table on stderr",
    )
    ev.add_argument("--png", help="write a bar chart of accuracy with 95%% intervals here")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval, parser=ev)
    ev.description = (ev.description or "").replace("{methods}", _methods_help())

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
    families.add_argument("--markdown", action="store_true", help="print the README's markdown table")
    families.set_defaults(func=cmd_families)

    index = _sub(
        sub,
        "index",
        "build a C3PO reference index",
        """
        'reroute index build' runs the model on reference items (a JSONL file of {"prompt", "choices", "label"} or
        {"prompt", "answer"}), keeps those it answers correctly with their routing pathways and embeddings, and
        writes the index folder that 'reroute eval --index' and C3PO load.
        """,
        """
        reroute index build --model ./my-moe --data reference.jsonl --out ./my-index
        reroute index build --data reference_sets/testbed/reference.jsonl --out idx --embedder lexical \\
            --query-field question
        """,
    )
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = index_sub.add_parser("build", help="build an index from a JSONL file", description="Build a C3PO index.")
    build.add_argument("--data", required=True, help="JSONL file of reference items")
    build.add_argument("--out", required=True, help="the index folder to write (resumed if it holds one)")
    build.add_argument("--model", default="testbed", help="'testbed' or a local from_pretrained folder")
    build.add_argument(
        "--embedder",
        help="hidden (default) | pathway | lexical | minilm | text (minilm where installed, else lexical) | a "
        "sentence-transformers name",
    )
    build.add_argument("--query-field", default="prompt", help="item field embedded for retrieval (default prompt)")
    build.add_argument("--mode", choices=["mc", "gen"], default="mc", help="how answers are checked (default mc)")
    build.add_argument("--batch-size", type=_positive_int, default=16, help="items per batch (default 16)")
    build.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    build.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_index_build, parser=build)

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


def _guarded(run: Callable[[], int], traceback: bool, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command: a usage error prints the usage and one line (exit 2); an expected failure one line (exit 1)."""
    try:
        return int(run())
    except KeyboardInterrupt:
        print("reroute: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        if traceback:
            raise
        if parser is not None:
            print(parser.format_usage().rstrip(), file=sys.stderr)
        prog = parser.prog if parser is not None else "reroute"
        print(f"{prog}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as exc:
        if traceback:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"reroute: error: {message}".splitlines()[0], file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv  # anywhere on the line, before or after the command
    argv = [a for a in argv if a != "--traceback"]
    if argv and argv[0] == "lm-eval":
        rest = argv[1:]
        return _guarded(lambda: cmd_lm_eval(rest), traceback)
    parser = build_parser()
    args = parser.parse_args(argv)
    return _guarded(lambda: args.func(args), traceback, getattr(args, "parser", parser))


if __name__ == "__main__":
    sys.exit(main())
