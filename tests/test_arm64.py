"""edgegemma's llama.cpp backend as arm64 code, under qemu-user, against this machine's build.

The arm64 Python is Debian bookworm's (Raspberry Pi OS Bookworm's) with llama-cpp-python over
llama.cpp cross-compiled for arm64 from the same sdist (tests/arm64_python.py): NEON and dot
product kernels, Q4_0 weights repacked for them at load. Emulated speed is not measured.

What the two builds give differs, measured (benchmarks/arm64_emulated.py, docs/devices.md):
they round differently, so greedy decoding keeps the same tokens until a step where x86's
two best tokens are within a few hundredths of a nat, and there the arm64 build may take
the second. The tests hold the builds to exactly that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import arm64_python
import pytest

import edgegemma
from edgegemma import models

HERE = Path(__file__).parent
PROMPT = "The capital of France is"
NEAR_TIE_NATS = 0.15
"""The largest top-2 gap at which the builds may part (measured: 0.03-0.10)."""


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> Path:
    sys.path.insert(0, str(HERE / "adb_standin"))
    try:
        from build_llama_tools import arm64_libraries
    finally:
        sys.path.pop(0)
    return arm64_python.launcher(tmp_path_factory.mktemp("arm64"), libraries=arm64_libraries())


def _greedy(engine, tokens: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    result = engine.generate(PROMPT, max_tokens=tokens, logprobs=2)
    return [(s.token, s.logprob, [(t.token, t.logprob) for t in s.top]) for s in result.logprobs]


ARM64_SCRIPT = """
import json, platform, sys
import edgegemma
with edgegemma.load(sys.argv[1], n_ctx=256, n_threads=2) as engine:
    result = engine.generate(sys.argv[2], max_tokens=int(sys.argv[3]), logprobs=2)
    print(json.dumps({"machine": platform.machine(), "backend": engine.backend_name,
        "steps": [(s.token, s.logprob, [(t.token, t.logprob) for t in s.top]) for s in result.logprobs]}))
"""


def test_the_q4_0_variant_decodes_on_arm64_as_on_x86_up_to_near_ties(arm64):
    """The Q4_0 variant: the format llama.cpp repacks for ARM, the Pi's and phones' fast path."""
    model = models.fetch("gemma3-270m-q4_0")
    done = subprocess.run(
        [str(arm64), "-c", ARM64_SCRIPT, str(model), PROMPT, "8"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    arm = json.loads(done.stdout.strip().splitlines()[-1])
    assert (arm["machine"], arm["backend"]) == ("aarch64", "llamacpp")
    with edgegemma.load(model, n_ctx=256, n_threads=2) as engine:
        x86 = _greedy(engine, 8)
    for (token, logprob, _), (x_token, x_logprob, x_top) in zip(arm["steps"], x86):
        if token != x_token:
            (_, best_logprob), (second, second_logprob) = x_top
            assert token == second and best_logprob - second_logprob < NEAR_TIE_NATS
            break
        assert abs(logprob - x_logprob) < 0.1


QUANTIZE_SCRIPT = """
import hashlib, sys
from pathlib import Path
from edgegemma import models
from edgegemma.models.cache import variant_options
from edgegemma.quantize import quantize
entry = models.read_lock()[sys.argv[2]]
quantize(Path(sys.argv[1]), Path(sys.argv[3]), variant_options(entry))
print(hashlib.sha256(Path(sys.argv[3]).read_bytes()).hexdigest())
"""


def test_the_quantizer_on_arm64_makes_the_file_models_lock_pins_for_aarch64(
    arm64, gguf_path, tmp_path
):
    """llama.cpp's quantizer makes other bytes on aarch64 than on x86-64 for this variant
    (fused multiply-adds): the lock's sha256_aarch64 is what it makes, so a Pi's first
    edgegemma.load() builds a file that checks out."""
    entry = models.read_lock()["gemma3-270m-q4_0"]
    out = tmp_path / "q4_0.gguf"
    done = subprocess.run(
        [str(arm64), "-c", QUANTIZE_SCRIPT, str(gguf_path), entry.name, str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == entry.sha256_aarch64 != entry.sha256
    assert out.stat().st_size == entry.size_aarch64
