"""One attention entry point for training, evaluation, prefill and the KV-cache decode step.

Which keys a query sees is described without a [T, S] mask: every query and every key carries a
segment id and a slot position, and query i sees key j when
    kv_seg[j] != 0  and  q_seg[i] == kv_seg[j]  and  kv_pos[j] <= q_pos[i].
Padding is segment 0 on the key side, packed documents are different segments, the cache is slot
positions offset by the cache index. Each implementation turns that into what it can use:

- `xla`: scores [B, KV, G, T, S] in f32 and a dense mask; the reference, fastest for short T.
- `chunked`: blockwise online softmax with a custom VJP that recomputes blocks (FlashAttention-2's
  backward, as levanter's `flash_attention` does): activation memory O(T) forward and backward.
  Forward and backward skip (`lax.cond`) blocks no query of the batch can see (causal upper
  triangle, other documents, padding); block masks are built inside the loop from the positions
  and segment ids (see `_forward` for why they pass an optimization barrier). Written here because
  JAX ships no portable memory-linear attention (its Pallas kernels are TPU/GPU only).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`; plain causal batches only (it
  takes no segment ids and no cache offset), bf16/fp16 on an NVIDIA GPU.
- `splash`: JAX's Pallas TPU splash kernel (`attention_splash.py`), segment ids as its own.
- `auto`: splash on TPU, cudnn on GPU where supported, else xla below AUTO_CHUNKED_FROM keys and
  chunked from there.
GQA never repeats K/V: queries are viewed as [B, T, KV, G, hd] against K/V [B, S, KV, hd].
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxvocab.errors import UsageError

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
# auto: xla below this many keys, chunked from here. Measured (bench/attention.py, CPU, jit(grad) of
# a 2-layer 135M-shaped model, chunked / xla step time, quiet machine): 0.98x at 256, 1.02x at 512,
# 0.92x at 1024, 0.85x at 2048; chunked also needs less memory from 1024 on.
AUTO_CHUNKED_FROM = 1024
BLOCK = 512
_NEG = -1e30  # masked score: finite, so no inf - inf anywhere in the online softmax


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_seg", "kv_seg", "q_pos", "kv_pos"],
    meta_fields=["segments", "padding", "cache"],
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Per-token segment ids and slot positions ([B, T] for queries, [B, S] for keys), plus what
    built them (static, so implementations can refuse what they cannot express)."""

    q_seg: jax.Array
    kv_seg: jax.Array
    q_pos: jax.Array
    kv_pos: jax.Array
    segments: bool = False
    padding: bool = False
    cache: bool = False

    def dense(self) -> jax.Array:
        """[B, 1, 1, T, S] bool: only for the xla path (and tests)."""
        return _visible(self.q_seg, self.q_pos, self.kv_seg, self.kv_pos)[:, None, None]


def make_mask(B: int, T: int, attention_mask=None, segment_ids=None, cache_valid=None, cache_index=None) -> Mask:
    """The model's arguments -> Mask; no [T, S] array is built.

    Args:
      B, T: batch and query length.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (keys only: a padding query sees nothing).
      segment_ids: [B, T] packed-document ids; 0 marks padding.
      cache_valid, cache_index: the KV cache's [B, S] valid slots (already holding the new tokens)
        and the slot of the first new token.
    Returns:
      A Mask of per-token segment ids and positions.
    Example:
      >>> mask = make_mask(2, 512, segment_ids=docs)  # packed rows: documents never see each other
    """
    q_seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if cache_valid is not None:
        S = cache_valid.shape[1]
        q_pos = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        return Mask(q_seg, cache_valid.astype(jnp.int32), q_pos, kv_pos, segment_ids is not None, True, True)
    kv_seg = q_seg if attention_mask is None else q_seg * attention_mask.astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return Mask(q_seg, kv_seg, pos, pos, segment_ids is not None, attention_mask is not None, False)


def _visible(qs, qp, ks, kp):
    return (ks[:, None, :] != 0) & (qs[:, :, None] == ks[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])


