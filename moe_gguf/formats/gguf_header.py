"""A GGUF file's metadata and tensor table, read without its tensor data and without gguf.GGUFReader.

gguf.GGUFReader makes a numpy view per string, which for a 150k-token vocabulary costs ~0.5 GB and seconds;
this reads the same header with one bytes object per key. Values are decoded on demand (``decode``).
Used by ModelTopology (every model load) and by moe-gguf prune (which copies values byte for byte).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_gguf.errors import GGUFHeaderError

_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFValue:
    vtype: int  # GGUFValueType
    raw: bytes  # the encoded value as in the file: type tag + payload


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order
    ggml_type: int
    data_offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class GGUFHeader:
    version: int
    kv: dict[str, GGUFValue]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int

    def value(self, key: str, default: Any = None) -> Any:
        """A scalar or string value (arrays are not decoded)."""
        v = self.kv.get(key)
        if v is None:
            return default
        if v.vtype == _STRING:
            return v.raw[12:].decode("utf-8", errors="replace")
        if v.vtype in _SCALAR_FMT:
            return struct.unpack_from(_SCALAR_FMT[v.vtype], v.raw, 4)[0]
        return default


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The metadata and tensor table of a little-endian GGUF (v2/v3), without the tensor data."""
    import gguf  # imported here: slow to import, and only the quantization block sizes are needed
    path = Path(path)
    with open(path, "rb") as f:
        r = _Cursor(f, path)
        if r.take(4) != b"GGUF":
            raise GGUFHeaderError(f"{path}: not a GGUF file")
        version = r.u32()
        if version > 0xFFFF:
            raise GGUFHeaderError(f"{path}: big-endian GGUF; convert it to little-endian (gguf_convert_endian.py) first")
        if version < 2:
            raise GGUFHeaderError(f"{path}: GGUF version {version} is too old; re-convert the model")
        n_tensors, n_kv = r.u64(), r.u64()
        kv: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            key = r.string().decode("utf-8", errors="replace")
            start = r.pos
            vtype = r.u32()
            r.skip_value(vtype)
            kv[key] = GGUFValue(vtype, r.slice(start))
        tensors = []
        for _ in range(n_tensors):
            name = r.string().decode("utf-8", errors="replace")
            ne = tuple(r.u64() for _ in range(r.u32()))
            ggml_type, offset = r.u32(), r.u64()
            tensors.append((name, ne, ggml_type, offset))
        header_end = r.pos
    head = GGUFHeader(version, kv, [], 32, 0)
    head.alignment = int(head.value(gguf.Keys.General.ALIGNMENT, 32))
    head.data_start = -(-header_end // head.alignment) * head.alignment
    for name, ne, ggml_type, offset in tensors:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (KeyError, ValueError) as e:
            raise GGUFHeaderError(f"{path}: tensor {name!r} has ggml type {ggml_type}, unknown to this gguf package; "
                             "upgrade gguf (pip install -U gguf)") from e
        n_bytes = (ne[0] // block) * size * math.prod(ne[1:]) if ne else 0
        tensors_info = GGUFTensorInfo(name, ne, ggml_type, head.data_start + offset, n_bytes)
        head.tensors.append(tensors_info)
    return head


class _Cursor:
    """Sequential reads from a buffered file, remembering the position (for raw slices)."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path, self.pos = f, path, 0
        self.size = os.fstat(f.fileno()).st_size

    def _room(self, n: int) -> None:
        # a damaged length must not become a read (or allocation) of up to 2**64 bytes
        if n > self.size - self.pos:
            raise GGUFHeaderError(f"{self.path}: truncated or corrupted GGUF header (a length of {n} bytes at "
                                  f"offset {self.pos} runs past the end of the {self.size}-byte file); "
                                  "download the file again")

    def take(self, n: int) -> bytes:
        self._room(n)
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFHeaderError(f"{self.path}: truncated GGUF header; download the file again")
        self.pos += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip(self, n: int) -> None:
        self._room(n)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR_SIZE:
            self.skip(_SCALAR_SIZE[vtype])
        elif vtype == _STRING:
            self.skip(self.u64())
        elif vtype == _ARRAY:
            sub, count = self.u32(), self.u64()
            if sub in _SCALAR_SIZE:
                self.skip(_SCALAR_SIZE[sub] * count)
            else:
                for _ in range(count):
                    self.skip_value(sub)
        else:
            raise GGUFHeaderError(f"{self.path}: unknown GGUF value type {vtype}; the file is damaged or newer than gguf")

    def slice(self, start: int) -> bytes:
        """The bytes from ``start`` to the current position."""
        end = self.pos
        self.f.seek(start)
        b = self.f.read(end - start)
        return b


def decode(v: GGUFValue) -> Any:
    """The value as gguf.GGUFReader's ``contents()`` gives it: int / float / bool / str (strict UTF-8:
    UnicodeDecodeError otherwise) / list of those."""
    value, _ = _decode(v.raw, 4, v.vtype)
    return value


def _decode(raw: bytes, off: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALAR_FMT:
        x = struct.unpack_from(_SCALAR_FMT[vtype], raw, off)[0]
        return (bool(x) if vtype == 7 else x), off + _SCALAR_SIZE[vtype]
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", raw, off)
        return raw[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n
    if vtype == _ARRAY:
        sub, count = struct.unpack_from("<IQ", raw, off)
        off += 12
        if sub in _SCALAR_FMT:
            vals = list(struct.unpack_from(f"<{count}{_SCALAR_FMT[sub][1]}", raw, off))
            return ([bool(x) for x in vals] if sub == 7 else vals), off + count * _SCALAR_SIZE[sub]
        out = []
        for _ in range(count):
            x, off = _decode(raw, off, sub)
            out.append(x)
        return out, off
    raise ValueError(f"unknown GGUF value type {vtype}")


def array_len(v: GGUFValue) -> int:
    """Number of elements of an array value (0 for anything else)."""
    return struct.unpack_from("<Q", v.raw, 8)[0] if v.vtype == _ARRAY else 0


def string_items(v: GGUFValue) -> list[bytes]:
    """The raw bytes of each string of a string array (no UTF-8 decoding; [] for other values)."""
    if v.vtype != _ARRAY:
        return []
    sub, count = struct.unpack_from("<IQ", v.raw, 4)
    if sub != _STRING:
        return []
    raw, off, out = v.raw, 16, []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, off)
        out.append(raw[off + 8:off + 8 + n])
        off += 8 + n
    return out
