"""edgegemma: run fine-tuned Gemma models on edge devices from Python.

import edgegemma
with edgegemma.load("gemma3-270m") as engine:
    print(engine.generate("The capital of France is", max_tokens=16).text)
"""

from .backends import available_backends
from .backends.base import Backend, BackendOptions, Features, ModelInfo
from .batching import Together
from .chat import ChatTemplate, Message
from .decisions import Choice, Decision, Decisions, Scale, Schema, YesNo
from .engine import Engine, load
from .errors import (
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
    NumericalError,
    TimedOutError,
    UnsupportedArchitectureError,
)
from .options import ENGINE_ADAPTERS, ChatOptions, GenerateOptions
from .results import Classification, Perplexity, Result, Stats, TokenLogprob
from .sampling import SamplingParams
from .streams import Stream

__version__ = "0.1.0"

__all__ = [
    "ENGINE_ADAPTERS",
    "AdapterError",
    "Backend",
    "BackendOptions",
    "BackendUnavailableError",
    "ChatOptions",
    "ChatTemplate",
    "Choice",
    "Classification",
    "ContextOverflowError",
    "ConversionError",
    "Decision",
    "Decisions",
    "EdgeGemmaError",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "Features",
    "GenerateOptions",
    "IntegrityError",
    "InvalidParameterError",
    "Message",
    "ModelError",
    "ModelInfo",
    "NumericalError",
    "Perplexity",
    "Result",
    "SamplingParams",
    "Scale",
    "Schema",
    "Stats",
    "Stream",
    "TimedOutError",
    "Together",
    "TokenLogprob",
    "UnsupportedArchitectureError",
    "YesNo",
    "available_backends",
    "load",
]
