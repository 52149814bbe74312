"""Meta original checkpoints: the safe .pth reader, params.json, shard merging and its checks, CLI."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main as convert_main
from jaxvocab.errors import CheckpointError, ConfigError, UsageError
from jaxvocab.io import pth
from jaxvocab.io.checkpoint import params_of
from jaxvocab.io.meta import intermediate_size, meta_config, read_params
from tests.builders import random_ids, torch_logits
from tests.meta_writer import make_hf_model, write_meta

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------ .pth reader
def test_pth_reads_views_offsets_and_dtypes(tmp_path):
    base = torch.randn(6, 10)
    sd = {
        "bf16": base.to(torch.bfloat16),
        "t": base.t(),
        "half": base[2].to(torch.float16),
        "param": torch.nn.Parameter(torch.ones(3)),
    }
    sd["view"] = sd["bf16"][1:5, ::3]  # shares bf16's storage: non-zero offset, stride 3
    torch.save(sd, tmp_path / "x.pth")
    loaded, ref = pth.read_pth(tmp_path / "x.pth"), torch.load(tmp_path / "x.pth")
    assert set(loaded) == set(ref)
    for name, t in loaded.items():
        want = ref[name].detach().float().numpy()
        assert t.shape == tuple(ref[name].shape)
        np.testing.assert_array_equal(t.read().astype(np.float32), want)
    assert loaded["view"].offset == 10 and loaded["view"].stride == (10, 3)
    before = pth.BYTES_READ
    part = loaded["view"].read((slice(1, 3), slice(0, 2)))
    np.testing.assert_array_equal(part.astype(np.float32), ref["view"][1:3, 0:2].float().numpy())
    assert pth.BYTES_READ - before == part.nbytes == 8


class _Evil:
    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


def _evil_calls(marker):
    return {
        "posix.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (eval, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.call": (subprocess.call, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.call"])
def test_pth_never_runs_pickle_code(tmp_path, name):
    marker = tmp_path / "pwned"
    file = tmp_path / "consolidated.00.pth"
    torch.save({"x": _Evil(_evil_calls(marker)[name]), "tok_embeddings.weight": torch.ones(2, 2)}, file)
    with pytest.raises(CheckpointError, match=rf"consolidated\.00\.pth: refusing to unpickle the global {name}"):
        pth.read_pth(file)
    assert not marker.exists()
    # The same bytes through a plain unpickler do run the payload: the test above can fail.
    with zipfile.ZipFile(file) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))

    class Plain(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

    with pytest.raises(AttributeError):  # the payload has run; then the stub storage breaks torch's rebuild
        Plain(io.BytesIO(data)).load()
    assert marker.exists()


def test_meta_dir_with_malicious_shard_fails_cleanly(tmp_path, capsys):
    marker = tmp_path / "pwned"
    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8}))
    torch.save({"w": _Evil((os.system, (f"touch {marker}",)))}, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="posix.system"):
        jaxvocab.load(d, show_progress=False)
    assert convert_main(["import", str(d), str(tmp_path / "out")]) == 1
    assert "error: " in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _rewrite_zip(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name, data, compress = edit(info.filename, zin.read(info.filename))
            zout.writestr(zipfile.ZipInfo(name), data, compress_type=compress)


def test_pth_rejects_malformed_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(16.0).reshape(4, 4)}, good)
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="not a zip archive"):
        pth.read_pth(tmp_path / "legacy.pth")
    cases = {
        "compressed": (
            lambda n, d: (n, d, zipfile.ZIP_DEFLATED if "/data/" in n else zipfile.ZIP_STORED),
            "compressed",
        ),
        "truncated": (lambda n, d: (n, d[:20] if "/data/" in n else d, zipfile.ZIP_STORED), "fewer than"),
        "bigendian": (lambda n, d: (n, b"big" if n.endswith("byteorder") else d, zipfile.ZIP_STORED), "byte order"),
        "nostorage": (
            lambda n, d: (n.replace("/data/0", "/data/9"), d, zipfile.ZIP_STORED),
            "missing from the archive",
        ),
    }
    for case, (edit, message) in cases.items():
        bad = tmp_path / f"{case}.pth"
        _rewrite_zip(good, bad, edit)
        with pytest.raises(CheckpointError, match=message):
            pth.read_pth(bad)


# ------------------------------------------------------------------------------------ params.json
@pytest.mark.parametrize(
    "dim,multiple_of,mult,expected",
    [
        (4096, 1024, 1.3, 14336),  # Llama 3 / 3.1 8B
        (8192, 4096, 1.3, 28672),  # 3.1 / 3.3 70B
        (16384, 4096, 1.2, 53248),  # 3.1 405B
        (2048, 256, 1.5, 8192),  # 3.2 1B
        (3072, 256, 1.0, 8192),  # 3.2 3B
        (4096, 256, None, 11008),  # Llama 2 7B: no multiplier
    ],
)
def test_intermediate_size_of_real_models(dim, multiple_of, mult, expected):
    assert intermediate_size(dim, multiple_of, mult) == expected


def test_bad_params_json(tmp_path):
    (tmp_path / "params.json").write_text("{")
    with pytest.raises(ConfigError, match="params.json: invalid JSON"):
        read_params(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4}))
    with pytest.raises(ConfigError, match="missing n_layers"):
        read_params(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 3, "n_layers": 1}))
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        read_params(tmp_path)


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untied 3.1-style model (head_dim 16) and its transformers logits."""
    root = tmp_path_factory.mktemp("tiny")
    hf_dir, model = make_hf_model(root / "hf", vocab=256, dim=64, heads=4, kv_heads=2, factor=8, std=0.1)
    ids = random_ids(256, batch=1, length=520)
    return dict(root=root, hf=hf_dir, model=model, ids=ids, torch=torch_logits(model, ids))


