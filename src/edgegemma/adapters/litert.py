"""LoRA adapters for LiteRT-LM, the runtime behind MediaPipe's LLM Inference, with numpy only.

A LoRA-enabled LiteRT-LM model (``edgegemma convert ... --lora-rank 16|32``) takes the LoRA
matrices of every attention projection as inputs of its prefill and decode signatures:
``lora_atten_{q,k,v,o}_{a,b}_prime_weight_<layer>``, with ``a_prime`` of shape (n_in, rank)
and ``b_prime`` of shape (rank, n_out), so that the projection adds ``x @ a_prime @ b_prime``.
A LoRA file is a TFLite flatbuffer holding those tensors, a ``lora_rank`` metadata entry, and
the tensor bytes outside the flatbuffer at 4096-aligned offsets (the runtime maps them; inline
buffers fail with "LoRA tensor size mismatch").

The runtime takes only ranks 16 and 32 and only attention projections. A PEFT adapter of lower
rank is zero-padded to the model's rank, which changes nothing in the product; PEFT's scale
(alpha / r) is folded into ``a_prime``.

The flatbuffers are read and written by :mod:`edgegemma.tflitefile`: no TensorFlow,
flatbuffers or torch package is needed.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import AdapterError
from ..files import writing_atomically
from ..tflitefile import (
    FLOAT32,
    LORA_RANKS,
    TFLITE_ID,
    LoraSpec,
    Obj,
    Scalar,
    Str,
    Table,
    Vec,
    Writer,
    inspect_model,
    mapped,
)
from .base import AdapterFormat, AdapterSummary
from .peft import PeftAdapter

_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_PEFT_MODULE = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)")
_ALIGN = 4096
_RANK_KEY = "lora_rank"


# -- LoRA files ----------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str]) -> tuple[int, dict[str, np.ndarray]]:
    """The rank and the tensors of a LiteRT-LM LoRA file; :class:`AdapterError` if it is not one."""
    lora_path = Path(path)
    with mapped(lora_path, AdapterError) as data:
        try:
            if data[4:8] != TFLITE_ID:
                raise ValueError("not a TFLite flatbuffer")
            model = Table.root(data, 0, len(data))
            rank = next(
                (m.scalar(1, "<I") for m in model.tables(6) if m.string(0) == _RANK_KEY), None
            )
            if rank is None:
                raise ValueError(f"no {_RANK_KEY} metadata")
            buffers = model.tables(4)
            tensors = {}
            for subgraph in model.tables(2):
                for tensor in subgraph.tables(0):
                    name, dims = tensor.string(3), tuple(tensor.ints(0))
                    if tensor.scalar(1, "<b") != FLOAT32:
                        raise ValueError(f"tensor {name} is not float32")
                    buffer = buffers[tensor.scalar(2, "<I")]
                    offset, size = buffer.scalar(1, "<Q"), buffer.scalar(2, "<Q")
                    count = int(np.prod(dims)) if dims else 1
                    if offset <= 1 or size != 4 * count or offset + size > len(data):
                        raise ValueError(f"tensor {name} has no external data of {4 * count} bytes")
                    tensors[name] = np.frombuffer(data, "<f4", count, offset).reshape(dims).copy()
        except (struct.error, IndexError, ValueError) as exc:
            raise AdapterError(f"{lora_path.name} is not a LiteRT-LM LoRA file ({exc})") from None
    return rank, tensors


def write_lora(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], *, rank: int
) -> Path:
    """Write a LiteRT-LM LoRA file; the write is atomic (:func:`edgegemma.files.writing_atomically`)."""
    out = Path(path)
    names = sorted(tensors)
    arrays = [np.ascontiguousarray(tensors[name], dtype="<f4") for name in names]

    def flatbuffer(offsets: Sequence[int]) -> bytes:
        writer = Writer()
        tensor_tables = [
            Obj(
                [
                    (0, Vec("i", a.shape)),
                    (1, Scalar("b", FLOAT32)),
                    (2, Scalar("I", i + 1)),
                    (3, Str(name)),
                ]
            )
            for i, (name, a) in enumerate(zip(names, arrays))
        ]
        buffer_tables = [Obj([])] + [
            Obj([(1, Scalar("Q", offset)), (2, Scalar("Q", a.nbytes))])
            for offset, a in zip(offsets, arrays)
        ]
        model = Obj(
            [
                (0, Scalar("I", 3)),
                (2, Vec(Obj, [Obj([(0, Vec(Obj, tensor_tables)), (4, Str("lora_params"))])])),
                (3, Str("lora_params")),
                (4, Vec(Obj, buffer_tables)),
                # The runtime reads the rank from the metadata's buffer field itself.
                (6, Vec(Obj, [Obj([(0, Str(_RANK_KEY)), (1, Scalar("I", rank))])])),
            ]
        )
        return writer.finish(model, TFLITE_ID)

    placeholder = flatbuffer([_ALIGN] * len(arrays))
    offsets, position = [], _aligned(len(placeholder))
    for a in arrays:
        offsets.append(position)
        position = _aligned(position + a.nbytes)
    head = flatbuffer(offsets)
    assert len(head) == len(placeholder)
    with writing_atomically(out) as partial, open(partial, "wb") as f:
        f.write(head)
        for offset, a in zip(offsets, arrays):
            f.write(b"\0" * (offset - f.tell()))
            f.write(a.tobytes())
    return out


def zero_lora(spec: LoraSpec) -> dict[str, np.ndarray]:
    """All-zero LoRA tensors for ``spec``: the model computes exactly its base output."""
    return {name: np.zeros(shape, np.float32) for name, shape in spec.shapes.items()}


def peft_to_lora(
    peft: PeftAdapter, *, rank: int | None = None
) -> tuple[int, dict[str, np.ndarray]]:
    """LiteRT-LM LoRA tensors for a PEFT adapter, zero-padded to ``rank`` (default: 16 or 32).

    Only the attention projections (q/k/v/o) of the decoder layers can be converted; anything
    else, or a rank above 32, raises :class:`AdapterError`.
    """
    others = sorted(module for module in peft.weights if not _PEFT_MODULE.fullmatch(module))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise AdapterError(
            f"{peft.path.name} adapts {shown}; LiteRT-LM applies LoRA to the attention projections "
            "q_proj, k_proj, v_proj and o_proj only. Retrain with "
            'target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] (or a subset).'
        )
    largest = max(w.rank for w in peft.weights.values())
    if rank is None:
        rank = next((r for r in LORA_RANKS if r >= largest), largest)
    if rank not in LORA_RANKS:
        raise AdapterError(f"LiteRT-LM runs LoRA ranks {LORA_RANKS} only, not {rank}")
    if largest > rank:
        raise AdapterError(
            f"{peft.path.name} has rank {largest}; LiteRT-LM runs LoRA ranks up to {max(LORA_RANKS)} "
            f"and this conversion targets rank {rank}. Retrain with r <= {rank}."
        )
    tensors = {}
    for module, weight in peft.weights.items():
        match = _PEFT_MODULE.fullmatch(module)
        assert match is not None
        layer, projection = match[1], _TARGETS[match[2]]
        a_prime = np.zeros((weight.a.shape[1], rank), np.float32)
        a_prime[:, : weight.rank] = weight.a.T * np.float32(weight.scale)
        b_prime = np.zeros((rank, weight.b.shape[0]), np.float32)
        b_prime[: weight.rank] = weight.b.T
        tensors[f"lora_atten_{projection}_a_prime_weight_{layer}"] = a_prime
        tensors[f"lora_atten_{projection}_b_prime_weight_{layer}"] = b_prime
    return rank, tensors


def convert_peft(
    peft: PeftAdapter,
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    rank: int | None = None,
) -> Path:
    """Write ``peft`` as a LiteRT-LM LoRA file for ``base`` and return its path.

    ``base`` is the LoRA-enabled ``.litertlm``/``.task`` the adapter will run on, or the GGUF
    it is converted from (the shapes follow from the GGUF's architecture; ``rank`` then picks
    16 or 32, default the smallest that holds the adapter).
    """
    base_path = Path(base)
    if base_path.suffix.lower() == ".gguf":
        lora_rank, tensors = peft_to_lora(peft, rank=rank)
        spec = gguf_lora_spec(base_path, lora_rank)
    else:
        found = inspect_model(base_path).lora
        if found is None:
            raise AdapterError(
                f"{base_path.name} was converted without LoRA inputs; convert the model with "
                "--lora-rank 16 (or 32) to use adapters"
            )
        spec = found
        lora_rank, tensors = peft_to_lora(peft, rank=spec.rank)
    check_lora(lora_rank, tensors, spec, name=peft.path.name)
    return write_lora(out, {**zero_lora(spec), **tensors}, rank=lora_rank)


def gguf_lora_spec(gguf: Path, rank: int) -> LoraSpec:
    """The LoRA inputs a model converted from ``gguf`` with ``--lora-rank rank`` takes."""
    from ..gguffile import read_header

    header = read_header(gguf)
    try:
        layers = int(header.arch_value("block_count"))
        n_embd = int(header.arch_value("embedding_length"))
        heads = int(header.arch_value("attention.head_count"))
        kv_heads = int(header.arch_value("attention.head_count_kv", heads))
        head_dim = int(header.arch_value("attention.key_length", n_embd // heads))
    except (TypeError, ValueError):
        raise AdapterError(f"{gguf.name} lacks the attention sizes a LoRA layout needs") from None
    q, kv = heads * head_dim, kv_heads * head_dim
    sizes = {"q": (n_embd, q), "k": (n_embd, kv), "v": (n_embd, kv), "o": (q, n_embd)}
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for projection, (n_in, n_out) in sizes.items():
            shapes[f"lora_atten_{projection}_a_prime_weight_{layer}"] = (n_in, rank)
            shapes[f"lora_atten_{projection}_b_prime_weight_{layer}"] = (rank, n_out)
    return LoraSpec(rank=rank, shapes=shapes)


def check_lora(rank: int, tensors: Mapping[str, np.ndarray], spec: LoraSpec, *, name: str) -> None:
    """Raise :class:`AdapterError` unless the LoRA tensors fit the model's LoRA inputs."""
    if rank != spec.rank:
        raise AdapterError(
            f"{name} has LoRA rank {rank} but the model takes rank {spec.rank}; convert the PEFT "
            f"adapter again for this model (edgegemma adapters convert PEFT_DIR --to litert --model BUNDLE)"
        )
    for tensor, values in tensors.items():
        wanted = spec.shapes.get(tensor)
        if wanted is None:
            raise AdapterError(
                f"{name}: the model has no LoRA input {tensor!r} (an adapter for another model?)"
            )
        if values.shape != wanted:
            raise AdapterError(
                f"{name}: {tensor} has shape {values.shape} but the model takes {wanted} "
                "(an adapter for another model size?)"
            )
        if not np.isfinite(values).all():
            raise AdapterError(f"{name}: {tensor} contains NaN or infinite values")


