"""torch `.pth` files read without torch and without running a line of the file's pickle code.

A `.pth` is a zip archive: `<archive>/data.pkl` (a pickle of the state dict), `<archive>/byteorder`
and one uncompressed member `<archive>/data/<key>` per storage. `torch.load` unpickles with the
full pickle machinery, so a crafted file can run anything (`os.system` is one GLOBAL opcode away).
Here the unpickler resolves only the few globals a tensor state dict needs, each mapped to a
pure-numpy stand-in; any other global is refused before it is looked up, let alone called.
Storages become `LazyTensor`s over their zip members: nothing is read until a slice is asked for,
and then only that slice is copied out of a short-lived memory map, honouring the storage offset
and strides that `_rebuild_tensor_v2` recorded (views saved by torch share one storage).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxvocab.errors import CheckpointError, brief

# Bounds on the unpickler's work (a torch state dict of a 405B shard needs a small fraction of each):
MAX_PICKLE = 16 << 20  # bytes of data.pkl
MAX_OPS = 2_000_000  # opcodes
MAX_MEMO = 500_000  # memo entries
MAX_DEPTH = 32  # nesting of built values (a shared-tuple DAG of depth 60 hashes 2**60 times)
MAX_NUMEL = 1 << 40  # elements of one tensor view
_INPLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}

# Bytes copied out of .pth storages by this process (the multi-host test checks each host reads its share).
BYTES_READ = 0

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """What `torch.BFloat16Storage` & co. resolve to: just the element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class Storage:
    """One `data/<key>` member: where its bytes start in the file, how many elements it holds."""

    __slots__ = ("path", "start", "numel", "dtype")

    def __init__(self, path: Path, start: int, numel: int, dtype: np.dtype):
        self.path, self.start, self.numel, self.dtype = path, start, numel, dtype


class LazyTensor:
    """A tensor as torch saved it (storage + offset + shape + strides), read slice by slice."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def path(self) -> Path:
        return self.storage.path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """A copy of `tensor[index]`; only the pages holding the slice are touched."""
        global BYTES_READ
        st, item = self.storage, self.dtype.itemsize
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)[index or ()]
        base = st.start - st.start % mmap.ALLOCATIONGRANULARITY
        with open(st.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), st.start + st.numel * item - base, access=mmap.ACCESS_READ, offset=base)
        try:
            flat = np.frombuffer(mm, dtype=st.dtype, count=st.numel, offset=st.start - base)
            view = np.lib.stride_tricks.as_strided(
                flat[self.offset :], self.shape, [s * item for s in self.stride], writeable=False
            )
            out = np.array(view[index or ()], copy=True)
            del view, flat
        finally:
            mm.close()
        BYTES_READ += out.nbytes
        return out


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: checks the view stays inside its storage."""
    if not isinstance(storage, Storage):
        raise CheckpointError("tensor without a storage")
    ints = lambda t: isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t)  # noqa: E731
    if not (
        isinstance(storage_offset, int)
        and storage_offset >= 0
        and ints(size)
        and ints(stride)
        and len(size) == len(stride)
    ):
        raise CheckpointError(
            f"{storage.path}: malformed tensor record (offset {brief(storage_offset)}, size "
            f"{brief(size)}, stride {brief(stride)})"
        )
    if math.prod(size) > MAX_NUMEL:
        raise CheckpointError(
            f"{storage.path}: a tensor of {len(size)} dims claims more than {MAX_NUMEL} elements; the file is corrupt"
        )
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if 0 not in size else -1
    if last >= storage.numel:
        raise CheckpointError(
            f"{storage.path}: a tensor of shape {list(size)} reaches past the end of its storage; the file is corrupt"
        )
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, storage_for):
        super().__init__(file)
        self.path, self.storage_for = path, storage_for

    def find_class(self, module, name):
        # Protocol-2 pickles spell some Python 3 names the Python 2 way (__builtin__.eval).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise CheckpointError(
                f"{self.path}: refusing to unpickle the global {module[:80]}.{name[:80]}: a tensor state dict "
                "never needs it, and jaxvocab does not run code from checkpoint files"
            )
        return fn

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        )
        if not ok:
            raise CheckpointError(f"{self.path}: unsupported persistent id {brief(pid)}; only tensor storages are read")
        return self.storage_for(pid[2], pid[1].dtype, pid[4])


# What a malformed data.pkl raises while it is unpickled; each becomes one CheckpointError naming the file.
_CORRUPT_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    RecursionError,
    MemoryError,
    OverflowError,
    zipfile.LargeZipFile,
    NotImplementedError,
)


