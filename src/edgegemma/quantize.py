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
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Mapping
from pathlib import Path

from .builds import Progress, cached_build, sha256_file, tool_versions
from .errors import ConversionError
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
    checked = gguf_options(options["quant"], _embedding(options))
    key = build_key(sha256_file(gguf_path), checked)
    folder = cached_build(
        KIND, key, lambda out: quantize(gguf_path, out / FILE, checked), progress=progress
    )
    return folder / FILE


def build_key(source_sha256: str, options: Mapping[str, str]) -> dict[str, str]:
    """The build cache key of the GGUF with sha256 ``source_sha256`` requantized with ``options``."""
    return {
        "source_sha256": source_sha256,
        **options,
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


def _embedding(options: Mapping[str, str]) -> str | None:
    value = options.get("embedding", "recipe")
    return None if value == "recipe" else value
