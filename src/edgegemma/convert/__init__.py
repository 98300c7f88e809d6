"""``edgegemma convert``: build models for a runtime from a GGUF or a Hugging Face checkpoint.

    edgegemma convert ./hf-checkpoint --to gguf --quant f32|f16|bf16|q8_0|q4_k_m|q4_0|q5_0 [-o FILE]
    edgegemma convert gemma3-270m --to gguf --quant q4_0 [--embedding q4_0] [--importance gemma3-270m]
    edgegemma convert gemma3-270m --to onnx [--precision int4|int8|fp32] [--quant-method default|k_quant]
                                            [--lora-targets q,k,v,o | --no-lora]
    edgegemma convert gemma3-270m --to litert [--quant RECIPE] [--lora-rank 16|32] [--context N]

Each target is named for the format it writes (see :mod:`edgegemma.recipes`): ``gguf`` for
llama.cpp (llama.cpp's own quantizer, no extra needed), ``onnx`` for ONNX Runtime GenAI,
``litert`` for MediaPipe / LiteRT-LM (a ``.litertlm`` and a ``.task`` bundle). A checkpoint
folder (transformers layout) becomes a GGUF through llama.cpp's own converter
(:mod:`.gguf`); the other formats start from a GGUF. What each Gemma family supports is in
:mod:`edgegemma.families`, checked before any work. Everything but GGUF-to-GGUF
requantization needs the ``convert`` extra. Builds from a GGUF are cached (see
:mod:`edgegemma.builds`) and the command prints what it built and a models.lock-style
record of it; ``-o`` copies the result out (a file, or a folder for ``onnx`` and
``litert``). Adapters are converted by ``edgegemma adapters convert``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..builds import read_manifest
from ..errors import InvalidParameterError
from ..families import require
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
from .gguf import CONVERTER_TYPES


def print_progress(message: str) -> None:
    print(f"edgegemma convert: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegemma convert",
        description="Build a model for a runtime from a GGUF (built once, then cached). "
        "PEFT adapters are converted by `edgegemma adapters convert`.",
    )
    parser.add_argument(
        "source", help="models.lock name, GGUF path, or Hugging Face checkpoint folder"
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=list(_TARGETS),
        metavar="|".join(_TARGETS),
        help="the format to build: gguf (llama.cpp), onnx (ONNX Runtime GenAI), "
        "litert (MediaPipe / LiteRT-LM)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="where to write the result (a file for gguf, a folder for onnx and litert); "
        "default: the build cache, whose path is printed",
    )
    gguf = parser.add_argument_group("gguf")
    gguf.add_argument("--quant", help=f"gguf: llama.cpp recipe, one of {', '.join(GGUF_QUANTS)} "
                      f"(from a checkpoint also {', '.join(CONVERTER_TYPES)}); "
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
    return _TARGETS[args.to](args)


def _to_gguf(args: argparse.Namespace) -> int:
    if args.quant is None:
        raise InvalidParameterError("--to gguf needs --quant (e.g. --quant q4_0)")
    source = _source(args.source)
    if source.is_dir():
        if args.embedding or args.importance:
            raise InvalidParameterError(
                "--embedding and --importance requantize a GGUF; convert the checkpoint first"
            )
        from .gguf import checkpoint_to_gguf

        out = args.output or Path(f"{source.resolve().name}-{args.quant}.gguf")
        print(checkpoint_to_gguf(source, out, args.quant, progress=print_progress))
        return 0
    from ..quantize import build_gguf

    path = build_gguf(
        _checked(source, "convert:gguf"),
        gguf_options(args.quant, args.embedding, args.importance),
        progress=print_progress,
    )
    print(_copy_out(path, args.output))
    print(_lock_record(path.parent))
    return 0


def _to_onnx(args: argparse.Namespace) -> int:
    from .onnx import build_onnx

    options = onnx_options(
        args.precision, args.quant_method, None if args.no_lora else args.lora_targets
    )
    folder = build_onnx(
        _checked(_source(args.source), "convert:onnx"), options, progress=print_progress
    )
    print(_copy_out(folder, args.output))
    print(_lock_record(folder))
    return 0


def _to_litert(args: argparse.Namespace) -> int:
    from .litert import build_litert

    options = litert_options(args.quant, args.lora_rank, args.context)
    folder = build_litert(
        _checked(_source(args.source), "convert:litert"), options, progress=print_progress
    )
    copied = _copy_out(folder, args.output)
    for bundle in LITERT_FILES.values():
        print(copied / bundle)
    print(_lock_record(folder))
    return 0


_TARGETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "gguf": _to_gguf,
    "onnx": _to_onnx,
    "litert": _to_litert,
}
"""``--to`` choices: each takes the parsed arguments and returns the exit status."""


def _source(model: str) -> Path:
    from ..models import resolve

    return resolve(model)


def _checked(path: Path, capability: str) -> Path:
    """``path`` if it is a GGUF model or a checkpoint folder whose family can be built into
    ``capability``."""
    from ..gguffile import read_header

    if path.is_dir():
        from ..families import family_of_checkpoint

        require(family_of_checkpoint(path).name, capability, path)
        return path
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise InvalidParameterError(
            f"{path} is not a GGUF file or a checkpoint folder; conversions start from either"
        )
    require(read_header(path).architecture, capability, path.name)
    return path


def _copy_out(built: Path, output: Path | None) -> Path:
    """``built`` (a file or folder in the build cache), copied to ``output`` if given."""
    if output is None:
        return built
    from ..files import copy_atomically

    return copy_atomically(built, output)


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
