"""The sequence-chunked MLP (jaxvocab/mlp.py) against the unchunked one, in f32."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxvocab import mlp as chunked_mlp
from tests.builders import tiny_llama


def _weights(D=32, F=96, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "g": jax.random.normal(k[0], (F, D)) / D**0.5,
        "u": jax.random.normal(k[1], (F, D)) / D**0.5,
        "d": jax.random.normal(k[2], (D, F)) / F**0.5,
        "x": jax.random.normal(k[3], (2, 37, D)),  # T = 37: no chunk count divides it
    }


def _block(w, x):
    return x + (jax.nn.silu(x @ w["g"].T) * (x @ w["u"].T)) @ w["d"].T


def test_chunk_count():
    assert chunked_mlp.chunks(1, 1024, 8192) == 1  # Llama-3.2-1B up to 1k: one chunk, nothing changes
    assert chunked_mlp.chunks(1, 16384, 8192) == 16 and chunked_mlp.chunks(2, 16384, 8192) == 32
    assert chunked_mlp.chunks(1, 3, 1 << 30) == 3  # never more chunks than tokens


@pytest.mark.parametrize("n", [1, 3, 37])
def test_chunked_mlp_matches_unchunked(monkeypatch, n):
    """Outputs and gradients wrt the input and every weight, with 1, 3 (padded: 3 x 13 = 39) and
    37 chunks of one token."""
    w = _weights()
    x = w.pop("x")
    B, T, _ = x.shape
    monkeypatch.setattr(chunked_mlp, "CHUNK_ELEMENTS", -(-B * T * 96 // n))
    assert chunked_mlp.chunks(B, T, 96) == n
    ct = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def run(chunked):
        f = (lambda w, x: chunked_mlp.sequence_chunked(lambda t: _block(w, t), x, 96)) if chunked else _block
        out, vjp = jax.vjp(f, w, x)
        return out, *vjp(ct)

    jaxpr = str(jax.make_jaxpr(lambda w, x: chunked_mlp.sequence_chunked(lambda t: _block(w, t), x, 96))(w, x))
    assert (f"length={n}" in jaxpr) == (n > 1)  # the chunks really are a loop
    got, want = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)  # per token


def test_model_runs_the_mlp_in_chunks(monkeypatch):
    """Llama's logits and gradients do not change when its MLP runs in 4 sequence chunks."""
    from flax import nnx

    graph, state = nnx.split(tiny_llama(attention="xla", remat="full"))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 50), 0, 64)
    f = lambda s: (nnx.merge(graph, s)(ids) ** 2).mean()  # noqa: E731
    want = jax.jit(jax.value_and_grad(f))(state)
    monkeypatch.setattr(chunked_mlp, "CHUNK_ELEMENTS", 2 * 50 * 64 // 4)
    assert "length=4" in str(jax.make_jaxpr(f)(state))
    got = jax.jit(jax.value_and_grad(f))(state)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
