"""New-row initialisation, jitted on the table's mesh: the rows a plan writes, and the grown tables.

Every statistic is taken in f32 over the *trained* rows only (row_stats.py finds them): Llama-3 base
releases carry hundreds of all-zero reserved rows, and letting them into a mean pulls every new row
towards zero (whose logit, against Llama's mostly negative logits, is among the largest). The
embedding and the head are separate tables with separate statistics; a tied model has one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab.model import TABLE_AXES
from jaxvocab.row_stats import masked_mean
from jaxvocab.sharding import sharding_for

INITS = ("mean", "mean-noise", "covariance", "subword", "random", "zeros")
NOISE_SCALE = 0.1  # mean-noise: mean + NOISE_SCALE * per-dim std * N(0, 1): distinct rows, still mean-like logits
COV_SCALE = 1e-5  # covariance: N(mu, COV_SCALE * Sigma), Hewitt's choice: distinct rows, mean-like logits
RANDOM_STD = 0.02  # random: N(0, 0.02^2), HF's initializer_range; an ablation, not a recommendation
_JITTER = 1e-6  # relative diagonal jitter before the Cholesky factorisation of Sigma
_MAX_RUNS = 32  # runs of consecutive target ids written as slice updates (more: one select pass)
_MAX_SUBTRACTED = 4096  # excluded rows a mean may subtract from the all-rows sums (see expand_table)


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

    Args:
      table: [V, D] table; trained: [V] bool rows the statistics come from; key: PRNG key.
      sub_idx, sub_w: [k, L] the rows and weights (1/len, 0 for padding) of each new token's own
        tokenization; sub_ok: [k] whether that token has one (others take the mean).
      method: one of INITS; k: rows to make; mesh: the table's mesh.

    Returns:
      [k, D] f32 rows.

    Example:
      >>> rows = new_rows(embed, trained, key, *no_subword(4), method="mean", k=4, mesh=mesh)
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


def _planned_rows(method: str, k: int, from_sums: bool, stat_rows: int, mesh: Mesh):
    """(table, trained, seed, n, subword..., sums, excluded) -> the [k, D] rows in the table's dtype."""

    def rows_of(table, trained, seed, n, sub_idx, sub_w, sub_ok, sums, excluded):
        key = jax.random.fold_in(jax.random.key(seed), n)  # inside the jit: no separate fold_in compile
        # Statistics over the checkpoint's rows only: a table loaded at its final size sums in
        # the same blocks, so it gets the same bits as one grown after loading. The slice is taken
        # only where a pass needs it (inside the fallback branch): cutting a table copies it.
        trained = trained[:stat_rows]

        def stats_table():
            return table if stat_rows == table.shape[0] else table[:stat_rows]

        if from_sums:
            total = sums.sum(axis=0) - jnp.sum(table[excluded].astype(jnp.float32), axis=0)
            mu = total / jnp.maximum(trained.sum(), 1).astype(jnp.float32)
            # A non-finite row (loaded with allow_nonfinite) poisons the all-rows sums: only then
            # pay for the masked pass, which keeps such rows out.
            mu = jax.lax.cond(jnp.all(jnp.isfinite(mu)), lambda: mu, lambda: masked_mean(stats_table(), trained, mesh))
            rows = jnp.broadcast_to(mu, (k, table.shape[1]))
        else:
            rows = new_rows(stats_table(), trained, key, sub_idx, sub_w, sub_ok, method=method, k=k, mesh=mesh)
        return rows.astype(table.dtype)

    return rows_of


@functools.lru_cache(maxsize=64)
def _expander(
    method: str,
    k: int,
    old_vocab: int,
    new_vocab: int,
    out_sharding: NamedSharding,
    from_sums: bool,
    runs: tuple | None,
    stat_rows: int,
    donate: bool = True,
):
    rows_of = _planned_rows(method, k, from_sums, stat_rows, out_sharding.mesh)

    def expand(table, trained, source, seed, n, sub_idx, sub_w, sub_ok, sums, excluded):
        rows = rows_of(table, trained, seed, n, sub_idx, sub_w, sub_ok, sums, excluded)
        grown = table
        if new_vocab > old_vocab:
            grown = jnp.concatenate([table, jnp.zeros((new_vocab - old_vocab, table.shape[1]), table.dtype)], axis=0)
        if runs is not None:
            # A few runs of consecutive ids (reserved slots, the appended block): one in-place
            # slice update each, so writing k rows costs k rows, not a pass over the table.
            # The update runs on the bits (an unsigned integer of the same width): XLA:CPU has no bf16
            # update, and its float normalisation would convert the whole table to f32 and back.
            bits = jnp.dtype(f"uint{8 * table.dtype.itemsize}")
            grown, rows = jax.lax.bitcast_convert_type(grown, bits), jax.lax.bitcast_convert_type(rows, bits)
            offset = 0
            for start, length in runs:
                grown = jax.lax.dynamic_update_slice_in_dim(grown, rows[offset : offset + length], start, axis=0)
                offset += length
            return jax.lax.bitcast_convert_type(grown, table.dtype)
        # Many scattered ids: a select, not a scatter (XLA:CPU runs a bf16 scatter by converting
        # the whole table to f32 and back); the gather + select fuses into one pass.
        return jnp.where((source >= 0)[:, None], rows[jnp.maximum(source, 0)], grown)

    # Same shape (reserved slots only, untrained fixes, a model loaded at its final size): with `donate`
    # the old table is donated and updated in place. A grown table cannot reuse the old buffer, so peak
    # memory is the old table plus the new one; the caller deletes the old one right after.
    return jax.jit(expand, out_shardings=out_sharding, donate_argnums=0 if donate and new_vocab == old_vocab else ())


