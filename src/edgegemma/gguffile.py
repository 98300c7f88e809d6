"""A strict, cheap reader for GGUF headers.

llama.cpp trusts the counts and offsets in a GGUF header; a truncated download or a hostile
file can make it allocate absurd amounts or read past the end. Every GGUF edgegemma hands
to a native library is read here first: each count is checked against the bytes that are
actually there, and every tensor must lie inside the file. Only the header is parsed, so this
costs a fraction of what the gguf package's full reader takes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError
from .partial_import import import_submodule

if TYPE_CHECKING:
    from gguf import constants
else:
    constants = import_submodule("gguf.constants")  # not the rest of gguf: partial_import.py

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_SMALL_ARRAY = 64
"""Arrays longer than this (vocabularies) are summarised by their length only."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """ggml order: shape[0] is the row length (the input dimension of a weight)."""
    type: constants.GGMLQuantizationType
    offset: int
    """Absolute offset of the data in the file."""
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    """Key/value metadata; long arrays are replaced by ``("array", length)``."""
    tensors: dict[str, TensorInfo]
    """In the file's order."""
    infos_start: int = 0
    """Where the tensor infos begin: what comes before (magic, counts, metadata) is the
    header proper."""
    alignment: int = 32

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_type(self) -> str:
        return str(self.metadata.get("general.type", "model"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_header(path: Path) -> GGUFHeader:
    """Parse and validate a GGUF header; raise :class:`ModelError` saying what is wrong."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelError(f"{path} is not a GGUF file: only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _Parser(path, data, size).header()
    except FileNotFoundError:
        raise ModelError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def tensor_array(header: GGUFHeader, name: str) -> np.ndarray:
    """A float tensor's values (F32/F16 only), shaped like numpy: ``shape[::-1]``."""
    info = header.tensors[name]
    dtypes = {
        constants.GGMLQuantizationType.F32: np.float32,
        constants.GGMLQuantizationType.F16: np.float16,
    }
    if info.type not in dtypes:
        raise ModelError(f"{header.path}: tensor {name} is {info.type.name}, expected F32 or F16")
    count = int(np.prod(info.shape))
    values = np.fromfile(header.path, dtype=dtypes[info.type], count=count, offset=info.offset)
    return values.reshape(info.shape[::-1])


class _Parser:
    def __init__(self, path: Path, data: mmap.mmap, size: int):
        self.path = path
        self.data = data
        self.size = size
        self.pos = 0

    def fail(self, what: str) -> ModelError:
        return ModelError(
            f"{self.path} is not a valid GGUF file: {what} (offset {self.pos} of {self.size} bytes)"
        )

    def header(self) -> GGUFHeader:
        if self.data[:4] != _MAGIC:
            raise self.fail(f"bad magic {bytes(self.data[:4])!r}, expected {_MAGIC!r}")
        self.pos = 4
        version = self.scalar("<I")
        if version not in _SUPPORTED_VERSIONS:
            raise self.fail(f"unsupported GGUF version {version}")
        n_tensors = self.scalar("<Q")
        n_kv = self.scalar("<Q")
        # Each KV entry takes at least 13 bytes, each tensor info at least 29: counts that
        # could not fit in the file are corrupt, whatever the rest says.
        if n_kv * 13 > self.size - self.pos or n_tensors * 29 > self.size - self.pos:
            raise self.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.scalar("<I"))
        infos_start = self.pos
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = _tensor_nbytes(shape, ggml_type)
            start = data_start + offset
            if start + nbytes > self.size:
                raise ModelError(
                    f"{self.path} is truncated or corrupt: tensor {name} needs bytes "
                    f"{start}..{start + nbytes} but the file has {self.size}"
                )
            if name in tensors:
                raise self.fail(f"tensor {name} appears twice")
            tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
        return GGUFHeader(self.path, version, metadata, tensors, infos_start, alignment)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes")
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            item_size = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8
            if item_type not in _SCALARS and item_type != _STRING:
                raise self.fail(f"array of unsupported type {item_type}")
            if count * item_size > self.size - self.pos:
                raise self.fail(f"array of {count} items does not fit in the file")
            if item_type in _SCALARS:
                block = self.take(count * item_size)
                if count > _SMALL_ARRAY:
                    return ("array", count)
                return list(struct.unpack(f"<{count}{_SCALARS[item_type][1]}", block))
            items = [self.string() for _ in range(count)]
            return ("array", count) if count > _SMALL_ARRAY else items
        raise self.fail(f"unknown metadata value type {value_type}")

    def tensor_info(self) -> tuple[str, tuple[int, ...], constants.GGMLQuantizationType, int]:
        name = self.string()
        n_dims = self.scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(self.scalar("<Q") for _ in range(n_dims))
        if any(d == 0 or d > self.size * 64 for d in shape):
            raise self.fail(f"tensor {name} has an impossible shape {shape}")
        raw_type = self.scalar("<I")
        try:
            ggml_type = constants.GGMLQuantizationType(raw_type)
        except ValueError:
            raise self.fail(f"tensor {name} has unknown type {raw_type}") from None
        return name, shape, ggml_type, self.scalar("<Q")


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: constants.GGMLQuantizationType) -> int:
    block_size, type_size = constants.GGML_QUANT_SIZES[ggml_type]
    n_elements = int(np.prod(shape, dtype=object))
    return n_elements // block_size * type_size
