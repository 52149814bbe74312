"""Next-token loss of a RowsModel without ever holding [B, T, V] logits or recomputing the head.

The head and the cross-entropy run over chunks of C positions (a scan along time, so chunks keep
the batch sharding). Each chunk is one `jax.custom_vjp`: its forward pass already forms
dlogits = w * (softmax - onehot) while the chunk's logits are live and contracts it into the
hidden-state gradient (through the frozen table and the head rows) and the head-row gradient.
Only those [B, C, D] and [k, D] residuals survive the chunk, so the backward pass is a scale by
the incoming cotangent: no stored logits, no second head projection. At a 128k vocabulary the
logits would otherwise dwarf every activation; against autodiff with per-chunk checkpointing this
saves one [B*T, D] x [D, V] matmul per step.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvocab.rows import head_logits
from train.data import Batch

# f32 logits per chunk (32 MiB: at 135M / B=4 / T=256 the step compiles 68 MB less temp memory than
# with 64 MiB, at the same speed; 16 MiB saves 16 MB more but is ~5% slower).
LOSS_CHUNK_BYTES = 1 << 25


def chunk_len(batch: int, seq: int, vocab: int) -> int:
    """Positions per chunk: a power of two within LOSS_CHUNK_BYTES of logits, in [16, seq]."""
    c = max(LOSS_CHUNK_BYTES // (4 * vocab * batch), 1)
    return min(max(1 << (c.bit_length() - 1), 16), seq)


def nll_sums(logits, targets, weights):
    """(sum of weighted next-token NLL, sum of weights), in f32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll * weights), jnp.sum(weights)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_nll(dtype, h, rows, table, ids, targets, weights):
    """(NLL sum, weight sum) of one chunk; differentiable in h and rows (the head rows or None)."""
    return nll_sums(head_logits(h, table, rows, ids, dtype), targets, weights)


def _chunk_fwd(dtype, h, rows, table, ids, targets, weights):
    logits = head_logits(h, table, rows, ids, dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    sums = (jnp.sum((lse - picked) * weights), jnp.sum(weights))
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d = (jnp.exp(logits - lse[..., None]) - onehot) * weights[..., None]  # d sum / d logits
    cast = lambda x: x.astype(dtype)  # noqa: E731
    if rows is None:
        dh = jnp.einsum("bcv,vd->bcd", cast(d), cast(table), preferred_element_type=jnp.float32)
        return sums, (cast(dh), None)
    from_table = jnp.ones(table.shape[0], bool).at[ids].set(False)
    d_rows = d[..., ids]
    dh = jnp.einsum(
        "bcv,vd->bcd", cast(jnp.where(from_table, d, 0.0)), cast(table), preferred_element_type=jnp.float32
    ) + jnp.einsum("bck,kd->bcd", cast(d_rows), cast(rows.astype(table.dtype)), preferred_element_type=jnp.float32)
    d_head_rows = jnp.einsum("bck,bcd->kd", cast(d_rows), h, preferred_element_type=jnp.float32)
    return sums, (cast(dh), d_head_rows)


def _chunk_bwd(dtype, res, g):
    dh, d_rows = res
    scale = g[0]  # only the NLL sum carries gradient; the weight sum does not depend on the inputs
    return (dh * scale.astype(dh.dtype), None if d_rows is None else d_rows * scale, None, None, None, None)


chunk_nll.defvjp(_chunk_fwd, _chunk_bwd)


def _by_chunk(x, C: int):
    """[B, T, ...] -> [T/C, B, C, ...] (T padded with zeros: zero weight, no loss)."""
    B, T = x.shape[:2]
    n = -(-T // C)
    x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(B, n, C, *x.shape[2:]).swapaxes(0, 1)


def _chunks(model, mb: Batch, dropout_key=None, remat=None):
    h, _ = model.hidden(mb.inputs, segment_ids=mb.segments, dropout_key=dropout_key, remat=remat)
    B, T, _ = h.shape
    C = chunk_len(B, T, model.config.vocab_size)
    return _by_chunk(h, C), _by_chunk(mb.targets, C), _by_chunk(mb.weights, C)


def _scan_sum(fn, xs, n_out: int):
    def body(acc, x):
        return tuple(a + b for a, b in zip(acc, fn(*x), strict=True)), None

    sums, _ = jax.lax.scan(body, (jnp.float32(0),) * n_out, xs)
    return sums


def token_sums(graphdef, params, frozen, mb: Batch, dropout_key=None, remat=None):
    """(NLL sum, target count) of one micro-batch [B, T]: the differentiable training loss
    (`dropout_key`: the adapters' dropout, when they have any; `remat`: overrides the model's)."""
    model = nnx.merge(graphdef, params, frozen)
    rows = model.head_param
    rows = None if rows is None else rows[...]
    table, ids, dtype = model.head_table[...], model.ids[...], jnp.dtype(model.compute_dtype)
    return _scan_sum(
        lambda h, t, w: chunk_nll(dtype, h, rows, table, ids, t, w), _chunks(model, mb, dropout_key, remat), 2
    )


def eval_sums(graphdef, params, frozen, mb: Batch, is_new):
    """(NLL sum, target count, argmax hits on new-id targets, new-id targets, NLL sum on new-id targets)
    of one micro-batch."""
    model = nnx.merge(graphdef, params, frozen)

    def chunk(h, t, w):
        logits = model.logits(h)
        on_new = (w > 0) & is_new[t]
        hits = (jnp.argmax(logits, axis=-1) == t) & on_new
        new_nll, _ = nll_sums(logits, t, on_new.astype(jnp.float32))
        return nll_sums(logits, t, w) + (jnp.sum(hits, dtype=jnp.float32), jnp.sum(on_new, dtype=jnp.float32), new_nll)

    return _scan_sum(chunk, _chunks(model, mb), 5)
