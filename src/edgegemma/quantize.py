"""GGUF variants made by llama.cpp's own quantizer, built once into the build cache.

``llama_model_quantize`` (exposed by llama-cpp-python) rewrites a GGUF with another recipe
and, separately, another type for the token embedding, which Gemma ties to the output
matrix: it is read once per generated token and is most of the file (the pinned Q4_K_M keeps
it as Q8_0: 178 of 253 MB). Re-running the file's own recipe is lossless, so a variant that
changes only the embedding keeps the layers exactly; requantizing the layers to another type
compounds their error (measured in docs/models.md). The output is deterministic for a given
llama.cpp on a given CPU architecture (aarch64 rounds a few blocks differently: GCC fuses
multiply-adds there), so the build key names the architecture and ``models.lock`` pins a
sha256 per architecture like any downloaded file.

With ``importance`` (shipped weights, :mod:`edgegemma.importance`) the embedding is then
quantized again from the source's values by llama.cpp's own ``ggml_quantize_chunk`` given
those per-column weights, which ``llama_model_quantize`` can take only from a C++ map, and
written over the first attempt in place (same type, same size).
"""

from __future__ import annotations

import ctypes
import functools
import platform
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import importance
from .builds import Progress, cached_build, sha256_file, tool_versions
from .errors import ConversionError
from .gguffile import read_header
from .recipes import gguf_options
from .stderr import captured_stderr
from .threads import default_threads

KIND = "gguf"
FILE = "model.gguf"
"""The GGUF inside a build folder."""
_RECIPE = "1"
"""Bump when what the build writes changes."""
_TOOLS = ("llama-cpp-python",)


def build_gguf(
    gguf_path: Path, options: Mapping[str, str], *, progress: Progress | None = None
) -> Path:
    """The requantized GGUF (options from :func:`~edgegemma.recipes.gguf_options`), cached."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    checked = gguf_options(options["quant"], _embedding(options), options.get("importance"))
    key = build_key(sha256_file(gguf_path), checked)
    folder = cached_build(
        KIND, key, lambda out: quantize(gguf_path, out / FILE, checked), progress=progress
    )
    return folder / FILE


def build_key(source_sha256: str, options: Mapping[str, str]) -> dict[str, str]:
    """The build cache key of the GGUF with sha256 ``source_sha256`` requantized with ``options``."""
    weights = options.get("importance")
    return {
        "source_sha256": source_sha256,
        **options,
        **({"importance_sha256": importance.sha256(weights)} if weights else {}),
        "recipe": _RECIPE,
        **tool_versions(*_TOOLS),
        "machine": cpu_architecture(),
    }


def cpu_architecture() -> str:
    """``x86_64`` or ``aarch64`` whatever the OS calls them (AMD64, arm64), else as named."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def quantize(source: Path, out: Path, options: Mapping[str, str]) -> None:
    """Write ``source`` requantized with ``options`` to ``out`` (llama.cpp's quantizer)."""
    import llama_cpp as ll

    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{options['quant'].upper()}")
    params.allow_requantize = True
    params.nthread = default_threads()
    embedding = _embedding(options)
    if embedding is not None:
        # Gemma ties the output matrix to the embedding: both settings name the one tensor.
        ggml_type = getattr(ll, f"GGML_TYPE_{embedding.upper()}")
        params.token_embedding_type = ggml_type
        params.output_tensor_type = ggml_type
    with captured_stderr() as log:
        status = ll.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        )
    if status != 0:
        raise ConversionError(
            f"llama.cpp could not quantize {source.name} with {dict(options)}: {log()[-500:]}"
        )
    if options.get("importance"):  # gguf_options() allows it only with an embedding type
        _requantize_embedding(source, out, importance.load(options["importance"]))


_EMBEDDING = "token_embd.weight"
_ROWS_PER_TASK = 8192


def _requantize_embedding(source: Path, out: Path, weights: np.ndarray) -> None:
    """Quantize ``source``'s embedding again into ``out``'s, weighting columns by ``weights``."""
    from gguf.quants import dequantize

    stored, made = read_header(source).tensors[_EMBEDDING], read_header(out).tensors[_EMBEDDING]
    columns, rows = made.shape
    if weights.shape != (columns,):
        raise ConversionError(
            f"importance weights have {weights.size} columns; {source.name}'s embedding has "
            f"{columns}"
        )
    raw = np.fromfile(source, dtype=np.uint8, count=stored.nbytes, offset=stored.offset)
    raw = raw.reshape(rows, -1)
    quantized = np.empty((rows, made.nbytes // rows), dtype=np.uint8)

    def task(first: int) -> None:
        # A slice at a time: the whole embedding as float32 would be 4x the file's size.
        values = dequantize(raw[first : first + _ROWS_PER_TASK], stored.type)
        quantized[first : first + _ROWS_PER_TASK] = quantize_rows(values, made.type, weights)

    # Rows are quantized independently, so the bytes do not depend on the thread count.
    with ThreadPoolExecutor(default_threads()) as pool:
        list(pool.map(task, range(0, rows, _ROWS_PER_TASK)))
    with open(out, "r+b") as f:
        f.seek(made.offset)
        f.write(quantized.data)


def quantize_rows(values: np.ndarray, ggml_type: int, weights: np.ndarray | None) -> np.ndarray:
    """The rows of ``values`` (a matrix) quantized to ``ggml_type`` by ggml's own quantizer, each
    column's squared error weighted by ``weights`` (llama.cpp's importance matrix; None: the
    type's plain rounding), as a ``uint8`` matrix with one row of blocks per row."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rows, columns = values.shape
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if columns % block or (weights is not None and weights.shape != (columns,)):
        raise ConversionError(
            f"cannot quantize {columns} columns to blocks of {block} with "
            f"{None if weights is None else weights.size} weights"
        )
    values = np.ascontiguousarray(values, dtype=np.float32)
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
    quantized = np.empty((rows, columns // block * block_bytes), dtype=np.uint8)
    written = _ggml_quantize_chunk()(
        int(ggml_type), values.ctypes.data, quantized.ctypes.data, 0, rows, columns,
        None if weights is None else weights.ctypes.data,
    )  # fmt: skip
    if written != quantized.nbytes:
        raise ConversionError(f"ggml wrote {written} bytes, expected {quantized.nbytes}")
    return quantized


@functools.cache
def _ggml_quantize_chunk() -> Any:
    """ggml's ``ggml_quantize_chunk``, typed once (calls from several threads share it)."""
    from llama_cpp._ggml import libggml  # llama-cpp-python's own handle on libggml

    function = libggml.ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    function.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    return function


def _embedding(options: Mapping[str, str]) -> str | None:
    value = options.get("embedding", "recipe")
    return None if value == "recipe" else value
