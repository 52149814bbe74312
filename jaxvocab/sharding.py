"""One mesh with axes (data, fsdp, tensor) and the rules that map parameter axes onto it.

Parameters carry *logical* axis names ("vocab", "embed", ...). Keeping the mapping in one table
means a model annotated once runs on a laptop (1 device), a CPU test mesh (2x4) or a TPU pod.
A dimension that its mesh axis does not divide is replicated instead of failing: tiny test
models and odd head counts still load, and the vocab is padded by `plan_vocab` so the big tables
always shard.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "rows": None,
    "seq": None,
}


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` >= n (vocab padding, decode buckets, Meta's FFN width)."""
    return -(-n // multiple) * multiple


def parse_mesh(spec: str | None, devices=None) -> Mesh:
    """Build the one (data, fsdp, tensor) mesh every placement in jaxvocab uses.

    Args:
        spec: e.g. "data=1,fsdp=2,tensor=4". Missing axes are 1; one axis may be -1 (the rest).
            None puts every device on fsdp.
        devices: defaults to all visible devices; the sizes must multiply to their count.
    Returns:
        A `jax.sharding.Mesh`; a bad spec raises a one-line UsageError naming `--mesh`.
    Example:
        >>> mesh = parse_mesh("fsdp=-1,tensor=4")   # 8 devices -> fsdp=2, tensor=4
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {a: 1 for a in MESH_AXES}
    given: set[str] = set()
    if spec:
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes or not value.strip().lstrip("-").isdigit():
                raise UsageError(
                    f"--mesh {spec!r}: expected e.g. 'data=1,fsdp=2,tensor=4' with axes {', '.join(MESH_AXES)}"
                )
            if name in given:
                raise UsageError(f"--mesh {spec!r}: axis {name!r} given twice; name each axis once")
            given.add(name)
            sizes[name] = int(value)
    else:
        sizes["fsdp"] = len(devices)
    free = [a for a, s in sizes.items() if s == -1]
    known = math.prod(s for s in sizes.values() if s != -1)
    if len(free) > 1 or known <= 0:
        raise UsageError(f"--mesh {spec!r}: at most one axis may be -1 and sizes must be positive")
    if free:
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise UsageError(
            f"--mesh {spec!r}: axis sizes multiply to {math.prod(sizes.values())} but {len(devices)} devices are visible; "
            "make the product equal the device count"
            + (
                " (on a CPU host, XLA_FLAGS=--xla_force_host_platform_device_count=N before the command makes N devices)"
                if devices[0].platform == "cpu"
                else ""
            )
        )
    return Mesh(np.array(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def single_device_mesh() -> Mesh:
    """The default placement: the first device, every axis of size 1."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)


def axis_size(mesh: Mesh, logical: str) -> int:
    target = RULES.get(logical)
    if target is None:
        return 1
    names = (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[n] for n in names)


def spec_for(shape, logical_axes, mesh: Mesh) -> P:
    """PartitionSpec for a tensor; axes the mesh does not divide stay replicated."""
    out = []
    for dim, name in zip(shape, logical_axes, strict=True):
        target = RULES.get(name) if name else None
        if target is not None and dim % axis_size(mesh, name) == 0:
            out.append(target)
        else:
            out.append(None)
    return P(*out)


def sharding_for(shape, logical_axes, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, logical_axes, mesh))
