"""A GGUF file's metadata and tensor table, read without touching the weights.

GGUF (llama.cpp's format, spec: ggml ``docs/gguf.md``, versions 2 and 3) starts with a header —
magic, version, tensor count, key/value count — then the key/values, then one record per tensor
(name, shape, type, offset), then the tensor data. Sizing needs only the part before the data.

Why not ``gguf.GGUFReader``: it maps the whole file and builds numpy views for every element of
every array, and a tokenizer holds ~100k strings (SmolLM2's 49,152 tokens and 48,900 merges), so
opening the 97 MB SmolLM2 file takes ~2.7 s. Here arrays of strings are skipped by their length
prefixes and only short numeric arrays are kept, which takes milliseconds. The ``gguf`` package
still supplies the format's constants: value types, quantisation types and each quantisation's
block size and bytes per block (``GGML_QUANT_SIZES``), so new quantisations arrive with it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from gpufleet.errors import SourceError

__all__ = ["GGUFArray", "GGUFHeader", "GGUFTensor", "MetaValue", "read_gguf_header"]

# Numeric arrays up to this length are kept (per-layer head counts); longer ones keep only length.
_KEEP_ARRAY = 4096

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True, slots=True)
class GGUFArray:
    item_type: str  # the GGUFValueType name, e.g. "STRING"
    length: int
    values: tuple[int | float | bool, ...] | None  # short numeric arrays only


MetaValue = str | int | float | bool | GGUFArray


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    type_name: str  # GGMLQuantizationType name, e.g. "Q4_1"
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, MetaValue]
    tensors: tuple[GGUFTensor, ...]


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        n = self.u64()
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self.pos += 8 + int(struct.unpack_from("<Q", self.buf, self.pos)[0])
        if self.pos > len(self.buf):
            raise struct.error("string array runs past the end of the file")

    def value(self, vtype: GGUFValueType) -> MetaValue:
        if vtype is GGUFValueType.STRING:
            return self.string()
        if vtype is GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.u32())
            length = self.u64()
            if item_type is GGUFValueType.STRING:
                self.skip_strings(length)
                return GGUFArray(item_type.name, length, None)
            if item_type is GGUFValueType.ARRAY:
                raise struct.error("nested arrays are not supported")
            fmt = _SCALARS[item_type]
            values: tuple[int | float | bool, ...] | None = None
            if length <= _KEEP_ARRAY:
                values = struct.unpack_from(f"<{length}{fmt[1]}", self.buf, self.pos)
            self.pos += struct.calcsize(fmt) * length
            return GGUFArray(item_type.name, length, values)
        return self.unpack(_SCALARS[vtype])


def _tensor_bytes(type_: GGMLQuantizationType, n_elements: int) -> int:
    block, type_size = GGML_QUANT_SIZES[type_]
    return n_elements // block * type_size


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of the GGUF file at ``path``; SourceError if it is not one."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, _Cursor(buf))
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise SourceError(f"{path}: cannot read GGUF header: {exc}") from exc


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    magic = cur.u32()
    if magic != GGUF_MAGIC:
        raise SourceError(
            f"{path}: not a GGUF file (expected magic {GGUF_MAGIC:#x} 'GGUF', found {magic:#x})"
        )
    version = cur.u32()
    if version not in (2, 3):
        raise SourceError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    tensor_count = cur.u64()
    kv_count = cur.u64()
    metadata: dict[str, MetaValue] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(GGUFValueType(cur.u32()))
    tensors = []
    for _ in range(tensor_count):
        name = cur.string()
        shape = tuple(cur.u64() for _ in range(cur.u32()))
        type_ = GGMLQuantizationType(cur.u32())
        cur.u64()  # offset into the data section
        n = 1
        for d in shape:
            n *= d
        tensors.append(GGUFTensor(name, shape, type_.name, n, _tensor_bytes(type_, n)))
    return GGUFHeader(version, metadata, tuple(tensors))
