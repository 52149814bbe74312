"""Llama-3 in flax.nnx, numerically a twin of transformers' LlamaForCausalLM.

Layer weights are stacked along a leading "layers" axis and run with `lax.scan`: compile time does
not grow with depth (an 80-layer model compiles like a 1-layer one) and the KV cache is one array
per tensor. Every parameter carries logical axis names in its `logical` metadata; `sharding.py`
turns those into mesh placements. The forward pass is split into small pure functions so that
`rows.py` can reuse the decoder with its own embedding lookup and head.

Every weight keeps the checkpoint's own layout: tables `embed` and `lm_head` are both [V, D], so
vocabulary work treats them alike, and Linear weights are [out, in] as torch stores them, so import
and export copy bytes and never transpose (XLA contracts either layout at the same speed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvocab.attention import IMPLEMENTATIONS, attend, choose, make_mask
from jaxvocab.config import LlamaConfig
from jaxvocab.errors import UsageError
from jaxvocab.remat import REMATS, remat_layer
from jaxvocab.rope import apply_rope, inverse_frequencies

LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "q_heads", "embed"),
    "wk": ("layers", "kv_heads", "embed"),
    "wv": ("layers", "kv_heads", "embed"),
    "wo": ("layers", "embed", "q_heads"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "mlp", "embed"),
    "w_up": ("layers", "mlp", "embed"),
    "w_down": ("layers", "embed", "mlp"),
}
TABLE_AXES = ("vocab", "embed")
LORA_ORDER = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # fixes each adapter's dropout stream


def layer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    L, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "attn_norm": (L, d),
        "wq": (L, q, d),
        "wk": (L, kv, d),
        "wv": (L, kv, d),
        "wo": (L, d, q),
        "mlp_norm": (L, d),
        "w_gate": (L, f, d),
        "w_up": (L, f, d),
        "w_down": (L, d, f),
    }


def _param(shape, dtype, logical, rngs: nnx.Rngs | None, ones=False):
    if ones:
        value = jnp.ones(shape, dtype)
    elif rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical=logical)


class Layers(nnx.Module):
    """All decoder layers, each weight stacked on a leading layer axis."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs | None):
        for name, shape in layer_shapes(config).items():
            setattr(self, name, _param(shape, dtype, LAYER_AXES[name], rngs, ones=name.endswith("norm")))

    def weights(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in LAYER_AXES}


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, KV, hd]
    v: jax.Array  # [L, B, S, KV, hd]
    valid: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # int32 scalar: next free slot

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool), jnp.int32(0))


