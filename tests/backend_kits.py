"""The backend matrix of the shared suites: what each backend brings to them.

A new backend is added in one place, :data:`KITS`: how to get its model from the GGUF, how to
write a random adapter in its format, how to rewrite an adapter file's tensors, and which
broken model files it must refuse. conftest's ``engines`` fixture opens one engine of each.
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
from loras import ATTENTION, random_lora, random_peft

from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.adapters.litert import read_lora, write_lora, zero_lora
from edgegemma.adapters.peft import read_peft
from edgegemma.gguffile import read_header, tensor_array
from edgegemma.tflitefile import inspect_model

Tensors = dict[str, np.ndarray]


def _built(gguf_path: Path, *convert_args: str) -> Path:
    """A converted model from the build cache (built on first use, like a user would)."""
    done = subprocess.run(
        [sys.executable, "-m", "edgegemma", "convert", str(gguf_path), *convert_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.splitlines()[0])


def _gguf_adapter(model: Path, out: Path, seed: int) -> Path:
    targets = ("attn_q", "attn_k", "attn_v", "attn_output")
    return random_lora(
        out.with_suffix(".gguf"), read_header(model), seed=seed, std=0.04, targets=targets
    )


def _onnx_adapter(model: Path, out: Path, seed: int) -> Path:
    from edgegemma.adapters.onnx import from_peft as to_onnx_adapter

    peft = read_peft(
        random_peft(out.with_name(out.name + "-peft"), seed=seed, modules=ATTENTION, std=0.04)
    )
    return to_onnx_adapter(peft, out.with_suffix(".onnx_adapter"), model)


def _litert_adapter(model: Path, out: Path, seed: int) -> Path:
    from edgegemma.adapters.litert import convert_peft

    peft = read_peft(
        random_peft(out.with_name(out.name + "-peft"), seed=seed, modules=ATTENTION, std=0.04)
    )
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
GARBAGE = os.urandom(8192)

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
            "a LiteRT-LM bundle": (_file(".gguf", b"LITERTLM" + GARBAGE), "bad magic"),
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
            "random zip": (_file(".task", b"PK\x03\x04" + GARBAGE), "truncated or corrupt .task"),
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
