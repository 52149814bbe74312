"""Rotary position embeddings, with Llama-3.1's frequency scaling.

The scaled frequencies follow transformers' `_compute_llama3_parameters` operation by operation in
float32, because a parity test at 512+ positions notices even last-bit differences in the angles.
Checkpoints in HF layout already have q/k permuted to "rotate half" form, so that is what we apply.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxvocab.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # numpy's float32 pow is 1 ulp off torch's for ~20% of Llama-3's frequencies; the float64 power
    # rounded once to float32 equals torch's bit for bit at every preset (tests/test_parity.py).
    power = (np.float64(config.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor = np.float32(rs.factor)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (
        (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
        / (rs.high_freq_factor - rs.low_freq_factor)
    ).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cos, sin) [B, T, 1, hd] in f32, computed once per forward pass: inside the layer scan XLA
    would fuse the cos/sin into every layer's q and k (per head, forward and backward), which was
    ~10% of a CPU rows step."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, H, hd]; cos, sin from `rope_angles`. Products in f32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
