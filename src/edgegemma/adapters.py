"""LoRA adapters across backends: convert PEFT folders, inspect and validate adapter files.

``edgegemma adapters convert PEFT_DIR --to gguf|onnx|mediapipe`` turns the folder a PEFT
training run writes (``adapter_config.json`` + ``adapter_model.safetensors``) into the file
each runtime loads. No torch is involved: the PEFT folder is read with numpy
(:mod:`edgegemma.peft`) and the GGUF written with the ``gguf`` package, so conversion runs
on the device itself.

GGUF conventions are those of llama.cpp's own ``convert_lora_to_gguf.py``: tensors
``blk.N.attn_q.weight.lora_a`` (PEFT ``lora_A``, numpy shape (rank, n_in)) and ``.lora_b``
(PEFT ``lora_B``, (n_out, rank)), and ``adapter.lora.alpha`` = PEFT's ``lora_alpha``;
llama.cpp scales by alpha / rank. Where llama.cpp's converter would be wrong, the scale is
made right instead: for rsLoRA (PEFT scales by alpha / sqrt(rank), which llama.cpp's
converter ignores) the file stores alpha * sqrt(rank), and per-module ``alpha_pattern``
values, which one GGUF alpha cannot express, are folded into that module's B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AdapterError, BackendUnavailableError, EdgeGemmaError
from .gguffile import GGUFHeader, read_header
from .lora import inspect_lora, write_lora_gguf
from .peft import CONFIG_FILE, WEIGHTS_FILE, PeftAdapter, read_peft

BACKENDS = ("gguf", "onnx", "mediapipe")
"""Formats ``convert`` writes: llama.cpp, ONNX Runtime GenAI, MediaPipe / LiteRT-LM."""

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Text decoder layers of Gemma (and Llama-like) checkpoints, also inside a multimodal
# Gemma 3 (``model.language_model.layers``), whose text tower has the same tensors.
_HF_LAYER = re.compile(
    r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.("
    + "|".join(re.escape(k) for k in _GGUF_NAMES)
    + r")"
)
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class AdapterSummary:
    """What ``edgegemma adapters inspect`` prints about an adapter file or a PEFT folder."""

    path: Path
    format: str
    """``"peft"``, ``"gguf"`` (llama.cpp), ``"onnx"`` (ONNX Runtime) or ``"litert"`` (LiteRT-LM)."""
    architecture: str
    """The base architecture (GGUF), the base model a PEFT config names, or ``""``."""
    rank: int
    alpha: float | None
    """None where the scale is folded into the matrices (ONNX, LiteRT-LM)."""
    scale: float
    """What B @ A is multiplied by at adapter scale 1.0 (for the largest rank)."""
    targets: tuple[str, ...]
    """Adapted weights, in the format's own names."""
    size_bytes: int


def gguf_tensor_name(module: str) -> str:
    """The llama.cpp tensor a Hugging Face module name adapts, e.g. ``blk.3.attn_q.weight``."""
    match = _HF_LAYER.fullmatch(module)
    if match is None:
        raise AdapterError(
            f"LoRA on {module!r} has no llama.cpp equivalent here: edgegemma converts LoRA on the "
            f"decoder layers' {', '.join(k.split('.')[1] for k in _GGUF_NAMES)}"
        )
    return f"blk.{match[1]}.{_GGUF_NAMES[match[2]]}.weight"


def to_gguf(
    peft: PeftAdapter,
    out_path: str | os.PathLike[str],
    base: GGUFHeader,
    *,
    dtype: str = "f16",
) -> Path:
    """Write ``peft`` as a llama.cpp LoRA adapter for the base model whose header is ``base``.

    ``dtype`` is ``"f16"`` (half the size; the default) or ``"f32"``. Every module is checked
    against the base tensor it adapts, so an adapter for another model fails here, not on
    the device.
    """
    if dtype not in ("f16", "f32"):
        raise AdapterError(f"GGUF adapters are written as f16 or f32, not {dtype!r}")
    # llama.cpp multiplies by alpha / rank of each tensor; rsLoRA wants alpha / sqrt(rank).
    alpha = peft.alpha * math.sqrt(peft.rank) if peft.use_rslora else peft.alpha
    weights = {}
    for module, weight in peft.weights.items():
        name = gguf_tensor_name(module)
        if name not in base.tensors:
            raise AdapterError(
                f"{peft.path.name}: {module} adapts {name}, which {base.path.name} does not have "
                f"(its {base.arch_value('block_count')} blocks are numbered from 0)"
            )
        n_in, n_out = base.tensors[name].shape
        if weight.a.shape[1] != n_in or weight.b.shape[0] != n_out:
            raise AdapterError(
                f"{peft.path.name}: {module} maps {weight.a.shape[1]} -> {weight.b.shape[0]} but "
                f"{base.path.name}'s {name} maps {n_in} -> {n_out} (an adapter for another model?)"
            )
        llama_scale = (
            alpha / weight.rank if alpha else 1.0
        )  # llama.cpp reads alpha 0 as "no scaling"
        b = weight.b
        if not math.isclose(weight.scale, llama_scale, rel_tol=1e-6):
            b = b * np.float32(weight.scale / llama_scale)
        if dtype == "f16" and max(np.abs(weight.a).max(), np.abs(b).max()) > _F16_MAX:
            raise AdapterError(
                f"{peft.path.name}: {module} has values beyond float16; use dtype f32"
            )
        weights[name] = (weight.a, b)
    if len(weights) != len(peft.weights):
        raise AdapterError(f"{peft.path.name}: two modules map to the same llama.cpp tensor")
    out = write_lora_gguf(
        out_path,
        architecture=base.architecture,
        alpha=alpha,
        weights=weights,
        dtype=np.float16 if dtype == "f16" else np.float32,
    )
    return out


