"""The MLP over long sequences in chunks of tokens ("mini-sequence" training, MsT, arXiv 2407.15892).

An MLP acts on every token alone, so running it over the sequence in chunks changes no value, only
what is alive at once: the [B, T, intermediate] gate/up activations (and their gradients, held in
f32 where XLA's CPU backend upcasts bf16 matmuls) become [B, chunk, intermediate]. At T = 16k on
Llama-3.2-1B shapes those are 512 MB each and dominate a remat step's memory once attention is
linear in T. Each chunk runs under `jax.checkpoint`, so the backward pass recomputes one chunk's
activations at a time instead of keeping all of them.

Above CHUNK_ELEMENTS = B x T x intermediate elements per activation only: below it one chunk is the
whole sequence and nothing changes. Weight gradients then sum over chunks in the weights' dtype
(JAX's scan transpose accumulates in the closed-over value's dtype): in f32 for f32 weights, one
rounding per chunk for bf16 ones. Not used with LoRA dropout, whose random mask depends on the
shape it is drawn for.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

CHUNK_ELEMENTS = 1 << 23  # B x tokens x intermediate per chunk: 32 MB of f32


def chunks(batch: int, tokens: int, intermediate: int) -> int:
    """How many sequence chunks the MLP runs in (1: the whole sequence at once).

    Args:
      batch, tokens, intermediate: B, T and the MLP's intermediate width.
    Returns:
      ceil(B x T x intermediate / CHUNK_ELEMENTS), at most T.
    Example:
      >>> chunks(1, 16384, 8192)  # Llama-3.2-1B at 16k: sixteen chunks of 1024 tokens
      16
    """
    return max(1, min(tokens, -(-batch * tokens * intermediate // CHUNK_ELEMENTS)))


def sequence_chunked(fn: Callable[[jax.Array], jax.Array], x: jax.Array, intermediate: int) -> jax.Array:
    """`fn(x)` for a per-token `fn` [B, t, D] -> [B, t, D'], run over the sequence in chunks.

    Args:
      fn: the MLP; must treat every token independently (no dropout drawn over the whole shape).
      x: [B, T, D] input.
      intermediate: fn's widest hidden size, which sets the chunk count (`chunks`).
    Returns:
      [B, T, D'] equal to `fn(x)` token for token.
    Example:
      >>> y = sequence_chunked(lambda t: mlp(w, t), x, config.intermediate_size)
    """
    B, T, D = x.shape
    n = chunks(B, T, intermediate)
    if n == 1:
        return fn(x)
    c = -(-T // n)
    xs = jnp.pad(x, ((0, 0), (0, n * c - T), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    ys = jax.lax.map(jax.checkpoint(fn), xs)  # zero padding rows: outputs sliced off, zero cotangent
    return ys.swapaxes(0, 1).reshape(B, n * c, ys.shape[-1])[:, :T]
