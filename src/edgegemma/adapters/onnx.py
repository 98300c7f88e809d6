"""LoRA adapters for ONNX Runtime GenAI: the ``.onnx_adapter`` format, in one place.

A model built with LoRA inputs (``edgegemma convert MODEL --to onnx``) takes, for each adapted
Hugging Face module, two graph inputs: A of shape (n_in, rank) and B of shape (rank, n_out),
so that the projection adds ``x @ A @ B``. The build records which inputs adapt which module
in :data:`LORA_FILE`. An adapter file holds float32 values for some of those inputs
(ONNX Runtime's ``AdapterFormat``); PEFT's scale is folded into B, so there is no alpha.

onnxruntime is imported only where a file is read or written: the format's table entry is
available without the runtime installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..builds import find_build
from ..errors import AdapterError, BackendUnavailableError, ModelError
from ..files import writing_atomically
from .base import AdapterFormat, AdapterSummary
from .peft import PeftAdapter

LORA_FILE = "edgegemma-lora.json"
"""Written into a LoRA-enabled build: which graph inputs adapt which Hugging Face module."""
_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraInput:
    """The graph inputs that adapt one Hugging Face module: A (n_in, rank), B (rank, n_out)."""

    a: str
    b: str
    n_in: int
    n_out: int


def lora_inputs(model_dir: Path) -> dict[str, LoraInput]:
    """The LoRA inputs of a built model by HF module name (empty: built without LoRA)."""
    path = Path(model_dir) / LORA_FILE
    if not path.is_file():
        return {}
    try:
        modules = json.loads(path.read_text())["modules"]
        return {
            name: LoraInput(m["a"], m["b"], int(m["n_in"]), int(m["n_out"]))
            for name, m in modules.items()
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is malformed: {exc}") from None


def write_lora_inputs(model_dir: Path, inputs: Mapping[str, LoraInput]) -> None:
    """Record a build's LoRA inputs (the converter calls this)."""
    record = {
        module: {"a": spec.a, "b": spec.b, "n_in": spec.n_in, "n_out": spec.n_out}
        for module, spec in inputs.items()
    }
    (model_dir / LORA_FILE).write_text(
        json.dumps({"modules": record}, indent=1, sort_keys=True) + "\n"
    )


def read_adapter(path: Path, inputs: Mapping[str, LoraInput]) -> dict[str, np.ndarray]:
    """An adapter file's matrices, checked against a model's LoRA inputs."""
    ort = _onnxruntime()
    try:
        # The parameters point into the reader's memory: copy them while it is alive.
        reader = ort.AdapterFormat.read_adapter(str(path))
        parameters = {
            name: np.array(value.numpy()) for name, value in reader.get_parameters().items()
        }
        del reader
    except RuntimeError as exc:
        raise AdapterError(f"{path.name} is not a readable .onnx_adapter file: {exc}") from None
    if not parameters:
        raise AdapterError(f"{path.name} holds no parameters")
    names = {name for spec in inputs.values() for name in (spec.a, spec.b)}
    unknown = sorted(set(parameters) - names)
    if unknown:
        targets = sorted({m.rsplit(".", 1)[-1] for m in inputs})
        raise AdapterError(
            f"{path.name} has parameters {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
            f"that the model has no LoRA inputs for (it takes adapters on: {', '.join(targets)})"
        )
    for module, spec in inputs.items():
        a, b = parameters.get(spec.a), parameters.get(spec.b)
        if a is None or b is None:
            if (a is None) != (b is None):
                raise AdapterError(f"{path.name}: {module} needs both its A and B matrices")
            continue
        if a.dtype != np.float32 or b.dtype != np.float32:
            raise AdapterError(
                f"{path.name}: {module} is {a.dtype}/{b.dtype}; the model takes float32"
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"{path.name}: {module} has A {a.shape} and B {b.shape}, which share no rank"
            )
        if a.shape[0] != spec.n_in or b.shape[1] != spec.n_out:
            raise AdapterError(
                f"{path.name}: {module} maps {a.shape[0]} -> {b.shape[1]} but the model's layer "
                f"maps {spec.n_in} -> {spec.n_out} (an adapter for another model?)"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"{path.name}: {module} contains NaN or infinite values")
    return parameters


