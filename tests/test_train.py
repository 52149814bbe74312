"""train.loop: the jitted rows step, its optimizer state, accumulation, mesh invariance, resume."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxvocab
from jaxvocab import rows as row_split
from tests.builders import make_hf_checkpoint
from train import loop, loss
from train.data import Batch, Doc, Packer, eval_batches

IDS = [5, 9, 77, 200]
V, D = 256, 64


def _docs(n=24, seed=0):
    rs = np.random.RandomState(seed)
    docs = []
    for _ in range(n):
        ids = rs.randint(0, V, rs.randint(8, 40)).astype(np.int32)
        ids[rs.rand(len(ids)) < 0.2] = rs.choice(IDS)  # the chosen ids occur often
        mask = (rs.rand(len(ids)) < 0.8).astype(np.float32)  # and some targets are masked out
        mask[1] = 1
        docs.append(Doc(ids, mask))
    return docs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("m") / "hf", tied=False, seed=4)
    return path


def _model(ckpt, mesh=None):
    return jaxvocab.load(ckpt, mesh=mesh, show_progress=False)


@nnx.jit
def _logits(model, mb):
    return model(jnp.asarray(mb.inputs), segment_ids=jnp.asarray(mb.segments))


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def test_schedule_warmup_cosine_and_constant():
    cfg = loop.TrainConfig(steps=10, lr=1e-2, warmup=2)
    lr = loop.schedule(cfg)
    assert [float(lr(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 5e-3, 1e-2])
    assert float(lr(6)) == pytest.approx(5e-3, rel=1e-5)  # half-way through the cosine
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-9)
    const = loop.schedule(loop.TrainConfig(steps=10, lr=1e-2, schedule="constant"))
    assert [float(const(s)) for s in (0, 5, 9)] == pytest.approx([1e-2] * 3)


def test_rates_and_seed_are_step_arguments_not_compiled_in(ckpt, mesh1):
    """Another --lr, --lora-lr, --warmup, --steps, --schedule or --seed lowers to the same program (the
    compile cache then serves it), and the rate given is the rate applied: 0 moves nothing, 2x moves
    each row twice as far (AdamW's first step is rate x g / (|g| + eps))."""
    model = _model(ckpt)
    base = loop.TrainConfig(steps=3, batch_size=2, seq_len=64, lr=1e-2, schedule="constant")
    batch = Packer(_docs(), 64, 2).next()

    def trainer(**changes):
        return loop.Trainer(row_split.split(model, IDS), dataclasses.replace(base, **changes), mesh1)

    hlo = trainer().lower(trainer().put(batch)).as_text()
    other = dict(lr=3e-4, lora_lr=1e-3, warmup=1, steps=50, schedule="cosine", seed=7)
    assert trainer(**other).lower(trainer().put(batch)).as_text() == hlo

    def moved(lr):
        t = trainer(lr=lr)
        before = _host(t.params)
        t.step(batch)
        return [b - a for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(t.params)), strict=True)]

    assert all(not d.any() for d in moved(0.0))
    for one, two in zip(moved(1e-2), moved(2e-2), strict=True):
        assert np.abs(one).max() > 1e-3
        np.testing.assert_allclose(two, 2 * one, rtol=1e-4, atol=1e-7)


def test_step_trains_only_rows_with_kxd_state(ckpt, mesh1):
    model = _model(ckpt)
    before = _host(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rm = row_split.split(model, IDS)
    cfg = loop.TrainConfig(steps=3, batch_size=2, seq_len=64, lr=1e-2)
    trainer = loop.Trainer(rm, cfg, mesh1)
    # optimizer state: AdamW mu + nu for the two k x d row tables, plus a step counter; nothing V-sized
    leaves = jax.tree.leaves(trainer.opt_state)
    k = len(IDS)
    state_bytes = sum(x.nbytes for x in leaves)
    assert 2 * 2 * k * D * 4 <= state_bytes <= 2 * 2 * k * D * 4 + 16
    assert all(V not in x.shape for x in leaves)
    frozen_before = _host(trainer.frozen)
    packer = Packer(_docs(), cfg.seq_len, cfg.batch_size)
    for _ in range(3):
        m = jax.device_get(trainer.step(packer.next()))
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(_host(trainer.frozen)), strict=True)
    )
    merged = _host(nnx.to_pure_dict(nnx.state(row_split.merge(trainer.model()), nnx.Param)))
    keep = np.setdiff1d(np.arange(V), IDS)
    for table in ("embed", "lm_head"):
        assert np.array_equal(merged[table][keep], before[table][keep])
        assert not np.any(np.all(merged[table][IDS] == before[table][IDS], axis=1))  # every chosen row moved
    for name in before["layers"]:
        assert np.array_equal(merged["layers"][name], before["layers"][name])
    assert np.array_equal(merged["norm"], before["norm"])
    # the caller's RowsModel is untouched by the donated steps
    assert np.array_equal(np.asarray(rm.embed_rows[...]), before["embed"][IDS])


