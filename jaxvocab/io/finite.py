"""Refuse weights holding NaN or Inf at load time.

A single non-finite value poisons everything downstream silently: a mean init copies it into every
new row, a probe reports a tiny KL for NaN rows, an export publishes it. The HF and Meta readers
hand every host slice they read to `observe` (inside `scan_reads`), which tests it while it is
still in cache: a float is NaN or Inf exactly when its exponent bits are all ones, so a masked
integer max over small chunks decides it at memory speed (isfinite on bf16 converts to f32 first).
Where the reads were not all seen (orbax restores, several processes) or something was found,
one jitted pass over the whole tree (one compilation, not one per shape) names the param and row.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxvocab.errors import CheckpointError
from jaxvocab.io import keys

# A float is NaN or Inf exactly when its exponent bits are all ones. Testing the bits as unsigned
# integers (the max over the masked exponents equals the mask iff some value is non-finite) runs
# at memory speed on XLA:CPU, where isfinite on bf16 first converts every element to f32 (7x slower).
_EXPONENT = {2: (jnp.uint16, 0x7C00), 4: (jnp.uint32, 0x7F800000), 8: (jnp.uint64, 0x7FF0000000000000)}


def _finite_rows(v) -> jax.Array:
    axes = tuple(range(1, v.ndim))
    if v.dtype == jnp.bfloat16:
        uint, mask = jnp.uint16, 0x7F80
    elif v.dtype.itemsize in _EXPONENT and jnp.issubdtype(v.dtype, jnp.floating):
        uint, mask = _EXPONENT[v.dtype.itemsize]
    else:
        return jnp.all(jnp.isfinite(v), axis=axes)
    bits = jax.lax.bitcast_convert_type(v, uint) & jnp.asarray(mask, uint)
    return jnp.max(bits, axis=axes) != jnp.asarray(mask, uint)


_HOST_MASKS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}
_CHUNK = 1 << 18  # elements per step: the masked copy stays in cache


def has_nonfinite(a: np.ndarray) -> bool:
    """Whether host array `a` holds a NaN or Inf (floating dtypes; others are finite)."""
    dtype = np.dtype(a.dtype)
    if dtype.kind == "V" or dtype.name == "bfloat16":
        uint, mask = np.uint16, 0x7F80
    elif dtype in _HOST_MASKS:
        uint, mask = _HOST_MASKS[dtype]
    else:
        return False
    bits = np.ascontiguousarray(a).reshape(-1).view(uint)
    buf = np.empty(min(_CHUNK, bits.size), uint)
    for i in range(0, bits.size, _CHUNK):
        chunk = bits[i : i + _CHUNK]
        out = buf[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if out.max() == mask:
            return True
    return False


class _Scan:
    def __init__(self):
        self.seen, self.bad = 0, False


_SCAN: _Scan | None = None


@contextlib.contextmanager
def scan_reads():
    """Within: every slice a reader passes to `observe` is tested; yields the running verdict."""
    global _SCAN
    prev, _SCAN = _SCAN, _Scan()
    try:
        yield _SCAN
    finally:
        _SCAN = prev


def observe(a: np.ndarray) -> np.ndarray:
    """Test a host slice just read (no-op outside `scan_reads`); returns it."""
    scan = _SCAN
    if scan is not None:
        scan.seen += a.size
        if not scan.bad and a.size and has_nonfinite(a):
            scan.bad = True
    return a


def check_loaded(model, where, scan: _Scan) -> None:
    """After a load inside `scan_reads`: the full jitted check only where the scan cannot vouch."""
    total = sum(keys.get_param(model, k)[...].size for k in keys.keys_for(model.config))
    if scan.bad or scan.seen < total or jax.process_count() > 1:
        check_finite(model, where)


@jax.jit
def _finite_along_axis0(tree: dict) -> dict:
    return {name: _finite_rows(v) for name, v in tree.items()}


def check_finite(model, where) -> None:
    """CheckpointError naming the first param (and row / layer) that holds NaN or Inf."""
    param_keys = keys.keys_for(model.config)
    tree = {"/".join(k.path): keys.get_param(model, k)[...] for k in param_keys}
    ok = jax.device_get(_finite_along_axis0(tree))
    for k in param_keys:
        name = "/".join(k.path)
        bad = np.nonzero(~np.asarray(ok[name]))[0]
        if bad.size:
            unit = "layer" if k.layered else ("row" if len(keys.param_shape(k, model.config)) == 2 else "index")
            units = unit if bad.size == 1 else {"index": "indices"}.get(unit, unit + "s")
            raise CheckpointError(
                f"{where}: {name} holds NaN or Inf ({bad.size} {units}, first {unit} "
                f"{int(bad[0])}); the checkpoint is corrupt: re-create or re-download it, or "
                "pass --allow-nonfinite (allow_nonfinite=True) to load it anyway"
            )
