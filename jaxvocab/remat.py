"""Per-layer rematerialisation, chosen from the traced shapes when asked for `auto`.

Recomputing each layer in the backward pass costs one more forward (for a rows step, whose frozen
weights need no gradient, that is ~1.5x the step), so `auto` keeps activations whenever the
estimate of what the backward pass holds fits in REMAT_MEMORY_FRACTION of the device's memory
(CPU: the host's available RAM), and rematerialises only when it would not.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

REMATS = ("auto", "full", "none")
REMAT_MEMORY_FRACTION = 0.5


def use_remat(remat, config, B: int, T: int, S: int, dtype, attention: str) -> bool:
    """Whether to wrap each layer in jax.checkpoint (decided at trace time)."""
    if remat in (True, "full"):
        return True
    if remat in (False, "none"):
        return False
    return activation_bytes(config, B, T, S, dtype, attention) > REMAT_MEMORY_FRACTION * memory_bytes()


def activation_bytes(config, B: int, T: int, S: int, dtype, attention: str) -> int:
    """What autodiff keeps for the backward pass of all layers without remat: per layer about six
    [B, T, D]-sized and four [B, T, F]-sized residuals in the compute dtype, q/k/v and the attention
    output, plus, for the dense `xla` attention, f32 scores and compute-dtype probabilities [B, H, T, S]."""
    c = config
    e = jnp.dtype(dtype).itemsize
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_token = 6 * c.hidden_size + 4 * c.intermediate_size + 2 * H * hd + 2 * KV * hd
    attn = B * H * T * S * (4 + e) if attention == "xla" else B * T * H * 4  # chunked/fused keep an f32 lse
    return c.num_hidden_layers * (B * T * per_token * e + attn)


def memory_bytes() -> int:
    """The first device's memory limit; on CPU the host's available RAM."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_available_bytes()


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
