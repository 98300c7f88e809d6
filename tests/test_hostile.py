"""Hostile input, table-driven, on every backend: a specific edgegemma error or a defined
result, the process alive, and the engine still giving its reference answer afterwards.

Every backend runs every table here and in test_concurrency.py. A new backend is added in one
place, :data:`KITS`: how to get its model from the GGUF, how to write a random adapter in its
format, how to rewrite an adapter file's tensors, and which broken model files it must refuse.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT
from loras import random_lora

import edgegemma
from edgegemma import (
    AdapterError,
    ContextOverflowError,
    InvalidParameterError,
    ModelError,
    NumericalError,
)
from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.adapters.litert import gguf_lora_spec, read_lora, write_lora, zero_lora
from edgegemma.adapters.peft import read_peft, write_peft
from edgegemma.gguffile import read_header, tensor_array
from edgegemma.sampling import SEED_MAX
from edgegemma.tflitefile import inspect_model

Tensors = dict[str, np.ndarray]

# -- what each backend brings to the shared suites -------------------------------------------------


def _built(gguf_path: Path, *convert_args: str) -> Path:
    """A converted model from the build cache (built on first use, like a user would)."""
    done = subprocess.run(
        [sys.executable, "-m", "edgegemma", "convert", str(gguf_path), *convert_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.splitlines()[0])


def _random_peft(folder: Path, seed: int) -> Path:
    """A rank-8 PEFT adapter on every attention projection of Gemma 3 270M."""
    shapes = {
        "q_proj": (640, 1024),
        "k_proj": (640, 256),
        "v_proj": (640, 256),
        "o_proj": (1024, 640),
    }
    rng = np.random.default_rng(seed)
    weights = {
        f"model.layers.{layer}.self_attn.{target}": (
            rng.normal(0, 0.04, (8, n_in)).astype(np.float32),
            rng.normal(0, 0.04, (n_out, 8)).astype(np.float32),
        )
        for layer in range(18)
        for target, (n_in, n_out) in shapes.items()
    }
    return write_peft(folder, weights, alpha=16)


def _gguf_adapter(model: Path, out: Path, seed: int) -> Path:
    targets = ("attn_q", "attn_k", "attn_v", "attn_output")
    return random_lora(
        out.with_suffix(".gguf"), read_header(model), seed=seed, std=0.04, targets=targets
    )


def _onnx_adapter(model: Path, out: Path, seed: int) -> Path:
    from edgegemma.adapters.onnx import from_peft as to_onnx_adapter

    peft = read_peft(_random_peft(out.with_name(out.name + "-peft"), seed))
    return to_onnx_adapter(peft, out.with_suffix(".onnx_adapter"), model)


def _litert_adapter(model: Path, out: Path, seed: int) -> Path:
    from edgegemma.adapters.litert import convert_peft

    peft = read_peft(_random_peft(out.with_name(out.name + "-peft"), seed))
    return convert_peft(peft, out.with_suffix(".lora"), model)


def _rewrite_gguf(src: Path, out: Path, change: Callable[[Tensors], Tensors]) -> Path:
    header = read_header(src)
    tensors = change(
        {name: tensor_array(header, name).astype(np.float32) for name in header.tensors}
    )
    weights = {
        name.removesuffix(".lora_a"): (a, tensors[name.removesuffix("_a") + "_b"])
        for name, a in tensors.items()
        if name.endswith(".lora_a")
    }
    alpha = header.metadata["adapter.lora.alpha"]
    return write_lora_gguf(out, architecture=header.architecture, alpha=alpha, weights=weights)


def _rewrite_onnx(src: Path, out: Path, change: Callable[[Tensors], Tensors]) -> Path:
    import onnxruntime as ort

    from edgegemma.adapters.onnx import write_adapter as write_onnx_adapter

    reader = ort.AdapterFormat.read_adapter(str(src))
    tensors = {name: np.array(value.numpy()) for name, value in reader.get_parameters().items()}
    write_onnx_adapter(out, change(tensors))
    return out


def _rewrite_litert(src: Path, out: Path, change: Callable[[Tensors], Tensors]) -> Path:
    rank, tensors = read_lora(src)
    return write_lora(out, change(tensors), rank=rank)


def _truncated(at: float, member: str = "") -> Callable[[Path, Path], Path]:
    """The model (or one file of a model folder) cut at byte ``at`` (a fraction: of its size)."""

    def make(model: Path, tmp: Path) -> Path:
        copy = _folder_copy(model, tmp) if member else tmp / f"cut{model.suffix}"
        source, target = (model / member, copy / member) if member else (model, copy)
        size = source.stat().st_size
        end = int(size * at) if isinstance(at, float) else (size + at if at < 0 else at)
        target.unlink(missing_ok=True)
        with open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(_Head(src, end), dst, 1 << 24)
        return copy

    return make


class _Head:
    """The first ``n`` bytes of a file, as a readable object."""

    def __init__(self, f, n: int):
        self._f, self._left = f, n

    def read(self, size: int) -> bytes:
        data = self._f.read(min(size, self._left))
        self._left -= len(data)
        return data


def _folder_copy(model: Path, tmp: Path) -> Path:
    """A model folder of symlinks to the real files: cheap to break one piece of."""
    copy = tmp / model.name
    copy.mkdir()
    for item in model.iterdir():
        (copy / item.name).symlink_to(item)
    return copy


def _without(member: str) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        copy = _folder_copy(model, tmp)
        (copy / member).unlink()
        return copy

    return make


def _config_edit(edit: Callable[[dict], object]) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        copy = _folder_copy(model, tmp)
        config = json.loads((model / "genai_config.json").read_text())
        edit(config["model"])
        (copy / "genai_config.json").unlink()
        (copy / "genai_config.json").write_text(json.dumps(config))
        return copy

    return make


def _file(suffix: str, data: bytes) -> Callable[[Path, Path], Path]:
    def make(model: Path, tmp: Path) -> Path:
        (tmp / f"bad{suffix}").write_bytes(data)
        return tmp / f"bad{suffix}"

    return make


def _bare_tflite(model: Path, tmp: Path) -> Path:
    with zipfile.ZipFile(model.with_suffix(".task")) as task:
        (tmp / "bare.tflite").write_bytes(task.read("TF_LITE_PREFILL_DECODE"))
    return tmp / "bare.tflite"


def _lora_as_model(model: Path, tmp: Path) -> Path:
    return write_lora(tmp / "adapter.litertlm", zero_lora(inspect_model(model).lora), rank=16)


@dataclass(frozen=True)
class Kit:
    """What the shared suites need from one backend."""

    convert_args: tuple[str, ...] | None
    """``edgegemma convert GGUF`` arguments that build its model; None: it runs the GGUF."""
    adapter: Callable[[Path, Path, int], Path]
    """(model, output path without suffix, seed) -> a random LoRA adapter file for the model."""
    rewrite_adapter: Callable[[Path, Path, Callable[[Tensors], Tensors]], Path]
    """(adapter, output, change) -> the adapter's tensors, changed, in the same format."""
    broken_models: dict[str, tuple[Callable[[Path, Path], Path], str]]
    """Case -> ((model, tmp dir) -> broken copy, regex the ModelError must match)."""


