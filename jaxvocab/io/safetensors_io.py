"""The safetensors format, read by slice and written by stream, with no torch and no whole-file loads.

Why not `safetensors.safe_open(framework="numpy")`: numpy has no bfloat16, so it refuses Llama's
weights, and its file map stays resident for as long as the file is open, which counts the whole
checkpoint against peak RSS a second time. Here a slice of whole rows is read with plain reads
into an aligned buffer; any other slice maps just the tensor, copies out the requested slice (only
those pages are touched) and drops the map, so peak host memory stays near the params plus one tensor. The format is simple: 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxvocab.errors import CheckpointError, brief

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
FLOATS = {DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}
# Bytes copied out by read_slice in this process (the multi-host test checks each host reads its share).
BYTES_READ = 0


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "start", "end", "path")

    def __init__(self, name, dtype, shape, start, end, path):
        self.name, self.dtype, self.shape, self.start, self.end, self.path = name, dtype, shape, start, end, path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


MAX_HEADER = 100_000_000  # the safetensors library's limit


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one file's header with at least the safetensors library's rules: bounded size, a JSON
    object starting with '{', string metadata, known dtypes, integer shapes whose byte size matches
    the offsets, and offsets that tile the data region exactly (no gaps, overlaps or trailing bytes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file; re-download it")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > MAX_HEADER or n < 2:
                raise CheckpointError(
                    f"{path}: header length {n} is impossible for a file of {size} bytes; "
                    "the file is truncated or not safetensors"
                )
            text = f.read(n)
        if not text.startswith(b"{"):
            raise CheckpointError(f"{path}: header does not start with '{{'; the file is corrupt or not safetensors")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise CheckpointError(f"{path}: header is not valid JSON; the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt or not safetensors")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings; the file is corrupt")
    base = 8 + n
    infos = {name: _entry(path, name, e, base) for name, e in header.items()}
    _check_layout(path, infos, base, size)
    return infos, meta


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _entry(path: Path, name: str, e, base: int) -> TensorInfo:
    """One header entry, every field type-checked (ints are JSON integers, never floats or bools)."""
    nat = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    ok = (
        isinstance(e, dict)
        and isinstance(e.get("dtype"), str)
        and e["dtype"] in DTYPES
        and isinstance(e.get("shape"), list)
        and all(nat(s) for s in e["shape"])
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and all(nat(o) for o in e["data_offsets"])
        and e["data_offsets"][0] <= e["data_offsets"][1]
    )
    if not ok:
        raise CheckpointError(
            f"{path}: tensor {brief(name)} has an unsupported or malformed header entry {brief(e)}; the file is corrupt"
        )
    dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
    start, end = (base + o for o in e["data_offsets"])
    if end - start != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {brief(name)} spans {end - start} bytes but its shape "
            f"{brief(list(shape))} of {e['dtype']} needs {math.prod(shape) * dtype.itemsize}; "
            "the file is corrupt"
        )
    return TensorInfo(name, dtype, shape, start, end, Path(path))


def _check_layout(path: Path, infos: dict[str, TensorInfo], base: int, size: int) -> None:
    """Offsets must tile the data region [base, size) in order: no overlap, gap or trailing byte."""
    cursor = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != cursor:
            raise CheckpointError(
                f"{path}: tensor {brief(info.name)} starts at data offset {info.start - base}, "
                f"expected {cursor - base} (offsets overlap or leave a gap); the file is corrupt"
            )
        cursor = info.end
    if cursor != size:
        raise CheckpointError(
            f"{path}: the tensors cover {cursor - base} data bytes but the file holds {size - base}; "
            "the file is truncated or has trailing bytes"
        )


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary: XLA's CPU client adopts such a buffer as a device array
    without copying it, where numpy's own 16-byte alignment costs a full extra copy per tensor."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def read_slice(info: TensorInfo, index: tuple[slice, ...] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """A copy of `tensor[index]`, touching only the pages the slice lives on.

    `out` (C-contiguous, the slice's shape and dtype) receives the bytes directly: fresh memory is
    slow to fault in, so a stacked parameter should be one buffer written once, not a copy of copies.
    """
    global BYTES_READ
    if info.nbytes == 0:
        return np.zeros(info.shape, info.dtype)[index or ()]
    rows = _row_range(info.shape, index or ())
    if rows is not None:
        out = _read_rows(info, *rows, out=out)
        BYTES_READ += out.nbytes
        return out
    page = mmap.ALLOCATIONGRANULARITY
    offset = info.start - info.start % page
    with open(info.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), info.end - offset, access=mmap.ACCESS_READ, offset=offset)
    try:
        view = np.frombuffer(mm, dtype=info.dtype, count=int(np.prod(info.shape)), offset=info.start - offset)
        if out is None:
            out = np.array(view.reshape(info.shape)[index or ()], copy=True)
        else:
            out[...] = view.reshape(info.shape)[index or ()]
        del view
    finally:
        mm.close()
    BYTES_READ += out.nbytes
    return out


def _row_range(shape, index) -> tuple[int, int] | None:
    """(first, stop) when `index` takes whole rows of dim 0, i.e. one contiguous byte range."""
    if not shape or len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        return None
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if any(s.indices(n) != (0, n, 1) for s, n in zip(index[1:], shape[1:], strict=True)):
        return None
    first, stop, step = index[0].indices(shape[0])
    return (first, max(first, stop)) if step == 1 else None


def _read_rows(info: TensorInfo, first: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Whole rows with plain reads into an aligned buffer: several times faster than faulting the
    same bytes in through a map, and the buffer becomes the device array as is on CPU."""
    shape = (stop - first, *info.shape[1:])
    if out is None:
        out = aligned_empty(shape, info.dtype)
    elif out.shape != shape or out.dtype != info.dtype or not out.flags.c_contiguous:
        raise ValueError(f"read_slice out= must be C-contiguous {info.dtype} {shape}, got {out.dtype} {out.shape}")
    buf = memoryview(out.reshape(-1).view(np.uint8))
    pos = info.start + first * (info.nbytes // info.shape[0])
    with open(info.path, "rb", buffering=0) as f:
        f.seek(pos)
        done = 0
        while done < len(buf):  # one read returns at most ~2 GB
            n = f.readinto(buf[done:])
            if not n:
                raise CheckpointError(f"{info.path}: ended inside tensor {info.name!r}; the file is truncated")
            done += n
    return out


def write_file(path: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]], produce, metadata=None) -> int:
    """Write tensors one at a time: `produce(name)` returns each array just before it is written.

    The header is known up front from (name, dtype, shape), so a shard never sits in memory whole.
    """
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes() if arr.nbytes < (1 << 26) else memoryview(arr.reshape(-1).view(np.uint8)))
    return offset
