"""A GGUF from a Hugging Face checkpoint folder, by llama.cpp's own converter.

``convert_hf_to_gguf.py`` knows every Gemma family llama.cpp runs (tensor names, the +1 on
Gemma's norm weights, Gemma 3n's AltUp and per-layer inputs, Gemma 4's per-layer head
sizes), so edgegemma runs it rather than restating it. It is not on PyPI as a package: it
ships, with the ``conversion`` package and the ``gguf-py`` it was written against, inside the
llama-cpp-python sdist of the very llama.cpp edgegemma runs. :func:`converter` takes those
files from that sdist once (``pip download``, or ``$EDGEGEMMA_LLAMA_CPP_SDIST``) into the
build cache. The converter reads tensors lazily, so its memory stays near one tensor's size
whatever the model's. It needs torch and transformers (the ``convert`` extra).

It writes float or Q8_0 files itself (:data:`CONVERTER_TYPES`); the other recipes are the
float file requantized by llama.cpp's quantizer (:func:`edgegemma.quantize.quantize`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

from ..builds import Progress, cached_build
from ..errors import ConversionError
from ..families import family_of_checkpoint, require
from ..files import replace_durably
from ..recipes import GGUF_QUANTS, gguf_options

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Types llama.cpp's converter writes itself (its ``--outtype``)."""
CHECKPOINT_QUANTS = (*CONVERTER_TYPES, *(q for q in GGUF_QUANTS if q not in CONVERTER_TYPES))
"""What ``edgegemma convert HF_DIR --to gguf --quant`` takes."""
SDIST_VARIABLE = "EDGEGEMMA_LLAMA_CPP_SDIST"
"""A llama-cpp-python sdist (.tar.gz) to take llama.cpp's sources from instead of PyPI."""
_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
_RECIPE = "1"


def llama_cpp_sdist(folder: Path) -> Path:
    """The llama-cpp-python sdist of the installed version (``$EDGEGEMMA_LLAMA_CPP_SDIST``,
    else downloaded by pip into ``folder``)."""
    configured = os.environ.get(SDIST_VARIABLE)
    if configured:
        return Path(configured)
    version = metadata.version("llama-cpp-python")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(folder)],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise ConversionError(
            f"could not fetch the llama-cpp-python {version} sdist (llama.cpp's converters ship "
            f"in it; set {SDIST_VARIABLE} to a downloaded copy): {done.stderr.strip()[-500:]}"
        )
    return found[0]


