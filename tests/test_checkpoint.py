"""jaxvocab (orbax) checkpoints: saved from one mesh, restored onto another, nothing lost."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxvocab
from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.io import checkpoint, keys
from jaxvocab.io.checkpoint import params_of
from jaxvocab.sharding import parse_mesh, sharding_for
from tests.builders import make_hf_checkpoint, random_ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama3_tokenizer_dir, mesh24):
    """An HF source, the model loaded on the (2, 4) mesh, and its jaxvocab checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    src, _ = make_hf_checkpoint(root / "src", heads=8, kv_heads=2, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama3_tokenizer_dir / name, src / name)
    model = jaxvocab.load(src, mesh=mesh24, show_progress=False)
    out = jaxvocab.save_checkpoint(model, root / "ck", tokenizer=jaxvocab.load_tokenizer(src))
    return src, model, out


def test_checkpoint_dir_layout(saved):
    src, _, out = saved
    assert json.loads((out / checkpoint.MARKER).read_text())["format"] == checkpoint.FORMAT_VERSION
    assert (out / "state").is_dir()
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((src / name).read_text()), name
    assert not (out / "vocab_plan.json").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


@pytest.mark.parametrize("spec", ["data=2,fsdp=4,tensor=1", None], ids=["mesh-2x4x1", "one-device"])
def test_restore_onto_another_mesh(saved, spec):
    _, model, out = saved
    mesh = parse_mesh(spec) if spec else None
    restored = jaxvocab.load(out, mesh=mesh)
    assert restored.config == model.config and jaxvocab.load_tokenizer(out).files.source == out
    before, after = params_of(model), params_of(restored)
    assert before.keys() == after.keys()
    for k in keys.keys_for(model.config):
        name = "/".join(k.path)
        a, b = before[name], after[name]
        assert b.dtype == a.dtype and np.array_equal(np.asarray(a), np.asarray(b)), name
        if mesh is None:
            assert len(b.sharding.device_set) == 1, name
        else:
            assert b.sharding.mesh == mesh, name
            assert b.sharding.is_equivalent_to(sharding_for(b.shape, keys.logical_axes(k), mesh), b.ndim), name
    if mesh is not None:  # fsdp is now 4 wide and tensor 1: the shards really moved
        assert {s.data.shape for s in after["embed"].addressable_shards} == {(256, 64 // 4)}
        assert {s.data.shape for s in after["layers/wq"].addressable_shards} == {(2, 64, 64 // 4)}
    ids = jnp.asarray(random_ids(256, batch=1, length=520, seed=8))
    want = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(restored(ids)), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_restore_casts_dtype(saved):
    _, model, out = saved
    restored = jaxvocab.load(out, dtype=jnp.bfloat16)
    assert restored.config.dtype == "bfloat16" and restored.compute_dtype == "bfloat16"
    for name, a in params_of(restored).items():
        assert a.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(params_of(model)[name].astype(jnp.bfloat16)))


def test_save_refuses_existing_dir_unless_overwrite(saved, tmp_path):
    _, model, _ = saved
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="--overwrite"):
        jaxvocab.save_checkpoint(model, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    jaxvocab.save_checkpoint(model, out, overwrite=True)
    assert not (out / "mine.txt").exists() and checkpoint.is_jaxvocab_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_interrupted_save_leaves_nothing(saved, tmp_path, monkeypatch):
    _, model, _ = saved

    def interrupted(model, out, meanwhile=None):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jaxvocab.save_checkpoint(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_format_1_checkpoint_loads_after_a_format_change(saved, tmp_path, monkeypatch):
    """A checkpoint written by today's code (format 1, built here) still loads once the writer moves on:
    a later jaxvocab that writes format 2 keeps 1 in READABLE_FORMATS and restores it bit for bit."""
    _, model, out = saved
    old = shutil.copytree(out, tmp_path / "v1")
    assert json.loads((old / checkpoint.MARKER).read_text()) == {"format": 1, "vocab_size": model.config.vocab_size}
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)
    monkeypatch.setattr(checkpoint, "READABLE_FORMATS", (1, 2))
    restored = jaxvocab.load(old)
    assert restored.config == model.config
    before, after = params_of(model), params_of(restored)
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)


def test_state_is_stored_uncompressed_and_compressed_states_still_load(saved, tmp_path):
    """save_state writes raw bytes (zstd halved the write on a CPU host): all-zero weights, which
    zstd shrinks ~100x, still take their full size; a state dir written compressed, as before,
    restores bit for bit."""
    import orbax.checkpoint as ocp

    _, model, out = saved
    zero = jaxvocab.load(out)
    for k in keys.keys_for(zero.config):
        keys.get_param(zero, k).set_value(jnp.zeros_like(keys.get_param(zero, k)[...]))
    (tmp_path / "raw").mkdir()
    checkpoint.save_state(zero, tmp_path / "raw")
    stored = sum(f.stat().st_size for f in (tmp_path / "raw" / "state").rglob("*") if f.is_file())
    assert stored >= sum(a.nbytes for a in params_of(zero).values())
    old = shutil.copytree(out, tmp_path / "zstd", ignore=shutil.ignore_patterns("state"))
    params = params_of(model)
    with ocp.StandardCheckpointer() as ckptr:  # orbax's default: zstd level 3
        ckptr.save((old / "state").absolute(), params)
    after = params_of(jaxvocab.load(old))
    assert all(np.array_equal(np.asarray(params[k]), np.asarray(after[k])) for k in params)


@pytest.mark.parametrize("version", [2, 10**6])
def test_future_format_is_one_line_naming_the_fix(saved, tmp_path, version):
    _, _, out = saved
    copy = shutil.copytree(out, tmp_path / "ck")
    marker = json.loads((copy / checkpoint.MARKER).read_text())
    (copy / checkpoint.MARKER).write_text(json.dumps({**marker, "format": version}))
    with pytest.raises(CheckpointError) as e:
        jaxvocab.load(copy)
    msg = str(e.value)
    assert "\n" not in msg and str(copy / checkpoint.MARKER) in msg
    assert f"format {version}" in msg and "newer jaxvocab" in msg and "upgrade jaxvocab" in msg


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: (d / checkpoint.MARKER).write_text("{oops"), "corrupt marker"),
        (lambda d: (d / checkpoint.MARKER).write_text('{"format": 99}'), "format 99"),
        (lambda d: _edit_config(d, vocab_size=512), "does not match config.json"),
        (lambda d: _truncate_largest(d / "state"), 'Error reading "'),  # tensorstore's cause, naming the tensor
    ],
)
def test_damaged_checkpoint_refused(saved, tmp_path, damage, words):
    _, _, out = saved
    copy = shutil.copytree(out, tmp_path / "ck")
    damage(copy)
    with pytest.raises(CheckpointError) as e:
        jaxvocab.load(copy)
    assert words in str(e.value) and str(copy) in str(e.value) and "\n" not in str(e.value)
    assert "TensorStore(" not in str(e.value)  # not orbax's wrapper, a repr of the store's spec


def _truncate_largest(d):
    f = max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
