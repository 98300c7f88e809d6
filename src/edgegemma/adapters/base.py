"""What every adapter format provides, and what inspecting an adapter tells."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .peft import PeftAdapter


@dataclass(frozen=True)
class AdapterSummary:
    """What ``edgegemma adapters inspect`` prints about an adapter file or a PEFT folder."""

    path: Path
    format: str
    """``"peft"``, or the name of an adapter format (``"gguf"``, ``"onnx"``, ``"litert"``)."""
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


@dataclass(frozen=True)
class AdapterFormat:
    """One runtime's LoRA file format: which backend loads it, and how to make and read one.

    Registered in the ``edgegemma.adapter_formats`` entry point group (edgegemma's own
    formats too); the entry's name is ``name``, the format module's name.
    """

    name: str
    """The registry key and ``edgegemma adapters convert --to`` word."""
    backend: str
    """The backend that loads files of this format."""
    suffix: str
    """The file suffix, which tells the format of a file."""
    title: str
    """The format in words, e.g. ``"GGUF LoRA (llama.cpp)"``."""
    dtypes: tuple[str, ...]
    """Tensor types files are written in; the first is the default."""
    from_peft: Callable[[PeftAdapter, Path, Path, str], Path]
    """``(adapter, output file, base model path, dtype) -> written file``; checks the adapter
    against the base model it will run on."""
    inspect: Callable[[Path], AdapterSummary]