def convert(
    peft_dir: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str] | None = None,
    *,
    model: str | os.PathLike[str] = "gemma3-270m",
    dtype: str = "f16",
) -> Path:
    """Convert a PEFT folder to the adapter format of backend ``to``; return the file written.

    ``model`` is the base model the adapter will run on (a models.lock name or a path); the
    adapter is checked against it. ``out`` defaults to a file inside the PEFT folder.
    """
    if to not in BACKENDS:
        raise AdapterError(f"unknown adapter format {to!r}; choose one of {', '.join(BACKENDS)}")
    from . import models

    peft = read_peft(peft_dir)
    base_path = models.resolve(model)
    if to == "gguf":
        target = Path(out) if out is not None else peft.path / "adapter.gguf"
        return to_gguf(peft, target, read_header(base_path), dtype=dtype)
    if to == "onnx":
        target = Path(out) if out is not None else peft.path / "adapter.onnx_adapter"
        try:
            from .peft import to_onnx_adapter

            return to_onnx_adapter(peft, target, _onnx_model(base_path, peft))
        except ImportError as exc:
            raise BackendUnavailableError(
                f"converting to ONNX adapters needs the onnx backend ({exc}); "
                "install it with: pip install 'edgegemma[onnx]'"
            ) from exc
    from .litert_lora import convert_peft as convert_litert

    target = Path(out) if out is not None else peft.path / "adapter.lora"
    return convert_litert(peft, target, base_path)


def _onnx_model(base_path: Path, peft: PeftAdapter) -> Path:
    """The ONNX model folder an adapter is converted for: given, or the cached build of the GGUF.

    ONNX adapters name the graph inputs of a model built with LoRA inputs, so the build must
    exist (``edgegemma convert MODEL --to onnx``) and adapt every module the adapter does.
    """
    if base_path.is_dir():
        return base_path
    from .convert import built_model

    order = ("q", "k", "v", "o", "gate", "up", "down")
    used = {m.rsplit(".", 1)[-1].removesuffix("_proj") for m in peft.weights}
    for targets in (",".join(t for t in order if t in used), "q,k,v,o", ",".join(order)):
        if set(targets.split(",")) >= used:
            found = built_model(base_path, "onnx", {"lora_targets": targets})
            if found is not None:
                return found
    raise AdapterError(
        f"no ONNX build of {base_path.name} with LoRA inputs on {', '.join(sorted(used))} "
        "in the cache; "
        f"build it first with `edgegemma convert {base_path} --to onnx`"
    )


def inspect(path: str | os.PathLike[str]) -> AdapterSummary:
    """Rank, alpha, targets, architecture and size of an adapter file or a PEFT folder.

    Reads PEFT folders, GGUF (``.gguf``), ONNX Runtime (``.onnx_adapter``, needs the onnx
    extra) and LiteRT-LM (``.lora``) adapters.
    """
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
    if adapter_path.suffix == ".lora":
        from .litert_lora import read_lora

        rank, tensors = read_lora(adapter_path)
        targets = sorted({re.sub(r"_[ab]_prime_weight_", "_prime_weight_", n) for n in tensors})
        return AdapterSummary(
            adapter_path, "litert", "", rank, None, 1.0, tuple(targets), adapter_path.stat().st_size
        )
    if adapter_path.suffix == ".onnx_adapter":
        shapes = _onnx_adapter_shapes(adapter_path)
        targets = sorted(n.removesuffix(".lora_A.MatMul.weight") for n in shapes if ".lora_A." in n)
        rank = max((shape[1] for n, shape in shapes.items() if ".lora_A." in n), default=0)
        return AdapterSummary(
            adapter_path, "onnx", "", rank, None, 1.0, tuple(targets), adapter_path.stat().st_size
        )
    info = inspect_lora(adapter_path)
    return AdapterSummary(
        path=info.path,
        format="gguf",
        architecture=info.architecture,
        rank=info.rank,
        alpha=info.alpha,
        scale=info.alpha / info.rank if info.alpha else 1.0,
        targets=info.targets,
        size_bytes=info.size_bytes,
    )