def test_config_from_params(tiny, tmp_path, caplog, llama3_tokenizer_dir):
    d = write_meta(tiny["model"], tmp_path / "m", mp=2, tokenizer=llama3_tokenizer_dir / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="jaxvocab"):
        c = meta_config(d)
    assert "using 8 because output.weight differs" in caplog.text
    hf = jaxvocab.LlamaConfig.from_hf_file(tiny["hf"])
    assert (c.intermediate_size, c.num_key_value_heads, c.rope_theta) == (hf.intermediate_size, 2, 500000.0)
    assert c.rope_scaling == jaxvocab.RopeScaling(8.0, 1.0, 4.0, 8192) and not c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.max_position_embeddings) == (128000, (128001, 128008, 128009), 131072)
    assert meta_config(d, rope_factor=16).rope_scaling.factor == 16
    # Llama 3.0: no use_scaled_rope
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, "use_scaled_rope": False}))
    c = meta_config(d)
    assert c.rope_scaling is None and c.eos_token_id == (128001, 128009) and c.max_position_embeddings == 8192
    with pytest.raises(UsageError, match="does not set use_scaled_rope"):
        meta_config(d, rope_factor=8)
    with pytest.raises(UsageError, match="not a Meta checkpoint"):
        jaxvocab.load(tiny["hf"], rope_factor=8)


def test_tied_needs_every_row_equal(tiny, tmp_path):
    """Tied means output == tok_embeddings bit for bit: a difference in the last row unties it."""
    _, tied_model = make_hf_model(tmp_path / "hf", vocab=256, dim=64, heads=4, kv_heads=2, factor=32, tied=True)
    d = write_meta(tied_model, tmp_path / "tied", mp=2)
    assert meta_config(d).tie_word_embeddings and meta_config(d).rope_scaling.factor == 32
    last = torch.load(d / "consolidated.01.pth")
    last["output.weight"][-1, -1] += 1.0
    torch.save(last, d / "consolidated.01.pth")
    c = meta_config(d)
    assert not c.tie_word_embeddings and c.rope_scaling.factor == 8


def test_bf16_mp4_with_duplicated_kv_heads(tiny, tmp_path, mesh24):
    """405B-style: 4 ranks, 2 kv heads, bf16 as Meta ships; params equal HF's bf16 bit for bit."""
    d = write_meta(tiny["model"], tmp_path / "m", mp=4, dtype=torch.bfloat16)
    meta = jaxvocab.load(d, mesh=mesh24, show_progress=False)
    hf = jaxvocab.load(tiny["hf"], dtype="bfloat16", mesh=mesh24, show_progress=False)
    assert meta.embed[...].dtype == np.dtype("bfloat16")
    for name, a in params_of(meta).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(params_of(hf)[name]), err_msg=name)