def attend(q, k, v, mask: Mask, implementation: str = "auto") -> jax.Array:
    """The one attention entry point: training, evaluation, prefill and the decode step.

    Args:
      q: [B, T, H, hd] queries; k, v: [B, S, KV, hd] keys and values (H a multiple of KV: GQA).
      mask: which keys each query sees (`make_mask`).
      implementation: auto | xla | chunked | cudnn | splash (`choose` resolves auto).
    Returns:
      [B, T, H, hd] in q's dtype (softmax in f32); 0 for a query that sees no key.
    Example:
      >>> out = attend(q, k, v, make_mask(B, T), "chunked")
    """
    impl = choose(implementation, q, k, mask)
    if impl == "xla":
        return xla(q, k, v, mask)
    if impl == "chunked":
        return chunked(q, k, v, mask)
    if impl == "cudnn":
        return cudnn(q, k, v, mask)
    from jaxvocab import attention_splash

    return attention_splash.splash(q, k, v, mask)


def choose(implementation: str, q, k, mask: Mask) -> str:
    """The implementation `auto` resolves to for these traced shapes (others: checked, passed through).

    Args:
      implementation: one of IMPLEMENTATIONS; q, k: arrays or ShapeDtypeStructs; mask: the Mask.
    Returns:
      "splash" on TPU, "cudnn" on GPU where supported, else "xla" below AUTO_CHUNKED_FROM keys and
      "chunked" from there.
    Example:
      >>> choose("auto", jax.ShapeDtypeStruct((1, 4096, 32, 64), jnp.bfloat16), k, mask)  # CPU
      'chunked'
    """
    if implementation not in IMPLEMENTATIONS:
        raise UsageError(f"--attention {implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    platform = jax.devices()[0].platform
    if platform == "tpu" and splash_unsupported(q, k, mask) is None:
        return "splash"
    if platform == "gpu" and cudnn_unsupported(q, k, mask) is None:
        return "cudnn"
    return "chunked" if k.shape[1] >= AUTO_CHUNKED_FROM else "xla"


def splash_unsupported(q, k, mask: Mask) -> str | None:
    if jax.devices()[0].platform != "tpu":
        return f"it is a TPU kernel and this is {jax.devices()[0].platform} (tests use interpret mode)"
    if mask.cache:
        return "the KV-cache decode step (its causal offset is dynamic)"
    return None


def cudnn_unsupported(q, k, mask: Mask) -> str | None:
    """Why jax.nn.dot_product_attention(implementation='cudnn') cannot run this call, or None."""
    platform = jax.devices()[0].platform
    if platform != "gpu":
        return f"it needs an NVIDIA GPU and this is {platform}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it runs bfloat16/float16 only and the compute dtype is {q.dtype}"
    if mask.segments:
        return "packed batches (segment_ids) are not supported by jax.nn.dot_product_attention"
    if mask.padding or mask.cache:
        return "padding masks and the KV-cache step are not supported here (only plain causal batches)"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} (cuDNN wants a multiple of 8, at most 128)"
    return None


