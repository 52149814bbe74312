"""Llama-3 in flax.nnx, numerically a twin of transformers' LlamaForCausalLM.

Layer weights are stacked along a leading "layers" axis and run with `lax.scan`: compile time does
not grow with depth (an 80-layer model compiles like a 1-layer one) and the KV cache is one array
per tensor. Every parameter carries logical axis names in its `logical` metadata; `sharding.py`
turns those into mesh placements. The forward pass has named stages (`Decoder`): embed_tokens ->
hidden (the layer stack + final norm) -> logits, so `rows.py` overrides only the lookup and the head
and the loss projects a slice of positions at a time.

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
from jaxvocab.low_rank import low_rank
from jaxvocab.mlp import sequence_chunked
from jaxvocab.remat import REMATS, remat_layer
from jaxvocab.rope import apply_rope, inverse_frequencies, rope_angles

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
        for name, shape in config.layer_shapes().items():
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


class Decoder(nnx.Module):
    """The forward pass in named stages: `embed_tokens(ids)` -> `hidden(ids)` (the layer stack and the
    final norm) -> `logits(h)`. Subclasses say how a token is looked up, which layer weights run and
    how hidden states meet the head; `Llama` uses its own tables, `rows.RowsModel` overrides them."""

    config: LlamaConfig
    compute_dtype: str
    remat: str
    attention: str

    def embed_tokens(self, input_ids) -> jax.Array:
        """Token ids [B, T] -> embeddings [B, T, D] in the compute dtype."""
        raise NotImplementedError

    def logits(self, h) -> jax.Array:
        """Final-norm hidden states [..., D] (any slice of positions) -> f32 logits [..., V]."""
        raise NotImplementedError

    def layer_weights(self, dropout_key=None) -> dict[str, jax.Array]:
        """The stacked layer weights the scan runs over (adapters included, if any)."""
        raise NotImplementedError

    def hidden(
        self,
        input_ids,
        *,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        cache: KVCache | None = None,
        dropout_key=None,
        remat: str | None = None,
    ):
        """Final-norm hidden states [B, T, D] and the updated cache (None without one).

        Args:
          input_ids: int [B, T] token ids.
          attention_mask: optional [B, T] (1 = real token); segment_ids: optional [B, T] packed documents.
          positions: optional [B, T] rotary positions (default: from segments / the cache index).
          cache: a `KVCache` to extend (decoding), or None.
          dropout_key: turns on the adapters' dropout (training only).
          remat: overrides the model's remat choice for this call ("auto" | "full" | "none").
        Returns:
          (h, cache): h in the compute dtype; the loss projects it a slice at a time.
        Example:
          >>> h, _ = model.hidden(ids); logits = model.logits(h[:, -1])
        """
        x = self.embed_tokens(input_ids)
        h, cache = run_layers(
            self.layer_weights(dropout_key),
            x,
            LayerStack(
                self.config, jnp.dtype(self.compute_dtype), self.attention, self.remat if remat is None else remat
            ),
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            positions=positions,
            cache=cache,
        )
        return rms_norm(h, self.norm[...], self.config.rms_norm_eps), cache

    def __call__(
        self, input_ids, *, attention_mask=None, segment_ids=None, positions=None, cache: KVCache | None = None
    ):
        """f32 logits [B, T, V] (and the cache when one is given): `logits(hidden(ids))`."""
        h, cache = self.hidden(
            input_ids, attention_mask=attention_mask, segment_ids=segment_ids, positions=positions, cache=cache
        )
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)


class Llama(Decoder):
    """`Llama(config)(input_ids)` -> f32 logits [B, T, V].

    A model is its config, its parameters and the static choices made here; nothing is assigned
    onto it afterwards. Build it abstractly with `nnx.eval_shape(lambda: Llama(cfg, ...))` and fill it
    from a checkpoint; pass `rngs` only when you really want a random model (tests, benchmarks).

    Args:
      config: the architecture.
      param_dtype: the parameters' dtype (`dtype` is the older spelling); default f32.
      compute_dtype: activations' dtype (default: param_dtype); logits and norms are f32 regardless.
      attention: auto | xla | chunked | cudnn | splash (jaxvocab/attention.py).
      remat: auto | full | dots | none: per-layer recompute in the backward pass (dots keeps only the
        matmul outputs), auto deciding from the traced shapes (remat.py).
    Example:
      >>> model = Llama(PRESETS["llama-3.2-1b"], param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype=None,
        compute_dtype=None,
        rngs: nnx.Rngs | None = None,
        attention: str = "auto",
        remat: str = "auto",
        dtype=None,
    ):
        param_dtype = jnp.dtype(param_dtype or dtype or jnp.float32)
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype or param_dtype).name
        self.attention = check_attention(attention)
        self.remat = check_remat(remat)
        shape = (config.vocab_size, config.hidden_size)
        self.embed = _param(shape, param_dtype, TABLE_AXES, rngs)
        self.layers = Layers(config, param_dtype, rngs)
        self.norm = _param((config.hidden_size,), param_dtype, ("norm",), rngs, ones=True)
        self.lm_head = None if config.tie_word_embeddings else _param(shape, param_dtype, TABLE_AXES, rngs)

    @property
    def head_table(self) -> nnx.Param:
        return self.embed if self.lm_head is None else self.lm_head

    def embed_tokens(self, input_ids):
        check_live(self)
        return self.embed[...][input_ids].astype(jnp.dtype(self.compute_dtype))

    def layer_weights(self, dropout_key=None):
        return self.layers.weights()

    def logits(self, h):
        return project(h, self.head_table[...], jnp.dtype(self.compute_dtype))

    def choices(self) -> dict:
        """The construction choices besides the config, to build a sibling model with the same ones."""
        return {"compute_dtype": self.compute_dtype, "attention": self.attention, "remat": self.remat}