_TRUNCATIONS = {"at 24 bytes": 24, "at 4 KiB": 4096, "at half": 0.5, "one byte short": -1}
_GARBAGE = os.urandom(8192)

KITS: dict[str, Kit] = {
    "llamacpp": Kit(
        convert_args=None,
        adapter=_gguf_adapter,
        rewrite_adapter=_rewrite_gguf,
        broken_models={
            **{
                f"truncated {k}": (_truncated(v), "truncated|corrupt|not a valid GGUF")
                for k, v in _TRUNCATIONS.items()
            },
            "empty file": (_file(".gguf", b""), "only 0 bytes"),
            "a LiteRT-LM bundle": (_file(".gguf", b"LITERTLM" + _GARBAGE), "bad magic"),
        },
    ),
    "onnx": Kit(
        convert_args=("--to", "onnx"),
        adapter=_onnx_adapter,
        rewrite_adapter=_rewrite_onnx,
        broken_models={
            **{
                f"weights truncated {k}": (_truncated(v, "model.onnx.data"), "could not load")
                for k, v in _TRUNCATIONS.items()
            },
            "graph truncated at half": (_truncated(0.5, "model.onnx"), "Protobuf parsing failed"),
            "tokenizer truncated at half": (_truncated(0.5, "tokenizer.json"), "tokenizer"),
            "config truncated at half": (
                _truncated(0.5, "genai_config.json"),
                "genai_config.json is unusable",
            ),
            "no genai_config.json": (_without("genai_config.json"), "no genai_config.json"),
            "no model.onnx": (_without("model.onnx"), "model.onnx failed"),
            "no model.onnx.data": (_without("model.onnx.data"), "could not load"),
            "no tokenizer.json": (_without("tokenizer.json"), "tokenizer"),
            "no tokenizer_config.json": (_without("tokenizer_config.json"), "tokenizer"),
            "unknown architecture": (
                _config_edit(lambda m: m.update(type="gemmaX")),
                "model_type .gemmaX. is not a Gemma family edgegemma knows",
            ),
            "config does not match the graph": (
                _config_edit(lambda m: m.update(vocab_size=1000)),
                "could not run",
            ),
        },
    ),
    "mediapipe": Kit(
        convert_args=("--to", "litert", "--lora-rank", "16"),
        adapter=_litert_adapter,
        rewrite_adapter=_rewrite_litert,
        broken_models={
            **{
                f"truncated {k}": (_truncated(v), "corrupt .litertlm header")
                for k, v in _TRUNCATIONS.items()
            },
            "task truncated at half": (
                lambda model, tmp: _truncated(0.5)(model.with_suffix(".task"), tmp),
                "truncated or corrupt .task",
            ),
            "empty file": (_file(".litertlm", b""), "too small"),
            "text": (_file(".litertlm", b"not a model\n" * 100), "neither a .litertlm nor"),
            "random zip": (_file(".task", b"PK\x03\x04" + _GARBAGE), "truncated or corrupt .task"),
            "bare TFLite graph": (_bare_tflite, "bare TFLite"),
            "a LoRA file": (_lora_as_model, "bare TFLite"),
        },
    ),
}
BACKENDS = list(KITS)


