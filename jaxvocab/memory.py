"""Size checks before allocating: an absurd but well-formed request fails in milliseconds with a
one-line error, not minutes into an allocation the machine cannot hold."""

from __future__ import annotations

import os

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
