"""edgegemma imports where POSIX-only modules do not exist (Windows): none is needed at import."""

from __future__ import annotations

import platform
import subprocess
import sys

CODE = """
import sys
# Third-party packages first: on Linux they may use these modules (psutil's Linux half does);
# their Windows builds do not. What must not need them is edgegemma's own code.
import filelock, gguf, jsonschema, llama_cpp, numpy, psutil  # noqa
for name in ("fcntl", "resource", "termios", "pwd", "grp"):
    sys.modules[name] = None  # "import fcntl" now raises ImportError, as on Windows
import importlib, pkgutil, edgegemma
names = [m.name for m in pkgutil.walk_packages(edgegemma.__path__, "edgegemma.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from edgegemma.memory import peak_rss
from edgegemma.threads import default_threads, usable_cores
assert peak_rss()[0] > 0 and default_threads() >= 1 and usable_cores()
print(len(names))
"""


def test_every_module_imports_without_posix_only_modules():
    found = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, check=False
    )
    assert found.returncode == 0, found.stderr[-3000:]
    assert int(found.stdout.strip()) > 40


BACKEND_MISSING = """
import sys
for name in ("onnxruntime_genai", "litert_lm", "llama_cpp"):
    sys.modules[name] = None  # not installed: no wheel on this platform, say
from edgegemma.backends import get_backend
from edgegemma.errors import BackendUnavailableError
for backend in ("onnx", "mediapipe", "llamacpp"):
    try:
        get_backend(backend)
    except BackendUnavailableError as exc:
        print(exc)
"""


def test_a_backend_without_its_runtime_names_the_platform_and_the_install():
    found = subprocess.run(
        [sys.executable, "-c", BACKEND_MISSING],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    onnx, mediapipe, llamacpp = found.stdout.strip().splitlines()
    here = f"{platform.system()} {platform.machine()} machine"
    assert here in onnx and "pip install 'edgegemma[onnx]'" in onnx
    assert here in mediapipe and "pip install 'edgegemma[mediapipe]'" in mediapipe
    assert here in llamacpp and "pip install llama-cpp-python==0.3.36" in llamacpp
    assert "platform table" in llamacpp