@functools.cache
def backend_model(backend: str, gguf_path: Path) -> Path:
    """The model file or folder ``backend`` loads, converted from the GGUF when it needs to be."""
    args = KITS[backend].convert_args
    return gguf_path if args is None else _built(gguf_path, *args)


@pytest.fixture(scope="module")
def engines(gguf_path: Path):
    """``engines(backend)`` -> (engine, greedy 8 tokens of PROMPT): one per backend and module."""
    opened: dict[str, tuple[edgegemma.Engine, list[int]]] = {}

    def get(backend: str) -> tuple[edgegemma.Engine, list[int]]:
        if backend not in opened:
            engine = edgegemma.load(
                backend_model(backend, gguf_path), backend=backend, n_ctx=512, n_threads=2
            )
            opened[backend] = engine, engine.generate(PROMPT, max_tokens=8).token_ids
        return opened[backend]

    yield get
    for engine, _ in opened.values():
        engine.close()


def _check_still_answers(engine: edgegemma.Engine, reference: list[int]) -> None:
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


# -- hostile calls ---------------------------------------------------------------------------------

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
    # Types at the boundary: a specific error, never a raw TypeError.
    ("prompt None", {"prompt": None}, InvalidParameterError),
    ("prompt an int", {"prompt": 818}, InvalidParameterError),
    ("prompt a float", {"prompt": 3.5}, InvalidParameterError),
    ("prompt a dict", {"prompt": {"text": "hi"}}, InvalidParameterError),
    ("ids with a float", {"prompt": [2, 1.5]}, InvalidParameterError),
    ("ids with a string", {"prompt": [2, "a"]}, InvalidParameterError),
    ("ids with a bool", {"prompt": [2, True]}, InvalidParameterError),
    ("ids as a 2-D array", {"prompt": np.array([[2, 818]])}, InvalidParameterError),
    ("ids as a float array", {"prompt": np.array([2.0, 818.0])}, InvalidParameterError),
    ("empty id list", {"prompt": []}, InvalidParameterError),
    ("stop not a list", {"stop": 5}, InvalidParameterError),
    ("adapters not a mapping", {"adapters": ["a"]}, InvalidParameterError),
    # Numbers checked in the types the runtimes take (C floats and ints).
    ("seed 2**32-1 (llama.cpp's random-seed sentinel)", {"seed": 2**32 - 1}, InvalidParameterError),
    ("seed 2**31", {"seed": 2**31}, InvalidParameterError),
    ("temperature beyond float32", {"temperature": 1e39}, InvalidParameterError),
    ("repeat_penalty beyond float32", {"repeat_penalty": 1e39}, InvalidParameterError),
    ("top_k beyond int32", {"top_k": 2**40}, InvalidParameterError),
    ("keep not a prefix", {"keep": "Something else"}, InvalidParameterError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "kwargs", "error"), HOSTILE_CALLS, ids=[c[0] for c in HOSTILE_CALLS]
)
def test_hostile_calls_raise_a_specific_error(engines, backend, case, kwargs, error):
    engine, reference = engines(backend)
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error):
        engine.generate(prompt, **kwargs)
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_control_characters_are_just_text(engines, backend):
    engine, reference = engines(backend)
    result = engine.generate("\x00\x01\x1b[31m\x7f\r\n\t reading: temp=81C", max_tokens=4)
    assert result.stats.completion_tokens == 4
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_string_that_never_matches_runs_to_max_tokens(engines, backend):
    engine, reference = engines(backend)
    result = engine.generate(PROMPT, max_tokens=8, stop=["\u2603 never \u2603"])
    assert result.finish_reason == "length" and result.token_ids == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_tokens_zero_is_an_empty_answer(engines, backend):
    engine, reference = engines(backend)
    result = engine.generate(PROMPT, max_tokens=0)
    assert (result.text, result.token_ids, result.finish_reason) == ("", [], "length")
    _check_still_answers(engine, reference)


