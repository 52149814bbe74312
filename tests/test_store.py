"""The tokenized store: `jaxvocab-train tokenize` over JSONL / .gz / Parquet with the real Llama-3
tokenizer, N workers equal to one, the same docs and masks as on-the-fly JSONL, lazy reads that
pack exactly like in-memory docs, and bad or truncated stores as one-line errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from train import store as token_store
from train.__main__ import main
from train.data import Packer, read_jsonl

FILES = ("tokens.bin", "mask.bin", "offsets.npy")


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A checkpoint dir as far as tokenizing goes: the real tokenizer files and a config.json."""
    from examples.llama3_tokenizer import tokenizing_checkpoint

    return tokenizing_checkpoint(tmp_path_factory.mktemp("tokmodel"))


def _records(n=1300):
    rs = np.random.RandomState(0)
    words = ["alpha", "beta", "gamma", "délta", "東京", "42", "\n", "don't", "<|eot_id|>"]
    out = []
    for i in range(n):
        text = " ".join(rs.choice(words, rs.randint(1, 40)))
        if i % 3 == 0:
            out.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]})
        elif i % 3 == 1:
            out.append({"text": text})
        else:
            ids = rs.randint(0, 128256, rs.randint(1, 30)).tolist()
            out.append({"input_ids": ids, "loss_mask": [int(x) for x in rs.rand(len(ids)) < 0.5]})
    return out


def _arrays(path):
    return {f: (path / f).read_bytes() for f in FILES}


def test_tokenize_workers_formats_and_same_docs_as_jsonl(tok_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _records()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl.read_text())
    rows = [{k: r.get(k) for k in ("text", "messages", "input_ids", "loss_mask")} for r in recs]  # absent: null
    pq.write_table(pa.Table.from_pylist(rows[:700]), tmp_path / "c1.parquet")  # split as `datasets` shards
    pq.write_table(pa.Table.from_pylist(rows[700:]), tmp_path / "c2.parquet")
    runs = {
        "one": ([jsonl], 1),
        "two": ([jsonl], 2),
        "gz": ([tmp_path / "b.jsonl.gz"], 1),
        "parquet": ([tmp_path / "c1.parquet", tmp_path / "c2.parquet"], 1),
    }
    for name, (srcs, workers) in runs.items():
        code = main(["tokenize", "--model", tok_model, "--data", *srcs, "--out", tmp_path / name, "--workers", workers])
        assert code == 0, capsys.readouterr().err
    one = _arrays(tmp_path / "one")
    for name in ("two", "gz", "parquet"):
        assert _arrays(tmp_path / name) == one, name
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    tok = token_store.tokenizer_for(tok_model)
    assert m["tokenizer"] == token_store.fingerprint(tok) and m["vocab_size"] == 128256
    docs = read_jsonl(jsonl, tok, 128256)
    st = token_store.Store(tmp_path / "two", 128256, tok)
    assert len(st) == len(docs) == m["docs"] and m["dropped"] == len(recs) - len(docs)
    for i in (0, 1, 2, 500, len(docs) - 1):
        assert np.array_equal(st[i].ids, docs[i].ids) and np.array_equal(st[i].mask, docs[i].mask.astype(np.uint8))
    import grain  # the store is a random-access source Grain reads as is

    ds = grain.MapDataset.source(st)
    assert len(ds) == len(docs) and np.array_equal(ds[7].ids, docs[7].ids)
    # a store packs exactly like the same docs in memory, and reading one row reads only that row
    a, b = Packer(docs, 64, 4, 2, seed=3), Packer(st, 64, 4, 2, seed=3)
    for _ in range(5):
        x, before = a.next(), token_store.BYTES_READ
        y = b.next(slice(1, 3))
        assert all(np.array_equal(u[:, 1:3], v) for u, v in zip(x, y, strict=True))
        assert token_store.BYTES_READ - before == 5 * int(np.count_nonzero(x.segments[:, 1:3]))
    assert a.state == b.state


def test_a_killed_tokenize_leaves_no_store(tok_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 600 + '{"text": 3}\n')
    code = main(["tokenize", "--model", tok_model, "--data", bad, "--out", tmp_path / "st", "--workers", 2])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "bad.jsonl:601: 'text' must be a string" in err, err
    assert list(tmp_path.iterdir()) == [bad]  # no store, no temp dir left behind


def _corrupt(kind, d):
    if kind == "truncated tokens":
        with open(d / "tokens.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 4)
    elif kind == "missing mask":
        (d / "mask.bin").unlink()
    elif kind == "manifest":
        (d / "manifest.json").write_text("{not json")
    elif kind == "no manifest":
        (d / "manifest.json").unlink()
    elif kind == "offsets":
        np.save(d / "offsets.npy", np.arange(3, dtype=np.int64))
    elif kind == "offsets garbage":
        (d / "offsets.npy").write_bytes(b"\x93NUMPY garbage")
    elif kind == "ids":
        ids = np.fromfile(d / "tokens.bin", "<i4")
        ids[:] = 10**6
        ids.tofile(d / "tokens.bin")
    elif kind == "tokenizer":
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(dict(m, tokenizer="0" * 64)))


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated tokens", "the manifest implies"),
        ("missing mask", "mask.bin: missing"),
        ("manifest", "corrupt manifest"),
        ("no manifest", "not a tokenized store"),
        ("offsets", "offsets do not match the manifest"),
        ("offsets garbage", "offsets.npy: unreadable"),
        ("ids", "outside [0, 256)"),
        ("tokenizer", "another tokenizer"),
    ],
)
def test_bad_store_is_a_one_line_error(tmp_path, capsys, kind, match):
    from tests.builders import make_hf_checkpoint

    model, _ = make_hf_checkpoint(tmp_path / "m", tied=True, max_pos=64)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"input_ids": list(range(i, i + 20))}) + "\n" for i in range(30)))
    assert main(["tokenize", "--model", model, "--data", src, "--out", tmp_path / "st"]) == 0
    _corrupt(kind, tmp_path / "st")
    capsys.readouterr()
    code = main(
        [
            "--model",
            model,
            "--data",
            tmp_path / "st",
            "--out",
            tmp_path / "run",
            "--trainable",
            "ids:5",
            "--steps",
            1,
            "--batch-size",
            2,
            "--seq-len",
            32,
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--coordinator", "127.0.0.1:1234"], "--num-processes, --process-id missing"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "need 0 <= process-id < num-processes"),
        (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    ],
)
def test_distributed_flags_are_checked(tmp_path, capsys, flags, match):
    code = main(["--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "o", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err, err