class Llama(nnx.Module):
    """`Llama(config)(input_ids)` -> f32 logits [B, T, V].

    Build it abstractly with `nnx.eval_shape(lambda: Llama(cfg))` and fill it from a checkpoint;
    pass `rngs` only when you really want a random model (tests, benchmarks).
    `attention`: auto | xla | chunked | cudnn | splash (jaxvocab/attention.py); `remat`: auto | full |
    dots | none, per-layer recompute in the backward pass, auto deciding from the traced shapes (remat.py).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.float32,
        compute_dtype=None,
        rngs: nnx.Rngs | None = None,
        attention: str = "auto",
        remat: str = "auto",
    ):
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype or dtype).name
        self.attention = check_attention(attention)
        self.remat = check_remat(remat)
        shape = (config.vocab_size, config.hidden_size)
        self.embed = _param(shape, dtype, TABLE_AXES, rngs)
        self.layers = Layers(config, dtype, rngs)
        self.norm = _param((config.hidden_size,), dtype, ("norm",), rngs, ones=True)
        self.lm_head = None if config.tie_word_embeddings else _param(shape, dtype, TABLE_AXES, rngs)

    @property
    def head_table(self) -> nnx.Param:
        return self.embed if self.lm_head is None else self.lm_head

    def __call__(
        self, input_ids, *, attention_mask=None, segment_ids=None, positions=None, cache: KVCache | None = None
    ):
        dtype = jnp.dtype(self.compute_dtype)
        x = self.embed[...][input_ids].astype(dtype)
        h, cache = decode(
            self.layers.weights(),
            x,
            self.config,
            dtype,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            positions=positions,
            cache=cache,
            remat=self.remat,
            attention=self.attention,
        )
        h = rms_norm(h, self.norm[...], self.config.rms_norm_eps)
        logits = project(h, self.head_table[...], dtype)
        return logits if cache is None else (logits, cache)


def check_attention(attention: str) -> str:
    if attention not in IMPLEMENTATIONS:
        raise UsageError(f"--attention {attention!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    return attention


def check_remat(remat) -> str:
    """'auto' | 'full' | 'none'; True / False (the older spelling) mean 'full' / 'none'."""
    remat = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if remat not in REMATS:
        raise UsageError(f"--remat {remat!r}: choose one of {', '.join(REMATS)}")
    return remat


def project(h, table, dtype):
    """Hidden states [B, T, D] x table [V, D] -> f32 logits (accumulated in f32)."""
    return jnp.einsum("btd,vd->btv", h, table.astype(dtype), preferred_element_type=jnp.float32)


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def default_positions(B, T, segment_ids=None, start=0):
    """Positions restart at 0 in every packed document; a cache continues from its index."""
    if segment_ids is None:
        return jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    idx = jnp.arange(T, dtype=jnp.int32)
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - last_start


def decode(
    layers: dict,
    x,
    config: LlamaConfig,
    dtype,
    *,
    attention_mask=None,
    segment_ids=None,
    positions=None,
    cache: KVCache | None = None,
    remat="auto",
    attention: str = "auto",
):
    """Run all decoder layers with one scan. Returns (hidden [B, T, D], updated cache or None)."""
    B, T, _ = x.shape
    if positions is None:
        positions = default_positions(B, T, segment_ids, 0 if cache is None else cache.index)
    inv_freq = inverse_frequencies(config)
    if cache is not None:
        new_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        cache = cache._replace(valid=jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index)))
        mask = make_mask(B, T, attention_mask, segment_ids, cache.valid, cache.index)
    else:
        mask = make_mask(B, T, attention_mask, segment_ids)
    S = T if cache is None else cache.valid.shape[1]
    impl = choose(
        attention,
        jax.ShapeDtypeStruct((B, T, config.num_attention_heads, config.head_dim), dtype),
        jax.ShapeDtypeStruct((B, S, config.num_key_value_heads, config.head_dim), dtype),
        mask,
    )

    def layer(h, xs):
        w, kv = xs
        h, kv = _layer(w, h, kv, config, dtype, positions, inv_freq, mask, cache, impl)
        return h, kv

    body = remat_layer(layer, remat, config, B, T, S, dtype, impl)
    kv_in = None if cache is None else (cache.k, cache.v)
    h, kv_out = jax.lax.scan(body, x, (layers, kv_in))
    if cache is not None:
        cache = cache._replace(k=kv_out[0], v=kv_out[1], index=cache.index + T)
    return h, cache


def _layer(w, h, kv, c: LlamaConfig, dtype, positions, inv_freq, mask, cache, impl):
    B, T, _ = h.shape
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def linear(x, name):  # x [B, T, in] . w [out, in] -> [B, T, out]
        y = jnp.einsum("bti,oi->bto", x, w[name].astype(dtype))
        return y + lora_delta(x, w, name, dtype) if "lora_a_" + name in w else y

    a = rms_norm(h, w["attn_norm"], c.rms_norm_eps)
    q = apply_rope(linear(a, "wq").reshape(B, T, H, hd), positions, inv_freq)
    k = apply_rope(linear(a, "wk").reshape(B, T, KV, hd), positions, inv_freq)
    v = linear(a, "wv").reshape(B, T, KV, hd)
    if kv is not None:
        k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache.index, 0, 0))
        v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache.index, 0, 0))
        kv = (k_all, v_all)
        k, v = k_all.astype(dtype), v_all.astype(dtype)
    attn = attend(q, k, v, mask, impl).reshape(B, T, H * hd)
    h = h + linear(attn, "wo")
    m = rms_norm(h, w["mlp_norm"], c.rms_norm_eps)
    h = h + linear(jax.nn.silu(linear(m, "w_gate")) * linear(m, "w_up"), "w_down")
    return h, kv


def lora_delta(x, w, name, dtype):
    """LoRA (lora.py): scale * dropout(x) A^T B^T, PEFT's order, in the compute dtype."""
    if "lora_drop_key" in w:
        key = jax.random.fold_in(w["lora_drop_key"], LORA_ORDER.index(name))
        p = w["lora_drop_p"]
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p).astype(x.dtype), 0).astype(x.dtype)
    r = jnp.einsum("bti,ri->btr", x, w["lora_a_" + name].astype(dtype))
    return jnp.einsum("btr,or->bto", r, w["lora_b_" + name].astype(dtype)) * w["lora_scale"].astype(dtype)
