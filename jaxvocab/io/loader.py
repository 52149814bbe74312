"""Place a checkpoint's params on a mesh, slice by slice, shared by the HF and Meta readers.

The model is built abstractly (`nnx.eval_shape`, no weights), then every param is created with
`jax.make_array_from_callback`: each device asks its reader for its own slice, so no full tensor
is ever assembled on the host. A reader may be asked for vocabulary tables larger than the
checkpoint's (`rows=`): the rows past the checkpoint come back as zeros, so an import that adds
tokens reads straight into the final-size tables and never copies a table to grow it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxvocab.config import LlamaConfig
from jaxvocab.errors import UsageError
from jaxvocab.io import finite, keys
from jaxvocab.io.safetensors_io import aligned_empty
from jaxvocab.memory import release
from jaxvocab.model import Llama
from jaxvocab.progress import progress
from jaxvocab.sharding import sharding_for, single_device_mesh


class Source(NamedTuple):
    """How one param is read: `read(idx)` returns the checkpoint slice `idx` (a tuple of slices in
    param space) as a host array; `nbytes` is what reading all of it costs (for the progress bar)."""

    read: Callable[[tuple[slice, ...]], np.ndarray]
    nbytes: int


def build(
    config: LlamaConfig,
    dtype,
    mesh: Mesh | None,
    source_for: Callable[[keys.Key], Source],
    show_progress: bool,
    choices: dict | None = None,
    rows: int | None = None,
    fill: Fill | None = None,
) -> Llama:
    """An abstract model with every param filled slice by slice from `source_for(key)`.

    Args:
      config: the checkpoint's config (its vocab_size is the checkpoint's row count).
      dtype: the params' dtype; slices are cast on the host as they arrive.
      mesh: where the params live (default: one device).
      source_for: key -> `Source` (or a (read, nbytes) pair) for that param.
      show_progress: draw a byte progress bar.
      choices: the model's construction choices (compute_dtype, attention, remat).
      rows: allocate the vocabulary tables with this many rows (>= config.vocab_size); rows past
        the checkpoint are zero, for the expansion to initialise in place.
      fill: told of each table as soon as it is read (the tables are read first), then asked for
        {table path: (sorted ids, [k, D] host rows)}, written into the tables' host buffers before
        they become the final arrays (see `Fill`).

    Returns:
      The `Llama`, with `config.vocab_size == rows or config.vocab_size`.

    Example:
      >>> model = build(config, np.float32, mesh, lambda key: Source(reader(key), nbytes(key)), False)
    """
    mesh = mesh or single_device_mesh()
    dtype = np.dtype(dtype)
    stored_rows = config.vocab_size
    rows = stored_rows if rows is None else rows
    if rows < stored_rows:
        raise UsageError(f"rows={rows}: the checkpoint has {stored_rows} vocabulary rows; give at least that many")
    final = config.replace(vocab_size=rows, dtype=dtype.name)
    model = nnx.eval_shape(lambda: Llama(final, param_dtype=jnp.dtype(dtype), **(choices or {})))
    param_keys = keys.keys_for(config)
    if fill is not None:  # the tables first: `fill` starts on them while the layers are read
        param_keys.sort(key=_fill_order)
    sources = {k: Source(*source_for(k)) for k in param_keys}
    total = sum(s.nbytes for s in sources.values())
    kept = {path: {} for path in TABLES} if fill is not None else None
    with progress(total=total, desc="loading", unit="B", unit_scale=True, disable=not show_progress) as bar:
        for key in param_keys:
            read = sources[key].read
            if rows != stored_rows and key.path in TABLES:
                read = _zero_rows_past(read, stored_rows, dtype)
            shape = keys.param_shape(key, final)
            sharding = sharding_for(shape, keys.logical_axes(key), mesh)
            callback = _device_slice(read, shape, dtype)
            if kept is not None and key.path in TABLES:
                callback = _keeping(callback, kept[key.path], shape)
            keys.get_param(model, key).set_value(jax.make_array_from_callback(shape, sharding, callback))
            bar.update(sources[key].nbytes)
            if fill is not None and key.path in TABLES:
                buffers = kept[key.path]
                fill.table_read(model, key.path, next(iter(buffers.values())) if len(buffers) == 1 else None)
    if fill is not None:
        _write_rows(model, fill.rows(model), kept)
    return model


class Fill(Protocol):
    """Rows written into the vocabulary tables before they become final (`vocab_load.load_expanded`)."""

    def table_read(self, model: Llama, path: tuple[str, ...], whole: np.ndarray | None) -> None:
        """Called as each table is read (the tables are read first, an untied head before the
        embedding, so work started here runs while the rest loads); `whole` is its one host buffer
        (one device, or replicated), else None."""

    def rows(self, model: Llama) -> dict:
        """Called once everything is read: {table path: (sorted ids, [k, D] rows)} to write."""


def _bounds(idx, shape) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in _full(idx, shape))


def _keeping(callback, buffers: dict, shape):
    """The callback, recording each device slice's host buffer (one per distinct slice)."""

    def keep(idx):
        bounds = _bounds(idx, shape)
        if bounds not in buffers:  # a replica of a slice already read shares its buffer
            buf = callback(idx)
            # never the caller's input: every reader returns its own copy
            buffers[bounds] = buf if buf.flags.writeable else buf.copy()
        return buffers[bounds]

    return keep


