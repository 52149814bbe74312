"""jaxvocab.rows: only k x d params exist, their gradients are the dense gradient's rows, merge is exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxvocab
from jaxvocab import rows as row_split
from jaxvocab.errors import UsageError
from tests.builders import make_hf_checkpoint, random_ids

IDS = [3, 7, 100, 255]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request, tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("m") / "hf", tied=request.param, seed=1)
    return jaxvocab.load(path, show_progress=False)


def _tokens(length=520):  # parity-length inputs
    x = random_ids(256, batch=2, length=length, seed=3)
    x[:, ::5] = 7  # chosen ids appear as inputs and as targets, often
    x[:, 2::11] = 100
    x[1, 3::17] = 255
    return jnp.asarray(x)


def _loss(logits, targets):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, targets[:, 1:, None], -1).mean()


@nnx.jit
def _fwd(module, x):
    return module(x)


@functools.partial(nnx.jit, static_argnums=3)
def _grad(module, inputs, targets, params_only=False):
    """d loss / d params, jitted once per model structure (eager scans would compile op by op)."""
    wrt = nnx.DiffState(0, nnx.Param) if params_only else 0
    return nnx.grad(lambda m: _loss(m(inputs), targets), argnums=wrt)(module)


def _as_np(a):
    return np.asarray(jax.device_get(a))


def test_only_rows_are_params(model):
    rm = row_split.split(model, IDS)
    params = jax.tree.leaves(nnx.state(rm, nnx.Param))
    assert params and all(p.shape == (len(IDS), model.config.hidden_size) and p.dtype == jnp.float32 for p in params)
    assert len(params) == (1 if model.lm_head is None else 2)
    frozen = jax.tree.leaves(nnx.state(rm, row_split.Frozen))
    assert any(f.shape == (model.config.vocab_size, model.config.hidden_size) for f in frozen)


@pytest.mark.parametrize("tables", ["both", "embed", "head"])
def test_row_grads_equal_dense_grad_rows(model, tables):
    tied = model.lm_head is None
    if tied and tables != "both":
        pytest.skip("tied models have one set of rows")
    x = _tokens()
    dense = _grad(model, x, x)
    rm = row_split.split(model, IDS, tables)
    grads = _grad(rm, x, x, True)
    got = nnx.to_pure_dict(grads)
    ids = np.asarray(IDS)
    if tables in ("both", "embed"):
        # tied: the dense embed grad already sums the embedding and head contributions
        want = _as_np(dense["embed"][...])[ids]
        np.testing.assert_allclose(_as_np(got["embed_rows"]), want, atol=1e-6, rtol=0)
        assert np.abs(want).max() > 1e-3  # the comparison is not between zeros
    if not tied and tables in ("both", "head"):
        want = _as_np(dense["lm_head"][...])[ids]
        np.testing.assert_allclose(_as_np(got["head_rows"]), want, atol=1e-6, rtol=0)
        assert np.abs(want).max() > 1e-3
    expected = {
        "both": {"embed_rows", "head_rows"} if not tied else {"embed_rows"},
        "embed": {"embed_rows"},
        "head": {"head_rows"},
    }[tables]
    assert set(got) == expected


def test_forward_equals_model_and_merge_round_trip(model):
    x = _tokens()
    rm = row_split.split(model, IDS)
    np.testing.assert_allclose(_as_np(_fwd(rm, x)), _as_np(_fwd(model, x)), atol=2e-5, rtol=0)
    merged = row_split.merge(rm)
    for a, b in zip(
        jax.tree.leaves(nnx.state(merged, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
    ):
        assert np.array_equal(_as_np(a), _as_np(b))


def test_merge_writes_rows_cast_to_table_dtype(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "hf", tied=False, dtype="bfloat16")
    m = jaxvocab.load(path, show_progress=False)
    assert m.embed[...].dtype == jnp.bfloat16
    rm = row_split.split(m, IDS)
    new = np.random.RandomState(0).standard_normal((len(IDS), 64)).astype(np.float32)
    rm.embed_rows.set_value(jnp.asarray(new))
    rm.head_rows.set_value(jnp.asarray(-new))
    merged = row_split.merge(rm)
    for name, rows in (("embed", new), ("lm_head", -new)):
        before, after = _as_np(getattr(m, name)[...]), _as_np(getattr(merged, name)[...])
        assert after.dtype == before.dtype
        assert np.array_equal(after[IDS], rows.astype(after.dtype))
        keep = np.setdiff1d(np.arange(256), IDS)
        assert np.array_equal(after[keep], before[keep])
    # what the rows model computes is what the merged model computes (rows pass through bf16)
    x = _tokens()
    np.testing.assert_allclose(_as_np(_fwd(rm, x)), _as_np(_fwd(merged, x)), atol=1e-5, rtol=0)


def test_sharded_split_keeps_shardings(tmp_path, mesh24):
    path, _ = make_hf_checkpoint(tmp_path / "hf", tied=False)
    m = jaxvocab.load(path, mesh=mesh24, show_progress=False)
    rm = row_split.split(m, IDS)
    assert rm.embed[...].sharding == m.embed[...].sharding
    assert rm.layers["wq"][...].sharding == m.layers.wq[...].sharding
    assert rm.embed_rows[...].sharding.is_fully_replicated
    x = _tokens()
    np.testing.assert_allclose(_as_np(_fwd(rm, x)), _as_np(_fwd(m, x)), atol=2e-5, rtol=0)
    merged = row_split.merge(rm)
    assert merged.embed[...].sharding == m.embed[...].sharding
    assert np.array_equal(_as_np(merged.lm_head[...]), _as_np(m.lm_head[...]))


def test_bad_ids_and_tables(model):
    with pytest.raises(UsageError, match="no trainable ids"):
        row_split.split(model, [])
    with pytest.raises(UsageError, match="outside"):
        row_split.split(model, [256])
    with pytest.raises(UsageError, match="--tables"):
        row_split.split(model, IDS, "rows")
    if model.lm_head is None:
        with pytest.raises(UsageError, match="ties"):
            row_split.split(model, IDS, "embed")
    assert row_split.new_ids(None) == []
