"""Issue 9, generated bad inputs against the readers, through `jaxvocab-convert` in-process.

Valid files are mutated structurally: safetensors truncated at every header boundary, header
fields given every JSON type, offsets corrupted, shapes flipped; config.json / params.json /
the shard index given every JSON type per field; .pth archives truncated and pickles crafted
to exhaust the unpickler. Each case must end in one `error:` line (or succeed when the mutation
happens to be harmless), leave no output or temp dir, and leave the inputs byte-identical.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convert.__main__ import main
from tests.builders import make_hf_checkpoint
from tests.hardening_util import (
    JSON_VALUES,
    attempt,
    boundaries,
    cases,
    join_safetensors,
    split_safetensors,
)
from tests.meta_writer import make_hf_model, write_meta


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-src")
    single, _ = make_hf_checkpoint(root / "single", vocab=128, hidden=32, intermediate=64, heads=4, kv_heads=2)
    sharded, _ = make_hf_checkpoint(root / "sharded", shards=True)  # 256 x 64: several 200KB shards
    _, hf_model = make_hf_model(root / "meta-hf", vocab=128, dim=64, heads=4, kv_heads=2, multiple_of=32)
    meta = write_meta(hf_model, root / "meta", multiple_of=32)
    return {"single": single, "sharded": sharded, "meta": meta}


def _copy(src: Path) -> tuple[tempfile.TemporaryDirectory, Path, Path]:
    """A fresh copy of `src` for one example, and an OUT beside it."""
    tmp = tempfile.TemporaryDirectory()
    dst = Path(tmp.name) / "src"
    shutil.copytree(src, dst)
    return tmp, dst, Path(tmp.name) / "out"


def _import(capsys, src: Path, out: Path, category: str, ok=True, extra=()):
    return attempt(
        capsys, main, ["import", src, out, *extra], inputs=[src], outs=[] if ok else [out], ok=ok, category=category
    )


# --------------------------------------------------------------------------------- safetensors
def test_safetensors_truncated_at_every_boundary(sources, capsys):
    tmp, src, out = _copy(sources["single"])
    with tmp:
        f = src / "model.safetensors"
        blob = f.read_bytes()
        cuts = boundaries(blob)
        assert len(cuts) > 50
        for cut in cuts:
            f.write_bytes(blob[:cut])
            _import(capsys, src, out, "safetensors: truncated at a boundary", ok=False)


@cases(60)
@given(data=st.data())
def test_safetensors_header_mutations(sources, capsys, data):
    tmp, src, out = _copy(sources["single"])
    with tmp:
        f = src / "model.safetensors"
        header, payload = split_safetensors(f.read_bytes())
        names = sorted(k for k in header if k != "__metadata__")
        kind = data.draw(st.sampled_from(["field", "offset", "shape", "metadata", "length", "trailing", "whole"]))
        name = data.draw(st.sampled_from(names))
        length = None
        if kind == "field":
            header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON_VALUES)
        elif kind == "offset":
            i = data.draw(st.sampled_from([0, 1]))
            header[name]["data_offsets"][i] += data.draw(st.sampled_from([-8, -4, -1, 1, 4, 8, 10**6, -(10**6)]))
        elif kind == "shape":
            shape = header[name]["shape"]
            header[name]["shape"] = data.draw(
                st.sampled_from([shape[::-1] + [1], [shape[0] * 2] + shape[1:], [], [0] + shape, [2**62, 2**62]])
            )
        elif kind == "metadata":
            header["__metadata__"] = data.draw(st.one_of(JSON_VALUES, st.just({"format": 1}), st.just({"a": ["b"]})))
        elif kind == "length":
            length = data.draw(st.sampled_from([0, 1, 2**63, 10**9, 200_000_000]))
        elif kind == "trailing":
            payload += b"\0" * data.draw(st.integers(1, 16))
        else:
            header = data.draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3), st.integers()))
        f.write_bytes(join_safetensors(header, payload, length))
        _import(capsys, src, out, f"safetensors: header {kind}")
        shutil.rmtree(out, ignore_errors=True)


def test_safetensors_library_agrees(sources, tmp_path):
    """Overlapping offsets, offsets into the header, trailing bytes: refused by us as by safetensors."""
    from safetensors import SafetensorError, safe_open

    from jaxvocab.errors import CheckpointError
    from jaxvocab.io.safetensors_io import read_header

    header, payload = split_safetensors((sources["single"] / "model.safetensors").read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    first = header[names[0]]
    bad = {
        "overlap": ({**header, names[1]: {**header[names[1]], "data_offsets": first["data_offsets"]}}, payload),
        "trailing": (header, payload + b"\0" * 8),
        "float shape": ({**header, names[0]: {**first, "shape": [float(s) for s in first["shape"]]}}, payload),
    }
    for label, (h, p) in bad.items():
        f = tmp_path / f"{label}.safetensors"
        f.write_bytes(join_safetensors(h, p))
        with pytest.raises((SafetensorError, Exception)):
            with safe_open(f, framework="np") as g:
                g.keys()
        with pytest.raises(CheckpointError):
            read_header(f)


# ------------------------------------------------------------------------------ JSON configs
def _swap(d: dict, data) -> None:
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(JSON_VALUES)


@cases(60)
@given(data=st.data())
def test_config_json_type_swaps(sources, capsys, data):
    tmp, src, out = _copy(sources["single"])
    with tmp:
        f = src / "config.json"
        config = json.loads(f.read_text())
        if data.draw(st.booleans()) and isinstance(config.get("rope_parameters"), dict):
            _swap(config["rope_parameters"], data)
        else:
            _swap(config, data)
        f.write_text(json.dumps(config))
        _import(capsys, src, out, "config.json: field type swap")
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(
    "text",
    ["[]", "[1, 2]", '"config"', "3", "null", "{", "", "\udcff", '{"a": ' * 5000],
    ids=["list", "list2", "string", "number", "null", "open brace", "empty", "bad utf8", "deep"],
)
def test_config_json_not_an_object(sources, capsys, text, tmp_path):
    tmp, src, out = _copy(sources["single"])
    with tmp:
        (src / "config.json").write_text(text, errors="surrogateescape")
        _import(capsys, src, out, "config.json: not an object", ok=False)


@cases(40)
@given(data=st.data())
def test_index_json_mutations(sources, capsys, data):
    tmp, src, out = _copy(sources["sharded"])
    with tmp:
        f = src / "model.safetensors.index.json"
        index = json.loads(f.read_text())
        kind = data.draw(st.sampled_from(["top", "weight_map", "entry", "target", "metadata"]))
        if kind == "top":
            index = data.draw(JSON_VALUES)
        elif kind == "weight_map":
            index["weight_map"] = data.draw(JSON_VALUES)
        elif kind == "entry":
            index["weight_map"][data.draw(st.sampled_from(sorted(index["weight_map"])))] = data.draw(JSON_VALUES)
        elif kind == "target":
            name = data.draw(st.sampled_from(sorted(index["weight_map"])))
            index["weight_map"][name] = data.draw(
                st.sampled_from(["../x.safetensors", "/etc/passwd", "nope", "config.json", "a\u0000b", ".."])
            )
        else:
            index["metadata"] = data.draw(JSON_VALUES)
        f.write_text(json.dumps(index))
        _import(capsys, src, out, f"index.json: {kind}")
        shutil.rmtree(out, ignore_errors=True)


@cases(40)
@given(data=st.data())
def test_params_json_type_swaps(sources, capsys, data):
    tmp, src, out = _copy(sources["meta"])
    with tmp:
        f = src / "params.json"
        params = json.loads(f.read_text())
        _swap(params, data)
        f.write_text(json.dumps(params))
        _import(capsys, src, out, "params.json: field type swap")
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("multiple_of", 0),
        ("norm_eps", 0),
        ("norm_eps", -1e-5),
        ("rope_theta", 0),
        ("dim", 64.0),
        ("n_layers", "2"),
        ("n_heads", True),
    ],
)
def test_params_json_insane_values(sources, capsys, field, value):
    tmp, src, out = _copy(sources["meta"])
    with tmp:
        params = json.loads((src / "params.json").read_text())
        params[field] = value
        (src / "params.json").write_text(json.dumps(params))
        _, err = _import(capsys, src, out, "params.json: insane value", ok=False)
        assert "params.json" in err and field in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", 0),
        ("rms_norm_eps", -1.0),
        ("rms_norm_eps", float("nan")),
        ("rope_theta", 0),
        ("hidden_size", 32.0),
        ("num_hidden_layers", "2"),
        ("intermediate_size", 64.5),
        ("vocab_size", True),
    ],
)
def test_config_json_insane_values(sources, capsys, field, value):
    tmp, src, out = _copy(sources["single"])
    with tmp:
        config = json.loads((src / "config.json").read_text())
        config.pop("rope_parameters", None) if field == "rope_theta" else None
        config[field] = value
        (src / "config.json").write_text(json.dumps(config))
        _, err = _import(capsys, src, out, "config.json: insane value", ok=False)
        assert "config.json" in err and field in err


# ------------------------------------------------------------------------------------- .pth
def _rezip(path: Path, replace: dict[str, bytes]) -> None:
    """Re-write a torch zip with some members replaced (stored, like torch writes them)."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(name, blob)


