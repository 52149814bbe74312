"""train.data: packing, segment isolation, masks, chat format, deterministic resumable order, bad lines."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvocab.errors import DataError
from jaxvocab.io.tokenizer_read import load_tokenizer
from jaxvocab.model import default_positions
from train.data import Doc, Packer, eval_batches, pieces, read_jsonl


def _docs(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [Doc(rs.randint(1, 256, n).astype(np.int32), (rs.rand(n) < 0.7).astype(np.float32)) for n in lengths]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _epoch_rows(packer):
    rows = []
    while packer.state["epoch"] == 0:
        rows.append(packer.row(within_epoch=True))
    return rows


def test_packing_targets_segments_and_windows():
    T = 16
    docs = _docs([5, 9, 16, 40, 3, 7])
    rows = _epoch_rows(Packer(docs, T, 1, shuffle=False))
    seen = {i: [] for i in range(len(docs))}
    cursor = 0
    for inputs, segments, targets, weights in rows:
        assert weights[segments == 0].sum() == 0 and (inputs[segments == 0] == 0).all()
        for s in range(1, segments.max() + 1):
            at = np.nonzero(segments == s)[0]
            assert (np.diff(at) == 1).all()  # a segment is contiguous
            assert weights[at[-1]] == 0  # a doc's last token predicts nothing
            np.testing.assert_array_equal(targets[at[:-1]], inputs[at[1:]])  # next token, same doc
            seen[cursor].append((inputs[at], weights[at[:-1]]))
            if sum(len(x) for x, _ in seen[cursor]) - (len(seen[cursor]) - 1) == len(docs[cursor].ids):
                cursor += 1
    assert cursor == len(docs)
    for i, doc in enumerate(docs):
        # windows overlap by one token, so every target of the doc is trained exactly once
        ids = np.concatenate([seen[i][0][0]] + [x[1:] for x, _ in seen[i][1:]])
        np.testing.assert_array_equal(ids, doc.ids)
        np.testing.assert_array_equal(np.concatenate([w for _, w in seen[i]]), doc.mask[1:])
    assert len(seen[3]) == 3 and pieces(docs[3], T) == [(0, 16), (15, 31), (30, 40)]
    # a doc that does not fit what is left of a row starts the next row instead of being cut
    assert all(len(seen[i]) == 1 for i in (0, 1, 2, 4, 5))


def test_positions_restart_and_docs_do_not_attend_to_each_other():
    from jaxvocab.config import LlamaConfig
    from jaxvocab.model import Llama

    docs = _docs([7, 12, 9], seed=1)
    inputs, segments, _, _ = Packer(docs, 32, 1, shuffle=False).row()
    pos = np.asarray(default_positions(1, 32, jnp.asarray(segments[None])))[0]
    np.testing.assert_array_equal(pos[:28], np.concatenate([np.arange(7), np.arange(12), np.arange(9)]))
    cfg = LlamaConfig(256, 64, 128, 2, 4, 2, rope_theta=10000.0)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, x, s: m(x, segment_ids=s))
    packed = np.asarray(fwd(model, jnp.asarray(inputs[None]), jnp.asarray(segments[None])))[0]
    start = 0
    for d in docs:
        alone = np.asarray(
            fwd(
                model,
                jnp.asarray(np.pad(d.ids, (0, 32 - len(d.ids)))[None]),
                jnp.asarray((np.arange(32) < len(d.ids)).astype(np.int32)[None]),
            )
        )[0]
        np.testing.assert_allclose(packed[start : start + len(d.ids)], alone[: len(d.ids)], atol=2e-5, rtol=0)
        start += len(d.ids)


def test_order_is_seeded_and_resumable():
    docs = _docs(np.random.RandomState(2).randint(3, 30, 25))
    a = Packer(docs, 32, 2, grad_accum=2, seed=7)
    stream = [a.next() for _ in range(12)]  # spans several epochs
    assert a.state["epoch"] >= 2
    b = Packer(docs, 32, 2, grad_accum=2, seed=7)
    for _ in range(5):
        b.next()
    saved = json.loads(json.dumps(b.state))
    c = Packer(docs, 32, 2, grad_accum=2, seed=7)
    c.load_state(saved)
    for want in stream[5:]:
        got = c.next()
        assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    other = Packer(docs, 32, 2, grad_accum=2, seed=8).next()
    assert not np.array_equal(other.inputs, stream[0].inputs)
    assert stream[0].inputs.shape == (2, 2, 32)


def test_eval_batches_cover_each_doc_once():
    docs = _docs([5, 9, 30, 4, 11, 6, 8])
    batches = eval_batches(docs, 16, 3)
    assert all(b.inputs.shape == (1, 3, 16) for b in batches)
    total = sum(float(b.weights.sum()) for b in batches)
    assert total == pytest.approx(sum(float(d.mask[1:].sum()) for d in docs))


def test_read_jsonl_kinds(tmp_path, llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ]
    f = _write(
        tmp_path / "d.jsonl",
        [
            {"text": "Hello world"},
            "",
            {"messages": msgs},
            {"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]},
            {"input_ids": [5, 6]},
        ],
    )
    docs = read_jsonl(f, tok, 128256)
    assert len(docs) == 4
    text, chat, pre, pre2 = docs
    assert text.ids.tolist() == [128000] + tok.encode("Hello world") + [128001]
    ids, mask = tok.encode_chat(msgs)
    assert chat.ids.tolist() == ids and chat.mask.tolist() == mask
    # loss only on the assistant replies and their <|eot_id|>
    trained = [i for i, m in zip(chat.ids.tolist(), chat.mask.tolist(), strict=True) if m]
    assert trained == tok.encode("4") + [128009] + tok.encode("6, of course.") + [128009]
    assert pre.mask.tolist() == [0, 0, 1, 1] and pre2.mask.tolist() == [1, 1]
    # packed: the chat doc's weights select exactly its assistant targets
    _, _, targets, weights = Packer([chat], 256, 1).row(within_epoch=True)
    assert targets[weights > 0].tolist() == trained


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "a"', "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "x"}', "'text', 'messages' or 'input_ids'"),
        ('{"input_ids": [1, "2"]}', "list of integers"),
        ('{"input_ids": [1, 2], "loss_mask": [1]}', "loss_mask"),
        ('{"input_ids": [1, 999]}', "token id 999"),
        ('{"text": "hi"}', "tokenizer files"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, match):
    f = _write(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 3]}, "", line])
    with pytest.raises(DataError, match=match) as e:
        read_jsonl(f, None, 256)
    assert str(e.value).startswith(f"{f}:3: ")


def test_bad_chat_and_empty_files(tmp_path, llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    f = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*role"):
        read_jsonl(f, tok, 128256)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", tok, 128256)
    f = _write(tmp_path / "masked.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [1, 0, 0]}])
    with pytest.raises(DataError, match="no line has a token to train on"):
        read_jsonl(f, None, 256)
