"""Row statistics, untrained-row detection and new-row initialisation, jitted on the table's mesh.

Every statistic is taken in f32 over the *trained* rows only: Llama-3 base releases carry hundreds
of all-zero reserved rows, and letting them into a mean pulls every new row towards zero (whose
logit, against Llama's mostly negative logits, is among the largest). The embedding and the head
are separate tables with separate statistics; a tied model has one.

The mean is summed in fixed blocks whose partial sums are gathered before the last add, so it is
bit-identical on one device and on any mesh whose vocab axis divides the block count: an expanded
checkpoint does not depend on the machine that expanded it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab.model import TABLE_AXES
from jaxvocab.sharding import sharding_for

INITS = ("mean", "mean-noise", "covariance", "subword", "random", "zeros")
NOISE_SCALE = 0.1  # mean-noise: mean + NOISE_SCALE * per-dim std * N(0, 1): distinct rows, still mean-like logits
COV_SCALE = 1e-5  # covariance: N(mu, COV_SCALE * Sigma), Hewitt's choice: distinct rows, mean-like logits
RANDOM_STD = 0.02  # random: N(0, 0.02^2), HF's initializer_range; an ablation, not a recommendation
_JITTER = 1e-6  # relative diagonal jitter before the Cholesky factorisation of Sigma
_MAX_BLOCKS = 128  # see _blocks
_GEMM_ROWS = 2  # mask rows per block product (see masked_mean)
REL_EPS = 1e-3  # a row is untrained when max|x| <= REL_EPS * (median row max |x|)


def _blocks(rows: int) -> int:
    """Row blocks of the mean: the largest divisor of `rows` up to 128. Few, large blocks keep the
    block products fast; the sum is bit-identical across meshes whose vocab axis divides the
    block count (any power of two up to 128 that divides the rows, e.g. 128256 = 128 x 1002)."""
    return max(b for b in range(1, _MAX_BLOCKS + 1) if rows % b == 0)


def masked_mean(values, mask, mesh: Mesh):
    """f32 mean over the rows where `mask` holds, in a sharding-independent summation order.

    Each block of rows is summed where it lives, as a small matrix product (mask rows x block):
    XLA:CPU then accumulates bf16 tables in f32 without first converting the whole table to f32,
    which a plain reduction over rows (or a single mask row, a GEMV) does. The block sums are
    then replicated (the optimisation barrier stops XLA from turning gather-then-sum back into a
    sharded reduction) and added in one fixed order on every device.
    """
    parts = _block_sums(values, mask, mesh)
    # 0 x NaN is NaN: a non-finite row outside the mask poisons the product. Only then (the sums
    # show it) pay for zeroing the excluded rows first; their values never enter the mean.
    parts = jax.lax.cond(
        jnp.all(jnp.isfinite(parts)),
        lambda: parts,
        lambda: _block_sums(jnp.where(mask[:, None], values, jnp.zeros((), values.dtype)), mask, mesh),
    )
    return parts.sum(axis=0) / jnp.maximum(mask.sum(), 1).astype(jnp.float32)


def _block_sums(values, mask, mesh):
    v, d = values.shape
    b = _blocks(v)
    rows = jnp.broadcast_to(mask.reshape(b, 1, v // b).astype(values.dtype), (b, _GEMM_ROWS, v // b))
    parts = jnp.einsum(
        "bkr,brd->bkd",
        rows,
        values.reshape(b, v // b, d),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )[:, 0]
    parts = jax.lax.with_sharding_constraint(parts, NamedSharding(mesh, P()))
    return jax.lax.optimization_barrier(parts)


def covariance(table, mask, mu):
    """Sigma = (X - mu)^T (X - mu) / n over trained rows, contracted over the sharded vocab axis in f32."""
    xc = jnp.where(mask[:, None], table.astype(jnp.float32) - mu, 0.0)
    n = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    return jnp.einsum("vd,ve->de", xc, xc, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32) / n


def _sample_gaussian(key, mu, sigma, k):
    """k rows ~ N(mu, sigma): Cholesky with a small jitter, eigendecomposition if that still fails."""
    d = mu.shape[0]
    jitter = _JITTER * jnp.maximum(jnp.trace(sigma) / d, 1e-30)
    sigma = sigma + jitter * jnp.eye(d, dtype=jnp.float32)
    chol = jnp.linalg.cholesky(sigma)

    def from_eigh(_):
        w, v = jnp.linalg.eigh(sigma)
        return v * jnp.sqrt(jnp.clip(w, 0.0))[None, :]

    factor = jax.lax.cond(jnp.any(jnp.isnan(chol)), from_eigh, lambda _: chol, None)
    z = jax.random.normal(key, (k, d), jnp.float32)
    return mu + jnp.einsum("kd,ed->ke", z, factor, precision=jax.lax.Precision.HIGHEST)


def new_rows(table, trained, key, sub_idx, sub_w, sub_ok, *, method: str, k: int, mesh: Mesh):
    """[k, D] rows for one table, in f32.

    sub_idx/sub_w [k, L]: the rows and weights (1/len, 0 for padding) of each new token's own
    tokenization; sub_ok [k]: whether that token has one (others take the mean).
    """
    d = table.shape[1]
    if method == "zeros":
        return jnp.zeros((k, d), jnp.float32)
    if method == "random":
        return RANDOM_STD * jax.random.normal(key, (k, d), jnp.float32)
    mu = masked_mean(table, trained, mesh)
    if method == "mean":
        return jnp.broadcast_to(mu, (k, d))
    if method == "mean-noise":
        std = jnp.sqrt(masked_mean(jnp.square(table.astype(jnp.float32) - mu), trained, mesh))
        return mu + NOISE_SCALE * std * jax.random.normal(key, (k, d), jnp.float32)
    if method == "covariance":
        return _sample_gaussian(key, mu, COV_SCALE * covariance(table, trained, mu), k)
    if method == "subword":
        picked = table[sub_idx].astype(jnp.float32)  # [k, L, D]
        avg = jnp.einsum("kld,kl->kd", picked, sub_w, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(sub_ok[:, None], avg, mu)
    raise ValueError(f"unknown init {method!r}")


@functools.lru_cache(maxsize=64)
def _expander(method: str, k: int, old_vocab: int, new_vocab: int, out_sharding: NamedSharding, donate: bool = True):
    mesh = out_sharding.mesh

    def expand(table, trained, source, key, sub_idx, sub_w, sub_ok):
        rows = new_rows(table, trained, key, sub_idx, sub_w, sub_ok, method=method, k=k, mesh=mesh)
        rows = rows.astype(table.dtype)
        d = table.shape[1]
        grown = table
        if new_vocab > old_vocab:
            grown = jnp.concatenate([table, jnp.zeros((new_vocab - old_vocab, d), table.dtype)], axis=0)
        # A select, not a scatter: XLA:CPU runs a bf16 scatter by converting the whole table to
        # f32 and back (3x its memory); this gather + select fuses into one pass over the output.
        return jnp.where((source >= 0)[:, None], rows[jnp.maximum(source, 0)], grown)

    # Same shape (reserved slots only, untrained fixes): the old table is donated and updated in
    # place. A grown table cannot reuse the old buffer, so peak memory is the old table plus the
    # new one; the caller deletes the old one right after.
    return jax.jit(expand, out_shardings=out_sharding, donate_argnums=0 if donate and new_vocab == old_vocab else ())


def expand_table(
    table,
    trained: np.ndarray,
    target_ids: np.ndarray,
    key,
    subword,
    *,
    method: str,
    new_vocab: int,
    mesh: Mesh,
    donate: bool = True,
):
    """The table grown to `new_vocab` rows with `target_ids` (sorted) set by `method`; with `donate`
    the input is donated when the shape does not change. `subword` is (sub_idx, sub_w, sub_ok) as in
    `new_rows`."""
    out = sharding_for((new_vocab, table.shape[1]), TABLE_AXES, mesh)
    source = np.full(new_vocab, -1, np.int32)  # output row -> index of its new row, or -1
    source[np.asarray(target_ids, np.int64)] = np.arange(len(target_ids), dtype=np.int32)
    fn = _expander(method, len(target_ids), table.shape[0], new_vocab, out, donate)
    return fn(table, jnp.asarray(trained), jnp.asarray(source), key, *subword)


@functools.lru_cache(maxsize=64)
def _row_builder(method: str, k: int, mesh: Mesh):
    def build(table, trained, key, sub_idx, sub_w, sub_ok):
        return new_rows(table, trained, key, sub_idx, sub_w, sub_ok, method=method, k=k, mesh=mesh)

    return jax.jit(build)


def init_rows(table, trained: np.ndarray, key, subword, *, method: str, k: int, mesh: Mesh):
    """The [k, D] f32 rows `expand_table` would write, without growing anything (diagnostics, tests)."""
    return _row_builder(method, k, mesh)(table, jnp.asarray(trained), key, *subword)


def no_subword(k: int):
    return (np.zeros((k, 1), np.int32), np.zeros((k, 1), np.float32), np.zeros((k,), bool))


@jax.jit
def row_absmax(table):
    """Per-row max |x|: exact under any sharding (a max does not depend on the order)."""
    return jnp.max(jnp.abs(table.astype(jnp.float32)), axis=1)  # cast first: XLA:CPU is 10x slower the other way


@jax.jit
def row_fingerprint(table, probe):
    """[V, 2] projections: equal rows give equal fingerprints (candidates are then compared bit
    for bit). A separate jit from row_absmax: XLA:CPU fuses the two into one slow pass."""
    return jnp.einsum("vd,dk->vk", table, probe.astype(table.dtype), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ untrained rows
def tables(model) -> list:
    return [model.embed] if model.lm_head is None else [model.embed, model.lm_head]


def _exact_duplicates(table, small: np.ndarray, fingerprint: np.ndarray) -> np.ndarray:
    """Ids of rows bit-identical to another row (only candidates with equal fingerprints are fetched)."""
    keys = np.ascontiguousarray(fingerprint).view(np.dtype((np.void, fingerprint.dtype.itemsize * 2))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    cand = np.nonzero((counts[inverse] > 1) & ~small)[0]
    if cand.size == 0:
        return cand
    rows = np.asarray(jax.device_get(table[cand]))
    raw = rows.view(np.uint8).reshape(len(cand), -1)
    _, inv, cnt = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    return cand[cnt[inv.ravel()] > 1]


def untrained_mask(model, rel_eps: float = REL_EPS) -> np.ndarray:
    """[rows] bool over all rows: tiny or non-finite in the embedding or the head, or an exact duplicate of
    another head row (Llama-3.1 base repeats one non-zero head row over its reserved ids; the
    embedding rows of never-seen tokens stay tiny, so only the head needs the duplicate pass)."""
    probe = np.random.RandomState(0).standard_normal((model.config.hidden_size, 2)).astype(np.float32)
    out = np.zeros(model.config.vocab_size, bool)
    for p in tables(model):
        table = p.get_value()
        rowmax = np.asarray(row_absmax(table))
        finite = np.isfinite(rowmax)  # a NaN / Inf row is never trained (nor part of any mean)
        scale = np.median(rowmax[finite]) if finite.any() else 0.0  # 128k floats: the host sorts them in ms
        small = (rowmax <= rel_eps * scale) | ~finite
        out |= small
        if p is model.head_table:
            out[_exact_duplicates(table, small, np.asarray(row_fingerprint(table, probe)))] = True
    return out
