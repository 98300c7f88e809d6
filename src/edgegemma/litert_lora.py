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

The flatbuffer code here reads and writes just the parts of the TFLite and ``.litertlm``
schemas that this needs, so that converting an adapter or checking a model needs no
TensorFlow, flatbuffers or torch package.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AdapterError, ModelError
from .peft import PeftAdapter

LORA_RANKS = (16, 32)
"""The LoRA ranks LiteRT-LM runs."""

_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_PEFT_MODULE = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)")
_INPUT_NAME = re.compile(r"lora_atten_([qkvo])_([ab])_prime_weight_(\d+)")
_ALIGN = 4096
_TFLITE_ID = b"TFL3"
_FLOAT32 = 0  # TensorType.FLOAT32
_RANK_KEY = "lora_rank"
_LITERTLM_MAGIC = b"LITERTLM"
_LITERTLM_TFLITE = 3  # AnySectionDataType.TFLiteModel
_TASK_MODEL = "TF_LITE_PREFILL_DECODE"


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA inputs a model takes."""

    rank: int
    shapes: dict[str, tuple[int, ...]]
    """Input name -> shape, e.g. ``lora_atten_q_a_prime_weight_0`` -> (640, 16)."""


@dataclass(frozen=True)
class TfliteFacts:
    """What the backend needs to know about a model's prefill/decode TFLite graph."""

    signatures: tuple[str, ...]
    vocab_size: int | None
    """Last dimension of the decode signature's logits output."""
    kv_cache_length: int | None
    """Positions of the KV cache (the most tokens a sequence can hold)."""
    lora: LoraSpec | None
    """The LoRA inputs of the decode signature, or None for a model without LoRA."""


# -- reading models ------------------------------------------------------------------------


def inspect_model(path: str | os.PathLike[str]) -> TfliteFacts:
    """Facts about the TFLite graph in a ``.litertlm`` or MediaPipe ``.task`` bundle.

    Raises :class:`ModelError` for anything that is not a readable bundle with an LLM graph.
    """
    model_path = Path(path)
    with _mapped(model_path, ModelError) as data:
        if data[:8] == _LITERTLM_MAGIC:
            start, end = _litertlm_tflite_section(data, model_path)
        elif data[4:8] == _TFLITE_ID:
            raise ModelError(
                f"{model_path.name} is a bare TFLite model; LiteRT-LM needs it bundled with its "
                "tokenizer and metadata as .litertlm or .task (edgegemma convert MODEL --to litertlm)"
            )
        elif zipfile.is_zipfile(model_path):  # a .task; MediaPipe's bundler pads its start
            start, end = _task_tflite_member(model_path)
        elif data.find(b"PK\x03\x04", 0, 64) != -1:  # a zip's first entry, but no readable directory
            raise ModelError(f"{model_path.name} is a truncated or corrupt .task bundle (no readable zip directory)")
        else:
            raise ModelError(f"{model_path.name} is neither a .litertlm nor a MediaPipe .task bundle")
        try:
            return _tflite_facts(_Table.root(data, start, end), model_path)
        except (struct.error, IndexError, ValueError) as exc:
            raise ModelError(f"{model_path.name}: its TFLite graph is corrupt ({exc})") from None


def _litertlm_tflite_section(data: mmap.mmap, path: Path) -> tuple[int, int]:
    try:
        (header_end,) = struct.unpack_from("<Q", data, 24)
        header = _Table.root(data, 32, header_end)
        sections = header.table(1)
        objects = sections.tables(0) if sections is not None else []
        for section in objects:
            if section.scalar(3, "<B") == _LITERTLM_TFLITE:
                begin, end = section.scalar(1, "<Q"), section.scalar(2, "<Q")
                if not 0 < begin < end <= len(data):
                    raise ValueError(f"section [{begin}, {end}) lies outside the file")
                return begin, end
    except (struct.error, IndexError, ValueError) as exc:
        raise ModelError(f"{path.name}: corrupt .litertlm header ({exc})") from None
    raise ModelError(f"{path.name} holds no TFLite model section")


def _task_tflite_member(path: Path) -> tuple[int, int]:
    try:
        with zipfile.ZipFile(path) as bundle:
            info = bundle.getinfo(_TASK_MODEL)
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelError(f"{path.name}: {_TASK_MODEL} is compressed; LiteRT-LM maps it uncompressed")
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            name_length, extra_length = struct.unpack_from("<HH", local, 26)
            start = info.header_offset + 30 + name_length + extra_length
            return start, start + info.file_size
    except KeyError:
        raise ModelError(f"{path.name} is a zip without a {_TASK_MODEL} model: not an LLM .task bundle") from None
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise ModelError(f"{path.name} is a corrupt .task bundle ({exc})") from None