def check_live(model) -> None:
    """A model whose tables `expand_vocab(..., donate=True)` consumed fails here, not with stale values."""
    for table in (model.embed, getattr(model, "lm_head", None)):
        value = None if table is None else table.get_value()
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.is_deleted():
            raise UsageError(
                "this model was consumed by expand_vocab(..., donate=True) (its tables were donated to the "
                "expanded model): use the model expand_vocab returned, or pass donate=False to keep this one"
            )


def check_attention(attention: str) -> str:
    if attention not in IMPLEMENTATIONS:
        raise UsageError(f"--attention {attention!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    return attention


def check_remat(remat) -> str:
    """The remat mode, validated here so a typo fails before anything is traced.

    Modes (jaxvocab.remat has the measurements):
      auto: decided at trace time from the traced shapes: `dots` when its estimate fits in
        REMAT_MEMORY_FRACTION of the device's memory (CPU: the host's available RAM), else `full`.
      full: keep only each layer's input and recompute the whole layer in the backward pass.
      dots: keep the outputs of the weight matmuls, recompute the cheap rest (norms, rope, softmax, silu).
      none: keep every residual; fastest, most memory.
    True / False (the older spelling) mean 'full' / 'none'.

    Returns:
      One of 'auto' | 'full' | 'dots' | 'none'.
    """
    remat = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if remat not in REMATS:
        raise UsageError(f"--remat {remat!r}: choose one of {', '.join(REMATS)}")
    return remat


def project(h, table, dtype):
    """Hidden states [..., D] x table [V, D] -> f32 logits [..., V] (accumulated in f32)."""
    return jnp.einsum("...d,vd->...v", h, table.astype(dtype), preferred_element_type=jnp.float32)


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


class LayerStack(NamedTuple):
    """How the layer stack runs: the static choices of the model that owns it."""

    config: LlamaConfig
    dtype: jnp.dtype  # compute dtype
    attention: str = "auto"
    remat: str = "auto"


class LayerContext(NamedTuple):
    """What every layer of one forward pass shares (built once, outside the scan)."""

    config: LlamaConfig
    dtype: jnp.dtype
    rope: tuple[jax.Array, jax.Array]  # (cos, sin) [B, T, 1, hd] of the rotary positions
    mask: object  # attention.Mask
    cache: KVCache | None
    impl: str  # the attention implementation chosen for these shapes


def run_layers(
    layers: dict,
    x,
    stack: LayerStack,
    *,
    attention_mask=None,
    segment_ids=None,
    positions=None,
    cache: KVCache | None = None,
):
    """Run all decoder layers with one scan (no final norm). Returns (hidden [B, T, D], updated cache or None)."""
    config, dtype = stack.config, jnp.dtype(stack.dtype)
    B, T, _ = x.shape
    if positions is None:
        positions = default_positions(B, T, segment_ids, 0 if cache is None else cache.index)
    if cache is not None:
        new_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        cache = cache._replace(valid=jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index)))
        mask = make_mask(B, T, attention_mask, segment_ids, cache.valid, cache.index)
    else:
        mask = make_mask(B, T, attention_mask, segment_ids)
    S = T if cache is None else cache.valid.shape[1]
    impl = choose(
        stack.attention,
        jax.ShapeDtypeStruct((B, T, config.num_attention_heads, config.head_dim), dtype),
        jax.ShapeDtypeStruct((B, S, config.num_key_value_heads, config.head_dim), dtype),
        mask,
    )
    ctx = LayerContext(config, dtype, rope_angles(positions, inverse_frequencies(config)), mask, cache, impl)

    def layer(h, xs):
        w, kv = xs
        return _layer(w, h, kv, ctx)

    body = remat_layer(layer, stack.remat, config, B, T, S, dtype, impl)
    kv_in = None if cache is None else (cache.k, cache.v)
    h, kv_out = jax.lax.scan(body, x, (layers, kv_in))
    if cache is not None:
        cache = cache._replace(k=kv_out[0], v=kv_out[1], index=cache.index + T)
    return h, cache