def write_adapter(path: Path, parameters: Mapping[str, np.ndarray]) -> Path:
    """Write named float32 matrices as an ``.onnx_adapter`` file (atomically)."""
    ort = _onnxruntime()
    # OrtValues borrow the arrays' memory on CPU: keep the arrays alive until the export.
    arrays = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in parameters.items()}
    adapter = ort.AdapterFormat()
    adapter.set_parameters(
        {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    )
    with writing_atomically(path) as partial:
        adapter.export_adapter(str(partial))
    return path


def from_peft(peft: PeftAdapter, out: Path, base_model: Path, dtype: str = "f32") -> Path:
    """Write ``peft`` for an ONNX build: the folder ``base_model``, or the cached build of that GGUF.

    The build must have LoRA inputs on every module the adapter touches. The matrices are
    transposed to the graph's layout and B is multiplied by the scale.
    """
    inputs = lora_inputs(_model_folder(base_model, peft))
    if not inputs:
        raise AdapterError(f"{base_model} was built without LoRA inputs; it cannot take adapters")
    unknown = sorted(set(peft.weights) - set(inputs))
    if unknown:
        known = sorted({m.rsplit(".", 1)[-1] for m in inputs})
        raise AdapterError(
            f"{peft.path.name} adapts {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}, "
            f"which the model has no LoRA inputs for (it was built for: {', '.join(known)})"
        )
    parameters = {}
    for module, weight in peft.weights.items():
        spec = inputs[module]
        if weight.a.shape[1] != spec.n_in or weight.b.shape[0] != spec.n_out:
            raise AdapterError(
                f"{peft.path.name}: {module} maps {weight.a.shape[1]} -> {weight.b.shape[0]} but the "
                f"model's layer maps {spec.n_in} -> {spec.n_out} (an adapter for another model?)"
            )
        parameters[spec.a] = weight.a.T
        parameters[spec.b] = weight.b.T * np.float32(weight.scale)
    return write_adapter(out, parameters)


def _model_folder(base_model: Path, peft: PeftAdapter) -> Path:
    """The ONNX build an adapter is converted for: given, or the cached build of the GGUF.

    ONNX adapters name the graph inputs of a model built with LoRA inputs, so the build must
    exist (``edgegemma convert MODEL --to onnx``) and adapt every module the adapter does.
    """
    if base_model.is_dir():
        return base_model
    used = {m.rsplit(".", 1)[-1].removesuffix("_proj") for m in peft.weights}
    for targets in (",".join(t for t in _ORDER if t in used), "q,k,v,o", ",".join(_ORDER)):
        if set(targets.split(",")) >= used:
            found = find_build(base_model, "onnx", {"lora_targets": targets})
            if found is not None:
                return found
    raise AdapterError(
        f"no ONNX build of {base_model.name} with LoRA inputs on {', '.join(sorted(used))} "
        f"in the cache; build it first with `edgegemma convert {base_model} --to onnx`"
    )


def inspect(path: Path) -> AdapterSummary:
    ort = _onnxruntime()
    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
        shapes = {name: tuple(value.shape()) for name, value in reader.get_parameters().items()}
    except RuntimeError as exc:  # onnxruntime's own errors are RuntimeErrors
        raise AdapterError(f"{path.name} is not a readable .onnx_adapter file: {exc}") from None
    targets = sorted(n.removesuffix(".lora_A.MatMul.weight") for n in shapes if ".lora_A." in n)
    rank = max((shape[1] for n, shape in shapes.items() if ".lora_A." in n), default=0)
    return AdapterSummary(path, "onnx", "", rank, None, 1.0, tuple(targets), path.stat().st_size)


def _onnxruntime() -> Any:  # onnxruntime ships no type hints
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            f"ONNX adapters need onnxruntime ({exc}); install it with: pip install 'edgegemma[onnx]'"
        ) from exc
    return onnxruntime


FORMAT = AdapterFormat(
    name="onnx",
    backend="onnx",
    suffix=".onnx_adapter",
    dtypes=("f32",),
    title="ONNX Runtime adapter",
    from_peft=from_peft,
    inspect=inspect,
)
