"""A strict, fail-fast reader of GGUF files (llama.cpp's single-file model format).

Layout (all little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64
key/value count; the key/value pairs (key string, uint32 value type, value); one info
record per tensor (name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml type, uint64
offset); padding to `general.alignment` (default 32); the tensor data.
Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

The header is parsed straight from an mmap with a bounds check on every read, and
every count or length is compared with the bytes left *before* anything is
allocated, so a corrupt or hostile file fails in milliseconds with a one-line
`GGUFError` instead of reading gigabytes or allocating absurd memory. Tensor data
is not touched until `GGUFFile.tensor()` asks for it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenloom.errors import GGUFError
from tokenloom.loading.gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType
from tokenloom.loading.gguf_quants import SUPPORTED_TYPES, dequantize, supported_type_names, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8

# value type id -> (name, struct format); STRING (8) and ARRAY (9) are handled apart
_SCALARS = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<B"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9
# smallest encoding of one tensor info (empty name, 0 dims) and one key/value pair
# (empty key, uint8 value): a count above remaining_bytes / this cannot be honest
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8
_MIN_KV = 8 + 4 + 1


@dataclass
class GGUFTensorInfo:
    """Where one tensor lives in the file. `offset` is absolute (from the start of the file)."""

    name: str
    shape: tuple[int, ...]  # torch order: reversed ggml `ne`, i.e. (rows, cols) for a matrix
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class GGUFFile:
    """A parsed GGUF header plus lazy access to the tensor data (memory-mapped).

    `metadata` holds plain Python values (str, int, float, bool, lists of those).
    Use as a context manager, or call `close()`, to release the mapping early.
    """

    def __init__(self, path: Path, version: int, metadata: dict[str, Any],
                 tensors: dict[str, GGUFTensorInfo], alignment: int, data_offset: int, mm: mmap.mmap):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._mm: mmap.mmap | None = mm

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name`, dequantized to `dtype`, in torch shape. Always a fresh copy."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        if info.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(f"{self.path}: tensor {name!r} is {info.type_name}, which tokenloom cannot "
                            f"dequantize (supported: {supported_type_names()})")
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        # a zero-copy view of the mapped bytes; dequantize() writes into a new tensor
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return dequantize(raw, info.ggml_type, dtype).view(info.shape)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, arch={self.architecture!r}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


class _Cursor:
    """Sequential little-endian reads from the mapped file, each one bounds-checked."""

    def __init__(self, mm: mmap.mmap, path: Path):
        self.mm, self.path, self.pos, self.size = mm, path, 0, len(mm)

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"corrupt GGUF file {self.path}: {problem}")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise self.fail(f"truncated while reading {what}: needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size} bytes")

    def unpack(self, fmt: str, size: int, what: str):
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.remaining():
            raise self.fail(f"{what} claims {n} bytes at offset {self.pos} but only "
                            f"{self.remaining()} bytes remain (string length past end of file)")
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            name, fmt = _SCALARS[vtype]
            v = self.unpack(fmt, struct.calcsize(fmt), what)
            return bool(v) if name == "bool" else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list:
        if depth >= _MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        etype = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        if etype in _SCALARS:
            elem_size = struct.calcsize(_SCALARS[etype][1])
        elif etype == _STRING:
            elem_size = 8  # at least the length prefix
        elif etype == _ARRAY:
            elem_size = 12  # at least element type + length
        else:
            raise self.fail(f"{what} has unknown array element type {etype}")
        if count * elem_size > self.remaining():
            raise self.fail(f"{what} claims {count} elements but only {self.remaining()} bytes remain "
                            f"(array length past end of file)")
        if count == 0:
            return []
        if etype in _SCALARS:
            # numeric arrays (token scores, types) can hold ~10^5 entries: decode in one go
            name, fmt = _SCALARS[etype]
            arr = np.frombuffer(self.mm, dtype=np.dtype(fmt), count=count, offset=self.pos)
            self.pos += count * elem_size
            return (arr != 0).tolist() if name == "bool" else arr.tolist()
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def _open_mmap(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                raise GGUFError(f"corrupt GGUF file {path}: file is empty")
            # ACCESS_COPY: a private, writable mapping; torch.frombuffer wants a writable
            # buffer and nothing we do can ever modify the file on disk
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise GGUFError(f"cannot read GGUF file {path}: {e.strerror or e}") from None


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate the header, metadata and tensor infos of a GGUF file.

    Reads no tensor data. Raises `GGUFError` naming the file and the problem for
    anything malformed: bad magic or version, counts or lengths that overrun the
    file, unknown value or tensor types, misaligned, overlapping or truncated
    tensor data, shapes that are not whole blocks, duplicate names.
    """
    path = Path(path)
    mm = _open_mmap(path)
    try:
        return _parse(mm, path)
    except BaseException:
        mm.close()
        raise


def _parse(mm: mmap.mmap, path: Path) -> GGUFFile:
    cur = _Cursor(mm, path)
    cur.need(4, "magic")
    magic = mm[:4]
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path} is a big-endian GGUF file, which tokenloom does not support")
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key/value count")
    if n_kv * _MIN_KV > cur.remaining():
        raise cur.fail(f"header claims {n_kv} metadata entries, more than the file could hold")
    if n_tensors * _MIN_TENSOR_INFO > cur.remaining():
        raise cur.fail(f"header claims {n_tensors} tensors, more than the file could hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"value type of {key!r}")
        metadata[key] = cur.value(vtype, f"value of {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")

    raw_infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        ne = [cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"data offset of tensor {name!r}")
        raw_infos.append((name, ne, ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment  # padding up to the alignment
    tensors = _check_tensors(cur, raw_infos, alignment, data_offset)
    _check_split(cur, metadata)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, mm)


def _check_tensors(cur: _Cursor, raw_infos: list, alignment: int, data_offset: int) -> dict[str, GGUFTensorInfo]:
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, ggml_type, offset in raw_infos:
        if name in tensors:
            raise cur.fail(f"duplicate tensor name {name!r}")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        if ne and ne[0] % block_size:
            raise cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the {qtype.name} "
                           f"block size {block_size}, so its byte size does not match its shape")
        n_elements = 1
        for n in ne:
            n_elements *= n
        nbytes = n_elements // block_size * type_size
        if offset % alignment:
            raise cur.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the "
                           f"alignment {alignment} (misaligned)")
        start = data_offset + offset
        if start + nbytes > cur.size:
            raise cur.fail(f"tensor {name!r}: data (bytes {start}..{start + nbytes}) runs past the end "
                           f"of the file ({cur.size} bytes); the file is probably truncated")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)
    # tensors that share bytes can only come from a corrupt offset table
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise cur.fail(f"tensors {a!r} and {b!r} overlap in the file")
    return tensors


def _check_split(cur: _Cursor, metadata: dict[str, Any]) -> None:
    count = metadata.get("split.count", 1)
    if isinstance(count, int) and count > 1:
        raise GGUFError(f"{cur.path} is part {metadata.get('split.no', 0) + 1} of a {count}-part split GGUF; "
                        "merge the parts first (llama-gguf-split --merge)")
