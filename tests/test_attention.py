"""Every attention implementation that runs on CPU against `xla`, outputs and q/k/v gradients, in f32.

Block size 128 on 300-key inputs puts T off the block grid and the packed documents across block
boundaries; the cotangent is random on rows that see at least one key and zero elsewhere (rows that
see nothing are padding: their output is defined as 0 and no loss reads it).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvocab import attention as attn
from jaxvocab.errors import UsageError
from tests.builders import tiny_llama

TOL = 2e-6
MAXIMA: dict[str, float] = {}


def _inputs(B, T, S, H, KV, hd, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(k1, (B, T, H, hd)),
        jax.random.normal(k2, (B, S, KV, hd)),
        jax.random.normal(k3, (B, S, KV, hd)),
        jax.random.normal(k4, (B, T, H, hd)),
    )


def _mask(kinds, T):
    """One batch row per kind: causal; padding (left 37 tokens on even rows, right 50 on odd ones);
    packed (documents of 150 - 31 x row, 95 and the rest, then a 20-token padding tail). Every kind
    goes through the same make_mask call, so one compiled pair serves every mix of kinds."""
    am, seg = np.ones((len(kinds), T), np.int32), np.ones((len(kinds), T), np.int32)
    for b, kind in enumerate(kinds):
        if kind == "padding" and b % 2 == 0:
            am[b, :37] = 0
        elif kind == "padding":
            am[b, T - 50 :] = 0
        elif kind == "packed":
            cuts = np.cumsum([150 - 31 * b, 95, T])
            seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
            seg[b, T - 20 :] = 0
    return attn.make_mask(len(kinds), T, attention_mask=jnp.asarray(am), segment_ids=jnp.asarray(seg))


def _grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct))


def _exact(q, k, v, ct, mask):
    """The dense reference in float64 on torch (the peer oracle), outputs and q/k/v gradients."""
    import torch

    t = [torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v)]
    G = q.shape[2] // k.shape[2]
    kk, vv = (x.repeat_interleave(G, dim=2) for x in t[1:])
    s = torch.einsum("bthd,bshd->bhts", t[0], kk) * q.shape[-1] ** -0.5
    vis = torch.tensor(np.asarray(mask.dense()[:, 0]))  # [B, 1, T, S]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", p, vv)
    out.backward(torch.tensor(np.asarray(ct), dtype=torch.float64))
    return [out.detach().numpy()] + [x.grad.numpy() for x in t]


def _check(name, got, want, exact):
    """Within TOL at unit scale (TOL x the tensor's largest value where that exceeds 1) of xla AND
    of the float64 truth. At unit scale because f32 xla itself is off the truth by up to ~7e-6 on
    dk (values ~7): an absolute 2e-6 against it would test xla's rounding, not ours."""
    for g, w, e, what in zip(got, want, exact, ("out", "dq", "dk", "dv"), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(1.0, float(np.abs(e).max()))
        diff, err, xla_err = (float(np.abs(a - b).max()) / scale for a, b in ((g, w), (g, e), (w, e)))
        key = f"{name} {what}"
        MAXIMA[key] = tuple(max(a, b) for a, b in zip(MAXIMA.get(key, (0.0,) * 3), (diff, err, xla_err), strict=True))
        assert diff <= TOL, f"{key}: {diff:.3g} from xla at unit scale > {TOL}"
        assert err <= TOL, f"{key}: {err:.3g} from the float64 truth at unit scale > {TOL} (xla: {xla_err:.3g})"


@pytest.fixture(scope="module", autouse=True)
def _print_maxima():
    """After the file: the parity maxima per implementation and quantity (seen with pytest -s)."""
    yield
    for k, v in sorted(MAXIMA.items()):
        print(f"\nparity max {k:26s} vs xla {v[0]:.2e}  vs f64 {v[1]:.2e}  (xla vs f64 {v[2]:.2e})", end="")


@jax.jit
def _pair(q, k, v, ct, mask):
    """(xla, chunked) outputs and q/k/v grads: one compile per shape, shared by every mask mix."""
    return _grads(partial(attn.xla, mask=mask), q, k, v, ct), _grads(
        partial(attn.chunked, mask=mask, block=128), q, k, v, ct
    )


# Every (kv heads, head_dim) pair of GQA 1/2/4 x 64/128 once, with two batch rows of mixed kinds:
# every kind in three cases, left and right padding twice each, and one all-packed batch, where the
# backward also skips blocks of other documents (mixed with a causal row, only the triangle is skipped).
GRID = [
    (1, 64, ("causal", "padding")),
    (1, 128, ("packed", "packed")),
    (2, 64, ("padding", "packed")),
    (2, 128, ("causal", "packed")),
    (4, 64, ("packed", "padding")),
    (4, 128, ("padding", "causal")),
]


@pytest.mark.parametrize("kv,hd,kinds", GRID, ids=[f"kv{kv}-hd{hd}-{'-'.join(kinds)}" for kv, hd, kinds in GRID])
def test_chunked_matches_xla(kv, hd, kinds):
    B, T, H = len(kinds), 300, 4
    q, k, v, ct = _inputs(B, T, T, H, kv, hd, seed=kv * hd)
    mask = _mask(kinds, T)
    seen = mask.dense()[:, 0, 0].any(-1)[..., None, None]  # [B, T, 1, 1]
    ct = jnp.where(seen, ct, 0.0)
    want, got = _pair(q, k, v, ct, mask)
    _check("chunked grid", got, want, _exact(q, k, v, ct, mask))
    plain = _pair(q, k, v, ct, _mask(("causal",) * B, T))[0][0]
    for b, kind in enumerate(kinds):  # the mask matters
        assert (kind == "causal") == (float(jnp.abs(want[0][b] - plain[b]).max()) < 1e-6)


def test_chunked_skips_blocks_no_query_can_see():
    """Causal: a 4 x 4 block grid has 10 live blocks; two documents split at a block edge: 8."""
    m = attn.make_mask(1, 512)
    blk = lambda x: attn._blocks(x, 128)  # noqa: E731
    live = attn._live(blk(m.q_seg), blk(m.q_pos), blk(m.kv_seg), blk(m.kv_pos))
    assert int(live.sum()) == 10 and not bool(live[0, 1])
    seg = jnp.asarray(np.repeat([1, 2], 256)[None], jnp.int32)
    m = attn.make_mask(1, 512, segment_ids=seg)
    live = attn._live(blk(m.q_seg), blk(m.q_pos), blk(m.kv_seg), blk(m.kv_pos))
    assert int(live.sum()) == 6 and not bool(live[2, 1])


@pytest.mark.parametrize("T", [1, 5])
def test_cache_decode_matches_xla(T):
    """The decode step (T=1) and a short prefill into a cache of 300 slots, some invalid."""
    B, S, H, KV, hd = 2, 300, 4, 2, 64
    q, k, v, ct = _inputs(B, T, S, H, KV, hd, seed=T)
    valid = np.zeros((B, S), bool)
    valid[:, : 203 + T] = True
    valid[1, :40] = False
    mask = attn.make_mask(B, T, cache_valid=jnp.asarray(valid), cache_index=jnp.int32(203))
    want, got = _pair(q, k, v, ct, mask)
    _check(f"chunked cache T={T}", got, want, _exact(q, k, v, ct, mask))


@pytest.mark.parametrize("kind", ["causal", "packed"])
def test_splash_interpret_matches_xla(kind):
    """JAX's TPU splash kernel in Pallas interpret mode on CPU: two small cases."""
    from jaxvocab.attention_splash import splash

    B, T, H, KV, hd = 1, 300, 4, 2, 64
    q, k, v, ct = _inputs(B, T, T, H, KV, hd, seed=3)
    mask = _mask((kind,), T)
    ct = jnp.where(mask.dense()[:, 0, 0].any(-1)[..., None, None], ct, 0.0)
    want = _grads(partial(attn.xla, mask=mask), q, k, v, ct)
    got = _grads(partial(splash, mask=mask, interpret=True), q, k, v, ct)
    seen = mask.dense()[:, 0, 0].any(-1)[..., None, None]
    got = (jnp.where(seen, got[0], 0.0), *got[1:])
    _check(f"splash {kind}", got, want, _exact(q, k, v, ct, mask))


def test_refusals_are_one_line():
    q, k, _, _ = _inputs(1, 8, 8, 4, 2, 64)
    with pytest.raises(UsageError, match="--attention cudnn: it needs an NVIDIA GPU"):
        attn.cudnn(q, k, k, attn.make_mask(1, 8))
    with pytest.raises(UsageError, match="--attention splash: it is a TPU kernel"):
        attn.attend(q, k, k, attn.make_mask(1, 8), "splash")
    with pytest.raises(UsageError, match="--attention 'flash': choose one of"):
        attn.attend(q, k, k, attn.make_mask(1, 8), "flash")


def test_auto_picks_xla_short_chunked_long():
    n = attn.AUTO_CHUNKED_FROM - 1
    short, long = (jax.ShapeDtypeStruct((1, T, 4, 64), jnp.float32) for T in (n, attn.AUTO_CHUNKED_FROM))
    assert attn.choose("auto", short, short, attn.make_mask(1, n)) == "xla"
    assert attn.choose("auto", long, long, attn.make_mask(1, attn.AUTO_CHUNKED_FROM)) == "chunked"


# ------------------------------------------------------------------------------ model-level choices
def _grad_jaxpr(model, T: int) -> str:
    from flax import nnx

    graph, state = nnx.split(model)
    loss = lambda s, ids: nnx.merge(graph, s)(ids).sum()  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(state, jnp.zeros((1, T), jnp.int32)))


def test_model_uses_the_chosen_implementation():
    assert " cond[" in _grad_jaxpr(tiny_llama(attention="chunked"), 16)
    assert " cond[" not in _grad_jaxpr(tiny_llama(attention="xla"), 16)
    assert " cond[" in _grad_jaxpr(tiny_llama(), attn.AUTO_CHUNKED_FROM)  # auto, long: chunked
    with pytest.raises(UsageError, match="--attention 'flash'"):
        tiny_llama(attention="flash")


def test_remat_auto_decides_from_traced_shapes(monkeypatch):
    """Remat shows as the forward's matmuls recomputed inside the backward scan: `full` recomputes the
    weight matmuls too, `dots` only the attention einsums, `none` nothing; `auto` is `dots` while its
    estimate fits in half the memory, `full` when it does not."""
    from jaxvocab import remat

    dots = lambda model, T: _grad_jaxpr(model, T).count("dot_general[")  # noqa: E731
    full, saved, none = (dots(tiny_llama(remat=r), 64) for r in ("full", "dots", "none"))
    assert full > saved > none
    model = tiny_llama()
    need = remat.dots_bytes(model.config, 1, 64, jnp.float32)
    monkeypatch.setattr(remat, "memory_bytes", lambda: 4 * need)  # fits in half: keep the matmul outputs
    assert dots(model, 64) == saved
    monkeypatch.setattr(remat, "memory_bytes", lambda: need)  # does not: recompute whole layers
    assert dots(model, 64) == full
    assert dots(model, 16) < full  # shorter: fits again
    assert tiny_llama(remat=True).remat == "full" and tiny_llama(remat=False).remat == "none"
    with pytest.raises(UsageError, match="--remat 'some'"):
        tiny_llama(remat="some")
