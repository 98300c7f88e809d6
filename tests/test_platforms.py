"""The README's platform table against the package index: every extra installs everywhere.

Asks PyPI (as pip would, CPython 3.11) for the files of each pinned requirement: on every
platform the table names, each requirement must have a wheel, a source distribution pip can
build, or an environment marker that leaves it out there -- never a resolver error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import platform_wheels
finally:
    sys.path.pop(0)


def test_every_pinned_requirement_installs_on_every_platform(tmp_path):
    out = tmp_path / "wheels.json"
    assert platform_wheels.main(["--json", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    unresolvable = [
        f"{requirement} on {platform}"
        for requirement, cells in table.items()
        for platform, found in cells.items()
        if platform != "extras" and found["status"] == "none"
    ]
    assert not unresolvable
    # The runtimes the README's table calls "wheel" on the Pi, and the one it leaves out.
    pi = "Linux aarch64 (Pi 5)"
    for runtime in ("onnxruntime-genai==0.18.0", "litert-lm-api==0.18.1", "torch==2.13.0"):
        assert table[runtime][pi]["status"] == "wheel", runtime
    assert table["mediapipe==0.10.35"][pi]["status"] == "left out"
    assert table["llama-cpp-python==0.3.36"][pi]["status"] == "sdist"