def _batch(docs, K, B, T=64):
    return Packer(docs, T, B, K, shuffle=False).next()


def test_accumulation_equals_one_big_batch_and_loss_is_masked_mean(ckpt, mesh1):
    model = _model(ckpt)
    big = _batch(_docs(), 1, 4)
    split = Batch(*(a.reshape(2, 2, *a.shape[2:]) for a in big))
    cfg = loop.TrainConfig(steps=5, batch_size=4, seq_len=64, lr=1e-2, weight_decay=0.1)
    one = loop.Trainer(row_split.split(model, IDS), cfg, mesh1)
    two = loop.Trainer(row_split.split(model, IDS), dataclasses.replace(cfg, batch_size=2, grad_accum=2), mesh1)
    m1, m2 = jax.device_get(one.step(big)), jax.device_get(two.step(split))
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    for a, b in zip(jax.tree.leaves(_host(one.params)), jax.tree.leaves(_host(two.params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # the reported loss is the mean NLL over the weighted targets of the whole batch
    mb = jax.tree.map(lambda a: a[0], big)
    logits = np.asarray(_logits(model, mb), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, mb.targets[..., None], -1)[..., 0]
    assert m1["loss"] == pytest.approx((nll * mb.weights).sum() / mb.weights.sum(), abs=1e-5)
    assert m1["targets"] == mb.weights.sum()


@pytest.mark.parametrize("tied, tables", [(False, "both"), (False, "embed"), (True, "both")])
def test_chunked_loss_grads_equal_dense_grads(ckpt, tmp_path, monkeypatch, tied, tables):
    """The training loss path (head in time chunks with a hand-written VJP, the last chunk padded;
    K micro-batches) gives the dense model's loss and the rows of its gradient."""
    model = _model(make_hf_checkpoint(tmp_path / "tied", tied=True, seed=4)[0] if tied else ckpt)
    batch = _batch(_docs(), 2, 2, T=40)
    monkeypatch.setattr(loss, "LOSS_CHUNK_BYTES", 4 * V * 2 * 16)
    assert loss.chunk_len(2, 40, V) == 16  # 3 chunks, the last one padded
    graphdef, params, frozen = nnx.split(row_split.split(model, IDS, tables), nnx.Param, row_split.Frozen)
    total, count, grads = jax.jit(functools.partial(loop.batch_grads, graphdef))(
        nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), batch
    )

    def dense(m):
        s = 0.0
        for k in range(2):
            logits = m(jnp.asarray(batch.inputs[k]), segment_ids=jnp.asarray(batch.segments[k]))
            s = s + loss.nll_sums(logits, jnp.asarray(batch.targets[k]), jnp.asarray(batch.weights[k]))[0]
        return s

    want_total, g = nnx.jit(nnx.value_and_grad(dense))(model)
    assert float(count) == batch.weights.sum()
    assert float(total) == pytest.approx(float(want_total), rel=1e-6)
    pairs = {"both": [("embed_rows", "embed"), ("head_rows", "lm_head")], "embed": [("embed_rows", "embed")]}
    assert set(grads) == {r for r, _ in pairs[tables]} - ({"head_rows"} if tied else set())
    for rows, table in pairs[tables]:
        if tied and table == "lm_head":
            continue  # tied: one set of rows, its gradient is the embed table's (both uses)
        want = np.asarray(g[table][...])[IDS]
        np.testing.assert_allclose(np.asarray(grads[rows]), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_weight_decay_touches_only_rows(ckpt, mesh1):
    """No targets -> zero gradient: AdamW's update is pure decay, rows shrink by (1 - lr*wd)."""
    model = _model(ckpt)
    rm = row_split.split(model, IDS)
    cfg = loop.TrainConfig(steps=4, batch_size=4, seq_len=64, lr=1e-2, weight_decay=0.5, schedule="constant")
    trainer = loop.Trainer(rm, cfg, mesh1)
    before = _host(trainer.params)
    batch = _batch(_docs(), 1, 4)
    m = jax.device_get(trainer.step(batch._replace(weights=np.zeros_like(batch.weights))))
    assert m["grad_norm"] == 0
    for name, rows in _host(trainer.params).items():
        np.testing.assert_allclose(rows, before[name] * (1 - 1e-2 * 0.5), rtol=1e-6)


def test_mesh_matches_single_device(ckpt, mesh1, mesh24):
    docs = _docs()
    cfg = loop.TrainConfig(steps=2, batch_size=2, seq_len=64, grad_accum=2, lr=1e-2)
    out = {}
    for name, mesh in (("one", mesh1), ("mesh", mesh24)):
        model = _model(ckpt, mesh)
        trainer = loop.Trainer(row_split.split(model, IDS), cfg, mesh)
        packer = Packer(docs, cfg.seq_len, cfg.batch_size, cfg.grad_accum)
        losses = [float(trainer.step(packer.next())["loss"]) for _ in range(2)]
        out[name] = (losses, _host(trainer.params), trainer)
    assert out["mesh"][0] == pytest.approx(out["one"][0], abs=1e-5)
    for a, b in zip(jax.tree.leaves(out["one"][1]), jax.tree.leaves(out["mesh"][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    t = out["mesh"][2]
    # rows and optimizer state stay replicated step after step (one compiled program, exact resume)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves((t.params, t.opt_state)))
    assert t.frozen["embed"].sharding.spec == P("tensor", "fsdp")  # frozen tables stay sharded
    assert t.put(_batch(docs, 2, 2)).inputs.sharding.spec == P(None, ("data", "fsdp"), None)


def test_eval_loss_and_new_token_accuracy(ckpt, mesh1):
    model = _model(ckpt)
    trainer = loop.Trainer(row_split.split(model, IDS), loop.TrainConfig(batch_size=2, seq_len=64), mesh1)
    batches = eval_batches(_docs(6, seed=3), 64, 2)
    got = trainer.evaluate(batches)
    s = n = correct = on_new = new_nll = 0.0
    for b in batches:
        mb = jax.tree.map(lambda a: a[0], b)
        logits = np.asarray(_logits(model, mb), np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = lse - np.take_along_axis(logits, mb.targets[..., None], -1)[..., 0]
        s, n = s + (nll * mb.weights).sum(), n + mb.weights.sum()
        sel = (mb.weights > 0) & np.isin(mb.targets, IDS)
        correct += (logits.argmax(-1) == mb.targets)[sel].sum()
        on_new += sel.sum()
        new_nll += nll[sel].sum()
    assert on_new > 0
    assert got["eval_loss"] == pytest.approx(s / n, abs=1e-5)
    assert got["new_token_acc"] == pytest.approx(correct / on_new)
    assert got["eval_new_tokens"] == on_new
    assert got["eval_new_token_loss"] == pytest.approx(new_nll / on_new, abs=1e-5)


def test_run_resume_from_checkpoint_is_exact(ckpt, mesh1, tmp_path):
    """In-process twin of the kill -9 test: drop the newest checkpoint, resume, same rows bit for bit."""
    docs = _docs()
    cfg = loop.TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-2, save_every=2, keep=5, warmup=2)
    full = loop.run(row_split.split(_model(ckpt), IDS), cfg, mesh1, docs, tmp_path / "a", show_progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for step in ("4", "6"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / step)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # a half-written line from the "killed" run
    resumed = loop.run(
        row_split.split(_model(ckpt), IDS), cfg, mesh1, docs, tmp_path / "b", resume=True, show_progress=False
    )
    for a, b in zip(
        jax.tree.leaves(_host(row_split.row_values(full))),
        jax.tree.leaves(_host(row_split.row_values(resumed))),
        strict=True,
    ):
        assert np.array_equal(a, b)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref]
    assert lines[0]["lr"] == 0.0 and lines[2]["lr"] == pytest.approx(1e-2)
