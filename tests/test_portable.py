"""edgegemma imports where POSIX-only modules do not exist (Windows): none is needed at import."""

from __future__ import annotations

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
