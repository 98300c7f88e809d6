"""The models edgegemma builds from a GGUF, and the options each build takes.

A build (see :mod:`edgegemma.builds`) is cached under its kind and a key made of the source
GGUF's sha256, the tools' versions and the options checked here. The backends use these to
find a build of a GGUF by name; ``edgegemma convert`` and ``models.lock`` variants use them to
make one.

    gguf     a GGUF requantized by llama.cpp's quantizer (:mod:`edgegemma.quantize`)
    onnx     an ONNX Runtime GenAI folder (:mod:`edgegemma.convert.onnx`)
    litert   a LiteRT-LM ``.litertlm`` and MediaPipe ``.task`` bundle (:mod:`edgegemma.convert.litert`)
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConversionError
from .importance import path as importance_path
from .tflitefile import LORA_RANKS

# -- gguf --------------------------------------------------------------------------------

GGUF_QUANTS = ("q4_k_m", "q4_0", "q5_0", "q8_0")
"""llama.cpp file types (recipes) a GGUF is requantized to."""
GGUF_EMBEDDINGS = ("q8_0", "q6_k", "q5_0", "q4_0", "iq4_nl", "q4_1")
"""Types of the token embedding / tied output matrix (read once per generated token)."""


def gguf_options(
    quant: str = "q4_k_m", embedding: str | None = None, importance: str | None = None
) -> dict[str, str]:
    """Checked options of a requantized GGUF; ``embedding=None`` keeps the recipe's own choice.

    ``importance`` names shipped importance weights (:mod:`edgegemma.importance`) the
    embedding is quantized with; it needs an ``embedding`` type.
    """
    if quant not in GGUF_QUANTS:
        raise ConversionError(f"quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    if embedding is not None and embedding not in GGUF_EMBEDDINGS:
        raise ConversionError(
            f"embedding must be one of {', '.join(GGUF_EMBEDDINGS)}, got {embedding!r}"
        )
    options = {"quant": quant, "embedding": embedding or "recipe"}
    if importance is not None:
        if embedding is None:
            raise ConversionError("importance weights apply to an embedding type: name one")
        importance_path(importance)  # a ConversionError naming the shipped ones if unknown
        options["importance"] = importance
    return options


# -- onnx --------------------------------------------------------------------------------

ONNX_PRECISIONS = ("int4", "int8", "fp32")
ONNX_QUANT_METHODS = ("default", "k_quant")
"""int4/int8 weight quantization: the builder's round-to-nearest, or llama.cpp-style k-quant
(k-quant agrees with llama.cpp's top-1 token more often at int4 and decodes as fast, but its
build takes several times longer: docs/onnx.md)."""
ONNX_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ONNX_DEFAULT_LORA_TARGETS = ("q", "k", "v", "o")
ONNX_OPTIONS = ("precision", "quant_method", "lora_targets")
"""The load options that pick an ONNX build (``edgegemma.load(..., backend="onnx", **options)``)."""


def onnx_options(
    precision: str = "int4",
    quant_method: str = "default",
    lora_targets: str | Sequence[str] | None = ONNX_DEFAULT_LORA_TARGETS,
) -> dict[str, str]:
    """Checked, normalized options of an ONNX build.

    ``lora_targets`` are short projection names (``q k v o gate up down``, or a
    comma-separated string); ``None``, empty or ``"none"`` means no LoRA inputs.
    """
    if precision not in ONNX_PRECISIONS:
        raise ConversionError(
            f"precision must be one of {', '.join(ONNX_PRECISIONS)}, got {precision!r}"
        )
    if quant_method not in ONNX_QUANT_METHODS:
        raise ConversionError(
            f"quant_method must be one of {', '.join(ONNX_QUANT_METHODS)}, got {quant_method!r}"
        )
    if isinstance(lora_targets, str):
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip() not in ("", "none")]
    targets = set(lora_targets or ())
    unknown = targets - set(ONNX_LORA_TARGETS)
    if unknown:
        raise ConversionError(
            f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(ONNX_LORA_TARGETS)}"
        )
    return {
        "precision": precision,
        "quant_method": "none" if precision == "fp32" else quant_method,
        "lora_targets": ",".join(t for t in ONNX_LORA_TARGETS if t in targets) or "none",
    }


# -- litert ------------------------------------------------------------------------------

LITERT_QUANTS = (
    "none",
    "fp16",
    "weight_only_int8",
    "dynamic_int8",
    "dynamic_int4_block32",
    "dynamic_int4_block128",
)
"""litert-torch's quantization recipes: ``none`` is float32; ``dynamic_*`` also quantize
activations at run time (fastest), ``weight_only_int8`` only stores int8 weights."""
LITERT_DEFAULT_QUANT = "dynamic_int8"
"""The fastest and smallest recipe; with LoRA inputs too: measured in docs/mediapipe.md, it
keeps trained adapters' effect (weight_only_int8 keeps more of it but needs several times
the memory at run time, none/float32 is exact but the largest)."""
LITERT_DEFAULT_CONTEXT = 2048
"""KV cache positions, the largest ``n_ctx`` the model can be loaded with (edgegemma's default)."""
LITERT_PREFILL_LENGTH = 128
"""Tokens per prefill step; longer prompts take several steps, shorter ones are padded."""
LITERT_FILES = {"litertlm": "model.litertlm", "task": "model.task"}
"""The two bundles inside a litert build folder, by bundle type."""


def litert_options(
    quant: str | None = None, lora_rank: int | None = None, context: int = LITERT_DEFAULT_CONTEXT
) -> dict[str, str]:
    """Checked options of a LiteRT-LM build."""
    if lora_rank not in (None, 0, *LORA_RANKS):
        raise ConversionError(
            f"--lora-rank must be one of {', '.join(map(str, LORA_RANKS))}, got {lora_rank}"
        )
    if quant is None:
        quant = LITERT_DEFAULT_QUANT
    if quant not in LITERT_QUANTS:
        raise ConversionError(f"--quant must be one of {', '.join(LITERT_QUANTS)}, got {quant!r}")
    if (
        isinstance(context, bool)
        or not isinstance(context, int)
        or not LITERT_PREFILL_LENGTH < context <= 32768
    ):
        raise ConversionError(
            f"--context must be an integer in ({LITERT_PREFILL_LENGTH}, 32768], got {context!r}"
        )
    return {"quant": quant, "lora_rank": str(lora_rank or 0), "context": str(context)}