def cudnn(q, k, v, mask: Mask) -> jax.Array:
    reason = cudnn_unsupported(q, k, mask)
    if reason:
        raise UsageError(f"--attention cudnn: {reason}; use --attention chunked (or auto)")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def xla(q, k, v, mask: Mask) -> jax.Array:
    """The reference: dense f32 scores, softmax normalised on the output (f32), weights in the compute dtype.

    Args and returns as `attend`; memory O(T x S) (scores [B, KV, G, T, S] in f32).
    Example:
      >>> out = xla(q, k, v, make_mask(B, T))
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    # [B, KV, G*T, hd] queries against [B, KV, S, hd] keys: one plain batched matmul per kv head,
    # whose operands XLA:CPU lays out without the transposes a [B, KV, G, T, S] einsum costs
    # (a rows step's attention fwd+bwd: 29 -> 23 ms per layer at 135M / B=4 / T=256).
    qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
    scores = jnp.einsum("bkqh,bskh->bkqs", qg, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    scores = scores.reshape(B, KV, G, T, -1)
    visible = mask.dense()
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    # Softmax normalised on the output, as the online softmax does: exp(s - max) @ v / sum. The sum's
    # reciprocal is then broadcast over [.., hd], not materialised over [.., S] for the backward pass.
    # Masked keys: exp(min - max) = 0 exactly.
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    pv = jnp.einsum(
        "bkqs,bskh->bkqh",
        unnormalised.astype(q.dtype).reshape(B, KV, G * T, -1),
        v,
        preferred_element_type=jnp.float32,
    )
    out = (pv.reshape(B, KV, G, T, hd) / total).astype(q.dtype)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)
    if mask.segments or mask.padding or mask.cache:
        # A query that sees no key (padding) got a uniform softmax: zero it on the [B, T, H, hd] output,
        # not on the [B, KV, G, T, S] probabilities (one pass over the scores less, forward and backward).
        out = jnp.where(visible.any(-1)[:, 0, 0, :, None, None], out, jnp.zeros((), out.dtype))
    return out


# ---------------------------------------------------------------------------------------- chunked
def chunked(q, k, v, mask: Mask, block: int | None = None) -> jax.Array:
    """Blockwise attention, memory O(T) forward and backward (custom VJP recomputing blocks).

    Args and returns as `attend`; block: query/key block length (default BLOCK; tests use 128).
    Example:
      >>> out = chunked(q, k, v, make_mask(B, T, segment_ids=docs))
    """
    block = block or BLOCK
    B, T, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    bq, bk = min(block, T), min(block, S)
    qg = q.reshape(B, T, KV, H // KV, hd)
    m = (mask.q_seg, mask.kv_seg, mask.q_pos, mask.kv_pos)
    return _flash(bq, bk, qg, k, v, m).reshape(B, T, H, hd)


def _blocks(x, b: int):
    """[B, T, ...] -> [n, B, b, ...], T zero-padded to a multiple of b (segment 0: nothing visible)."""
    B, T = x.shape[:2]
    n = -(-T // b)
    x = jnp.pad(x, [(0, 0), (0, n * b - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(B, n, b, *x.shape[2:]).swapaxes(0, 1)


def _unblock(x, T: int):
    n, B, b = x.shape[:3]
    return x.swapaxes(0, 1).reshape(B, n * b, *x.shape[3:])[:, :T]


def _live(qs, qp, ks, kp):
    """[nq, nk] bool: some query of q block i may see some key of kv block j in some batch row."""
    big = jnp.iinfo(jnp.int32).max
    valid = ks != 0
    k_pos_min = jnp.where(valid, kp, big).min(-1)  # [nk, B]
    k_seg_min = jnp.where(valid, ks, big).min(-1)
    k_seg_max = jnp.where(valid, ks, -1).max(-1)
    q_pos_max, q_seg_min, q_seg_max = qp.max(-1), qs.min(-1), qs.max(-1)  # [nq, B]
    live = (
        (k_pos_min[None] <= q_pos_max[:, None])
        & (k_seg_min[None] <= q_seg_max[:, None])
        & (k_seg_max[None] >= q_seg_min[:, None])
    )
    return live.any(-1)


def _scores(qb, kb, qs, qp, ks, kp):
    """f32 scaled scores [B, KV, G, bq, bk] and their visibility [B, 1, 1, bq, bk]."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32) * (qb.shape[-1] ** -0.5)
    return s, _visible(qs, qp, ks, kp)[:, None, None]


