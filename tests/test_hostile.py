"""Hostile input, table-driven, on every backend: a specific edgegemma error or a defined
result, the process alive, and the engine still giving its reference answer afterwards."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgegemma
from edgegemma import AdapterError, ContextOverflowError, InvalidParameterError

from conftest import PROMPT

BACKENDS = ["llamacpp", "onnx"]


def _built(gguf_path: Path, *convert_args: str) -> Path:
    """A converted model from the build cache (built on first use, like a user would)."""
    done = subprocess.run(
        [sys.executable, "-m", "edgegemma", "convert", str(gguf_path), *convert_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.splitlines()[0])


@pytest.fixture(scope="module", params=BACKENDS)
def hostile_engine(request, gguf_path: Path):
    backend = request.param
    if backend == "onnx":
        assert importlib.util.find_spec("onnxruntime_genai"), "CI installs edgegemma[onnx]"
        model = _built(gguf_path, "--to", "onnx")
    else:
        model = gguf_path
    with edgegemma.load(model, backend=backend, n_ctx=512, n_threads=2) as engine:
        reference = engine.generate(PROMPT, max_tokens=8).token_ids
        yield engine, reference


HOSTILE_CALLS = [
    ("enormous prompt", {"prompt": "word " * 40_000}, ContextOverflowError),
    ("lone surrogate (invalid UTF-8)", {"prompt": "temp=\udcff81C"}, InvalidParameterError),
    ("bytes prompt", {"prompt": b"temp=81C"}, InvalidParameterError),
    ("token id out of range", {"prompt": [2, 300_000]}, InvalidParameterError),
    ("negative token id", {"prompt": [2, -5]}, InvalidParameterError),
    ("max_tokens negative", {"max_tokens": -1}, InvalidParameterError),
    ("max_tokens huge", {"max_tokens": 10**9}, ContextOverflowError),
    ("max_tokens bool", {"max_tokens": True}, InvalidParameterError),
    ("temperature negative", {"temperature": -0.1}, InvalidParameterError),
    ("temperature infinite", {"temperature": float("inf")}, InvalidParameterError),
    ("top_p zero", {"top_p": 0.0}, InvalidParameterError),
    ("top_p above one", {"top_p": 1.01}, InvalidParameterError),
    ("top_p NaN", {"top_p": float("nan")}, InvalidParameterError),
    ("top_k negative", {"top_k": -5}, InvalidParameterError),
    ("seed too large", {"seed": 2**40}, InvalidParameterError),
    ("empty stop string", {"stop": [""]}, InvalidParameterError),
    ("unknown adapter", {"adapters": {"nope": 1.0}}, AdapterError),
    ("unknown overflow policy", {"on_overflow": "sideways"}, InvalidParameterError),
    ("timeout negative", {"timeout": -1}, InvalidParameterError),
]


@pytest.mark.parametrize(("case", "kwargs", "error"), HOSTILE_CALLS, ids=[c[0] for c in HOSTILE_CALLS])
def test_hostile_calls_raise_a_specific_error(hostile_engine, case, kwargs, error):
    engine, reference = hostile_engine
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error):
        engine.generate(prompt, **kwargs)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


def test_control_characters_are_just_text(hostile_engine):
    engine, reference = hostile_engine
    result = engine.generate("\x00\x01\x1b[31m\x7f\r\n\t reading: temp=81C", max_tokens=4)
    assert result.stats.completion_tokens == 4
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


def test_a_stop_string_that_never_matches_runs_to_max_tokens(hostile_engine):
    engine, reference = hostile_engine
    result = engine.generate(PROMPT, max_tokens=8, stop=["\u2603 never \u2603"])
    assert result.finish_reason == "length" and result.token_ids == reference


def test_max_tokens_zero_is_an_empty_answer(hostile_engine):
    engine, reference = hostile_engine
    result = engine.generate(PROMPT, max_tokens=0)
    assert (result.text, result.token_ids, result.finish_reason) == ("", [], "length")
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


def test_nan_and_inf_adapters_are_refused_on_llama_cpp(clean_engine, base_header, tmp_path):
    from loras import random_lora

    for bad in (np.nan, np.inf):
        path = random_lora(tmp_path / f"bad-{bad}.gguf", base_header, seed=7)
        data = bytearray(path.read_bytes())
        data[-4:] = np.float32(bad).tobytes()  # the last float of the last tensor
        path.write_bytes(bytes(data))
        with pytest.raises(AdapterError, match="NaN or infinite"):
            clean_engine.load_adapter("bad", path)
    assert clean_engine.generate(PROMPT, max_tokens=8).text.startswith(" the capital")
