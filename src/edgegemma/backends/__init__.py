"""The backends: one module per runtime, named as users name the backend.

    llamacpp    llama.cpp through llama-cpp-python (GGUF)
    onnx        ONNX Runtime GenAI (a model folder built by ``edgegemma convert``)
    mediapipe   MediaPipe LLM Inference's runtime, LiteRT-LM (``.task`` / ``.litertlm``)

:mod:`.base` defines the interface. Every backend, built-in or third-party, registers
through the ``edgegemma.backends`` entry point group (edgegemma's own in its
``pyproject.toml``), whose entries name a :class:`~.base.Backend` subclass; the entry's name
is the backend's name. A runtime is imported only when its backend is first used.
"""

from __future__ import annotations

import importlib
import platform
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import BackendUnavailableError
from .base import Backend

ENTRY_POINT_GROUP = "edgegemma.backends"

INSTALL = {
    "llamacpp": "pip install llama-cpp-python==0.3.36 (edgegemma's own dependency: pip compiles "
    "llama.cpp, which needs a C/C++ compiler and cmake)",
    "onnx": "pip install 'edgegemma[onnx]'",
    "mediapipe": "pip install 'edgegemma[mediapipe]'",
}
"""How to install each built-in backend's runtime; the README's platform table says where
each has wheels."""


def available_backends() -> dict[str, str]:
    """Backend names mapped to the ``module:Class`` that implements each.

    Where a plugin reuses a built-in name, the built-in wins.
    """
    found: dict[str, str] = {}
    entries = sorted(
        entry_points(group=ENTRY_POINT_GROUP), key=lambda e: not e.value.startswith("edgegemma.")
    )
    for entry in entries:
        found.setdefault(entry.name, entry.value)
    return found


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``; imports its runtime on first use."""
    backends = available_backends()
    if name not in backends:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(backends)) or 'none'}"
        )
    module_name, _, class_name = backends[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        how = INSTALL.get(name, f"install the package that provides {module_name}")
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed on this "
            f"{platform.system()} {platform.machine()} machine ({exc}); {how} "
            "(the README's platform table says where each runtime has wheels)"
        ) from exc
    backend_class = getattr(module, class_name, None)
    if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
        raise BackendUnavailableError(f"{backends[name]} is not an edgegemma Backend")
    return backend_class


def backend_for_path(path: Path) -> str:
    """The name of the backend that opens files like ``path``."""
    for name in available_backends():
        try:
            if get_backend(name).accepts(path):
                return name
        except BackendUnavailableError:
            continue
    raise BackendUnavailableError(
        f"no installed backend opens {path.name!r} files; pass backend=... explicitly"
    )


__all__ = ["ENTRY_POINT_GROUP", "Backend", "available_backends", "backend_for_path", "get_backend"]
