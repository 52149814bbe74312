"""HF dirs in and out: bit-identical round trips through transformers, HF's shard/index layout,
placement on a device mesh, and all-or-nothing writes."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxvocab
from jaxvocab.io import hf
from jaxvocab.io.checkpoint import params_of
from tests.builders import make_hf_checkpoint, random_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def make_src(path, llama3_tokenizer_dir, **kw):
    """An HF dir as users have them: weights + config + generation config + tokenizer files."""
    path, ref = make_hf_checkpoint(path, heads=8, **kw)
    for name in TOKENIZER_FILES:
        shutil.copy(llama3_tokenizer_dir / name, path / name)
    return path, ref


def torch_state(path, dtype=None):
    from transformers import LlamaForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    return LlamaForCausalLM.from_pretrained(path, **kw).state_dict()


def assert_same_state(a: dict, b: dict):
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def shard_files(out):
    """(file, {tensor: nbytes}, metadata) read with the reference safetensors library."""
    from safetensors import safe_open

    rows = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            sizes = {k: st.get_tensor(k).nbytes for k in st.keys()}
            rows.append((f, sizes, st.metadata()))
    return rows


# --------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "src_shards, limit",
    [(False, "5GB"), (True, "100KB"), (False, "40KB")],
    ids=["single-to-single", "sharded-to-sharded", "single-to-small-shards"],
)
def test_export_reloads_bit_identical_in_transformers(tmp_path, llama3_tokenizer_dir, mesh24, tied, src_shards, limit):
    src, _ = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=2, tied=tied, shards=src_shards)
    model = jaxvocab.load(src, mesh=mesh24, show_progress=False)  # written back from sharded arrays
    tok = jaxvocab.load_tokenizer(src)
    out = jaxvocab.save_hf(model, tmp_path / "out", max_shard_size=limit, tokenizer=tok, show_progress=False)

    assert_same_state(torch_state(out), torch_state(src))
    files = shard_files(out)
    limit_bytes = hf.parse_size(limit)
    for f, sizes, meta in files:
        assert meta == {"format": "pt"}, f
        assert sum(sizes.values()) <= limit_bytes or len(sizes) == 1, f
    if limit == "5GB":
        assert [f.name for f, *_ in files] == ["model.safetensors"] and not (out / hf.INDEX).exists()
    else:
        assert len(files) > 2
        index = json.loads((out / hf.INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(sum(s.values()) for _, s, _ in files)
        assert index["weight_map"] == {name: f.name for f, sizes, _ in files for name in sizes}
        if limit == "40KB":  # the 64 KB embedding is bigger than the limit: alone in its shard
            assert any(list(s) == ["model.embed_tokens.weight"] for _, s, _ in files)
    assert ("lm_head.weight" in {n for _, s, _ in files for n in s}) == (not tied)

    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in (*TOKENIZER_FILES, "generation_config.json"):  # parsed and re-written, same content
        assert json.loads((out / name).read_text()) == json.loads((src / name).read_text()), name
    from transformers import AutoConfig, GenerationConfig

    assert AutoConfig.from_pretrained(out).tie_word_embeddings == tied
    assert GenerationConfig.from_pretrained(out).eos_token_id == 1


def test_bfloat16_round_trips_bit_identical(tmp_path, llama3_tokenizer_dir):
    import torch

    src, _ = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=4, dtype="bfloat16", shards=True)
    model = jaxvocab.load(src, show_progress=False)
    assert model.embed[...].dtype == jnp.bfloat16 and model.config.dtype == "bfloat16"
    out = jaxvocab.save_hf(
        model, tmp_path / "out", max_shard_size="50KB", tokenizer=jaxvocab.load_tokenizer(src), show_progress=False
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    state = torch_state(out, torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert_same_state(state, torch_state(src, torch.bfloat16))
    assert {n for _, s, _ in shard_files(out) for n in s} == {n for _, s, _ in shard_files(src) for n in s}


def test_generation_config_written_when_source_has_none(tmp_path, llama3_tokenizer_dir):
    from transformers import GenerationConfig

    src, _ = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=2)
    (src / "generation_config.json").unlink()
    out = jaxvocab.save_hf(
        jaxvocab.load(src, show_progress=False),
        tmp_path / "out",
        tokenizer=jaxvocab.load_tokenizer(src),
        show_progress=False,
    )
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (0, 1)


def test_export_casts_dtype_on_request(tmp_path, llama3_tokenizer_dir):
    import torch

    src, ref = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=2)
    out = jaxvocab.save_hf(
        jaxvocab.load(src, dtype="bfloat16", show_progress=False),
        tmp_path / "out",
        tokenizer=jaxvocab.load_tokenizer(src),
        show_progress=False,
    )
    state = torch_state(out, torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    assert_same_state(state, want)  # round to nearest even, like torch's own cast


# ---------------------------------------------------------------------------------------- meshes
def test_sharded_load_matches_single_device(tmp_path, llama3_tokenizer_dir, mesh1, mesh24):
    src, _ = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=2, shards=True)
    one = jaxvocab.load(src, mesh=mesh1, show_progress=False)
    many = jaxvocab.load(src, mesh=mesh24, show_progress=False)
    assert one.embed[...].sharding.mesh.devices.size == 1
    embed, wq = many.embed[...], many.layers.wq[...]
    assert embed.sharding.mesh == mesh24 and embed.sharding.spec == P("tensor", "fsdp")
    assert wq.sharding.spec == P(None, "tensor", "fsdp") and many.layers.wo[...].sharding.spec == P(
        None, "fsdp", "tensor"
    )
    assert {s.data.shape for s in embed.addressable_shards} == {(256 // 4, 64 // 2)}
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64 // 4, 64 // 2)}
    for name, a in params_of(one).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(params_of(many)[name]), err_msg=name)
    ids = random_ids(256, batch=2, length=520, seed=2)
    a, b = np.asarray(one(jnp.asarray(ids))), np.asarray(many(jnp.asarray(ids)))
    # Only the summation order differs (partial sums per fsdp/tensor shard): a few f32 ulps of
    # the largest logit (|logit| reaches ~8 with the builder's std=0.2 weights).
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))


# ---------------------------------------------------------------------------------- atomic writes
def test_failed_export_leaves_nothing(tmp_path, llama3_tokenizer_dir, monkeypatch):
    src, _ = make_src(tmp_path / "src", llama3_tokenizer_dir, kv_heads=2)
    model = jaxvocab.load(src, show_progress=False)
    real, calls = hf.write_file, []

    def fail_on_second_shard(*a, **kw):
        calls.append(a[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(hf, "write_file", fail_on_second_shard)
    out = tmp_path / "exports" / "out"
    with pytest.raises(OSError, match="disk full"):
        jaxvocab.save_hf(model, out, max_shard_size="100KB", show_progress=False)
    assert len(calls) == 2 and calls[0].is_relative_to(tmp_path / "exports")  # it was mid-way
    assert list((tmp_path / "exports").iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        jaxvocab.save_hf(model, out, max_shard_size="100KB", overwrite=True, show_progress=False)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # --overwrite replaces only on success


# ------------------------------------------------------------------------------------ the read path
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_slice_equals_reference_reader(tmp_path, dtype):
    """Whole-row slices take plain reads into aligned buffers, others the map; both must agree
    with the safetensors library on every slice shape the loaders ask for."""
    import torch
    from safetensors.torch import save_file

    from jaxvocab.io.safetensors_io import read_header, read_slice

    g = torch.Generator().manual_seed(0)
    tensors = {
        "m": torch.randn(300, 260, generator=g),
        "v": torch.randn(1000, generator=g),
        "s": torch.randn(3, 5, 7, generator=g),
        "one": torch.randn(1, 64, generator=g),
    }
    tensors = {k: t.to(getattr(torch, dtype)) for k, t in tensors.items()}
    save_file(tensors, tmp_path / "t.safetensors")
    infos, meta = read_header(tmp_path / "t.safetensors")
    slices = [
        (),
        (slice(None),),
        (slice(10, 70),),
        (slice(0, 300), slice(0, 260)),
        (slice(0, 150), slice(130, 260)),
        (slice(None), slice(65, 130)),
        (slice(5, 5),),
        (slice(0, 300, 2),),
    ]
    for name, t in tensors.items():
        want_all = t.view(torch.int16 if dtype == "bfloat16" else torch.int32).numpy()
        for idx in slices:
            if len(idx) > t.ndim:
                continue
            got = read_slice(infos[name], idx)
            want = want_all[idx]
            assert got.shape == want.shape and str(got.dtype) == dtype, (name, idx)
            np.testing.assert_array_equal(got.view(want.dtype), want, err_msg=f"{name}{idx}")
            if got.nbytes and got.flags.c_contiguous and idx in ((), (slice(None),), (slice(10, 70),)):
                assert got.ctypes.data % 64 == 0, (name, idx)  # adopted by XLA's CPU client without a copy