def test_legacy_release_vocab_minus_one_and_embedding_split_on_dim1(tmp_path, mesh24):
    """Llama 2 wrote vocab_size -1, no rope_theta, and split tok_embeddings on dim 1."""
    d0 = tmp_path / "hf"
    _, model = make_hf_model(d0, vocab=256, dim=64, heads=4, kv_heads=4, theta=10000.0, std=0.1)
    d = write_meta(model, tmp_path / "m", mp=2, legacy_vocab=True, embed_dim=1)
    p = json.loads((d / "params.json").read_text())
    del p["rope_theta"], p["use_scaled_rope"], p["n_kv_heads"]
    (d / "params.json").write_text(json.dumps(p))
    meta = jaxvocab.load(d, mesh=mesh24, show_progress=False)
    c = meta.config
    assert (c.vocab_size, c.rope_theta, c.rope_scaling, c.bos_token_id, c.eos_token_id) == (256, 10000.0, None, 1, 2)
    ids = random_ids(256, batch=1, length=520)
    out, ref = np.asarray(meta(ids)), torch_logits(model, ids)
    assert np.abs(out - ref).max() <= 1e-4 and (out.argmax(-1) == ref.argmax(-1)).all()


def _edit_shard(d, rank, fn):
    sd = torch.load(d / f"consolidated.{rank:02d}.pth")
    fn(sd)
    torch.save(sd, d / f"consolidated.{rank:02d}.pth")


def test_shard_consistency_errors(tiny, tmp_path, mesh24):
    def fresh(name, mp=4):
        return write_meta(tiny["model"], tmp_path / name, mp=mp)

    d = fresh("norm")
    _edit_shard(d, 2, lambda sd: sd["layers.1.ffn_norm.weight"].add_(1e-3))
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: layers\.1\.ffn_norm\.weight differs"):
        jaxvocab.load(d, mesh=mesh24, show_progress=False)

    d = fresh("kvdup")  # ranks 2 and 3 both hold kv head 1
    _edit_shard(d, 3, lambda sd: sd["layers.0.attention.wv.weight"].mul_(2))
    with pytest.raises(
        CheckpointError, match=r"consolidated\.03\.pth: layers\.0\.attention\.wv\.weight .*duplicated kv"
    ):
        jaxvocab.load(d, mesh=mesh24, show_progress=False)

    d = fresh("gap")
    (d / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
        meta_config(d)

    d = fresh("missing", mp=1)
    _edit_shard(d, 0, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError, match="'layers.1.feed_forward.w3.weight' is missing"):
        meta_config(d)

    d = fresh("extra", mp=1)
    _edit_shard(d, 0, lambda sd: sd.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.bias'"):
        meta_config(d)

    d = fresh("ffn", mp=2)
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, "multiple_of": 256}))
    with pytest.raises(
        CheckpointError, match=r"feed_forward\.w1\.weight is \[.*\] in each of 2 shard\(s\).*params\.json"
    ):
        meta_config(d)


def test_cli_import_inspect_and_tokenizer(tiny, tmp_path, capsys, llama3_tokenizer_dir):
    tok = llama3_tokenizer_dir / "tokenizer.model"
    d = write_meta(tiny["model"], tmp_path / "m", mp=2, tokenizer=tok)
    assert convert_main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert "Meta original" in text and "4 heads x 16, 2 kv heads" in text
    assert "2 model-parallel shard(s): consolidated.00.pth (" in text and "consolidated.01.pth (" in text
    assert "llama3 scaling factor 8" in text
    out = tmp_path / "ckpt"
    assert convert_main(["import", str(d), str(out), "--mesh", "data=1,fsdp=2,tensor=4", "--rope-factor", "8"]) == 0
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    model = jaxvocab.load(out, show_progress=False)
    assert model.config.rope_scaling.factor == 8
    logits = np.asarray(model(tiny["ids"]))
    assert np.abs(logits - tiny["torch"]).max() <= 1e-4
    assert convert_main(["import", str(d), str(tmp_path / "o2"), "--rope-factor", "-1"]) == 2
    assert "--rope-factor -1: must be > 0" in capsys.readouterr().err
    shutil.rmtree(out)