def _layer(w, h, kv, ctx: LayerContext):
    c, dtype = ctx.config, ctx.dtype
    B, T, _ = h.shape
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def linear(x, name):  # x [B, T, in] . w [out, in] -> [B, T, out]
        y = jnp.einsum("bti,oi->bto", x, w[name].astype(dtype))
        return y + lora_delta(x, w, name, dtype) if "lora_a_" + name in w else y

    a = rms_norm(h, w["attn_norm"], c.rms_norm_eps)
    q = apply_rope(linear(a, "wq").reshape(B, T, H, hd), *ctx.rope)
    k = apply_rope(linear(a, "wk").reshape(B, T, KV, hd), *ctx.rope)
    v = linear(a, "wv").reshape(B, T, KV, hd)
    if kv is not None:
        k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, ctx.cache.index, 0, 0))
        v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, ctx.cache.index, 0, 0))
        kv = (k_all, v_all)
        k, v = k_all.astype(dtype), v_all.astype(dtype)
    attn = attend(q, k, v, ctx.mask, ctx.impl).reshape(B, T, H * hd)
    h = h + linear(attn, "wo")

    def mlp(h):
        m = rms_norm(h, w["mlp_norm"], c.rms_norm_eps)
        return h + linear(jax.nn.silu(linear(m, "w_gate")) * linear(m, "w_up"), "w_down")

    h = mlp(h) if "lora_drop_key" in w else sequence_chunked(mlp, h, c.intermediate_size)
    return h, kv


def lora_delta(x, w, name, dtype):
    """LoRA (lora.py): scale * dropout(x) A^T B^T, PEFT's order, in the compute dtype."""
    if "lora_drop_key" in w:
        key = jax.random.fold_in(w["lora_drop_key"], LORA_ORDER.index(name))
        p = w["lora_drop_p"]
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p).astype(x.dtype), 0).astype(x.dtype)
    a, b = w["lora_a_" + name].astype(dtype), w["lora_b_" + name].astype(dtype)
    return low_rank(x, a, b) * w["lora_scale"].astype(dtype)
