"""Refuse weights holding NaN or Inf at load time, in one jitted pass over the whole tree.

A single non-finite value poisons everything downstream silently: a mean init copies it into every
new row, a probe reports a tiny KL for NaN rows, an export publishes it. One compiled function for
the whole parameter dict (not one per shape) reduces each param along its leading axis (rows of a
table, layers of a stacked param), so the error can name where the first bad value sits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvocab.errors import CheckpointError
from jaxvocab.io import keys as K


@jax.jit
def _finite_along_axis0(tree: dict) -> dict:
    return {name: jnp.all(jnp.isfinite(v), axis=tuple(range(1, v.ndim))) for name, v in tree.items()}


def check_finite(model, where) -> None:
    """CheckpointError naming the first param (and row / layer) that holds NaN or Inf."""
    keys = K.keys_for(model.config)
    tree = {"/".join(k.path): K.get_param(model, k)[...] for k in keys}
    ok = jax.device_get(_finite_along_axis0(tree))
    for k in keys:
        name = "/".join(k.path)
        bad = np.nonzero(~np.asarray(ok[name]))[0]
        if bad.size:
            unit = "layer" if k.layered else ("row" if len(K.param_shape(k, model.config)) == 2 else "index")
            raise CheckpointError(f"{where}: {name} holds NaN or Inf ({bad.size} {unit}(s), first {unit} "
                                  f"{int(bad[0])}); the checkpoint is corrupt: re-create or re-download it, or "
                                  "pass --allow-nonfinite (allow_nonfinite=True) to load it anyway")