# -- hostile model files ---------------------------------------------------------------------------

MODEL_CASES = [(backend, case) for backend, kit in KITS.items() for case in kit.broken_models]


@pytest.mark.parametrize(("backend", "case"), MODEL_CASES, ids=[f"{b}-{c}" for b, c in MODEL_CASES])
def test_broken_model_files_are_refused(engines, gguf_path, tmp_path, backend, case):
    make, message = KITS[backend].broken_models[case]
    broken = make(backend_model(backend, gguf_path), tmp_path)
    with (
        pytest.raises(ModelError, match=message) as refused,
        edgegemma.load(broken, backend=backend, n_ctx=512, n_threads=2) as engine,
    ):
        engine.generate(PROMPT, max_tokens=2)  # some faults show only when the model runs
    assert broken.name in str(refused.value)
    # The runtime's other models in this process are untouched.
    _check_still_answers(*engines(backend))


# -- hostile adapter files -------------------------------------------------------------------------


def _poisoned(value: float) -> Callable[[Tensors], Tensors]:
    def change(tensors: Tensors) -> Tensors:
        last = max(tensors)
        poisoned = tensors[last].copy()
        poisoned.flat[-1] = value
        return {**tensors, last: poisoned}

    return change


def _wider(tensors: Tensors) -> Tensors:
    """The same names, shaped for Gemma 3 1B (640-wide embeddings become 1152)."""
    return {
        name: np.pad(t, [(0, 1152 - n if n == 640 else 0) for n in t.shape])
        for name, t in tensors.items()
    }


def _other_format(backend: str, gguf_path: Path, tmp: Path) -> Path:
    """An adapter in another backend's format (GGUF LoRA, or a LiteRT-LM LoRA for llama.cpp)."""
    if backend == "llamacpp":
        return write_lora(tmp / "other.lora", zero_lora(gguf_lora_spec(gguf_path, 16)), rank=16)
    return random_lora(tmp / "other.gguf", read_header(gguf_path), seed=9)


