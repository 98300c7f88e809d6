"""``edgegemma convert``: build other runtimes' models from the locked GGUF.

    edgegemma convert gemma3-270m --to onnx [--precision int4|int8|fp32] [--quant-method default|k_quant]
                                            [--lora-targets q,k,v,o | --no-lora]
    edgegemma convert gemma3-270m --to litertlm|task [--quant RECIPE] [--lora-rank 16|32] [--context N]

Models are built once into the build cache (see :mod:`edgegemma.convert.cache`) and the
folder is printed with a models.lock-style record of what was built. Building models needs
the ``convert`` extra. Adapters are converted by ``edgegemma adapters convert``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..errors import ConversionError, InvalidParameterError
from .cache import builds_root, read_manifest, sha256_file, verify_build
from .onnx_model import LORA_TARGETS, PRECISIONS, QUANT_METHODS, build_onnx, build_options


def built_model(gguf_path: Path, kind: str, options: Mapping[str, str]) -> Path | None:
    """The newest finished build of ``kind`` from ``gguf_path`` with ``options``, or None.

    Tool versions are not compared, so a model built on another machine (or before an
    upgrade of the build tools) is found too; only the source and the options must match.
    """
    wanted = {"source_sha256": sha256_file(gguf_path), **options}
    found = []
    for folder in (builds_root() / kind).glob("[!.]*"):
        if not folder.is_dir():
            continue
        try:
            manifest = read_manifest(folder)
        except ConversionError:
            continue
        key = manifest.get("key", {})
        if all(key.get(name) == value for name, value in wanted.items()) and verify_build(
            folder, hashes=False
        ):
            found.append((manifest.get("built_at", ""), folder))
    return max(found)[1] if found else None


def print_progress(message: str) -> None:
    print(f"edgegemma convert: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegemma convert",
        description="Build a model for another runtime from a GGUF (built once, then cached). "
        "PEFT adapters are converted by `edgegemma adapters convert`.",
    )
    parser.add_argument("source", help="models.lock name or GGUF path")
    parser.add_argument(
        "--to", required=True, choices=sorted(_TARGETS), help="target runtime format"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="int4",
        help="onnx: weight precision (default: %(default)s)",
    )
    parser.add_argument(
        "--quant-method",
        choices=QUANT_METHODS,
        default="default",
        help="onnx int4/int8: round-to-nearest (default), or k_quant: closer to the "
        "float model, ~4x slower to build",
    )
    parser.add_argument(
        "--lora-targets",
        default="q,k,v,o",
        metavar="LIST",
        help=f"onnx: projections that take LoRA adapters, from {','.join(LORA_TARGETS)} "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-lora",
        action="store_true",
        help="onnx: build without LoRA inputs (slightly faster; no adapters)",
    )
    parser.add_argument("--quant", help="litertlm/task: quantization recipe (default: dynamic_int8; "
                        "see docs/mediapipe.md)")
    parser.add_argument("--lora-rank", type=int, choices=(16, 32),
                        help="litertlm/task: take LoRA adapters of this rank (default: no LoRA inputs)")
    parser.add_argument("--context", type=int, default=2048,
                        help="litertlm/task: KV cache positions, the largest n_ctx (default: %(default)s)")
    args = parser.parse_args(argv)
    return _TARGETS[args.to](args)


def _to_onnx(args: argparse.Namespace) -> int:
    folder = build_onnx(_gguf(args.source), _onnx_options(args), progress=print_progress)
    print(folder)
    print(_lock_record(folder))
    return 0


def _to_litert(args: argparse.Namespace) -> int:
    from .litert_model import convert_command

    return convert_command(args)


_TARGETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "onnx": _to_onnx,
    "litertlm": _to_litert,
    "task": _to_litert,
}
"""``--to`` choices: each takes the parsed arguments and returns the exit status."""


def _gguf(model: str) -> Path:
    from ..models import resolve

    path = resolve(model)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise InvalidParameterError(f"{path} is not a GGUF file; conversions start from the GGUF")
    return path


def _onnx_options(args: argparse.Namespace) -> dict[str, str]:
    return build_options(
        args.precision, args.quant_method, None if args.no_lora else args.lora_targets
    )


def _lock_record(folder: Path) -> str:
    """The build in the form of a models.lock entry, to pin and check rebuilds against."""
    manifest = read_manifest(folder)
    key = manifest["key"]
    lines = [
        f"[builds.{manifest['kind']}-{folder.name}]",
        f'format = "{manifest["kind"]}"',
        f'source_sha256 = "{key["source_sha256"]}"',
        f'options = "{", ".join(f"{k}={v}" for k, v in sorted(key.items()) if k != "source_sha256")}"',
        f'sha256 = "{manifest["sha256"]}"',
        f"size = {manifest['size']}",
    ]
    lines += [
        f'files."{name}" = "{entry["sha256"]}"' for name, entry in sorted(manifest["files"].items())
    ]
    return "\n".join(lines)
