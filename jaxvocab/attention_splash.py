"""The `splash` implementation: JAX's own Pallas TPU splash-attention kernel, nothing hand-written.

GQA runs the kernel's multi-query form once per kv head (vmapped over batch and kv heads), so K/V
are never repeated. Our visibility rule maps onto splash's segment ids: keys with segment 0
(padding) get -1, which no query carries. Under a mesh context (`jax.set_mesh`) the kernel runs
under `shard_map`, batch split over (data, fsdp) and kv heads over tensor where they divide. On
CPU, tests run the same kernel with `interpret=True`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk,
)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from jaxvocab.attention import Mask, splash_unsupported
from jaxvocab.errors import UsageError

ALIGN = 128


def splash(q, k, v, mask: Mask, *, interpret: bool = False) -> jax.Array:
    """q [B, T, H, hd], k/v [B, S, KV, hd] -> [B, T, H, hd]."""
    reason = None if interpret else splash_unsupported(q, k, mask)
    if reason is None and mask.cache:
        reason = "the KV-cache decode step (its causal offset is dynamic)"
    if reason:
        raise UsageError(f"--attention splash: {reason}; use --attention chunked (or auto)")
    B, T, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    Tp, Sp = -(-T // ALIGN) * ALIGN, -(-S // ALIGN) * ALIGN
    qh = _pad(q * jnp.asarray(hd**-0.5, q.dtype), Tp).reshape(B, Tp, KV, H // KV, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = (_pad(x, Sp).transpose(0, 2, 1, 3) for x in (k, v))  # [B, KV, S, hd]
    q_seg = _pad(mask.q_seg, Tp)
    kv_seg = jnp.where(_pad(mask.kv_seg, Sp) == 0, -1, _pad(mask.kv_seg, Sp))
    kernel = _kernel(H // KV, Tp, Sp, interpret)
    run = partial(_run, kernel)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        b_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and B % mesh.shape[a] == 0)
        h_axis = "tensor" if "tensor" in mesh.axis_names and KV % mesh.shape["tensor"] == 0 else None
        spec = P(b_axes or None, h_axis)
        run = jax.shard_map(
            run, in_specs=(spec, spec, spec, P(b_axes or None), P(b_axes or None)), out_specs=spec, check_vma=False
        )
    out = run(qh, kh, vh, q_seg, kv_seg)  # [B, KV, G, Tp, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, hd)[:, :T]


def _pad(x, n: int):
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _kernel(G: int, T: int, S: int, interpret: bool):
    bq, bk = min(512, T), min(512, S)
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    heads = sm.MultiHeadMask([sm.CausalMask((T, S))] * G)
    return sk.make_splash_mqa(heads, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _run(kernel, q, k, v, q_seg, kv_seg):
    """Per batch row and kv head: q [G, T, hd] against k/v [S, hd]."""

    def row(q, k, v, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg))(q, k, v)

    return jax.vmap(row)(q, k, v, q_seg, kv_seg)