ADAPTER_CASES: dict[str, tuple[Callable[[str, Path, Path, Path], Path], str | None]] = {
    "NaN weight": (
        lambda backend, good, gguf, tmp: KITS[backend].rewrite_adapter(
            good, tmp / f"nan{good.suffix}", _poisoned(np.nan)
        ),
        "NaN or infinite",
    ),
    "infinite weight": (
        lambda backend, good, gguf, tmp: KITS[backend].rewrite_adapter(
            good, tmp / f"inf{good.suffix}", _poisoned(np.inf)
        ),
        "NaN or infinite",
    ),
    "right names, wrong shapes": (
        lambda backend, good, gguf, tmp: KITS[backend].rewrite_adapter(
            good, tmp / f"wide{good.suffix}", _wider
        ),
        "1152",
    ),
    "truncated at half": (
        lambda backend, good, gguf, tmp: _write(
            tmp / f"half{good.suffix}", good.read_bytes()[: good.stat().st_size // 2]
        ),
        None,
    ),
    "one byte short": (
        lambda backend, good, gguf, tmp: _write(
            tmp / f"short{good.suffix}", good.read_bytes()[:-1]
        ),
        None,
    ),
    "empty file": (lambda backend, good, gguf, tmp: _write(tmp / f"empty{good.suffix}", b""), None),
    "random bytes": (
        lambda backend, good, gguf, tmp: _write(tmp / f"junk{good.suffix}", _GARBAGE),
        None,
    ),
    "another runtime's format": (
        lambda backend, good, gguf, tmp: _other_format(backend, gguf, tmp),
        None,
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def good_adapters(gguf_path, tmp_path_factory):
    """``good_adapters(backend)`` -> a random adapter that loads, made once per backend."""
    root = tmp_path_factory.mktemp("adapters")

    @functools.cache
    def get(backend: str) -> Path:
        return KITS[backend].adapter(backend_model(backend, gguf_path), root / backend, 1)

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_broken_adapters_are_refused(engines, good_adapters, gguf_path, tmp_path, backend, case):
    engine, reference = engines(backend)
    make, message = ADAPTER_CASES[case]
    bad = make(backend, good_adapters(backend), gguf_path, tmp_path)
    with pytest.raises(AdapterError, match=message) as refused:
        engine.load_adapter("bad", bad)
    assert bad.name in str(refused.value)
    assert "bad" not in engine.adapters
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_good_adapter_loads_and_changes_the_answer(engines, good_adapters, backend):
    engine, reference = engines(backend)
    engine.load_adapter("good", good_adapters(backend))
    try:
        assert engine.generate(PROMPT, max_tokens=8, adapters={"good": 1.0}).token_ids != reference
    finally:
        engine.unload_adapter("good")
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_ids_are_token_ids(engines, backend):
    engine, reference = engines(backend)
    ids = engine.tokenize(PROMPT)
    as_array = engine.generate(np.array(ids, dtype=np.int64), max_tokens=8)
    as_numpy_ints = engine.generate([np.int32(t) for t in ids], max_tokens=8)
    assert as_array.token_ids == as_numpy_ints.token_ids == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_accepted_seed_reproduces(engines, backend):
    engine, reference = engines(backend)
    for seed in (0, 12345, SEED_MAX):
        runs = [
            engine.generate(PROMPT, max_tokens=8, temperature=1.0, seed=seed).token_ids
            for _ in range(3)
        ]
        assert runs[0] == runs[1] == runs[2], seed
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_adapter_scale_that_makes_logits_non_finite_is_an_error(engines, good_adapters, backend):
    engine, reference = engines(backend)
    engine.load_adapter("loud", good_adapters(backend))
    try:
        with pytest.raises(InvalidParameterError, match="32-bit float"):
            engine.generate(PROMPT, max_tokens=4, adapters={"loud": 1e39})
        with pytest.raises(NumericalError, match="non-finite|padding token"):
            engine.generate(PROMPT, max_tokens=4, adapters={"loud": 1e30})
    finally:
        engine.unload_adapter("loud")
    _check_still_answers(engine, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_checks_threads_and_context(gguf_path, backend):
    model = backend_model(backend, gguf_path)
    with pytest.raises(InvalidParameterError, match="cores this process may use"):
        edgegemma.load(model, backend=backend, n_threads=1000)
    with pytest.raises(InvalidParameterError, match="cores this process may use"):
        edgegemma.load(model, backend=backend, n_threads=2**31)
    with pytest.raises(InvalidParameterError, match="n_ctx must be"):
        edgegemma.load(model, backend=backend, n_ctx=2**40)
    with edgegemma.load(model, backend=backend, n_ctx=500, n_threads=1) as engine:
        assert engine.n_ctx == 512  # rounded up to a multiple of 256 on every backend
