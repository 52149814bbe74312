"""Writing one output dir from many processes: one temp dir, process 0 renames, everyone waits.

On one process this is `atomic_dir`. On several, process 0 creates the temp sibling and publishes
its name through the coordination service's key-value store; every process writes its part
(orbax writes its own shards; `save_hf` gathers tensor by tensor and only process 0 writes);
a barrier; process 0 renames the dir into place; a barrier, so no process returns before the
output exists. Calls must happen in the same order on every process, like any collective.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import jax
import numpy as np

from jaxvocab.io.atomic import atomic_dir, check_output

_calls = itertools.count()
BARRIER_MS = 3_600_000  # a dead peer is caught by the CLI's watchdog, not by this timeout


def is_main() -> bool:
    return jax.process_index() == 0


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        _client().wait_at_barrier(f"jaxvocab/{name}", BARRIER_MS)


@contextlib.contextmanager
def shared_atomic_dir(out, overwrite: bool = False):
    """`atomic_dir` for a job of one or many processes; yields the temp dir every process writes into."""
    if jax.process_count() == 1:
        with atomic_dir(out, overwrite) as tmp:
            yield tmp
        return
    out = Path(out)
    key = f"atomic/{next(_calls)}"
    check_output(out, overwrite)
    barrier(f"{key}/checked")  # nobody may see the output process 0 is about to create
    if is_main():
        ctx = atomic_dir(out, overwrite)
        tmp = ctx.__enter__()
        _client().key_value_set(f"jaxvocab/{key}", str(tmp))
    else:
        ctx, tmp = None, Path(_client().blocking_key_value_get(f"jaxvocab/{key}", BARRIER_MS))
    try:
        yield tmp
        barrier(f"{key}/written")
    except BaseException as e:
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        raise
    if ctx is not None:
        ctx.__exit__(None, None, None)
    barrier(f"{key}/renamed")


def to_host(arr) -> np.ndarray:
    """One array's full value on this host; gathered across processes when it spans several."""
    if getattr(arr, "is_fully_addressable", True):
        return np.asarray(jax.device_get(arr))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


def gather_only(path, entries, produce, metadata=None) -> int:
    """`write_file`'s part in a process other than 0: take part in each tensor's gather, write nothing."""
    total = 0
    for name, dtype, shape in entries:
        produce(name)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total
