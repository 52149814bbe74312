"""JSONL -> packed, loss-masked batches, in a deterministic order that survives kill -9 and resume.

Every line is tokenized and checked up front, so a bad line fails the run before the first step
(with file:line) instead of hours in. Documents are packed into rows of `seq_len` with segment ids
(1, 2, ... per row; 0 = padding): packed documents never attend to each other and positions
restart per document. A document that does not fit in what is left of a row starts the next row,
so no conversation is cut between rows; one longer than a row is split into windows overlapping by
one token, so every token is still a target exactly once.

Targets are per position: `targets[t]` is the next token of the same document and `weights[t]`
its loss-mask bit; the last token of a document predicts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxvocab.errors import DataError, JaxVocabError, brief


class Doc(NamedTuple):
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # float32 [n]: 1 where the token is a training target


class Batch(NamedTuple):
    """[K, B, T] arrays: K micro-batches of B rows of T tokens."""

    inputs: np.ndarray
    segments: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


def read_jsonl(path, tok, vocab_size: int) -> list[Doc]:
    """Tokenize every line of `path`; documents without a single target are dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check --data / --eval") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); training data must be UTF-8 JSONL") from None
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        doc = _parse_line(line, f"{path}:{n}", tok, vocab_size)
        if doc.mask[1:].any():
            docs.append(doc)
    if not docs:
        raise DataError(f"{path}: no line has a token to train on (empty file, or every loss_mask is 0)")
    return docs


def _parse_line(line: str, where: str, tok, vocab_size: int) -> Doc:
    return parse_record(load_json(line, where), where, tok, vocab_size)


