"""LoRA adapters across backends: convert PEFT folders, inspect and validate adapter files.

``edgegemma adapters convert PEFT_DIR --to gguf|onnx|litert`` turns the folder a PEFT
training run writes (``adapter_config.json`` + ``adapter_model.safetensors``) into the file
a runtime loads. No torch is involved: the PEFT folder is read with numpy (:mod:`.peft`), so
conversion runs on the device itself.

One module per format, each named for its format and exporting a ``FORMAT`` record
(:class:`~.base.AdapterFormat`: the backend that loads it, its suffix, its converter from
PEFT and its reader):

    gguf     llama.cpp's GGUF LoRA            backend llamacpp    .gguf
    onnx     ONNX Runtime's adapter format    backend onnx        .onnx_adapter
    litert   LiteRT-LM's LoRA flatbuffer      backend mediapipe   .lora

:data:`FORMATS` holds every registered format, edgegemma's own and plugins' alike, from the
``edgegemma.adapter_formats`` entry point group. Backends import their format module to read
and check adapter files; nothing in this package imports a backend, except :func:`validate`,
which runs an adapter in an engine.

Packages and signed updates (``pack``, ``keygen``, ``repo-init``, ``publish``, ``pull``,
``rollback``; the ``updates`` extra) live in :mod:`.package` (the manifest), :mod:`.repository`
(the publisher's TUF repository), :mod:`.pull` (the device's verified pull) and :mod:`.store`
(the installed versions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import AdapterError, EdgeGemmaError
from . import _updates
from .base import AdapterFormat, AdapterSummary
from .peft import CONFIG_FILE, WEIGHTS_FILE, read_peft

ENTRY_POINT_GROUP = "edgegemma.adapter_formats"
DEFAULT_MODEL = "gemma3-270m"
"""The base model adapters are converted for and validated against, unless told otherwise."""


def _registered() -> dict[str, AdapterFormat]:
    found: dict[str, AdapterFormat] = {}
    entries = sorted(
        entry_points(group=ENTRY_POINT_GROUP), key=lambda e: not e.value.startswith("edgegemma.")
    )
    for entry in entries:
        if entry.name in found:
            continue
        record = entry.load()
        if not isinstance(record, AdapterFormat) or record.name != entry.name:
            raise AdapterError(
                f"the adapter format entry point {entry.value} is not the AdapterFormat {entry.name!r}"
            )
        found[entry.name] = record
    return found


FORMATS: Mapping[str, AdapterFormat] = _registered()
"""Every adapter format by name."""


def format_for_backend(backend: str) -> AdapterFormat:
    """The adapter format the backend ``backend`` loads."""
    for fmt in FORMATS.values():
        if fmt.backend == backend:
            return fmt
    raise AdapterError(f"no adapter format is registered for the backend {backend!r}")


def format_of(path: Path) -> AdapterFormat:
    """The format of an adapter file, by its suffix."""
    for fmt in FORMATS.values():
        if path.name.endswith(fmt.suffix):
            return fmt
    known = ", ".join(f"{f.suffix} ({f.name})" for f in FORMATS.values())
    raise AdapterError(f"{path.name} has none of the adapter suffixes {known}")


def convert(
    peft_dir: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str] | None = None,
    *,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: str | None = None,
) -> Path:
    """Convert a PEFT folder to the adapter format ``to``; return the file written.

    ``model`` is the base model the adapter will run on (a models.lock name or a path); the
    adapter is checked against it. ``out`` defaults to ``adapter<suffix>`` inside the PEFT
    folder. ``dtype`` is one of the format's tensor types (GGUF: f16, the default, or f32).
    """
    if to not in FORMATS:
        raise AdapterError(f"unknown adapter format {to!r}; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[to]
    chosen = dtype or fmt.dtypes[0]
    if chosen not in fmt.dtypes:
        raise AdapterError(
            f"{to} adapters are written as {' or '.join(fmt.dtypes)}, not {chosen!r}"
        )
    from .. import models

    peft = read_peft(peft_dir)
    target = Path(out) if out is not None else peft.path / f"adapter{fmt.suffix}"
    base = models.resolve(model)
    if base.is_file() and base.suffix.lower() == ".gguf":
        from ..families import require
        from ..gguffile import read_header

        require(read_header(base).architecture, f"adapter:{to}", base.name)
    return fmt.from_peft(peft, target, base, chosen)


def inspect(path: str | os.PathLike[str]) -> AdapterSummary:
    """Rank, alpha, targets, architecture and size of an adapter file or a PEFT folder."""
    adapter_path = Path(path)
    if adapter_path.is_dir():
        peft = read_peft(adapter_path)
        base = json.loads((adapter_path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
        return AdapterSummary(
            path=adapter_path,
            format="peft",
            architecture=str(base or ""),
            rank=max(w.rank for w in peft.weights.values()),
            alpha=peft.alpha,
            scale=max(w.scale for w in peft.weights.values()),
            targets=tuple(peft.weights),
            size_bytes=sum(
                (adapter_path / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)
            ),
        )
    if not adapter_path.is_file():
        raise AdapterError(f"adapter file not found: {adapter_path}")
    return format_of(adapter_path).inspect(adapter_path)


def validate(
    path: str | os.PathLike[str], model: str | os.PathLike[str] = DEFAULT_MODEL
) -> AdapterSummary:
    """Load an adapter into its runtime with the base model ``model`` and generate a token.

    Every check the runtime and edgegemma make on load applies: architecture, tensor names,
    shapes, ranks, finite values. A PEFT folder is converted to GGUF in a temporary folder
    first. Raises :class:`~edgegemma.errors.AdapterError` saying what does not fit.
    """
    from .. import models
    from ..engine import load

    adapter_path = Path(path)
    backend = "llamacpp" if adapter_path.is_dir() else format_of(adapter_path).backend
    base_path = models.resolve(model)
    with tempfile.TemporaryDirectory(prefix="edgegemma-validate-") as tmp:
        file = adapter_path
        if adapter_path.is_dir():
            fmt = format_for_backend(backend)
            file = fmt.from_peft(
                read_peft(adapter_path),
                Path(tmp) / f"adapter{fmt.suffix}",
                base_path,
                fmt.dtypes[0],
            )
        with load(base_path, backend=backend, n_ctx=512, n_threads=1) as engine:
            engine.load_adapter("candidate", file)
            engine.generate("Hello", max_tokens=1, adapters={"candidate": 1.0})
    return inspect(adapter_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegemma adapters",
        description="Convert, inspect and validate LoRA adapters; pack, sign, publish, pull and "
        "roll back adapter packages (docs/adapters.md, signed packages and updates).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = commands.add_parser("convert", help="convert a PEFT adapter folder for a backend")
    conv.add_argument(
        "peft_dir", help="folder with adapter_config.json and adapter_model.safetensors"
    )
    conv.add_argument(
        "--to",
        required=True,
        type=_format_name,
        metavar="|".join(FORMATS),
        help="target format (the backend that loads it: "
        + ", ".join(f"{f.name}: {f.backend}" for f in FORMATS.values())
        + ")",
    )
    conv.add_argument("-o", "--output", help="output file (default: inside PEFT_DIR)")
    conv.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    conv.add_argument("--dtype", choices=("f16", "f32"), help="gguf tensor type (default: f16)")
    insp = commands.add_parser(
        "inspect", help="rank, alpha, targets and size of an adapter, or a package's manifest"
    )
    insp.add_argument(
        "path", help="a package folder, a PEFT folder, or a .gguf, .onnx_adapter or .lora file"
    )
    val = commands.add_parser("validate", help="check that an adapter fits a base model and loads")
    val.add_argument("path", help="a PEFT folder, or a .gguf, .onnx_adapter or .lora adapter file")
    val.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    _updates.add_commands(commands)
    options = parser.parse_args(argv)
    try:
        if options.command == "convert":
            written = convert(
                options.peft_dir,
                options.to,
                options.output,
                model=options.model,
                dtype=options.dtype,
            )
            print(f"wrote {written} ({_size(written.stat().st_size)})")
        elif options.command == "inspect":
            print(_inspect_text(Path(options.path)))
        elif options.command == "validate":
            summary = validate(options.path, options.model)
            backend = FORMATS[summary.format].backend if summary.format in FORMATS else "llamacpp"
            print(f"ok: {summary.path} fits {options.model} and loads in the {backend} backend")
            print(describe(summary))
        else:
            _updates.run(options)
    except EdgeGemmaError as exc:
        print(f"edgegemma adapters: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _inspect_text(path: Path) -> str:
    from .package import MANIFEST, describe_manifest, read_package

    if (path / MANIFEST).is_file():
        return describe_manifest(read_package(path), path)
    return describe(inspect(path))


def describe(summary: AdapterSummary) -> str:
    """A few aligned lines about an adapter, as ``inspect`` prints them."""
    fmt = FORMATS.get(summary.format)
    alpha = (
        f"{summary.alpha:g} (scale {summary.scale:g} at adapter scale 1.0)"
        if summary.alpha is not None
        else "folded into the matrices"
    )
    rows = [
        ("path", str(summary.path)),
        ("format", fmt.title if fmt is not None else "PEFT LoRA folder"),
        (
            "architecture" if summary.format == "gguf" else "base model",
            summary.architecture or "not recorded",
        ),
        ("rank", str(summary.rank)),
        ("alpha", alpha),
        ("targets", _targets(summary.targets)),
        ("size", _size(summary.size_bytes)),
    ]
    return "\n".join(f"{key:<13}{value}" for key, value in rows)


def _targets(names: Sequence[str]) -> str:
    """``attn_q (layers 0-17), ...`` rather than 72 tensor names."""
    patterns = (
        r"blk\.(\d+)\.(\w+)\.weight",  # GGUF
        r".*layers\.(\d+)\.(.+)",  # PEFT and ONNX
        r"lora_atten_(\w)_prime_weight_(\d+)",  # LiteRT-LM: kind first
    )
    layers: dict[str, set[int]] = {}
    other = []
    for name in names:
        for number, pattern in enumerate(patterns):
            match = re.fullmatch(pattern, name)
            if match:
                layer, kind = (match[2], match[1]) if number == 2 else (match[1], match[2])
                layers.setdefault(kind, set()).add(int(layer))
                break
        else:
            other.append(name)
    parts = [f"{kind} ({_ranges(sorted(blocks))})" for kind, blocks in layers.items()]
    return ", ".join(parts + other) + f"; {len(names)} weights adapted"


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
    return f"layers {text}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _format_name(text: str) -> str:
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(FORMATS)}, not {text!r}")
    return text