def _tflite_facts(model: _Table, path: Path) -> TfliteFacts:
    subgraphs = model.tables(2)
    signatures = {}
    for signature in model.tables(7):
        inputs = {m.string(0): m.scalar(1, "<I") for m in signature.tables(0)}
        outputs = {m.string(0): m.scalar(1, "<I") for m in signature.tables(1)}
        signatures[signature.string(2)] = (signature.scalar(4, "<I"), inputs, outputs)
    if "decode" not in signatures or not any(name.startswith("prefill") for name in signatures):
        raise ModelError(
            f"{path.name} has no prefill/decode signatures ({', '.join(signatures) or 'none'}): "
            "not a LiteRT-LM language model"
        )

    subgraph, inputs, outputs = signatures["decode"]
    tensors = subgraphs[subgraph].tables(0)

    def shape(tensor_index: int) -> tuple[int, ...]:
        return tuple(tensors[tensor_index].ints(0))

    logits = shape(outputs["logits"]) if "logits" in outputs else ()
    cache = [shape(i) for name, i in inputs.items() if name.startswith("kv_cache_k")]
    mask = [shape(i) for name, i in inputs.items() if name == "mask"]
    lora_shapes = {name: shape(i) for name, i in inputs.items() if _INPUT_NAME.fullmatch(name)}
    lora = None
    if lora_shapes:
        rank = lora_shapes.get("lora_atten_q_a_prime_weight_0", (0, 0))[-1]
        if rank not in LORA_RANKS:
            raise ModelError(f"{path.name} takes LoRA rank {rank}; LiteRT-LM runs only {LORA_RANKS}")
        lora = LoraSpec(rank=rank, shapes=lora_shapes)
    return TfliteFacts(
        signatures=tuple(signatures),
        vocab_size=logits[-1] if logits else None,
        kv_cache_length=mask[0][-1] if mask else (max(cache[0]) if cache else None),
        lora=lora,
    )


# -- LoRA files ----------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str]) -> tuple[int, dict[str, np.ndarray]]:
    """The rank and the tensors of a LiteRT-LM LoRA file; :class:`AdapterError` if it is not one."""
    lora_path = Path(path)
    with _mapped(lora_path, AdapterError) as data:
        try:
            if data[4:8] != _TFLITE_ID:
                raise ValueError("not a TFLite flatbuffer")
            model = _Table.root(data, 0, len(data))
            rank = next((m.scalar(1, "<I") for m in model.tables(6) if m.string(0) == _RANK_KEY), None)
            if rank is None:
                raise ValueError(f"no {_RANK_KEY} metadata")
            buffers = model.tables(4)
            tensors = {}
            for subgraph in model.tables(2):
                for tensor in subgraph.tables(0):
                    name, dims = tensor.string(3), tuple(tensor.ints(0))
                    if tensor.scalar(1, "<b") != _FLOAT32:
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


def write_lora(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], *, rank: int) -> Path:
    """Write a LiteRT-LM LoRA file; the write is atomic (a ``.partial`` file renamed into place)."""
    out = Path(path)
    names = sorted(tensors)
    arrays = [np.ascontiguousarray(tensors[name], dtype="<f4") for name in names]

    def flatbuffer(offsets: Sequence[int]) -> bytes:
        writer = _Writer()
        tensor_tables = [
            _Obj(
                [
                    (0, _Vec("i", a.shape)),
                    (1, _Scalar("b", _FLOAT32)),
                    (2, _Scalar("I", i + 1)),
                    (3, _Str(name)),
                ]
            )
            for i, (name, a) in enumerate(zip(names, arrays))
        ]
        buffer_tables = [_Obj([])] + [
            _Obj([(1, _Scalar("Q", offset)), (2, _Scalar("Q", a.nbytes))])
            for offset, a in zip(offsets, arrays)
        ]
        model = _Obj(
            [
                (0, _Scalar("I", 3)),
                (2, _Vec(_Obj, [_Obj([(0, _Vec(_Obj, tensor_tables)), (4, _Str("lora_params"))])])),
                (3, _Str("lora_params")),
                (4, _Vec(_Obj, buffer_tables)),
                # The runtime reads the rank from the metadata's buffer field itself.
                (6, _Vec(_Obj, [_Obj([(0, _Str(_RANK_KEY)), (1, _Scalar("I", rank))])])),
            ]
        )
        return writer.finish(model, _TFLITE_ID)

    placeholder = flatbuffer([_ALIGN] * len(arrays))
    offsets, position = [], _aligned(len(placeholder))
    for a in arrays:
        offsets.append(position)
        position = _aligned(position + a.nbytes)
    head = flatbuffer(offsets)
    assert len(head) == len(placeholder)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as f:
        f.write(head)
        for offset, a in zip(offsets, arrays):
            f.write(b"\0" * (offset - f.tell()))
            f.write(a.tobytes())
    os.replace(partial, out)
    return out


