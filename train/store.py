"""The tokenized store: tokenize once, in parallel; read lazily, per host, by byte range.

Layout of a store dir (written to a hidden temp sibling and renamed into place at the end, so a
killed `tokenize` leaves nothing that looks complete):

    tokens.bin      int32 little-endian token ids of every kept document, back to back
    mask.bin        uint8 loss-mask bit per token (1: a training target)
    offsets.npy     int64 [docs + 1]: document i is tokens[offsets[i]:offsets[i+1]]
    manifest.json   format, counts, vocab size, tokenizer fingerprint (when text was tokenized), sources

Flat arrays rather than ArrayRecord: packing needs arbitrary [start, end) windows of documents
(long ones are split with one token of overlap), which a flat file serves with one positioned
read and no record decoding; ArrayRecord would store whole documents and decode each. `Store` has
`__len__` and `__getitem__`, the random-access protocol `grain` data sources use. Reads go through
`os.pread`, not a memory map, so a training host's memory holds the offsets (8 bytes a document)
and the rows it is packing, never pages of the corpus, and every byte it reads is counted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
from array import array
from collections import deque
from pathlib import Path

import numpy as np

from jaxvocab.errors import DataError
from train.data import Doc, load_json, parse_record

FORMAT = 1
MANIFEST = "manifest.json"
CHUNK = 512  # records per task handed to a worker
BYTES_READ = 0  # store bytes this process has read (tests check each host reads its share)
ROWS_READ = 0  # document pieces this process has read


def is_store(path: Path) -> bool:
    return Path(path).is_dir()


def fingerprint(tok) -> str | None:
    """sha256 of what decides how text becomes ids: the merges, the special and added tokens. Taken
    from the parsed tokenizer, not its files, so a re-written but equal tokenizer.json still matches."""
    if tok is None:
        return None
    h = hashlib.sha256()
    for piece, rank in sorted(tok.mergeable_ranks.items(), key=lambda x: x[1]):
        h.update(rank.to_bytes(4, "little") + len(piece).to_bytes(2, "little") + piece)
    h.update(
        json.dumps(
            [sorted(tok.special_tokens.items()), sorted(tok.added_plain), tok.bos_id, tok.eos_id, tok.eot_id]
        ).encode()
    )
    return h.hexdigest()


# ------------------------------------------------------------------------------------ records
def records(path: Path):
    """(where, record) pairs of one source file; a record is a JSON line (str) or a Parquet row (dict)."""
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file; check --data")
    if name.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{n}", line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); sources must be UTF-8 JSONL (optionally .gz) or Parquet") from None


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
            for row in batch.to_pylist():  # a column a row lacks reads as None: the row does not have it
                n += 1
                yield f"{path}:row {n}", {k: v for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _chunks(paths):
    chunk = []
    for path in paths:
        for rec in records(Path(path)):
            chunk.append(rec)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------- tokenize
_WORKER = {}


def _init_worker(model_dir: str, vocab_size: int) -> None:
    _WORKER["tok"], _WORKER["vocab_size"] = tokenizer_for(Path(model_dir)), vocab_size


def tokenizer_for(model_dir: Path):
    from jaxvocab.io import load_plan
    from train.trainable import tokenizer_of

    return tokenizer_of(model_dir, load_plan(model_dir))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _tokenize_chunk(chunk):
    """One chunk's kept docs as flat arrays (cheap to send back), with its counts."""
    tok, V = _WORKER["tok"], _WORKER["vocab_size"]
    ids, masks, lengths = [], [], []
    counts = {"dropped": 0, "targets": 0, "text": 0}
    for where, rec in chunk:
        obj = load_json(rec, where) if isinstance(rec, str) else rec
        doc = parse_record(obj, where, tok, V)
        counts["text"] += isinstance(obj, dict) and "input_ids" not in obj
        targets = int(doc.mask[1:].sum())
        if not targets:
            counts["dropped"] += 1
            continue
        counts["targets"] += targets
        ids.append(doc.ids)
        masks.append(doc.mask.astype(np.uint8))
        lengths.append(len(doc.ids))
    return np.array(lengths, np.int64), _concat(ids, np.int32), _concat(masks, np.uint8), counts


