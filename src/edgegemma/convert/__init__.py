"""``edgegemma convert``: build models for a runtime from a GGUF, once, into the build cache.

    edgegemma convert gemma3-270m --to gguf --quant q4_0 [--embedding q4_0] [--importance gemma3-270m]
    edgegemma convert gemma3-270m --to onnx [--precision int4|int8|fp32] [--quant-method default|k_quant]
                                            [--lora-targets q,k,v,o | --no-lora]
    edgegemma convert gemma3-270m --to litert [--quant RECIPE] [--lora-rank 16|32] [--context N]

Each target is named for the format it writes (see :mod:`edgegemma.recipes`): ``gguf`` for
llama.cpp (llama.cpp's own quantizer, no extra needed), ``onnx`` for ONNX Runtime GenAI,
``litert`` for MediaPipe / LiteRT-LM (a ``.litertlm`` and a ``.task`` bundle). The ``onnx``
and ``litert`` builds need the ``convert`` extra. Builds are cached (see
:mod:`edgegemma.builds`); the command prints what it built and a models.lock-style record of
it. Adapters are converted by ``edgegemma adapters convert``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..builds import read_manifest
from ..errors import InvalidParameterError
from ..importance import names as importance_names
from ..recipes import (
    GGUF_EMBEDDINGS,
    GGUF_QUANTS,
    LITERT_FILES,
    LITERT_QUANTS,
    ONNX_LORA_TARGETS,
    ONNX_PRECISIONS,
    ONNX_QUANT_METHODS,
    gguf_options,
    litert_options,
    onnx_options,
)

_OLD_TARGETS = {"litertlm": "litert", "task": "litert"}
"""``--to`` words of earlier versions; still understood (they print that one bundle)."""


def print_progress(message: str) -> None:
    print(f"edgegemma convert: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegemma convert",
        description="Build a model for a runtime from a GGUF (built once, then cached). "
        "PEFT adapters are converted by `edgegemma adapters convert`.",
    )
    parser.add_argument("source", help="models.lock name or GGUF path")
    parser.add_argument(
        "--to",
        required=True,
        choices=[*_TARGETS, *_OLD_TARGETS],
        metavar="|".join(_TARGETS),
        help="the format to build: gguf (llama.cpp), onnx (ONNX Runtime GenAI), "
        "litert (MediaPipe / LiteRT-LM)",
    )
    gguf = parser.add_argument_group("gguf")
    gguf.add_argument("--quant", help=f"gguf: llama.cpp recipe, one of {', '.join(GGUF_QUANTS)}; "
                      f"litert: quantization recipe, one of {', '.join(LITERT_QUANTS)} "
                      "(default: dynamic_int8; see docs/mediapipe.md)")  # fmt: skip
    gguf.add_argument(
        "--embedding",
        choices=GGUF_EMBEDDINGS,
        help="gguf: type of the token embedding / output matrix (default: the recipe's choice)",
    )
    gguf.add_argument(
        "--importance",
        metavar="MODEL",
        help="gguf: quantize the embedding with MODEL's shipped importance weights "
        f"(docs/models.md), one of {', '.join(importance_names())}",
    )
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--precision", choices=ONNX_PRECISIONS, default="int4",
                      help="weight precision (default: %(default)s)")  # fmt: skip
    onnx.add_argument(
        "--quant-method",
        choices=ONNX_QUANT_METHODS,
        default="default",
        help="int4/int8: round-to-nearest (default), or k_quant: closer to the "
        "float model, ~4x slower to build",
    )
    onnx.add_argument(
        "--lora-targets",
        default="q,k,v,o",
        metavar="LIST",
        help=f"projections that take LoRA adapters, from {','.join(ONNX_LORA_TARGETS)} "
        "(default: %(default)s)",
    )
    onnx.add_argument(
        "--no-lora",
        action="store_true",
        help="build without LoRA inputs (slightly faster; no adapters)",
    )
    litert = parser.add_argument_group("litert")
    litert.add_argument("--lora-rank", type=int, choices=(16, 32),
                        help="take LoRA adapters of this rank (default: no LoRA inputs)")  # fmt: skip
    litert.add_argument("--context", type=int, default=2048,
                        help="KV cache positions, the largest n_ctx (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    return _TARGETS[_OLD_TARGETS.get(args.to, args.to)](args)


def _to_gguf(args: argparse.Namespace) -> int:
    from ..quantize import build_gguf

    if args.quant is None:
        raise InvalidParameterError("--to gguf needs --quant (e.g. --quant q4_0)")
    path = build_gguf(
        _gguf(args.source),
        gguf_options(args.quant, args.embedding, args.importance),
        progress=print_progress,
    )
    print(path)
    print(_lock_record(path.parent))
    return 0


def _to_onnx(args: argparse.Namespace) -> int:
    from .onnx import build_onnx

    options = onnx_options(
        args.precision, args.quant_method, None if args.no_lora else args.lora_targets
    )
    folder = build_onnx(_gguf(args.source), options, progress=print_progress)
    print(folder)
    print(_lock_record(folder))
    return 0


def _to_litert(args: argparse.Namespace) -> int:
    from .litert import build_litert

    options = litert_options(args.quant, args.lora_rank, args.context)
    folder = build_litert(_gguf(args.source), options, progress=print_progress)
    bundles = [args.to] if args.to in LITERT_FILES else list(LITERT_FILES)
    for bundle in bundles:
        print(folder / LITERT_FILES[bundle])
    print(_lock_record(folder))
    return 0


_TARGETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "gguf": _to_gguf,
    "onnx": _to_onnx,
    "litert": _to_litert,
}
"""``--to`` choices: each takes the parsed arguments and returns the exit status."""


def _gguf(model: str) -> Path:
    from ..models import resolve

    path = resolve(model)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise InvalidParameterError(f"{path} is not a GGUF file; conversions start from the GGUF")
    return path


def _lock_record(folder: Path) -> str:
    """The build in the form of a models.lock entry, to pin and check rebuilds against."""
    manifest = read_manifest(folder)
    key = manifest["key"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(key.items()) if k != "source_sha256")
    lines = [
        f"[builds.{manifest['kind']}-{folder.name}]",
        f'format = "{manifest["kind"]}"',
        f'source_sha256 = "{key["source_sha256"]}"',
        f'options = "{options}"',
        f'sha256 = "{manifest["sha256"]}"',
        f"size = {manifest['size']}",
    ]
    lines += [
        f'files."{name}" = "{entry["sha256"]}"' for name, entry in sorted(manifest["files"].items())
    ]
    return "\n".join(lines)