def zero_lora(spec: LoraSpec) -> dict[str, np.ndarray]:
    """All-zero LoRA tensors for ``spec``: the model computes exactly its base output."""
    return {name: np.zeros(shape, np.float32) for name, shape in spec.shapes.items()}


def peft_to_lora(peft: PeftAdapter, *, rank: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
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
    peft: PeftAdapter, out: str | os.PathLike[str], base: str | os.PathLike[str], *, rank: int | None = None
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
        spec = inspect_model(base_path).lora
        if spec is None:
            raise AdapterError(
                f"{base_path.name} was converted without LoRA inputs; convert the model with "
                "--lora-rank 16 (or 32) to use adapters"
            )
        lora_rank, tensors = peft_to_lora(peft, rank=spec.rank)
    check_lora(lora_rank, tensors, spec, name=peft.path.name)
    return write_lora(out, {**zero_lora(spec), **tensors}, rank=lora_rank)


def gguf_lora_spec(gguf: Path, rank: int) -> LoraSpec:
    """The LoRA inputs a model converted from ``gguf`` with ``--lora-rank rank`` takes."""
    from .gguffile import read_header

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
    shapes = {}
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
            f"adapter again for this model (edgegemma adapters convert PEFT_DIR --to mediapipe --model BUNDLE)"
        )
    for tensor, values in tensors.items():
        wanted = spec.shapes.get(tensor)
        if wanted is None:
            raise AdapterError(f"{name}: the model has no LoRA input {tensor!r} (an adapter for another model?)")
        if values.shape != wanted:
            raise AdapterError(
                f"{name}: {tensor} has shape {values.shape} but the model takes {wanted} "
                "(an adapter for another model size?)"
            )
        if not np.isfinite(values).all():
            raise AdapterError(f"{name}: {tensor} contains NaN or infinite values")


def combine(parts: Sequence[tuple[Mapping[str, np.ndarray], float]], spec: LoraSpec) -> dict[str, np.ndarray]:
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


# -- flatbuffers ---------------------------------------------------------------------------