@functools.lru_cache(maxsize=64)
def _rows_only(method: str, k: int, from_sums: bool, stat_rows: int, mesh: Mesh):
    return jax.jit(_planned_rows(method, k, from_sums, stat_rows, mesh), out_shardings=NamedSharding(mesh, P()))


def _statistics_args(table, trained, method: str, sums, summed_rows):
    """(from_sums, sums, excluded): a mean is taken from the all-rows `sums` minus the excluded rows
    while they are few (Llama-3: <= 256), which beats a second pass over the table."""
    excluded = np.nonzero(~np.asarray(trained)[: summed_rows or table.shape[0]])[0].astype(np.int32)
    from_sums = sums is not None and method == "mean" and len(excluded) <= _MAX_SUBTRACTED
    if not from_sums:
        sums, excluded = np.zeros((1, table.shape[1]), np.float32), np.zeros(0, np.int32)
    return from_sums, sums, excluded


def expand_table(
    table,
    trained: np.ndarray,
    target_ids: np.ndarray,
    seed: int,
    n: int,
    subword,
    *,
    method: str,
    new_vocab: int,
    mesh: Mesh,
    sums=None,
    summed_rows: int | None = None,
    donate: bool = True,
):
    """The table grown to `new_vocab` rows with `target_ids` (sorted) set by `method`.

    Args:
      table: [V, D] table; with `donate`, donated when the shape does not change.
      trained: [V] bool, the rows statistics are taken from.
      target_ids: sorted ids of the rows to write.
      seed, n: the random key is `fold_in(key(seed), n)` (n: the table's index in the model).
      subword: (sub_idx, sub_w, sub_ok) as in `new_rows`.
      method: one of INITS.
      new_vocab: rows of the result (>= V).
      mesh: the table's mesh.
      sums, summed_rows: `TableStats.sums` of this table and the rows they cover; with "mean", the
        mean is taken from them (no second pass over the table).
      donate: consume `table` when the shape does not change (False keeps it intact).

    Returns:
      The [new_vocab, D] table, sharded like the model's tables.

    Example:
      >>> embed = expand_table(embed, trained, np.arange(v, v + 8), 0, 0, no_subword(8), method="mean",
      ...                      new_vocab=v + 128, mesh=mesh)
    """
    out = sharding_for((new_vocab, table.shape[1]), TABLE_AXES, mesh)
    from_sums, sums, excluded = _statistics_args(table, trained, method, sums, summed_rows)
    ids = np.asarray(target_ids, np.int64)
    runs = _runs(ids)
    source = np.full(new_vocab if runs is None else 1, -1, np.int32)  # output row -> its new row, or -1
    if runs is None:
        source[ids] = np.arange(len(ids), dtype=np.int32)
    fn = _expander(
        method, len(ids), table.shape[0], new_vocab, out, from_sums, runs, summed_rows or table.shape[0], donate
    )
    return fn(table, trained, source, np.uint32(seed), np.uint32(n), *subword, sums, excluded)


def table_rows(
    table,
    trained: np.ndarray,
    k: int,
    seed: int,
    n: int,
    subword,
    *,
    method: str,
    mesh: Mesh,
    sums=None,
    summed_rows=None,
) -> np.ndarray:
    """The [k, D] rows (in the table's dtype, on the host) that `expand_table` writes, bit for bit,
    for a caller that places them itself (`load_expanded` writes them into the loader's buffers).
    Args as `expand_table`. Example:

      >>> rows = table_rows(embed, trained, 8, 0, 0, no_subword(8), method="mean", mesh=mesh)
    """
    from_sums, sums, excluded = _statistics_args(table, trained, method, sums, summed_rows)
    fn = _rows_only(method, k, from_sums, summed_rows or table.shape[0], mesh)
    return np.asarray(fn(table, trained, np.uint32(seed), np.uint32(n), *subword, sums, excluded))


def _runs(ids: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Sorted ids as (start, length) runs of consecutive ids; None when there are more than _MAX_RUNS."""
    if ids.size == 0:
        return ()
    breaks = np.nonzero(np.diff(ids) != 1)[0] + 1
    if len(breaks) >= _MAX_RUNS:
        return None
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [ids.size]]))
    return tuple((int(ids[s]), int(n)) for s, n in zip(starts, lengths, strict=True))


@functools.lru_cache(maxsize=64)
def _row_builder(method: str, k: int, mesh: Mesh):
    def build(table, trained, key, sub_idx, sub_w, sub_ok):
        return new_rows(table, trained, key, sub_idx, sub_w, sub_ok, method=method, k=k, mesh=mesh)

    return jax.jit(build)


def init_rows(table, trained: np.ndarray, key, subword, *, method: str, k: int, mesh: Mesh):
    """The [k, D] f32 rows `expand_table` would write, without growing anything (diagnostics, tests).
    Args as `new_rows`, with `subword` = (sub_idx, sub_w, sub_ok). Example:

      >>> rows = init_rows(embed, trained, jax.random.key(0), no_subword(4), method="mean", k=4, mesh=mesh)
    """
    return _row_builder(method, k, mesh)(table, jnp.asarray(trained), key, *subword)


def no_subword(k: int):
    return (np.zeros((k, 1), np.int32), np.zeros((k, 1), np.float32), np.zeros((k,), bool))