def read_pth(path) -> dict[str, LazyTensor]:
    """The state dict of one `.pth` file as {name: LazyTensor}; no tensor data is read."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename: i for i in z.infolist()}
            pkl, prefix = _pickle_member(z, members, path)
            blob = _read_pickle(z, members[pkl], path)
            with open(path, "rb") as raw:
                storages = {}

                def storage_for(key, dtype, numel):
                    if key not in storages:
                        storages[key] = _storage(path, raw, members.get(f"{prefix}data/{key}"), key, dtype, numel)
                    return storages[key]

                state = _Unpickler(io.BytesIO(blob), path, storage_for).load()
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path}: not a zip archive; only torch's zip format (torch >= 1.6) is read, "
            "re-save the file with a recent torch.save"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except _CORRUPT_PICKLE as e:
        raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {brief(str(e))})") from None
    flat = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, LazyTensor) for k, v in state.items())
    if not flat:
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return dict(state)


def _pickle_member(z: zipfile.ZipFile, members: dict, path: Path) -> tuple[str, str]:
    """torch's zip layout is <archive>/data.pkl beside <archive>/data/<key>; anything else is not a checkpoint,
    and a big-endian archive would need byte swaps we do not do."""
    pkl = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: not a torch zip checkpoint (no <archive>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    order = z.read(prefix + "byteorder").strip() if prefix + "byteorder" in members else b"little"
    if order != b"little":
        raise CheckpointError(
            f"{path}: byte order {order.decode(errors='replace')!r} is not supported; "
            "re-save it on a little-endian machine"
        )
    return pkl[0], prefix


def _read_pickle(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """The pickle's bytes, bounded twice (declared size, then actual inflation) so a zip bomb is never unpickled,
    and its opcodes vetted before anything runs."""
    if info.file_size > MAX_PICKLE:
        raise CheckpointError(
            f"{path}: data.pkl is {info.file_size} bytes, more than a state dict needs ({MAX_PICKLE}); "
            "refusing to unpickle it"
        )
    with z.open(info) as f:
        blob = f.read(MAX_PICKLE + 1)
    if len(blob) > MAX_PICKLE:
        raise CheckpointError(f"{path}: data.pkl inflates past {MAX_PICKLE} bytes; refusing to unpickle it")
    check_pickle(blob, path)
    return blob


def check_pickle(blob: bytes, path: Path) -> None:
    """Walk the pickle's opcodes before running any (pickletools parses, never executes): bound the
    opcode count, the memo and the nesting depth of every value the real unpickler would build."""
    stack: list[int | None] = []  # depth of each stack value; None marks a MARK
    memo: dict = {}
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(blob)):
            if n > MAX_OPS or len(memo) > MAX_MEMO:
                raise CheckpointError(
                    f"{path}: data.pkl needs more than {MAX_OPS} opcodes / {MAX_MEMO} memo entries; "
                    "a state dict never does, refusing to unpickle it"
                )
            _simulate(op, arg, stack, memo)
    except (ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {brief(str(e))})") from None
    if max((d for d in stack if d is not None), default=0) > MAX_DEPTH or any(
        d is not None and d > MAX_DEPTH for d in memo.values()
    ):
        raise CheckpointError(f"{path}: data.pkl nests values deeper than {MAX_DEPTH}; refusing to unpickle it")


def _simulate(op, arg, stack: list, memo: dict) -> None:
    """One opcode's effect on value depths (a leaf is 1, a container 1 + its deepest item)."""
    name = op.name
    if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        return
    if name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[arg])
        return
    before = op.stack_before
    if pickletools.markobject in before:
        k = len(stack) - 1 - stack[::-1].index(None)
        items, pre_n = stack[k + 1 :], before.index(pickletools.markobject)
        pre = stack[k - pre_n : k] if pre_n else []
        del stack[k - pre_n :]
    else:
        pre = stack[len(stack) - len(before) :] if before else []
        if len(pre) != len(before):
            raise IndexError("stack underflow")
        del stack[len(stack) - len(before) :]
        items = []
    depths = [d or 0 for d in pre + items]
    if name == "DUP":
        stack += [depths[0]] * 2
        return
    if name in _INPLACE:
        d = max([depths[0]] + [1 + x for x in depths[1:]])
    else:
        d = 1 + max(depths, default=0)
    if d > MAX_DEPTH:
        raise ValueError(f"values nested deeper than {MAX_DEPTH}")
    stack += [None if s is pickletools.markobject else d for s in op.stack_after]


def _storage(path: Path, raw, info: zipfile.ZipInfo | None, key: str, dtype: np.dtype, numel: int) -> Storage:
    """Locate a storage member's bytes: torch writes them uncompressed, so they can be mapped in place."""
    if info is None:
        raise CheckpointError(f"{path}: storage {key!r} is referenced but missing from the archive")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: storage {key!r} is compressed; re-save the file with torch.save")
    if info.file_size < numel * dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage {key!r} holds {info.file_size} bytes, fewer than its {numel} "
            f"{dtype.name} elements; the file is truncated"
        )
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: bad zip entry for storage {key!r}; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + numel * dtype.itemsize > os.fstat(raw.fileno()).st_size:
        raise CheckpointError(f"{path}: storage {key!r} runs past the end of the file; the file is truncated")
    return Storage(path, start, numel, dtype)