def load_json(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; each line must be one flat JSON object") from None


def parse_record(obj, where: str, tok, vocab_size: int) -> Doc:
    """One record (a JSONL line's object or a Parquet row) -> Doc, checked; errors carry `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'text', 'messages' or 'input_ids'")
    try:
        if "input_ids" in obj:
            ids, mask = _pretokenized(obj, where)
        elif "messages" in obj or "text" in obj:
            if tok is None:
                raise DataError(
                    f"{where}: 'text'/'messages' need the model's tokenizer files, which the checkpoint "
                    "lacks; pass pre-tokenized 'input_ids' instead"
                )
            ids, mask = _tokenize(obj, where, tok)
        else:
            raise DataError(
                f"{where}: expected a key 'text', 'messages' or 'input_ids' (got {brief(list(obj)) if obj else 'none'})"
            )
    except DataError:
        raise
    except JaxVocabError as e:
        raise DataError(f"{where}: {e}") from None
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise DataError(
            f"{where}: token id {int(bad[0])} is outside the model's vocabulary [0, {vocab_size}); "
            "tokenize with this model's tokenizer"
        )
    return Doc(ids.astype(np.int32), np.asarray(mask, np.float32))


def _pretokenized(obj: dict, where: str):
    ids, mask = obj["input_ids"], obj.get("loss_mask")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and -(2**31) <= i < 2**31 for i in ids
    ):
        raise DataError(f"{where}: 'input_ids' must be a list of integers (int32 token ids)")
    if mask is None:
        return ids, [1] * len(ids)
    if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise DataError(f"{where}: 'loss_mask' must be a list of 0/1 as long as 'input_ids' ({len(ids)})")
    return ids, mask


def _tokenize(obj: dict, where: str, tok):
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        return tok.encode_chat(msgs)
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string")
    ids = tok.encode(text, bos=tok.bos_id is not None, eos=tok.eos_id is not None)
    return ids, [1] * len(ids)


def pieces(doc: Doc, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most seq_len tokens, overlapping by one token."""
    return [piece(len(doc.ids), seq_len, k) for k in range(n_pieces(len(doc.ids), seq_len))]


def n_pieces(n: int, seq_len: int) -> int:
    return 1 if n <= seq_len else -(-(n - 1) // (seq_len - 1))


def piece(n: int, seq_len: int, k: int) -> tuple[int, int]:
    if n <= seq_len:
        return 0, n
    s = k * (seq_len - 1)
    return s, min(s + seq_len, n)


class MemoryDocs:
    """Documents held in RAM (a JSONL tokenized on the fly), behind the interface a store offers."""

    def __init__(self, docs: list[Doc]):
        self.docs = docs
        self.lengths = np.array([len(d.ids) for d in docs], np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def read(self, i: int, start: int, end: int) -> Doc:
        d = self.docs[i]
        return Doc(d.ids[start:end], d.mask[start:end])


class Packer:
    """Endless stream of packed batches; `state` (epoch, cursor, piece) pins its exact position.

    Each epoch visits the documents in a permutation seeded by (seed, epoch), so the stream after
    a restore is the stream that would have followed without the interruption. Packing is planned
    from document lengths alone, for the whole global batch, identically on every process; tokens
    are then read only for the rows asked for (`next(rows=...)`), so a host reads its share only.
    """

    def __init__(self, docs, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0, shuffle: bool = True):
        if seq_len < 2:
            raise DataError(f"seq_len={seq_len}: need at least 2 tokens per row (one input, one target)")
        self.source = MemoryDocs(docs) if isinstance(docs, list) else docs
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self.lengths = self.source.lengths
        self.state = {"epoch": 0, "cursor": 0, "piece": 0}
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))

    def load_state(self, state: dict) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "cursor", "piece")}
        self._order = self._permutation(self.state["epoch"])

    def _advance(self) -> None:
        s = self.state
        s["piece"] += 1
        if s["piece"] == n_pieces(int(self.lengths[self._order[s["cursor"]]]), self.seq_len):
            s["piece"], s["cursor"] = 0, s["cursor"] + 1
            if s["cursor"] == len(self.lengths):
                s["cursor"], s["epoch"] = 0, s["epoch"] + 1
                self._order = self._permutation(s["epoch"])

    def plan_row(self, within_epoch: bool = False) -> list[tuple[int, int, int]]:
        """The (doc, start, end) pieces of the next row; `within_epoch` ends it at the epoch boundary."""
        T, pos, epoch, plan = self.seq_len, 0, self.state["epoch"], []
        while not (within_epoch and self.state["epoch"] != epoch):
            d = int(self._order[self.state["cursor"]])
            start, end = piece(int(self.lengths[d]), T, self.state["piece"])
            if end - start > T - pos:
                break
            plan.append((d, start, end))
            pos += end - start
            self._advance()
        return plan

    def fill(self, plan: list[tuple[int, int, int]]):
        """Read a planned row's tokens: [inputs, segments, targets, weights]."""
        T = self.seq_len
        row = [np.zeros(T, np.int32) for _ in range(3)] + [np.zeros(T, np.float32)]
        pos = 0
        for seg, (d, start, end) in enumerate(plan, 1):
            place(row, pos, seg, self.source.read(d, start, end))
            pos += end - start
        return row

    def row(self, within_epoch: bool = False):
        """One packed row (planned and read)."""
        return self.fill(self.plan_row(within_epoch))

    def next(self, rows: slice = slice(None)) -> Batch:
        """The next [K, B, T] batch, or only its rows `rows` of each micro-batch ([K, b, T]); the
        stream advances by the whole global batch either way. `self.last_tokens` counts all of it."""
        plans = [[self.plan_row() for _ in range(self.batch_size)] for _ in range(self.grad_accum)]
        self.last_tokens = sum(e - s for mb in plans for r in mb for _, s, e in r)
        filled = [[self.fill(r) for r in mb[rows]] for mb in plans]
        return Batch(*(np.stack([np.stack([r[i] for r in mb]) for mb in filled]) for i in range(4)))


def place(row, pos: int, seg: int, doc: Doc) -> None:
    """Write a document piece into row at pos: inputs, segment, next-token targets and their weights."""
    inputs, segments, targets, weights = row
    n = len(doc.ids)
    inputs[pos : pos + n] = doc.ids
    segments[pos : pos + n] = seg
    targets[pos : pos + n - 1] = doc.ids[1:]
    weights[pos : pos + n - 1] = doc.mask[1:]


def eval_batches(docs: list[Doc], seq_len: int, batch_size: int) -> list[Batch]:
    """One pass over `docs` in file order, packed like training; the last batch padded with empty rows."""
    packer = Packer(docs, seq_len, 1, 1, shuffle=False)
    rows = []
    while packer.state["epoch"] == 0:
        rows.append(packer.row(within_epoch=True))
    rows += [[np.zeros_like(a) for a in rows[0]] for _ in range(-len(rows) % batch_size)]
    return [
        Batch(*(np.stack([r[i] for r in rows[b : b + batch_size]])[None] for i in range(4)))
        for b in range(0, len(rows), batch_size)
    ]