def _results(paths, model_dir: Path, vocab_size: int, workers: int):
    """Tokenized chunks in source order; at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(str(model_dir), vocab_size)
        yield from map(_tokenize_chunk, _chunks(paths))
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, (str(model_dir), vocab_size)) as pool:
        pending = deque()
        for chunk in _chunks(paths):
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize(
    model_dir: Path,
    sources: list[Path],
    out: Path,
    workers: int = 1,
    overwrite: bool = False,
    vocab_size: int | None = None,
) -> dict:
    """Tokenize `sources` with the model's tokenizer into a store at `out`; returns the manifest."""
    from jaxvocab.io.atomic import atomic_dir

    vocab_size = vocab_size or model_vocab_size(model_dir)
    with atomic_dir(out, overwrite) as tmp:
        offsets, total, counts = array("q", [0]), 0, {"dropped": 0, "targets": 0, "text": 0}  # 8 bytes a doc
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            for lengths, ids, mask, got in _results(sources, model_dir, vocab_size, workers):
                ft.write(ids.astype("<i4").tobytes())
                fm.write(mask.tobytes())
                offsets.extend(total + np.cumsum(lengths))
                total += len(ids)
                counts = {k: counts[k] + got[k] for k in counts}
        if len(offsets) == 1:
            raise DataError(
                f"{', '.join(map(str, sources))}: no record has a token to train on "
                "(empty files, or every loss_mask is 0)"
            )
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, np.int64))
        manifest = {
            "format": FORMAT,
            "docs": len(offsets) - 1,
            "tokens": total,
            "targets": counts["targets"],
            "dropped": counts["dropped"],
            "vocab_size": vocab_size,
            "tokenizer": fingerprint(tokenizer_for(Path(model_dir))) if counts["text"] else None,
            "sources": [str(Path(s).name) for s in sources],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def model_vocab_size(model_dir: Path) -> int:
    from jaxvocab.config import LlamaConfig
    from jaxvocab.io import detect

    kind = detect(Path(model_dir))
    if kind == "meta":
        params = json.loads((Path(model_dir) / "params.json").read_text())
        return int(params["vocab_size"])
    return LlamaConfig.from_hf_file(Path(model_dir)).vocab_size


# ------------------------------------------------------------------------------------- read
class Store:
    """A store opened for training: checked up front, then read by positioned reads only."""

    def __init__(self, path, vocab_size: int | None = None, tok=None):
        self.path = Path(path)
        self.manifest = self._manifest()
        n, total = self.manifest["docs"], self.manifest["tokens"]
        self.offsets = self._offsets(n, total)
        self.lengths = np.diff(self.offsets)
        self._fds = {}
        for name, size in (("tokens.bin", 4 * total), ("mask.bin", total)):
            f = self.path / name
            got = f.stat().st_size if f.is_file() else None
            if got != size:
                what = "missing" if got is None else f"{got} bytes, the manifest implies {size} (truncated?)"
                raise DataError(f"{f}: {what}; rebuild the store with `jaxvocab-train tokenize`")
            self._fds[name] = os.open(f, os.O_RDONLY)
        self.vocab_size = vocab_size
        if vocab_size is not None and self.manifest["vocab_size"] > vocab_size:
            raise DataError(
                f"{self.path}: tokenized for a vocabulary of {self.manifest['vocab_size']}, the model has "
                f"{vocab_size}; tokenize again with this --model"
            )
        want = self.manifest["tokenizer"]
        if want is not None and fingerprint(tok) != want:
            raise DataError(
                f"{self.path}: tokenized with another tokenizer or vocab plan than --model's; "
                "tokenize again with this --model"
            )

    def _manifest(self) -> dict:
        f = self.path / MANIFEST
        try:
            m = json.loads(f.read_text())
        except FileNotFoundError:
            raise DataError(
                f"{self.path}: not a tokenized store (no {MANIFEST}); build one with "
                "`jaxvocab-train tokenize`, or pass a JSONL file"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{f}: corrupt manifest; rebuild the store with `jaxvocab-train tokenize`") from None
        keys = ("format", "docs", "tokens", "vocab_size", "tokenizer")
        if (
            not isinstance(m, dict)
            or any(k not in m for k in keys)
            or m["format"] != FORMAT
            or not all(isinstance(m[k], int) and m[k] >= 0 for k in ("docs", "tokens", "vocab_size"))
        ):
            raise DataError(
                f"{f}: not a format-{FORMAT} store manifest; rebuild the store with `jaxvocab-train tokenize`"
            )
        return m

    def _offsets(self, n: int, total: int) -> np.ndarray:
        f = self.path / "offsets.npy"
        try:
            off = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(
                f"{f}: unreadable ({str(e).splitlines()[0]}); rebuild the store with `jaxvocab-train tokenize`"
            ) from None
        if (
            off.dtype != np.int64
            or off.shape != (n + 1,)
            or off[0] != 0
            or off[-1] != total
            or np.any(np.diff(off) < 1)
        ):
            raise DataError(
                f"{f}: offsets do not match the manifest ({n} documents, {total} tokens); "
                "rebuild the store with `jaxvocab-train tokenize`"
            )
        return off

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Doc:
        return self.read(i, 0, int(self.lengths[i]))

    def read(self, i: int, start: int, end: int) -> Doc:
        global BYTES_READ, ROWS_READ
        a = int(self.offsets[i]) + start
        n = end - start
        ids = np.frombuffer(os.pread(self._fds["tokens.bin"], 4 * n, 4 * a), "<i4").astype(np.int32)
        mask = np.frombuffer(os.pread(self._fds["mask.bin"], n, a), np.uint8)
        if len(ids) != n or len(mask) != n:
            raise DataError(
                f"{self.path}: short read at document {i}; the store changed or was truncated while training"
            )
        BYTES_READ += 5 * n
        ROWS_READ += 1
        if self.vocab_size is not None and n and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(
                f"{self.path / 'tokens.bin'}: document {i} holds token ids outside [0, {self.vocab_size}); "
                "the store is corrupt: rebuild it with `jaxvocab-train tokenize`"
            )
        return Doc(ids, mask)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