def _write_rows(model: Llama, writes: dict, kept: dict) -> None:
    """Write each table's planned rows into the host buffers it was made from, then make the final
    array from the same buffers. On CPU the arrays borrow those buffers, so writing k rows costs
    k rows: XLA would copy a borrowed table to update it (a full pass per table)."""
    for path, (ids, rows) in writes.items():
        param = getattr(model, path[0])
        old = param.get_value()
        shape, sharding, buffers = old.shape, old.sharding, kept[path]
        release(old)
        for (row_lo, row_hi), (col_lo, col_hi) in buffers:
            sel = (ids >= row_lo) & (ids < row_hi)
            if sel.any():
                buffers[(row_lo, row_hi), (col_lo, col_hi)][ids[sel] - row_lo] = rows[sel, col_lo:col_hi]
        param.set_value(jax.make_array_from_callback(shape, sharding, functools.partial(_kept, buffers, shape)))


def _kept(buffers: dict, shape, idx) -> np.ndarray:
    return buffers[_bounds(idx, shape)]


TABLES = (("embed",), ("lm_head",))


def _fill_order(key: keys.Key) -> int:
    """Read order with a `Fill`: an untied head, then the embedding, then the layers (stable). The
    head's statistics take longest (they also fingerprint its rows), so they start first and run
    while the embedding is read: 8B shapes, 1 layer, wait after the last read 0.22 -> 0.14 s."""
    return {("lm_head",): 0, ("embed",): 1}.get(key.path, 2)


def _device_slice(read, shape, dtype):
    """The callback of one param: full slices in, a finite-checked host array of `dtype` out."""

    def callback(idx):
        return finite.observe(_as_dtype(read(_full(idx, shape)), dtype))

    return callback


def _zero_rows_past(read, stored_rows: int, dtype):
    """A table reader over more rows than the checkpoint holds: rows >= stored_rows are zeros."""

    def read_grown(idx: tuple[slice, ...]) -> np.ndarray:
        r, rest = idx[0], idx[1:]
        if r.stop <= stored_rows:
            return read(idx)
        out = aligned_empty((r.stop - r.start, *(s.stop - s.start for s in rest)), dtype)
        kept = max(0, min(r.stop, stored_rows) - r.start)
        if kept:
            part = slice(r.start, r.start + kept), *rest
            got = read(part, out=out[:kept]) if _takes_out(read) else read(part)
            if got is not None and got.base is not out and got is not out:
                out[:kept] = got  # a reader that cannot fill the caller's buffer (other dtype, Meta)
        out[kept:] = 0
        return out

    return read_grown


def _takes_out(read) -> bool:
    """Whether a reader fills a caller's buffer (`read(idx, out=...)`), saving a table-sized copy."""
    try:
        return "out" in inspect.signature(read).parameters
    except (TypeError, ValueError):
        return False


def _as_dtype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast into an aligned buffer, so the cast copy is also the device array's memory on CPU."""
    if a.dtype == dtype:
        return a
    out = aligned_empty(a.shape, dtype)
    out[...] = a
    return out


def _full(idx, shape) -> tuple[slice, ...]:
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape, strict=True))
