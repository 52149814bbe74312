"""Memory as a budget: size checks before allocating (an absurd but well-formed request fails in
milliseconds with a one-line error, not minutes into an allocation the machine cannot hold), and
freeing a consumed table before the next allocation."""

from __future__ import annotations

import gc
import os
import time

from jaxvocab.errors import UsageError


def available_bytes(mesh) -> int:
    """Memory the mesh's devices can hold in all: accelerators report a limit; CPU devices share
    the host's physical memory."""
    devices = list(mesh.devices.flat)
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # backends without memory stats
            stats = {}
        limits.append(stats.get("bytes_limit"))
    if all(limits) and devices and devices[0].platform != "cpu":
        return int(sum(limits))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(extra_bytes: int, mesh, what: str, fix: str) -> None:
    """UsageError when `extra_bytes` more would exceed what the mesh can hold."""
    have = available_bytes(mesh)
    if extra_bytes > have:
        raise UsageError(
            f"{what} needs {extra_bytes / 2**30:.1f} GiB more memory but the devices hold "
            f"{have / 2**30:.1f} GiB in all; {fix}"
        )


_RELEASE_POLLS = 5  # young-generation collections, 2 ms apart, after a table is deleted (see release)


def release(table) -> None:
    """Free a consumed table before the next one is made, whoever still holds the array.

    On CPU a loaded table borrows the loader's host buffer. Deleting it only starts the release:
    once the kernel that read it lets go (on XLA's worker thread, just after the result is ready),
    jaxlib queues the host reference, and drops it the next time its garbage hook runs, which any
    young-generation collection does. No reference cycle is involved. Measured: with no
    collection, one bench run in three held the old table until the next one was built (peak
    5.06 GB against 4.00 GB); one collection straight after `delete` sometimes ran before the
    release was queued; a few, 2 ms apart, freed it in every run.
    """
    if not table.is_deleted():
        table.delete()
    for _ in range(_RELEASE_POLLS):
        gc.collect(0)
        time.sleep(0.002)