def converter(*, progress: Progress | None = None) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py``
    of the installed llama-cpp-python, taken from its sdist once."""
    key = {"llama-cpp-python": metadata.version("llama-cpp-python"), "recipe": _RECIPE}
    return cached_build("llama-cpp-converter", key, _extract, progress=progress)


def _extract(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="edgegemma-sdist-") as scratch:
        sdist = llama_cpp_sdist(Path(scratch))
        try:
            with tarfile.open(sdist) as archive:
                members = [
                    member
                    for member in archive.getmembers()
                    if _part(member.name) is not None and (member.isfile() or member.isdir())
                ]
                archive.extractall(scratch, members=members, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise ConversionError(f"cannot read the llama-cpp-python sdist {sdist}: {exc}") from exc
        roots = list(Path(scratch).glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not roots or not all((roots[0] / part).exists() for part in _PARTS):
            raise ConversionError(f"{sdist} does not hold llama.cpp's converters")
        for part in _PARTS:
            shutil.move(roots[0] / part, out / part)


def _part(name: str) -> str | None:
    """The converter part an sdist member belongs to, if any."""
    pieces = name.split("/")
    if len(pieces) < 4 or pieces[1:3] != ["vendor", "llama.cpp"]:
        return None
    return pieces[3] if pieces[3] in _PARTS else None


def checkpoint_to_gguf(
    checkpoint: Path, out: Path, quant: str, *, progress: Progress | None = None
) -> Path:
    """Write the Hugging Face checkpoint folder ``checkpoint`` as a GGUF of ``quant`` to ``out``.

    The family is read from ``config.json`` and checked first; a config that llama.cpp
    computes differently from transformers is warned about (:func:`runtime_differences`).
    """
    say = progress or (lambda _message: None)
    if quant not in CHECKPOINT_QUANTS:
        raise ConversionError(
            f"--quant for a checkpoint must be one of {', '.join(CHECKPOINT_QUANTS)}, got {quant!r}"
        )
    checkpoint = Path(checkpoint)
    family = family_of_checkpoint(checkpoint)
    require(family.name, "convert:gguf", checkpoint)
    for difference in runtime_differences(checkpoint):
        warnings.warn(difference, stacklevel=2)
        say(f"warning: {difference}")
    tools = converter(progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgegemma-convert-", dir=out.parent) as scratch:
        direct = quant in CONVERTER_TYPES
        written = Path(scratch) / ("model.gguf" if direct else "model-f32.gguf")
        say(f"converting {checkpoint} ({family.title}) with llama.cpp's convert_hf_to_gguf.py")
        _run_converter(tools, checkpoint, written, quant if direct else "f32")
        _fold_attention_scale(checkpoint, written)
        if not direct:
            from ..quantize import quantize

            say(f"quantizing to {quant} with llama.cpp's quantizer")
            quantized = Path(scratch) / "model.gguf"
            quantize(written, quantized, gguf_options(quant))
            written = quantized
        replace_durably(written, out)
    return out


def _fold_attention_scale(checkpoint: Path, gguf_path: Path) -> None:
    """Make llama.cpp's Gemma 3 attention scale transformers' where the config sets another.

    llama.cpp divides Gemma 3's attention scores by sqrt(head_dim) (by sqrt(hidden/heads) for
    27B); transformers by sqrt(query_pre_attn_scalar). The queries pass through a per-head
    RMS norm whose weight multiplies them, and which the converter writes as float32, so
    multiplying that weight by the ratio of the two roots gives transformers' scores exactly,
    at any quantization of the other tensors.
    """
    from ..gguffile import read_header

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    header = read_header(gguf_path)
    if header.architecture != "gemma3":
        return
    scalar = text.get("query_pre_attn_scalar")
    heads, hidden, head_dim = (
        text.get("num_attention_heads"), text.get("hidden_size"), text.get("head_dim")
    )  # fmt: skip
    if not all(isinstance(v, (int, float)) and v > 0 for v in (scalar, heads, hidden, head_dim)):
        return
    llama_divisor = hidden / heads if header.arch_value("block_count") == 62 else head_dim
    factor = (llama_divisor / scalar) ** 0.5
    if abs(factor - 1.0) < 1e-9:
        return
    import numpy as np

    with open(gguf_path, "r+b") as f:
        for name, tensor in header.tensors.items():
            if not name.endswith("attn_q_norm.weight"):
                continue
            if tensor.type != 0:  # GGML_TYPE_F32
                raise ConversionError(f"{name} is not float32; cannot fold the attention scale")
            f.seek(tensor.offset)
            weight = np.frombuffer(f.read(tensor.nbytes), dtype=np.float32) * np.float32(factor)
            f.seek(tensor.offset)
            f.write(weight.astype(np.float32).tobytes())


def _run_converter(tools: Path, checkpoint: Path, out: Path, outtype: str) -> None:
    done = subprocess.run(
        [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(checkpoint),
         "--outfile", str(out), "--outtype", outtype],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tools), str(tools / "gguf-py"), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)},
    )  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise ConversionError(f"llama.cpp's converter failed on {checkpoint}:\n{tail}")


_LAYER_PERIOD = {"gemma2": 2, "gemma3": 6}
"""Sliding-window periods llama.cpp assumes for families whose converter writes no per-layer
pattern: every period-th layer attends to the whole context, the others to the window."""


def runtime_differences(checkpoint: Path) -> list[str]:
    """What llama.cpp will compute differently from transformers for this checkpoint's config.

    Real Gemma checkpoints have none; a hand-made or pruned config may. llama.cpp scales
    Gemma 2 attention by 1/sqrt(head_dim) (every size but 27B) where transformers uses
    ``query_pre_attn_scalar`` (Gemma 3's is made right: :func:`_fold_attention_scale`), and
    places Gemma 2 and 3 full-attention layers by a fixed period (:data:`_LAYER_PERIOD`) where
    transformers reads ``layer_types``.
    """
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    family = family_of_checkpoint(checkpoint).name
    if family == "gemma3n":
        return _gemma3n_differences(checkpoint.name, text)
    if family not in _LAYER_PERIOD:
        return []
    found = []
    scalar, head_dim = text.get("query_pre_attn_scalar"), text.get("head_dim")
    if (
        family == "gemma2"  # Gemma 3's is folded into its query norm (_fold_attention_scale)
        and isinstance(scalar, (int, float))
        and isinstance(head_dim, int)
        and scalar != head_dim
        and text.get("num_hidden_layers") != 62  # 27B: llama.cpp uses hidden / heads there
    ):
        found.append(
            f"{checkpoint.name}: query_pre_attn_scalar is {scalar} but head_dim is {head_dim}: "
            f"llama.cpp scales {family} attention by 1/sqrt(head_dim), transformers by "
            f"1/sqrt(query_pre_attn_scalar)"
        )
    period = _LAYER_PERIOD[family]
    layer_types = text.get("layer_types")
    expected = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(len(layer_types or []))
    ]
    if isinstance(layer_types, list) and layer_types != expected:
        found.append(
            f"{checkpoint.name}: layer_types is {layer_types}, but llama.cpp makes every "
            f"{period}th {family} layer full attention and the others sliding"
        )
    return [f"{line}, so the GGUF will not compute what transformers does" for line in found]


def _gemma3n_differences(name: str, text: dict) -> list[str]:
    """llama.cpp builds Gemma 3n as E2B and E4B are: sparse activations (the top 5 %) in the
    first 10 layers, and K/V computed by the first 20 layers and shared by the rest."""
    found = []
    layers = text.get("num_hidden_layers")
    pattern = text.get("activation_sparsity_pattern")
    if isinstance(layers, int) and isinstance(pattern, list):
        fixed = [0.95] * min(layers, 10) + [0.0] * max(0, layers - 10)
        if [round(float(p), 6) for p in pattern] != fixed:
            found.append(
                f"{name}: activation_sparsity_pattern differs from llama.cpp's fixed one "
                "(0.95 in the first 10 layers, 0 after)"
            )
        shared = text.get("num_kv_shared_layers")
        if isinstance(shared, int) and layers - shared != 20:
            found.append(
                f"{name}: {layers - shared} layers compute K/V, but llama.cpp shares the K/V of "
                "the first 20 layers"
            )
    return [f"{line}, so the GGUF will not compute what transformers does" for line in found]
