"""The ``edgegemma`` command: generate text, measure perplexity, dispatch the other commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .adapters.option import AdapterGrammar
from .backends.base import round_n_ctx
from .engine import HELDOUT_TEXT, load
from .errors import EdgeGemmaError, InvalidParameterError
from .models import default_model
from .options import OVERFLOW_POLICIES
from .threads import MAX_DEFAULT_THREADS

THREADS_HELP = f"CPU threads (default: the free cores, at most {MAX_DEFAULT_THREADS})"
"""What ``load(n_threads=None)`` gives: threads.ThreadPolicy over threads.default_threads()."""

_ADAPTER = AdapterGrammar()
"""``--adapter`` of generate and perplexity: one model on one backend, at any scale."""

_SUBCOMMANDS = {
    "models": ("edgegemma.models", "list, fetch, verify and pin the artifacts in models.lock"),
    "convert": ("edgegemma.convert", "build GGUF variants, ONNX and LiteRT models from a GGUF"),
    "adapters": (
        "edgegemma.adapters",
        "convert, inspect, validate adapters; pack, publish, pull signed updates",
    ),
    "train": ("edgegemma.train", "fine-tune a LoRA adapter on a JSONL of examples (CPU)"),
    "serve": ("edgegemma.serve", "an OpenAI-compatible HTTP server, adapters chosen per request"),
    "gateway": ("edgegemma.gateway", "answer MQTT readings with calibrated decisions (a skill)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _SUBCOMMANDS:
        try:
            module = importlib.import_module(_SUBCOMMANDS[args[0]][0])
        except ModuleNotFoundError as exc:  # a command of an extra that is not installed
            print(f"edgegemma {args[0]}: error: {exc}", file=sys.stderr)
            return 1
        try:
            return int(module.main(args[1:]))
        except EdgeGemmaError as exc:
            print(f"edgegemma {args[0]}: error: {exc}", file=sys.stderr)
            return 1
    parser = _parser()
    options = parser.parse_args(args)
    commands = {"generate": _generate, "perplexity": _perplexity}
    if options.command not in commands:
        parser.print_help()
        return 2
    try:
        return commands[options.command](options)
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
        default=None,
        help="models.lock name or file path (default: gemma3-270m-embed-iq4_nl on llama.cpp, "
        "gemma3-270m on the backends built from it)",
    )
    gen.add_argument(
        "--backend", help="llamacpp, onnx or mediapipe (default: chosen from the model file)"
    )
    _ADAPTER.add_to(gen, "load a LoRA adapter and use it (repeatable; scale defaults to 1.0)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--n-ctx", type=int, default=2048)
    gen.add_argument("--threads", type=int, help=THREADS_HELP)
    gen.add_argument("--on-overflow", choices=OVERFLOW_POLICIES, default="error")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    ppl = commands.add_parser(
        "perplexity",
        help="a model's perplexity on a text (default: the English text edgegemma ships)",
        description="Perplexity the way llama.cpp's perplexity tool measures it: the text is cut "
        "into windows; the second half of each is scored given what precedes it.",
    )
    ppl.add_argument("file", nargs="?", help="a UTF-8 text file (default: %(default)s)",
                     default=str(HELDOUT_TEXT))  # fmt: skip
    ppl.add_argument("--model", default=None, help="models.lock name or file path")
    ppl.add_argument("--backend", help="default: chosen from the model file")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window (default: 1024)")
    _ADAPTER.add_to(ppl, "score with this LoRA adapter (repeatable)")
    ppl.add_argument("--threads", type=int, help=THREADS_HELP)
    return parser


def _generate(options: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if options.prompt == "-" else options.prompt
    adapters = [_ADAPTER.parse(spec) for spec in options.adapter]
    with load(
        options.model,
        backend=options.backend,
        n_ctx=options.n_ctx,
        n_threads=options.threads,
        on_overflow=options.on_overflow,
    ) as engine:
        for adapter in adapters:
            engine.load_adapter(adapter.name, adapter.path)
        stream = engine.stream(
            prompt,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop,
            adapters={adapter.name: adapter.scale for adapter in adapters},
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


def _perplexity(options: argparse.Namespace) -> int:
    try:
        text = Path(options.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"cannot read {options.file}: {exc}") from None
    adapters = [_ADAPTER.parse(spec) for spec in options.adapter]
    n_ctx = max(2048, round_n_ctx(options.window)) if options.window > 0 else 2048
    with load(
        options.model, backend=options.backend, n_ctx=n_ctx, n_threads=options.threads
    ) as engine:
        for adapter in adapters:
            engine.load_adapter(adapter.name, adapter.path)
        result = engine.perplexity(
            text,
            window=options.window,
            adapters={adapter.name: adapter.scale for adapter in adapters},
        )
        print(
            f"perplexity {result.perplexity:.3f} ({options.model or default_model(options.backend)}, "
            f"{engine.backend_name}): "
            f"{result.tokens} tokens scored in {result.windows} windows of {result.window}, "
            f"{result.seconds:.1f} s"
        )
    return 0