def combine(
    parts: Sequence[tuple[Mapping[str, np.ndarray], float]], spec: LoraSpec
) -> dict[str, np.ndarray]:
    """One set of LoRA tensors computing the scaled sum of several adapters.

    A LiteRT-LM session takes one LoRA; the sum of adapters is one LoRA whose rank components
    are theirs side by side, which fits when their used ranks add up to at most the model's.
    """
    used = [_used_rank(tensors) for tensors, _ in parts]
    if sum(used) > spec.rank:
        raise AdapterError(
            f"these adapters use ranks {used}, {sum(used)} in all, but the model takes one LoRA of "
            f"rank {spec.rank} at a time; use fewer adapters together, or a model converted with "
            "a larger --lora-rank"
        )
    combined = zero_lora(spec)
    start = 0
    for (tensors, scale), width in zip(parts, used):
        for name, values in tensors.items():
            target = combined[name]
            if "_a_prime_" in name:
                target[:, start : start + width] = values[:, :width] * np.float32(scale)
            else:
                target[start : start + width] = values[:width]
        start += width
    return combined


def _used_rank(tensors: Mapping[str, np.ndarray]) -> int:
    """1 + the last rank component that is non-zero in some tensor (zero padding is unused)."""
    used = 0
    for name, values in tensors.items():
        per_component = np.abs(values).max(axis=0 if "_a_prime_" in name else 1)
        nonzero = np.flatnonzero(per_component)
        if nonzero.size:
            used = max(used, int(nonzero[-1]) + 1)
    return used


def _aligned(position: int) -> int:
    return position + (-position % _ALIGN)


def inspect(path: Path) -> AdapterSummary:
    rank, tensors = read_lora(path)
    targets = sorted({re.sub(r"_[ab]_prime_weight_", "_prime_weight_", n) for n in tensors})
    return AdapterSummary(path, "litert", "", rank, None, 1.0, tuple(targets), path.stat().st_size)


FORMAT = AdapterFormat(
    name="litert",
    backend="mediapipe",
    suffix=".lora",
    dtypes=("f32",),
    title="LiteRT-LM LoRA (MediaPipe)",
    from_peft=lambda peft, out, base, _dtype: convert_peft(peft, out, base),
    inspect=inspect,
)