def _onnx_adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            f"reading ONNX adapters needs onnxruntime ({exc}); "
            "install it with: pip install 'edgegemma[onnx]'"
        ) from exc
    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
        return {name: tuple(value.shape()) for name, value in reader.get_parameters().items()}
    except Exception as exc:
        raise AdapterError(f"{path.name} is not a readable .onnx_adapter file: {exc}") from None


_VALIDATING_BACKEND = {".onnx_adapter": "onnx", ".lora": "mediapipe"}
"""The backend that loads each adapter format; GGUF files and PEFT folders go to llama.cpp."""


def validate(
    path: str | os.PathLike[str], model: str | os.PathLike[str] = "gemma3-270m"
) -> AdapterSummary:
    """Load an adapter into its runtime with the base model ``model`` and generate a token.

    Every check the runtime and edgegemma make on load applies: architecture, tensor names,
    shapes, ranks, finite values. A PEFT folder is converted to GGUF in a temporary folder
    first. Raises :class:`~edgegemma.errors.AdapterError` saying what does not fit.
    """
    from . import models
    from .engine import load

    adapter_path = Path(path)
    backend = _VALIDATING_BACKEND.get(adapter_path.suffix, "llamacpp")
    base_path = models.resolve(model)
    with tempfile.TemporaryDirectory(prefix="edgegemma-validate-") as tmp:
        file = adapter_path
        if adapter_path.is_dir():
            file = to_gguf(
                read_peft(adapter_path), Path(tmp) / "adapter.gguf", read_header(base_path)
            )
        with load(base_path, backend=backend, n_ctx=512, n_threads=1) as engine:
            engine.load_adapter("candidate", file)
            engine.generate("Hello", max_tokens=1, adapters={"candidate": 1.0})
    return inspect(adapter_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgegemma adapters", description="Convert, inspect and validate LoRA adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = commands.add_parser("convert", help="convert a PEFT adapter folder for a backend")
    conv.add_argument(
        "peft_dir", help="folder with adapter_config.json and adapter_model.safetensors"
    )
    conv.add_argument("--to", required=True, choices=BACKENDS, help="target format")
    conv.add_argument("-o", "--output", help="output file (default: inside PEFT_DIR)")
    conv.add_argument("--model", default="gemma3-270m", help="base model (default: %(default)s)")
    conv.add_argument(
        "--dtype", choices=("f16", "f32"), default="f16", help="GGUF tensor type (default: f16)"
    )
    insp = commands.add_parser("inspect", help="rank, alpha, targets and size of an adapter")
    insp.add_argument("path", help="a PEFT folder, or a .gguf, .onnx_adapter or .lora adapter file")
    val = commands.add_parser("validate", help="check that an adapter fits a base model and loads")
    val.add_argument("path", help="a PEFT folder, or a .gguf, .onnx_adapter or .lora adapter file")
    val.add_argument("--model", default="gemma3-270m", help="base model (default: %(default)s)")
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
            print(describe(inspect(options.path)))
        else:
            summary = validate(options.path, options.model)
            runtime = {"onnx": "ONNX Runtime GenAI", "litert": "LiteRT-LM"}.get(
                summary.format, "llama.cpp"
            )
            print(f"ok: {summary.path} fits {options.model} and loads in {runtime}")
            print(describe(summary))
    except EdgeGemmaError as exc:
        print(f"edgegemma adapters: error: {exc}", file=sys.stderr)
        return 1
    return 0


def describe(summary: AdapterSummary) -> str:
    """A few aligned lines about an adapter, as ``inspect`` prints them."""
    formats = {
        "gguf": "GGUF LoRA (llama.cpp)",
        "peft": "PEFT LoRA folder",
        "onnx": "ONNX Runtime adapter",
        "litert": "LiteRT-LM LoRA (MediaPipe)",
    }
    alpha = (
        f"{summary.alpha:g} (scale {summary.scale:g} at adapter scale 1.0)"
        if summary.alpha is not None
        else "folded into the matrices"
    )
    rows = [
        ("path", str(summary.path)),
        ("format", formats[summary.format]),
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
