"""Text generation with the model's KV cache: one prefill, then one jitted one-token step per token.

Shapes are fixed per call (prompt padded to a bucket, cache sized for prompt + max_new_tokens,
both rounded up), so the step compiles once and later calls of similar size reuse it. Padding
sits after the prompt and is marked invalid in the cache; positions are passed explicitly, so
the padding changes neither attention nor RoPE.

By default the ids a model has never learned are suppressed: reserved slots the tokenizer still
calls reserved, rows beyond the tokenizer, the vocab plan's padding rows and rows that measure as
untrained. Sampling them produces garbage that looks like a model bug.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvocab.errors import UsageError
from jaxvocab.model import KVCache
from jaxvocab.rows import RowsModel, merge
from jaxvocab.sharding import round_up

BUCKET = 64


def generate(
    model,
    tok,
    prompt,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    suppress=None,
    stop=None,
    seed: int = 0,
    return_ids: bool = False,
    plan=None,
):
    """Continue `prompt` with a KV cache, one jitted step per token.

    Args:
        model: a Llama (a RowsModel is merged first).
        tok: the tokenizer the model's ids belong to.
        prompt: a string, chat messages ([{"role": ..., "content": ...}]) or a list of token ids.
        max_new_tokens: at most this many new tokens (prompt + new must fit the model's positions).
        temperature, top_p: 0.0 is greedy; otherwise nucleus sampling with `seed`.
        suppress: ids never generated. None = `default_suppressed(model, tok, plan)` (untrained and
            padding rows); () = nothing.
        stop: ids that end generation (default: tok.stop_ids and the config's eos ids); not returned.
        return_ids: also return the new ids.
        plan: the model's VocabPlan, if any (its padding rows are suppressed by default).
    Returns:
        The new text, or (text, ids) with `return_ids`.
    Example:
        >>> generate(model, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=16)
    """
    if isinstance(model, RowsModel):
        model = merge(model)
    ids = prompt_ids(tok, prompt)
    _check_request(model, len(ids), max_new_tokens, temperature, top_p)
    stops = set(stop) if stop is not None else set(getattr(tok, "stop_ids", None) or []) | set(model.config.eos_ids)
    banned = _banned_mask(model, default_suppressed(model, tok, plan) if suppress is None else suppress, stops)
    sampling = (jnp.asarray(banned), jnp.float32(temperature), jnp.float32(top_p))
    out = _decode(model, ids, max_new_tokens, stops, sampling, seed, greedy=temperature == 0.0)
    text = tok.decode(out) if tok is not None else ""
    return (text, out) if return_ids else text


def _check_request(model, n_prompt: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse a request up front, before anything compiles, with the flag to change."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if n_prompt + max_new_tokens > model.config.max_position_embeddings:
        raise UsageError(
            f"prompt ({n_prompt} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings ({model.config.max_position_embeddings}); shorten one of them"
        )
    if not 0.0 < top_p <= 1.0 or temperature < 0.0:
        raise UsageError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")


def _banned_mask(model, suppressed, stops) -> np.ndarray:
    """A [V] mask; stop ids are never banned, so suppression cannot keep generation from ending."""
    V = model.config.vocab_size
    banned = np.zeros(V, bool)
    for i in suppressed:
        if 0 <= int(i) < V and int(i) not in stops:
            banned[int(i)] = True
    return banned


def _decode(model, ids, max_new_tokens: int, stops, sampling, seed: int, *, greedy: bool) -> list[int]:
    """Prefill a bucket-padded prompt, then step token by token; shapes are bucketed so steps reuse one compile."""
    n = len(ids)
    P = round_up(n, BUCKET)
    S = round_up(P + max_new_tokens, BUCKET)
    graphdef, state = nnx.split(model)
    cache = KVCache.empty(model.config, 1, S, jnp.dtype(model.compute_dtype))
    tokens = np.zeros((1, P), np.int32)
    tokens[0, :n] = ids
    key = jax.random.PRNGKey(seed)
    nxt, cache, key = _prefill(graphdef, state, cache, jnp.asarray(tokens), jnp.int32(n), key, *sampling, greedy=greedy)
    out = []
    for i in range(max_new_tokens):
        t = int(nxt)
        if t in stops:
            break
        out.append(t)
        if i + 1 == max_new_tokens:
            break
        nxt, cache, key = _step(graphdef, state, cache, nxt, jnp.int32(n + i), key, *sampling, greedy=greedy)
    return out


def prompt_ids(tok, prompt) -> list[int]:
    """str -> bos + text; messages -> chat format + the assistant header; ids pass through."""
    if isinstance(prompt, str):
        if tok is None:
            raise UsageError("a text prompt needs a tokenizer; pass tok or a list of token ids")
        return tok.encode(prompt, bos=tok.bos_id is not None)
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if tok is None:
            raise UsageError("a messages prompt needs a tokenizer; pass tok")
        ids, _ = tok.encode_chat(prompt)
        sh, eh = tok.special_tokens["<|start_header_id|>"], tok.special_tokens["<|end_header_id|>"]
        return ids + [sh] + tok.encode("assistant") + [eh] + tok.encode("\n\n")
    if not prompt or not all(isinstance(i, (int, np.integer)) for i in prompt):
        raise UsageError("prompt must be a str, a non-empty list of {'role', 'content'} messages or of token ids")
    return [int(i) for i in prompt]


def default_suppressed(model, tok, plan=None) -> list[int]:
    """Ids without a trained row: still-reserved slots, rows past the tokenizer, the plan's padding
    rows, and rows `find_untrained` measures as untrained (tiny, or identical to another row, as
    freshly mean-initialised rows are until trained)."""
    from jaxvocab.vocab import find_untrained

    V = model.config.vocab_size
    out = set(find_untrained(model, tok))
    if tok is not None:
        out |= set(tok.free_reserved()) | set(range(min(tok.n_words, V), V))
    if plan is not None:
        out |= set(plan.padding_ids)
    return sorted(i for i in out if 0 <= i < V)


def _choose(logits, key, banned, temperature, top_p, greedy: bool):
    """Next token from f32 logits [V]: argmax, or temperature + nucleus (top-p) sampling."""
    logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
    if greedy:
        return jnp.argmax(logits).astype(jnp.int32), key
    key, sub = jax.random.split(key)
    order = jnp.argsort(-logits)
    scaled = logits[order] / temperature
    probs = jax.nn.softmax(scaled)
    keep = (jnp.cumsum(probs) - probs) < top_p  # smallest prefix whose mass reaches top_p
    pick = jax.random.categorical(sub, jnp.where(keep, scaled, -jnp.inf))
    return order[pick].astype(jnp.int32), key


@partial(jax.jit, static_argnums=(0,), static_argnames=("greedy",), donate_argnums=(2,))
def _prefill(graphdef, state, cache, tokens, n, key, banned, temperature, top_p, *, greedy):
    model = nnx.merge(graphdef, state)
    P = tokens.shape[1]
    valid = (jnp.arange(P) < n)[None]
    positions = jnp.arange(P, dtype=jnp.int32)[None]
    logits, cache = model(tokens, attention_mask=valid, positions=positions, cache=cache)
    nxt, key = _choose(logits[0, n - 1], key, banned, temperature, top_p, greedy)
    return nxt, cache, key


@partial(jax.jit, static_argnums=(0,), static_argnames=("greedy",), donate_argnums=(2,))
def _step(graphdef, state, cache, token, position, key, banned, temperature, top_p, *, greedy):
    model = nnx.merge(graphdef, state)
    logits, cache = model(token.reshape(1, 1), positions=position.reshape(1, 1), cache=cache)
    nxt, key = _choose(logits[0, -1], key, banned, temperature, top_p, greedy)
    return nxt, cache, key
