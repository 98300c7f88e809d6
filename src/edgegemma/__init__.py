"""edgegemma: run fine-tuned Gemma models on edge devices from Python.

    import edgegemma
    with edgegemma.load("gemma3-270m") as engine:
        print(engine.generate("The capital of France is", max_tokens=16).text)
"""

import os as _os

# llama.cpp's OpenMP threads spin while waiting; on a device that runs anything else besides
# inference that collapses throughput (measured 50 -> 4 tok/s on 2 busy cores). libgomp reads
# this once, when it is loaded, so it must be set before any backend imports its runtime.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backend import Backend, BackendOptions, ModelInfo, available_backends  # noqa: E402
from .engine import ENGINE_ADAPTERS, Engine, Result, Stats, Stream, load  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    BackendUnavailableError,
    ContextOverflowError,
    ConversionError,
    EdgeGemmaError,
    EngineBusyError,
    EngineClosedError,
    IntegrityError,
    InvalidParameterError,
    ModelError,
)
from .sampling import SamplingParams  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ENGINE_ADAPTERS",
    "AdapterError",
    "Backend",
    "BackendOptions",
    "BackendUnavailableError",
    "ContextOverflowError",
    "ConversionError",
    "EdgeGemmaError",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "IntegrityError",
    "InvalidParameterError",
    "ModelError",
    "ModelInfo",
    "Result",
    "SamplingParams",
    "Stats",
    "Stream",
    "available_backends",
    "load",
]