def _pkl_name(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))


def test_pth_truncated_at_every_zip_boundary(sources, capsys):
    tmp, src, out = _copy(sources["meta"])
    with tmp:
        f = src / "consolidated.00.pth"
        blob = f.read_bytes()
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            infos = z.infolist()
        cuts = {0, 4, 30, len(blob) - 1, len(blob) - 22, len(blob) - 23}
        cuts |= {i.header_offset + k for i in infos for k in (0, 1, 30)}
        for cut in sorted(c for c in cuts if 0 <= c < len(blob)):
            f.write_bytes(blob[:cut])
            _import(capsys, src, out, ".pth: truncated at a zip boundary", ok=False)


@cases(30)
@given(pos=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_pth_pickle_byte_flips(sources, capsys, pos, byte):
    tmp, src, out = _copy(sources["meta"])
    with tmp:
        f = src / "consolidated.00.pth"
        name = _pkl_name(f)
        with zipfile.ZipFile(f) as z:
            pkl = bytearray(z.read(name))
        pkl[pos % len(pkl)] = byte
        _rezip(f, {name: bytes(pkl)})
        _import(capsys, src, out, ".pth: pickle byte flip")
        shutil.rmtree(out, ignore_errors=True)


def _deep_tuple_dag(depth: int) -> bytes:
    """A tiny pickle whose value is a tuple DAG of `depth` levels sharing children: hashing or
    rendering it takes 2**depth steps."""
    ops = [pickle.PROTO + b"\x02", pickle.EMPTY_TUPLE, pickle.BINPUT + b"\x00"]
    for _ in range(depth):
        ops += [pickle.BINGET + b"\x00", pickle.BINGET + b"\x00", pickle.TUPLE2, pickle.BINPUT + b"\x00"]
    ops += [pickle.EMPTY_DICT, pickle.BINGET + b"\x00", pickle.BININT1 + b"\x01", pickle.SETITEM, pickle.STOP]
    return b"".join(ops)


def _memo_bomb(n: int) -> bytes:
    ops = [pickle.PROTO + b"\x04", pickle.EMPTY_LIST]
    ops += [pickle.MEMOIZE] * n
    return b"".join(ops + [pickle.STOP])


@pytest.mark.parametrize(
    "label, pkl",
    ids=lambda v: v if isinstance(v, str) else "",
    argvalues=[
        ("shared tuple DAG, depth 64", _deep_tuple_dag(64)),
        ("memo of 600k entries", _memo_bomb(600_000)),
        ("evil global", b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03."),
        (
            "huge long",
            pickle.PROTO
            + b"\x02"
            + pickle.LONG4
            + (4_000_000).to_bytes(4, "little")
            + b"\x7f" * 4_000_000
            + pickle.STOP,
        ),
        ("nested lists 10k", pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * 10_000 + pickle.APPEND * 9_999 + pickle.STOP),
        ("not a dict", pickle.dumps([1, 2, 3])),
        (
            "persistent id of a huge string",
            pickle.PROTO
            + b"\x02"
            + pickle.BINUNICODE
            + (5_000_000).to_bytes(4, "little")
            + b"a" * 5_000_000
            + pickle.BINPERSID
            + pickle.STOP,
        ),
    ],
)
def test_pth_crafted_pickles(sources, capsys, label, pkl):
    tmp, src, out = _copy(sources["meta"])
    with tmp:
        f = src / "consolidated.00.pth"
        _rezip(f, {_pkl_name(f): pkl})
        _, err = _import(capsys, src, out, ".pth: crafted pickle", ok=False)
        assert len(err) < 600, err


def test_nan_weights_refused_unless_allowed(sources, capsys):
    """A NaN row imports only with --allow-nonfinite, and then never enters the mean of new rows."""
    from safetensors.numpy import load_file, save_file

    import jaxvocab
    from jaxvocab.row_stats import untrained_mask

    tmp, src, out = _copy(sources["single"])
    with tmp:
        f = src / "model.safetensors"
        tensors = load_file(f)
        tensors["model.embed_tokens.weight"][7] = np.nan
        tensors["lm_head.weight"][9, 3] = np.inf
        save_file(tensors, f, metadata={"format": "pt"})
        _, err = _import(capsys, src, out, "non-finite weights", ok=False)
        assert "NaN or Inf" in err and "--allow-nonfinite" in err and "row 7" in err
        code, err = _import(capsys, src, out, "non-finite weights", extra=["--allow-nonfinite"])
        assert code == 0, err
        model = jaxvocab.load(out, allow_nonfinite=True)
        assert untrained_mask(model)[[7, 9]].all()  # non-finite rows count as untrained ...
        model = jaxvocab.fix_untrained(model, [5])  # ... so the mean that re-inits row 5 skips them
        embed, head = np.asarray(model.embed[...]), np.asarray(model.lm_head[...])
        assert np.isnan(embed[7]).all() and np.isfinite(embed[5]).all() and np.isfinite(head[5]).all()
