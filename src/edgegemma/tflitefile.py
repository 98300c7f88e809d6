"""TFLite flatbuffers and the LiteRT-LM model bundles that hold them, with the standard library.

LiteRT-LM (the runtime behind MediaPipe's LLM Inference) runs ``.litertlm`` and MediaPipe
``.task`` bundles: a TFLite graph with prefill and decode signatures plus a tokenizer. This
module reads just the parts of the TFLite and ``.litertlm`` schemas that edgegemma needs --
the graph's signatures, its KV cache and vocabulary sizes, its LoRA inputs -- and writes small
flatbuffers (LoRA files, :mod:`edgegemma.adapters.litert`), so that checking a model or
converting an adapter needs no TensorFlow, flatbuffers or torch package.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

LORA_RANKS = (16, 32)
"""The LoRA ranks LiteRT-LM runs."""
LORA_INPUT = re.compile(r"lora_atten_([qkvo])_([ab])_prime_weight_(\d+)")
"""The name of a LoRA input of a LiteRT-LM graph: projection, matrix, layer."""
TFLITE_ID = b"TFL3"
FLOAT32 = 0  # TensorType.FLOAT32
_LITERTLM_MAGIC = b"LITERTLM"
_LITERTLM_TFLITE = 3  # AnySectionDataType.TFLiteModel
_LITERTLM_LLM_METADATA = 5  # AnySectionDataType.LlmMetadataProto
_JINJA_PROMPT_TEMPLATE = 7  # LlmMetadata.jinja_prompt_template
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
    with mapped(model_path, ModelError) as data:
        if data[:8] == _LITERTLM_MAGIC:
            start, end = _litertlm_tflite_section(data, model_path)
        elif data[4:8] == TFLITE_ID:
            raise ModelError(
                f"{model_path.name} is a bare TFLite model; LiteRT-LM needs it bundled with its "
                "tokenizer and metadata as .litertlm or .task (edgegemma convert MODEL --to litert)"
            )
        elif zipfile.is_zipfile(model_path):  # a .task; MediaPipe's bundler pads its start
            start, end = _task_tflite_member(model_path)
        elif (
            data.find(b"PK\x03\x04", 0, 64) != -1
        ):  # a zip's first entry, but no readable directory
            raise ModelError(
                f"{model_path.name} is a truncated or corrupt .task bundle (no readable zip directory)"
            )
        else:
            raise ModelError(
                f"{model_path.name} is neither a .litertlm nor a MediaPipe .task bundle"
            )
        try:
            return _tflite_facts(Table.root(data, start, end), model_path)
        except (struct.error, IndexError, ValueError) as exc:
            raise ModelError(f"{model_path.name}: its TFLite graph is corrupt ({exc})") from None


def _litertlm_tflite_section(data: mmap.mmap, path: Path) -> tuple[int, int]:
    found = _litertlm_section(data, path, _LITERTLM_TFLITE)
    if found is None:
        raise ModelError(f"{path.name} holds no TFLite model section")
    return found


def _litertlm_section(data: mmap.mmap, path: Path, kind: int) -> tuple[int, int] | None:
    """``[begin, end)`` of the first section of type ``kind`` in a ``.litertlm`` file."""
    try:
        (header_end,) = struct.unpack_from("<Q", data, 24)
        header = Table.root(data, 32, header_end)
        sections = header.table(1)
        objects = sections.tables(0) if sections is not None else []
        for section in objects:
            if section.scalar(3, "<B") == kind:
                begin, end = section.scalar(1, "<Q"), section.scalar(2, "<Q")
                if not 0 < begin < end <= len(data):
                    raise ValueError(f"section [{begin}, {end}) lies outside the file")
                return begin, end
    except (struct.error, IndexError, ValueError) as exc:
        raise ModelError(f"{path.name}: corrupt .litertlm header ({exc})") from None
    return None


def bundle_chat_template(path: str | os.PathLike[str]) -> str | None:
    """The Jinja chat template in a ``.litertlm`` bundle's LLM metadata (its
    ``jinja_prompt_template``), or None: a ``.task`` bundle or a bundle without one."""
    model_path = Path(path)
    with mapped(model_path, ModelError) as data:
        if data[:8] != _LITERTLM_MAGIC:
            return None
        found = _litertlm_section(data, model_path, _LITERTLM_LLM_METADATA)
        if found is None:
            return None
        try:
            value = _proto_field(data[found[0] : found[1]], _JINJA_PROMPT_TEMPLATE)
        except (IndexError, ValueError) as exc:
            raise ModelError(f"{model_path.name}: corrupt LLM metadata ({exc})") from None
    return value.decode("utf-8", errors="replace") if value else None


def _proto_field(message: bytes, number: int) -> bytes | None:
    """The last length-delimited field ``number`` of a serialized protobuf message."""

    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = message[at]
            value |= (byte & 0x7F) << shift
            at += 1
            if byte < 0x80:
                return value, at
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    found, at = None, 0
    while at < len(message):
        key, at = varint(at)
        wire = key & 7
        if wire == 0:
            _, at = varint(at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = varint(at)
            if at + length > len(message):
                raise ValueError("field runs past the message")
            if key >> 3 == number:
                found = message[at : at + length]
            at += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return found


def _task_tflite_member(path: Path) -> tuple[int, int]:
    try:
        with zipfile.ZipFile(path) as bundle:
            info = bundle.getinfo(_TASK_MODEL)
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelError(
                    f"{path.name}: {_TASK_MODEL} is compressed; LiteRT-LM maps it uncompressed"
                )
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            name_length, extra_length = struct.unpack_from("<HH", local, 26)
            start = info.header_offset + 30 + name_length + extra_length
            return start, start + info.file_size
    except KeyError:
        raise ModelError(
            f"{path.name} is a zip without a {_TASK_MODEL} model: not an LLM .task bundle"
        ) from None
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise ModelError(f"{path.name} is a corrupt .task bundle ({exc})") from None


def _tflite_facts(model: Table, path: Path) -> TfliteFacts:
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
    lora_shapes = {name: shape(i) for name, i in inputs.items() if LORA_INPUT.fullmatch(name)}
    lora = None
    if lora_shapes:
        rank = lora_shapes.get("lora_atten_q_a_prime_weight_0", (0, 0))[-1]
        if rank not in LORA_RANKS:
            raise ModelError(
                f"{path.name} takes LoRA rank {rank}; LiteRT-LM runs only {LORA_RANKS}"
            )
        lora = LoraSpec(rank=rank, shapes=lora_shapes)
    return TfliteFacts(
        signatures=tuple(signatures),
        vocab_size=logits[-1] if logits else None,
        kv_cache_length=mask[0][-1] if mask else (max(cache[0]) if cache else None),
        lora=lora,
    )


# -- flatbuffers ---------------------------------------------------------------------------


@contextmanager
def mapped(path: Path, error: type[Exception]) -> Iterator[mmap.mmap]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    if size < 8:
        raise error(f"{path.name} is too small to be a model or adapter file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


class Table:
    """A flatbuffer table inside ``[lo, hi)`` of a buffer; out-of-range reads raise."""

    __slots__ = ("_buf", "_hi", "_lo", "_pos")

    def __init__(self, buf: mmap.mmap | bytes, pos: int, lo: int, hi: int):
        if not lo <= pos < hi:
            raise ValueError(f"offset {pos} outside [{lo}, {hi})")
        self._buf, self._pos, self._lo, self._hi = buf, pos, lo, hi

    @classmethod
    def root(cls, buf: mmap.mmap | bytes, lo: int, hi: int) -> Table:
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

    def table(self, index: int) -> Table | None:
        at = self._field(index)
        return None if at is None else Table(self._buf, self._target(at), self._lo, self._hi)

    def _vector(self, index: int, item_size: int) -> tuple[int, int]:
        at = self._field(index)
        if at is None:
            return 0, 0
        start = self._target(at)
        count = self._u32(self._buf, start, self._lo, self._hi)
        if start + 4 + count * item_size > self._hi:
            raise ValueError(f"vector of {count} items runs past the buffer")
        return start + 4, count

    def tables(self, index: int) -> list[Table]:
        start, count = self._vector(index, 4)
        return [
            Table(self._buf, self._target(start + 4 * i), self._lo, self._hi) for i in range(count)
        ]

    def ints(self, index: int) -> tuple[int, ...]:
        start, count = self._vector(index, 4)
        return struct.unpack_from(f"<{count}i", self._buf, start) if count else ()

    def string(self, index: int) -> str:
        start, count = self._vector(index, 1)
        return bytes(self._buf[start : start + count]).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Scalar:
    fmt: str
    value: int


@dataclass(frozen=True)
class Str:
    text: str


@dataclass(frozen=True)
class Vec:
    kind: object
    """A struct format letter for a vector of scalars, or ``Obj`` for a vector of tables."""
    items: Sequence


@dataclass(frozen=True)
class Obj:
    fields: list[tuple[int, object]]
    """(field index, Scalar | Str | Vec | Obj) pairs."""


class Writer:
    """Lays out a flatbuffer front to back: each object after the one that refers to it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def finish(self, root: Obj, identifier: bytes) -> bytes:
        self._buf = bytearray(8)
        self._buf[4:8] = identifier
        struct.pack_into("<I", self._buf, 0, self._table(root))
        return bytes(self._buf)

    def _pad(self, alignment: int) -> None:
        self._buf += b"\0" * (-len(self._buf) % alignment)

    def _refer(self, at: int, target: int) -> None:
        struct.pack_into("<I", self._buf, at, target - at)

    def _table(self, obj: Obj) -> int:
        # Inline layout: the vtable offset, then 8-, 4- and 1-byte fields, each aligned.
        def size(value: object) -> int:
            return struct.calcsize(value.fmt) if isinstance(value, Scalar) else 4

        fields = sorted(obj.fields, key=lambda field: -size(field[1]))
        slots = max((index for index, _ in fields), default=-1) + 1
        layout, inline = {}, 4
        for index, value in fields:
            inline += -inline % size(value)
            layout[index] = inline
            inline += size(value)
        vtable = struct.pack(
            f"<HH{slots}H", 4 + 2 * slots, inline, *(layout.get(i, 0) for i in range(slots))
        )
        self._pad(2)
        vtable_at = len(self._buf)
        self._buf += vtable
        self._pad(8)
        table_at = len(self._buf)
        self._buf += bytes(inline + (-inline % 8))
        struct.pack_into("<i", self._buf, table_at, table_at - vtable_at)
        for index, value in fields:
            at = table_at + layout[index]
            if isinstance(value, Scalar):
                struct.pack_into("<" + value.fmt, self._buf, at, value.value)
            else:
                self._refer(at, self._child(value))
        return table_at

    def _child(self, value: object) -> int:
        if isinstance(value, Obj):
            return self._table(value)
        if isinstance(value, Str):
            data = value.text.encode("utf-8")
            self._pad(4)
            at = len(self._buf)
            self._buf += struct.pack("<I", len(data)) + data + b"\0"
            return at
        assert isinstance(value, Vec)
        self._pad(8)
        at = len(self._buf)
        if value.kind is Obj:
            self._buf += struct.pack("<I", len(value.items)) + bytes(4 * len(value.items))
            for i, item in enumerate(value.items):
                self._refer(at + 4 + 4 * i, self._table(item))
        else:
            self._buf += struct.pack(
                f"<I{len(value.items)}{value.kind}", len(value.items), *value.items
            )
        return at
