"""The ``edgegemma`` command: generate text, manage models, convert formats."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .engine import OVERFLOW_POLICIES, load
from .errors import EdgeGemmaError, InvalidParameterError

_SUBCOMMANDS = {
    "models": ("edgegemma.models", "list, fetch, verify and pin the artifacts in models.lock"),
    "convert": ("edgegemma.convert", "build ONNX / LiteRT models from the locked GGUF"),
    "adapters": ("edgegemma.adapters", "convert PEFT adapters for a backend; inspect, validate"),
    "train": ("edgegemma.train", "fine-tune a LoRA adapter on a JSONL of examples (CPU)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _SUBCOMMANDS:
        module = importlib.import_module(_SUBCOMMANDS[args[0]][0])
        try:
            return int(module.main(args[1:]))
        except EdgeGemmaError as exc:
            print(f"edgegemma {args[0]}: error: {exc}", file=sys.stderr)
            return 1
    parser = _parser()
    options = parser.parse_args(args)
    if options.command != "generate":
        parser.print_help()
        return 2
    try:
        return _generate(options)
    except EdgeGemmaError as exc:
        print(f"edgegemma: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgegemma",
        description="Run Gemma models on edge devices, with LoRA adapters swapped at runtime.",
        epilog="Benchmarks: python -m edgegemma.bench --help",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser("generate", help="generate a continuation of a prompt")
    for name, (_, summary) in _SUBCOMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    gen.add_argument("prompt", help='prompt text ("-" reads standard input)')
    gen.add_argument(
        "--model",
        default="gemma3-270m",
        help="models.lock name or file path (default: %(default)s)",
    )
    gen.add_argument(
        "--backend", help="llamacpp, onnx or mediapipe (default: chosen from the model file)"
    )
    gen.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH[:SCALE]",
        help="load a LoRA adapter and use it (repeatable; scale defaults to 1.0)",
    )
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--n-ctx", type=int, default=2048)
    gen.add_argument(
        "--threads", type=int, help="CPU threads (default: available cores, at most 8)"
    )
    gen.add_argument("--on-overflow", choices=OVERFLOW_POLICIES, default="error")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    return parser


def _generate(options: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if options.prompt == "-" else options.prompt
    adapters = [_parse_adapter(spec) for spec in options.adapter]
    with load(
        options.model,
        backend=options.backend,
        n_ctx=options.n_ctx,
        n_threads=options.threads,
        on_overflow=options.on_overflow,
    ) as engine:
        for name, path, _ in adapters:
            engine.load_adapter(name, path)
        stream = engine.stream(
            prompt,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop,
            adapters={name: scale for name, _, scale in adapters},
        )
        with stream:
            for piece in stream:
                if options.stream:
                    print(piece, end="", flush=True)
        result = stream.result
        print("" if options.stream else result.text)
        if options.stats:
            s = result.stats
            print(
                f"[{engine.backend_name}] prompt {s.prompt_tokens} tok ({s.cached_tokens} cached), "
                f"{s.completion_tokens} generated, ttft {s.ttft_s * 1000:.0f} ms, prefill "
                f"{s.prefill_tps:.1f} tok/s, decode {s.decode_tps:.1f} tok/s, peak RSS "
                f"{s.peak_rss_mb:.0f} MiB, finish: {result.finish_reason} ({result.finish_detail})",
                file=sys.stderr,
            )
    return 0


def _parse_adapter(spec: str) -> tuple[str, str, float]:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise InvalidParameterError(f"--adapter takes NAME=PATH[:SCALE], got {spec!r}")
    path, colon, scale_text = rest.rpartition(":")
    if colon:
        try:
            return name, path, float(scale_text)
        except ValueError:
            pass  # a ':' that is part of the path
    return name, rest, 1.0
