"""GGUF variants made by llama.cpp's own quantizer, built once into the build cache.

``llama_model_quantize`` (exposed by llama-cpp-python) rewrites a GGUF with another recipe
and, separately, another type for the token embedding, which Gemma ties to the output
matrix: it is read once per generated token and is most of the file (the pinned Q4_K_M keeps
it as Q8_0; docs/models.md). Re-running the file's own recipe is lossless, so a variant that
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
import shutil
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import importance
from .builds import Progress, cached_build, tool_versions
from .errors import ConversionError
from .files import disk_full, sha256_file
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
    say = progress or (lambda _message: None)
    folder = cached_build(
        KIND,
        key,
        lambda out: _in_own_process(gguf_path, out / FILE, checked, say),
        progress=progress,
    )
    return folder / FILE


def _in_own_process(source: Path, out: Path, options: Mapping[str, str], say: Progress) -> None:
    """:func:`quantize` in a child process: what it maps and allocates is given back when it
    ends, and the peak memory a later generation reports is the generation's own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        peak = pool.submit(_quantize_measured, source, out, dict(options)).result()
    say(f"{KIND}: the build peaked at {peak:.0f} MiB in its own process")


def _quantize_measured(source: Path, out: Path, options: Mapping[str, str]) -> float:
    from .memory import peak_rss_mb

    quantize(source, out, options)
    return peak_rss_mb()


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
    """Write ``source`` requantized with ``options`` to ``out`` (llama.cpp's quantizer).

    An embedding of a named type is not left to ``llama_model_quantize``, which converts a
    whole tensor to float32 before quantizing it: Gemma's 262k-row embedding is hundreds of
    MB so for 270M and GBs for the larger models (docs/models.md). The
    quantizer copies it as stored; it is then quantized a slice of rows at a time, with the
    very ggml function the quantizer calls (rows are independent, so the bytes are the
    same), and spliced in."""
    embedding = _embedding(options)
    if embedding is None:
        _llama_quantize(source, out, options["quant"], None)
        return
    import llama_cpp as ll

    stored = read_header(source).tensors[_EMBEDDING]
    layers = out.with_name(out.name + ".layers")
    try:
        _llama_quantize(source, layers, options["quant"], int(stored.type))
        weights = importance.load(options["importance"]) if options.get("importance") else None
        _splice_embedding(
            source, layers, out, getattr(ll, f"GGML_TYPE_{embedding.upper()}"), weights
        )
    finally:
        layers.unlink(missing_ok=True)


def _llama_quantize(source: Path, out: Path, quant: str, embedding_type: int | None) -> None:
    import llama_cpp as ll

    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.allow_requantize = True
    params.nthread = default_threads()
    if embedding_type is not None:
        # Gemma ties the output matrix to the embedding: both settings name the one tensor.
        params.token_embedding_type = embedding_type
        params.output_tensor_type = embedding_type
    with captured_stderr() as log:
        status = ll.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        )
    if status != 0:
        if shutil.disk_usage(out.parent).free < source.stat().st_size:
            # llama.cpp says only that a write failed, after its warnings.
            raise ConversionError(f"llama.cpp could not quantize {source.name}: {disk_full(out)}")
        raise ConversionError(
            f"llama.cpp could not quantize {source.name} to {quant}: {log()[-500:]}"
        )


_EMBEDDING = "token_embd.weight"
_ROWS_PER_TASK = 8192


def _splice_embedding(
    source: Path, layers: Path, out: Path, ggml_type: int, weights: np.ndarray | None
) -> None:
    """Write ``layers`` (a GGUF) to ``out`` with its embedding quantized anew to ``ggml_type``
    from ``source``'s values, weighted by ``weights``: the layout llama.cpp's writer gives
    (the same header and metadata, tensors in order, each aligned)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    header = read_header(layers)
    stored = read_header(source).tensors[_EMBEDDING]
    columns, rows = stored.shape
    if weights is not None and weights.shape != (columns,):
        raise ConversionError(
            f"importance weights have {weights.size} columns; {source.name}'s embedding has "
            f"{columns}"
        )
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    new_nbytes = rows * (columns // block) * block_bytes
    align = header.alignment

    def pad(size: int) -> int:
        return -size % align

    with open(layers, "rb") as reading, open(out, "wb") as writing:
        writing.write(reading.read(header.infos_start))
        offset = 0
        for tensor in header.tensors.values():
            spliced = tensor.name == _EMBEDDING
            name = tensor.name.encode()
            writing.write(struct.pack("<Q", len(name)) + name)
            writing.write(struct.pack("<I", len(tensor.shape)))
            writing.write(struct.pack(f"<{len(tensor.shape)}Q", *tensor.shape))
            writing.write(struct.pack("<IQ", ggml_type if spliced else int(tensor.type), offset))
            nbytes = new_nbytes if spliced else tensor.nbytes
            offset += nbytes + pad(nbytes)
        writing.write(b"\0" * pad(writing.tell()))
        for tensor in header.tensors.values():
            if tensor.name == _EMBEDDING:
                writing.writelines(_quantized_rows(source, stored, ggml_type, weights))
                nbytes = new_nbytes
            else:
                reading.seek(tensor.offset)
                remaining = tensor.nbytes
                while remaining:
                    chunk = reading.read(min(_COPY_CHUNK, remaining))
                    writing.write(chunk)
                    remaining -= len(chunk)
                nbytes = tensor.nbytes
            writing.write(b"\0" * pad(nbytes))


_COPY_CHUNK = 16 << 20


def _quantized_rows(
    source: Path, stored: Any, ggml_type: int, weights: np.ndarray | None
) -> Iterator[bytes]:
    """The rows of ``source``'s embedding quantized to ``ggml_type``, a few thousand rows at
    a time (each slice dequantized on its own: float32 of the whole would be 4x the file)."""
    from gguf.quants import dequantize

    rows = stored.shape[1]
    row_bytes = stored.nbytes // rows

    def task(first: int) -> bytes:
        count = min(_ROWS_PER_TASK, rows - first)
        raw = np.fromfile(
            source,
            dtype=np.uint8,
            count=count * row_bytes,
            offset=stored.offset + first * row_bytes,
        ).reshape(count, row_bytes)
        return quantize_rows(dequantize(raw, stored.type), ggml_type, weights).tobytes()

    # Rows are quantized independently, so the bytes do not depend on the threads. A few
    # slices are in flight at a time, written in order as they finish.
    threads = default_threads()
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[bytes]] = deque()
        for first in range(0, rows, _ROWS_PER_TASK):
            pending.append(pool.submit(task, first))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
