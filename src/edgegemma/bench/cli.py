"""``python -m edgegemma.bench``: measure, print the table, write JSON/Markdown/plot.

python -m edgegemma.bench                        # every installed backend, defaults
python -m edgegemma.bench -p 512 -n 128 -r 10 --json out.json --plot out.png
python -m edgegemma.bench --target ssh://pi@raspberrypi.local --json pi.json
python -m edgegemma.bench --target adb --llama-bench ./android/llama-bench --json phone.json
python -m edgegemma.bench compare laptop.json pi.json phone.json --plot all.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters.option import AdapterGrammar
from ..backends import available_backends
from ..errors import EdgeGemmaError, InvalidParameterError
from ..skills import SKILLS
from . import report as reports
from .schema import load_report
from .targets import BenchRequest, run_local, run_ssh
from .workloads import parse_sizes, shipped_tasks


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _output_options(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument(
        "--json", metavar="PATH", help="write the report as JSON ('-': stdout, and no table)"
    )
    out.add_argument(
        "--markdown", metavar="PATH", help="write the tables as Markdown ('-': stdout)"
    )
    out.add_argument(
        "--plot", metavar="PATH", help="write a PNG of tok/s and latency distributions (matplotlib)"
    )


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgegemma.bench",
        description="Measure edgegemma's backends side by side: prefill and decode tok/s, time to "
        "first token, request latency percentiles, task accuracy, peak RSS, load and adapter "
        "swap time. 'python -m edgegemma.bench compare A.json B.json ...' merges reports.",
    )
    where = parser.add_argument_group("where")
    where.add_argument(
        "--target",
        default="local",
        help="local (default), ssh://[user@]host[:port], adb or adb:SERIAL",
    )
    where.add_argument(
        "--remote-python",
        default="python3",
        help="python with edgegemma installed, on the ssh target",
    )
    where.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="passed to ssh as -o OPTION (e.g. IdentityFile=~/.ssh/pi); repeatable",
    )
    where.add_argument(
        "--adb", default="adb", metavar="PATH", help="the adb executable (default: adb on PATH)"
    )
    what = parser.add_argument_group("what")
    what.add_argument(
        "--backend",
        action="append",
        default=[],
        help="measure this backend (repeatable; default: all installed)",
    )
    what.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[BACKEND=]MODEL",
        help="model name from models.lock or path, for every backend or for BACKEND only "
        "(repeatable; default: what edgegemma.load(backend=...) opens)",
    )
    _adapter_grammar().add_to(
        what,
        "also measure every workload with this LoRA adapter (at scale 1), and its swap time; "
        "BACKEND: gives one backend its own file; a bare skill name (sensor, emoji) takes the "
        "shipped skill's adapter for each backend (repeatable)",
    )
    what.add_argument(
        "-p",
        "--pp",
        default="128",
        metavar="N[,N]",
        help="prompt-processing workloads: prompt tokens (0: none; default 128)",
    )
    what.add_argument(
        "-n",
        "--tg",
        default="32",
        metavar="N[,N]",
        help="text-generation workloads: generated tokens (0: none; default 32)",
    )
    what.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help=f"task workload, shipped ({', '.join(shipped_tasks())}) or a JSONL file; "
        "'none' for no task (repeatable; default: sensor)",
    )
    what.add_argument(
        "--task-limit", type=_positive, metavar="N", help="use the first N examples of each task"
    )
    what.add_argument(
        "--ids",
        choices=("random", "fixed"),
        default="random",
        help="synthetic prompt token ids (default: random)",
    )
    what.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the raw llama.cpp loop the engine is compared with",
    )
    what.add_argument(
        "--server",
        action="store_true",
        help="also run the synthetic workloads through `edgegemma serve` on localhost, paired "
        "request by request with the in-process engine: the server's cost per request",
    )
    what.add_argument(
        "--llama-bench",
        metavar="PATH",
        help="llama.cpp's llama-bench: also run it as a reference (local, ssh); "
        "the binary run on the device (adb)",
    )
    what.add_argument(
        "--llama-completion",
        metavar="PATH",
        help="adb target: llama.cpp's llama-completion built for Android, to run task workloads "
        "(with and without each --adapter) on the device",
    )
    how = parser.add_argument_group("how")
    how.add_argument(
        "-r",
        "--repetitions",
        type=_positive,
        default=5,
        help="measured repetitions per synthetic workload (default 5)",
    )
    how.add_argument(
        "--warmup", type=_non_negative, default=1, help="unmeasured runs first (default 1)"
    )
    how.add_argument(
        "-t",
        "--threads",
        type=_positive,
        help="threads (default: edgegemma's default for this machine)",
    )
    how.add_argument("--n-ctx", type=_positive, default=2048, help="context window (default 2048)")
    how.add_argument(
        "--seed", type=int, default=0, help="seed of the random prompt ids (default 0)"
    )
    _output_options(parser)
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgegemma.bench compare",
        description="Merge bench reports from several machines into one table and plot.",
    )
    parser.add_argument("reports", nargs="+", metavar="REPORT.json")
    _output_options(parser)
    return parser


def _adapter_grammar() -> AdapterGrammar:
    """``--adapter`` of the bench: per backend or for all, a file or a skill, at scale 1."""
    return AdapterGrammar(backends=tuple(available_backends()), skills=tuple(SKILLS), scale=False)


def request_from(args: argparse.Namespace) -> BenchRequest:
    grammar = _adapter_grammar()
    adapters = [grammar.parse(spec) for spec in args.adapter]
    tasks = args.task or ["sensor"]
    return BenchRequest(
        backends=tuple(args.backend),
        models=tuple(args.model),
        adapters=tuple((a.backend, a.name, a.path) for a in adapters),
        pp=tuple(parse_sizes(args.pp, "-p")),
        tg=tuple(parse_sizes(args.tg, "-n")),
        tasks=tuple(t for t in tasks if t != "none"),
        task_limit=args.task_limit,
        repetitions=args.repetitions,
        warmup=args.warmup,
        threads=args.threads,
        n_ctx=args.n_ctx,
        seed=args.seed,
        ids=args.ids,
        baseline=not args.no_baseline,
        server=args.server,
        llama_bench=args.llama_bench,
        llama_completion=args.llama_completion,
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    request = request_from(args)
    target = args.target
    if request.llama_completion and not target.startswith("adb"):
        raise InvalidParameterError(
            "--llama-completion is for the adb target; locally the Engine runs tasks"
        )
    if target == "local":
        return run_local(request)
    if target.startswith("ssh://"):
        return run_ssh(target, request, remote_python=args.remote_python, options=args.ssh_option)
    if target == "adb" or target.startswith("adb:"):
        from .adb import run_adb

        return run_adb(target, request, adb=args.adb)
    raise InvalidParameterError(
        f"unknown target {target!r}: use local, ssh://[user@]host[:port], adb or adb:SERIAL"
    )


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written, before anything is measured."""
    for option in ("json", "markdown", "plot"):
        path = getattr(args, option)
        if not path or path == "-":
            continue
        target = Path(path)
        folder = target.parent if str(target.parent) else Path(".")
        if target.is_dir():
            raise InvalidParameterError(f"--{option} {path} is a folder; give a file name")
        if not folder.is_dir():
            raise InvalidParameterError(f"--{option} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise InvalidParameterError(f"--{option} {path} cannot be written")
    if args.plot:
        try:
            import matplotlib  # noqa: F401 -- only checked for here
        except ImportError:
            raise InvalidParameterError(
                "--plot needs matplotlib: pip install 'edgegemma[bench]'"
            ) from None


def output(found: list[dict[str, Any]], args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json != "-":
        print(reports.format_table(found), end="", flush=True)
    if args.json:
        _write(args.json, json.dumps(document, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, reports.format_markdown(found))
    if args.plot:
        reports.plot(found, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench (or ``compare``); 0 on success, 1 when a measurement failed, 2 on bad input."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["compare"]:
            args = compare_parser().parse_args(args_list[1:])
            check_outputs(args)
            found = [load_report(path) for path in args.reports]
            output(found, args, {"schema": "edgegemma.bench.compare/1", "reports": found})
            return 0
        args = run_parser().parse_args(args_list)
        check_outputs(args)  # before a run of minutes, not after it
        result = measure(args)
        output([result], args, result)
    except InvalidParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EdgeGemmaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if reports.failed(result) else 0