@contextmanager
def _mapped(path: Path, error: type[Exception]) -> Iterator[mmap.mmap]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    if size < 8:
        raise error(f"{path.name} is too small to be a model or adapter file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


class _Table:
    """A flatbuffer table inside ``[lo, hi)`` of a buffer; out-of-range reads raise."""

    __slots__ = ("_buf", "_hi", "_lo", "_pos")

    def __init__(self, buf: mmap.mmap | bytes, pos: int, lo: int, hi: int):
        if not lo <= pos < hi:
            raise ValueError(f"offset {pos} outside [{lo}, {hi})")
        self._buf, self._pos, self._lo, self._hi = buf, pos, lo, hi

    @classmethod
    def root(cls, buf: mmap.mmap | bytes, lo: int, hi: int) -> _Table:
        return cls(buf, lo + cls._u32(buf, lo, lo, hi), lo, hi)

    @staticmethod
    def _u32(buf: mmap.mmap | bytes, at: int, lo: int, hi: int) -> int:
        if not lo <= at <= hi - 4:
            raise ValueError(f"offset {at} outside [{lo}, {hi})")
        return struct.unpack_from("<I", buf, at)[0]

    def _field(self, index: int) -> int | None:
        vtable = self._pos - struct.unpack_from("<i", self._buf, self._pos)[0]
        if not self._lo <= vtable <= self._hi - 4:
            raise ValueError(f"vtable offset {vtable} outside the buffer")
        size = struct.unpack_from("<H", self._buf, vtable)[0]
        slot = 4 + 2 * index
        if slot + 2 > size:
            return None
        offset = struct.unpack_from("<H", self._buf, vtable + slot)[0]
        return self._pos + offset if offset else None

    def _target(self, at: int) -> int:
        return at + self._u32(self._buf, at, self._lo, self._hi)

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        at = self._field(index)
        return default if at is None else struct.unpack_from(fmt, self._buf, at)[0]

    def table(self, index: int) -> _Table | None:
        at = self._field(index)
        return None if at is None else _Table(self._buf, self._target(at), self._lo, self._hi)

    def _vector(self, index: int, item_size: int) -> tuple[int, int]:
        at = self._field(index)
        if at is None:
            return 0, 0
        start = self._target(at)
        count = self._u32(self._buf, start, self._lo, self._hi)
        if start + 4 + count * item_size > self._hi:
            raise ValueError(f"vector of {count} items runs past the buffer")
        return start + 4, count

    def tables(self, index: int) -> list[_Table]:
        start, count = self._vector(index, 4)
        return [
            _Table(self._buf, self._target(start + 4 * i), self._lo, self._hi) for i in range(count)
        ]

    def ints(self, index: int) -> tuple[int, ...]:
        start, count = self._vector(index, 4)
        return struct.unpack_from(f"<{count}i", self._buf, start) if count else ()

    def string(self, index: int) -> str:
        start, count = self._vector(index, 1)
        return bytes(self._buf[start : start + count]).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Scalar:
    fmt: str
    value: int


@dataclass(frozen=True)
class _Str:
    text: str


@dataclass(frozen=True)
class _Vec:
    kind: object
    """A struct format letter for a vector of scalars, or ``_Obj`` for a vector of tables."""
    items: Sequence


@dataclass(frozen=True)
class _Obj:
    fields: list[tuple[int, object]]
    """(field index, _Scalar | _Str | _Vec | _Obj) pairs."""


class _Writer:
    """Lays out a flatbuffer front to back: each object after the one that refers to it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def finish(self, root: _Obj, identifier: bytes) -> bytes:
        self._buf = bytearray(8)
        self._buf[4:8] = identifier
        struct.pack_into("<I", self._buf, 0, self._table(root))
        return bytes(self._buf)

    def _pad(self, alignment: int) -> None:
        self._buf += b"\0" * (-len(self._buf) % alignment)

    def _refer(self, at: int, target: int) -> None:
        struct.pack_into("<I", self._buf, at, target - at)

    def _table(self, obj: _Obj) -> int:
        # Inline layout: the vtable offset, then 8-, 4- and 1-byte fields, each aligned.
        def size(value: object) -> int:
            return struct.calcsize(value.fmt) if isinstance(value, _Scalar) else 4

        fields = sorted(obj.fields, key=lambda field: -size(field[1]))
        slots = max((index for index, _ in fields), default=-1) + 1
        layout, inline = {}, 4
        for index, value in fields:
            inline += -inline % size(value)
            layout[index] = inline
            inline += size(value)
        vtable = struct.pack(f"<HH{slots}H", 4 + 2 * slots, inline, *(layout.get(i, 0) for i in range(slots)))
        self._pad(2)
        vtable_at = len(self._buf)
        self._buf += vtable
        self._pad(8)
        table_at = len(self._buf)
        self._buf += bytes(inline + (-inline % 8))
        struct.pack_into("<i", self._buf, table_at, table_at - vtable_at)
        for index, value in fields:
            at = table_at + layout[index]
            if isinstance(value, _Scalar):
                struct.pack_into("<" + value.fmt, self._buf, at, value.value)
            else:
                self._refer(at, self._child(value))
        return table_at

    def _child(self, value: object) -> int:
        if isinstance(value, _Obj):
            return self._table(value)
        if isinstance(value, _Str):
            data = value.text.encode("utf-8")
            self._pad(4)
            at = len(self._buf)
            self._buf += struct.pack("<I", len(data)) + data + b"\0"
            return at
        assert isinstance(value, _Vec)
        self._pad(8)
        at = len(self._buf)
        if value.kind is _Obj:
            self._buf += struct.pack("<I", len(value.items)) + bytes(4 * len(value.items))
            for i, item in enumerate(value.items):
                self._refer(at + 4 + 4 * i, self._table(item))
        else:
            self._buf += struct.pack(f"<I{len(value.items)}{value.kind}", len(value.items), *value.items)
        return at


def _aligned(position: int) -> int:
    return position + (-position % _ALIGN)
