"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``), with numpy only.

:func:`read_peft` reads a PEFT adapter folder into plain arrays keyed by Hugging Face module
name; each runtime's format converts from it (``from_peft`` in each format module). No
torch is needed, so adapters can be converted on the device. The safetensors container is
read and written here directly: it is a JSON header plus raw little-endian arrays, and
bfloat16, common in trained adapters, has no numpy dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
_MAX_HEADER = 100 << 20
_MAX_DIMS = 8
_MAX_RANK = 4096
_MAX_ALPHA = 1e6
"""Beyond this an alpha scales B past what float32 holds once multiplied out: a broken
config, never a trained one (ranks are up to a few hundred, alphas up to a few thousand)."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class LoraWeight:
    """One adapted linear layer: ``y += scale * B @ A @ x``."""

    a: np.ndarray
    """float32, shape (rank, n_in): PEFT's ``lora_A.weight``."""
    b: np.ndarray
    """float32, shape (n_out, rank): PEFT's ``lora_B.weight``."""
    scale: float
    """alpha / rank, or alpha / sqrt(rank) with rsLoRA."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class PeftAdapter:
    path: Path
    rank: int
    """The config's default rank ``r`` (a module may differ through ``rank_pattern``)."""
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    """Short module names the adapter touches, e.g. ``("q_proj", "v_proj")``."""
    weights: dict[str, LoraWeight]
    """By Hugging Face module name, e.g. ``model.layers.0.self_attn.q_proj``."""


def read_peft(path: str | os.PathLike[str]) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder; :class:`AdapterError` says what is unsupported or broken."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a PEFT adapter folder")
    config = _read_config(folder)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    rank = config["r"]
    alpha = float(config.get("lora_alpha", rank))
    use_rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_pattern = config.get("rank_pattern") or {}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise AdapterError(
                f"{folder.name}: unsupported tensor {key!r} (only LoRA A/B matrices of linear "
                "layers can be converted)"
            )
        pairs.setdefault(match[1], {})[match[2]] = array
    if not pairs:
        raise AdapterError(f"{folder.name}: {WEIGHTS_FILE} holds no LoRA matrices")
    weights = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{folder.name}: {module} needs both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{folder.name}: {module} has lora_A {a.shape} and lora_B {b.shape}, "
                "which do not share a rank"
            )
        expected_rank = _pattern_value(rank_pattern, module, rank)
        if a.shape[0] != expected_rank:
            raise AdapterError(
                f"{folder.name}: {module} has rank {a.shape[0]} but the config says {expected_rank}"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"{folder.name}: {module} contains NaN or infinite values")
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        divisor = math.sqrt(a.shape[0]) if use_rslora else a.shape[0]
        weights[module] = LoraWeight(a=a, b=b, scale=module_alpha / divisor)
    return PeftAdapter(
        path=folder,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights})),
        weights=weights,
    )


def write_peft(
    path: str | os.PathLike[str],
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    alpha: float,
    use_rslora: bool = False,
) -> Path:
    """Write ``{module name: (A (rank, n_in), B (n_out, rank))}`` as a PEFT LoRA folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {a.shape[0] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise AdapterError(f"write_peft takes one rank for all modules, got {sorted(ranks)}")
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(a, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(b, dtype=np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in weights}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    return folder


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Float tensors of a safetensors file as float32 arrays."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{path.parent.name}: {path.name} not found") from None
    if len(data) < 8:
        raise AdapterError(f"{path} is not a safetensors file (only {len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(_MAX_HEADER, len(data) - 8):
        raise AdapterError(f"{path} is not a safetensors file or is truncated")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except ValueError:
        raise AdapterError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path} has a corrupt safetensors header")
    body = memoryview(data)[8 + header_size :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{path}: malformed entry for tensor {name!r}") from None
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_DIMS
            and all(_is_count(d) for d in shape)
            and _is_count(start)
            and _is_count(end)
        ):
            raise AdapterError(
                f"{path}: tensor {name!r} has a malformed shape {shape!r} or offsets "
                f"{[start, end]!r} (counts must be non-negative integers)"
            )
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise AdapterError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        count = math.prod(shape)
        if not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
            raise AdapterError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        if dtype_name == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32)
    return tensors


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write float32 arrays as a safetensors file."""
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for blob in blobs:
            f.write(blob)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{folder.name}: {CONFIG_FILE} not found (not a PEFT adapter?)"
        ) from None
    except ValueError as exc:
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{folder.name} is a {config.get('peft_type')} adapter; only LoRA is supported"
        )
    refused = {
        "use_dora": "DoRA",
        "modules_to_save": "modules_to_save (fully trained layers)",
        "lora_bias": "LoRA bias vectors",
        "layer_replication": "layer_replication",
        "target_parameters": "target_parameters",
        "use_qalora": "QA-LoRA",
        "trainable_token_indices": "trainable_token_indices",
    }
    for key, feature in refused.items():
        if config.get(key):
            raise AdapterError(f"{folder.name} uses {feature}, which edgegemma cannot convert")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{folder.name} trains biases (bias={config['bias']!r}), which edgegemma cannot convert"
        )
    rank = config.get("r")
    if not (isinstance(rank, int) and _is_count(rank) and 1 <= rank <= _MAX_RANK):
        raise AdapterError(
            f"{folder.name}: {CONFIG_FILE} has no valid rank r ({rank!r}; 1 to {_MAX_RANK})"
        )
    alpha = config.get("lora_alpha", rank)
    if not _is_alpha(alpha):
        raise AdapterError(
            f"{folder.name}: lora_alpha must be a finite number of magnitude at most "
            f"{_MAX_ALPHA:g}, got {alpha!r}"
        )
    _check_patterns(folder, config, "rank_pattern", rank=True)
    _check_patterns(folder, config, "alpha_pattern", rank=False)
    return config


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_patterns(folder: Path, config: dict, key: str, *, rank: bool) -> None:
    """PEFT's ``rank_pattern``/``alpha_pattern``: regular expressions to a rank or an alpha."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"{folder.name}: {key} must map module patterns to values")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError):
            raise AdapterError(f"{folder.name}: {key} has an invalid pattern {pattern!r}") from None
        if rank and not (isinstance(value, int) and _is_count(value) and 1 <= value <= _MAX_RANK):
            raise AdapterError(
                f"{folder.name}: {key}[{pattern!r}] must be a rank from 1 to {_MAX_RANK}, got {value!r}"
            )
        if not rank and not _is_alpha(value):
            raise AdapterError(
                f"{folder.name}: {key}[{pattern!r}] must be a number of magnitude at most "
                f"{_MAX_ALPHA:g}, got {value!r}"
            )


def _is_alpha(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= _MAX_ALPHA
    )


def _pattern_value(patterns: Mapping[str, _T], module: str, default: _T) -> _T:
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
