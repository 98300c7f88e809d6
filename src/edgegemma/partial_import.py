"""Import one module of a package before, and without, the package's ``__init__``.

``llama_cpp/__init__`` imports llama-cpp-python's high-level API (``Llama``, its chat
formats, jinja2) and ``gguf/__init__`` the gguf package's reader, writer and vocabulary
tools; loading a model needs only ``llama_cpp.llama_cpp`` (the C bindings) and
``gguf.constants``. Skipping the rest keeps megabytes out of the resident set of every process
that loads a GGUF model, which on a Pi is what the model has to share (measured in
docs/models.md, "Memory").

The package is registered half-made: on the first attribute it lacks (``llama_cpp.Llama``,
``from gguf import GGUFReader``) its ``__init__`` runs, so code in the same process that
uses the whole package still gets it. A package already imported is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any


def import_submodule(name: str) -> ModuleType:
    """The module ``name`` (``package.module``), its package's ``__init__`` deferred."""
    package_name = name.rpartition(".")[0]
    if package_name not in sys.modules:
        spec = importlib.util.find_spec(package_name)
        if spec is None:
            raise ImportError(f"no package named {package_name!r}", name=package_name)
        if spec.loader is None or spec.submodule_search_locations is None:
            raise ImportError(f"{package_name!r} is not a package", name=package_name)
        package = importlib.util.module_from_spec(spec)
        package.__getattr__ = _completer(package, spec.loader)  # type: ignore[method-assign]
        sys.modules[package_name] = package
        try:
            return importlib.import_module(name)
        except BaseException:
            del sys.modules[package_name]  # as a failed import leaves nothing behind
            raise
    return importlib.import_module(name)


def _completer(package: ModuleType, loader: Any) -> Any:
    """The package's module ``__getattr__`` (PEP 562): runs ``__init__`` once, then looks again."""
    # Reentrant: the package's own __init__ may look up a name it has not yet defined.
    lock = threading.RLock()
    done = False

    def complete(attribute: str) -> Any:
        nonlocal done
        with lock:
            if not done:
                done = True
                loader.exec_module(package)
                if package.__dict__.get("__getattr__") is complete:
                    del package.__dict__["__getattr__"]
        if attribute in package.__dict__:
            return package.__dict__[attribute]
        own = package.__dict__.get("__getattr__")  # one the package's __init__ defines
        if own is not None and own is not complete:
            return own(attribute)
        raise AttributeError(f"module {package.__name__!r} has no attribute {attribute!r}")

    return complete