def _forward(bq, bk, q, k, v, m):
    """Online softmax over kv blocks for every q block: (out [B, T, KV, G, hd], lse [nq, B, KV, G, bq]).
    Blocks no query can see are skipped (`lax.cond`), as in the backward.

    The masks pass an optimization barrier together with q (the backward: with the cotangent).
    Otherwise, inside the layer scan under `grad`, JAX's partial evaluation (of the remat'd layer
    recomputed in the backward pass) splits this loop nest into the part that depends on q and the
    part that does not, and stacks the latter's per-block values as residuals: every block's
    [bq, bk] visibility ([nq, nk, ..., bq, bk]: a [T, S] mask, 268 MB at 16k) and, with `lax.cond`
    skipping, its branch residuals too (91 GB at 16k). Tied to q, nothing is known early."""
    T = q.shape[1]
    q, m = jax.lax.optimization_barrier((q, m))
    qb, kb, vb = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    qs, ks, qp, kp = _blocks(m[0], bq), _blocks(m[1], bk), _blocks(m[2], bq), _blocks(m[3], bk)
    live = _live(qs, qp, ks, kp)  # [nq, nk]
    B, KV, G, hd = q.shape[0], q.shape[2], q.shape[3], q.shape[4]

    def q_block(xs):
        qi, qsi, qpi, live_i = xs

        def kv_block(carry, ys):
            def update(carry):
                mx, denom, acc = carry
                s, vis = _scores(qi, ys[0], qsi, qpi, ys[2], ys[3])
                s = jnp.where(vis, s, _NEG)
                mx_new = jnp.maximum(mx, s.max(-1))
                p = jnp.where(vis, jnp.exp(s - mx_new[..., None]), 0.0)
                alpha = jnp.exp(mx - mx_new)
                acc = alpha[..., None] * acc + jnp.einsum(
                    "bkgqs,bskh->bkgqh", p.astype(v.dtype), ys[1], preferred_element_type=jnp.float32
                )
                return mx_new, alpha * denom + p.sum(-1), acc

            return jax.lax.cond(ys[4], update, lambda carry: carry, carry), None

        init = (
            jnp.full((B, KV, G, bq), _NEG, jnp.float32),
            jnp.zeros((B, KV, G, bq), jnp.float32),
            jnp.zeros((B, KV, G, bq, hd), jnp.float32),
        )
        (mx, denom, acc), _ = jax.lax.scan(kv_block, init, (kb, vb, ks, kp, live_i))
        seen = denom > 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        return jnp.einsum("bkgqh->bqkgh", out).astype(q.dtype), lse

    out, lse = jax.lax.map(q_block, (qb, qs, qp, live))
    return _unblock(out, T), lse


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bq, bk, q, k, v, m):
    return _forward(bq, bk, q, k, v, m)[0]


def _flash_fwd(bq, bk, q, k, v, m):
    out, lse = _forward(bq, bk, q, k, v, m)
    return out, (q, k, v, m, out, lse)


def _flash_bwd(bq, bk, res, do):
    """FlashAttention-2 backward: per kv block, recompute p per q block; dk, dv accumulate in the
    inner carry, dq in place in a carried [nq, ...] buffer. Nothing [T, S]-sized is ever stored."""
    q, k, v, m, out, lse = res
    T, S = q.shape[1], k.shape[1]
    do, m = jax.lax.optimization_barrier((do, m))
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", do.astype(jnp.float32), out.astype(jnp.float32))
    qb, dob, kb, vb = _blocks(q, bq), _blocks(do, bq), _blocks(k, bk), _blocks(v, bk)
    deltab = _blocks(jnp.moveaxis(delta, 3, 1), bq)  # [nq, B, bq, KV, G]
    qs, ks, qp, kp = _blocks(m[0], bq), _blocks(m[1], bk), _blocks(m[2], bq), _blocks(m[3], bk)
    live = _live(qs, qp, ks, kp).T  # [nk, nq]
    scale = q.shape[-1] ** -0.5

    def kv_block(dq, xs):
        kj, vj, ksj, kpj, live_j = xs

        def q_block(carry, ys):
            i, qi, doi, lsei, di, qsi, qpi, on = ys

            def grads(carry):
                dk, dv, dq = carry
                s, vis = _scores(qi, kj, qsi, qpi, ksj, kpj)
                p = jnp.where(vis, jnp.exp(s - lsei[..., None]), 0.0)
                dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - jnp.moveaxis(di, 1, 3)[..., None]) * scale
                dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
                dqi = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
                return dk, dv, jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, 0)  # in place: no [T] stack

            return jax.lax.cond(on, grads, lambda carry: carry, carry), None

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv, dq), _ = jax.lax.scan(
            q_block, (zeros, zeros, dq), (jnp.arange(len(qb)), qb, dob, lse, deltab, qs, qp, live_j)
        )
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, ks, kp, live))
    return (_unblock(dq, T).astype(q.dtype), _unblock(dk, S).astype(k.dtype), _unblock(dv, S).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
