"""Meta's original checkpoints: params.json + consolidated.NN.pth (+ tokenizer.model).

Meta saves one file per model-parallel rank. Column-parallel weights (wq, wk, wv, w1, w3, output,
tok_embeddings) are split on dim 0, row-parallel ones (wo, w2) on dim 1, norms are replicated;
with more ranks than kv heads (405B on 16 ranks, 8 kv heads) each kv head sits on consecutive
ranks. Meta rotates interleaved pairs (x0, x1), (x2, x3)... of each q/k head while HF and this
model rotate halves, so q/k rows are reordered within each head (the inverse of the `permute` in
transformers' convert_llama_weights_to_hf.py).

No merged tensor is ever built: `io.loader.build` asks `source_for(key)` for each device's slice, and
`Merged` maps that slice to the ranks and rows that hold it (whole heads for q/k, because the
reordering is per head), so each device reads only its part of the files and replicated or
duplicated pieces are compared as they are read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxvocab.config import LlamaConfig, RopeScaling, _positive_float, read_json
from jaxvocab.errors import CheckpointError, ConfigError, UsageError, brief
from jaxvocab.io import keys
from jaxvocab.io.loader import Source, build
from jaxvocab.io.pth import LazyTensor, read_pth
from jaxvocab.io.safetensors_io import FLOATS
from jaxvocab.model import Llama
from jaxvocab.sharding import round_up

log = logging.getLogger("jaxvocab")

PARAMS = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_IGNORED = {"rope.freqs"}  # Llama 2 stored its rotary table; it is recomputed from params.json
# Meta's use_scaled_rope hard-codes everything but the factor (llama-models apply_scaling).
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_CHUNK_BYTES = 64 << 20


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth in rank order; a gap is an error, not a smaller model."""
    found = {int(m.group(1)): p for p in Path(path).iterdir() if (m := _SHARD.fullmatch(p.name))}
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth files next to {PARAMS}")
    for i in range(max(found) + 1):
        if i not in found:
            raise CheckpointError(
                f"{path}: consolidated.{i:02d}.pth is missing (shards go up to "
                f"consolidated.{max(found):02d}.pth); re-download the checkpoint"
            )
    return [found[i] for i in range(len(found))]


def intermediate_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return round_up(hidden, multiple_of)


def read_params(path: Path) -> dict:
    file = Path(path) / PARAMS
    d = read_json(file, "a Meta checkpoint dir needs params.json")
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in d]
    if missing:
        raise ConfigError(f"{file}: missing {', '.join(missing)}")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        v = d.get(k)
        required = k in ("dim", "n_layers", "n_heads")
        if (v is not None or required) and (
            isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and k != "vocab_size")
        ):
            raise ConfigError(f"{file}: {k} must be a positive integer, got {brief(v)}")
    for k in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        if d.get(k) is not None:
            _positive_float(d[k], k, str(file))
    if not isinstance(d.get("use_scaled_rope", False), (bool, type(None))):
        raise ConfigError(f"{file}: use_scaled_rope must be true or false, got {brief(d['use_scaled_rope'])}")
    if d.get("vocab_size") is not None and d["vocab_size"] <= 0 and d["vocab_size"] != -1:
        raise ConfigError(f"{file}: vocab_size must be a positive integer (or -1), got {d['vocab_size']}")
    dim, heads, kv = d["dim"], d["n_heads"], d.get("n_kv_heads") or d["n_heads"]
    if dim <= 0 or heads <= 0 or d["n_layers"] <= 0 or dim % heads or heads % kv or (dim // heads) % 2:
        raise ConfigError(
            f"{file}: dim={dim}, n_heads={heads}, n_kv_heads={kv} do not describe a Llama "
            "(dim must split into even-sized heads, n_heads into kv groups)"
        )
    return d


class Merged:
    """One Meta tensor as if its model-parallel pieces were concatenated; read by slice, never whole."""

    def __init__(self, name: str, parts: list[LazyTensor], dim: int | None, shape: tuple[int, ...]):
        self.name, self.parts, self.dim, self.shape = name, parts, dim, tuple(shape)
        local = parts[0].shape
        for p in parts:
            if p.shape != local:
                raise CheckpointError(
                    f"{p.path}: {name} has shape {list(p.shape)} but {list(local)} in "
                    f"{parts[0].path.name}; all shards of one checkpoint must agree"
                )
        bad = CheckpointError(
            f"{parts[0].path.parent}: {name} is {list(local)} in each of {len(parts)} shard(s), "
            f"which cannot make the {list(shape)} that {PARAMS} implies"
        )
        if dim is None:
            if local != self.shape:
                raise bad
            self.groups = [(0, parts)]
            return
        if len(local) != len(shape) or any(
            a != b for i, (a, b) in enumerate(zip(local, shape, strict=True)) if i != dim
        ):
            raise bad
        self.local = local[dim]
        if self.local == 0 or shape[dim] % self.local or (len(parts) * self.local) % shape[dim]:
            raise bad
        copies = len(parts) * self.local // shape[dim]  # >1 only when kv heads are duplicated
        self.groups = [(g * self.local, parts[g * copies : (g + 1) * copies]) for g in range(len(parts) // copies)]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.parts[0].dtype.itemsize

    def read(self, idx: tuple[slice, ...]) -> np.ndarray:
        """`merged[idx]` (step-1 slices), reading only the ranks that hold part of it."""
        if self.dim is None:
            return self._agreeing(self.parts, idx)
        want, out = idx[self.dim], []
        for start, copies in self.groups:
            lo, hi = max(want.start, start), min(want.stop, start + self.local)
            if lo < hi:
                local = idx[: self.dim] + (slice(lo - start, hi - start),) + idx[self.dim + 1 :]
                out.append(self._agreeing(copies, local))
        return out[0] if len(out) == 1 else np.concatenate(out, axis=self.dim)

    def _agreeing(self, copies: list[LazyTensor], idx) -> np.ndarray:
        first = copies[0].read(idx)
        for other in copies[1:]:
            if not _identical(first, other.read(idx)):
                what = "a replicated weight" if self.dim is None else "duplicated kv heads"
                raise CheckpointError(
                    f"{other.path}: {self.name} differs from {copies[0].path.name}; {what} must be "
                    "identical on every shard (corrupt or mixed-up shard files)"
                )
        return first


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise, so -0.0 vs 0.0 or NaN payloads count as different, as they do for a tied table."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    raw = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(raw), np.ascontiguousarray(b).view(raw)))


def _same_tables(a: Merged, b: Merged) -> bool:
    """Are output and tok_embeddings one table? Chunks grow from one row, so an untied model is
    told apart after reading a row or two, and a tied one never has two whole tables in memory."""
    if a.shape != b.shape:
        return False
    rows, width = a.shape
    cap = max(1, _CHUNK_BYTES // max(1, width * a.parts[0].dtype.itemsize))
    lo, step = 0, 1
    while lo < rows:
        hi = min(rows, lo + step)
        part = (slice(lo, hi), slice(0, width))
        if not _identical(a.read(part), b.read(part)):
            return False
        lo, step = hi, min(step * 8, cap)
    return True


def _rotary_rows(t: Merged, rows: slice, cols: slice, head_dim: int) -> np.ndarray:
    """HF rows [a, b) of wq/wk: read the whole heads they fall in, un-interleave each head, cut."""
    h0, h1 = rows.start // head_dim, -(-rows.stop // head_dim)
    block = t.read((slice(h0 * head_dim, h1 * head_dim), cols))
    block = block.reshape(h1 - h0, head_dim // 2, 2, -1).swapaxes(1, 2).reshape((h1 - h0) * head_dim, -1)
    return block[rows.start - h0 * head_dim : rows.stop - h0 * head_dim]


class MetaCheckpoint:
    """params.json + the shard files' pickles (no weights read beyond the tied-head check)."""

    def __init__(self, path: Path, rope_factor: float | None = None):
        self.path = Path(path)
        self.params = p = read_params(self.path)
        self.files = shard_files(self.path)
        self.shards = [read_pth(f) for f in self.files]
        n_layers, dim, mp = p["n_layers"], p["dim"], len(self.shards)
        self._check_names(n_layers)
        emb = self.shards[0]["tok_embeddings.weight"]
        if len(emb.shape) != 2:
            raise CheckpointError(f"{emb.path}: tok_embeddings.weight has shape {list(emb.shape)}; expected 2-D")
        # Llama 2 split the embedding on dim 1 (ParallelEmbedding); Llama 3 splits the vocab (dim 0).
        self.embed_split = 1 if mp > 1 and emb.shape[1] != dim and emb.shape[1] * mp == dim else 0
        vocab = p.get("vocab_size", -1)
        if vocab in (-1, None):
            vocab = emb.shape[0] * (mp if self.embed_split == 0 else 1)
        tables = {
            n: self._merged(n, split, (vocab, dim))
            for n, split in (("tok_embeddings.weight", self.embed_split), ("output.weight", 0))
        }
        tied = _same_tables(tables["tok_embeddings.weight"], tables["output.weight"])
        self.dtype = emb.dtype
        self.config = self._config(vocab, tied, rope_factor)
        self.tensors = dict(tables)
        for key in keys.KEYS:
            split = self.embed_split if key.path == ("embed",) else key.meta_split
            for name in keys.names(key, self.config, "meta"):
                if name not in self.tensors:
                    self.tensors[name] = self._merged(name, split, keys.checkpoint_shape(key, self.config))

    def _check_names(self, n_layers: int) -> None:
        expected = {k.meta.format(i=i) for k in keys.KEYS for i in (range(n_layers) if k.layered else [0])}
        for f, shard in zip(self.files, self.shards, strict=True):
            missing = sorted(expected - set(shard), key=keys.natural_order)
            if missing:
                raise CheckpointError(
                    f"{f}: tensor {missing[0]!r} is missing"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                    f"the checkpoint does not match {PARAMS} (n_layers={n_layers})"
                )
            extra = sorted(set(shard) - expected - _IGNORED, key=keys.natural_order)
            if extra:
                raise CheckpointError(f"{f}: unexpected tensor {extra[0]!r}; jaxvocab reads plain Llama checkpoints")
            for name in expected:
                if shard[name].dtype not in FLOATS:
                    raise CheckpointError(f"{f}: {name} has dtype {shard[name].dtype}; weights must be floating point")

    def _merged(self, name: str, split: int | None, shape) -> Merged:
        return Merged(name, [s[name] for s in self.shards], split, shape)

    def _config(self, vocab: int, tied: bool, rope_factor: float | None) -> LlamaConfig:
        p, where = self.params, self.path / PARAMS
        scaled = bool(p.get("use_scaled_rope", False))
        legacy = p.get("vocab_size", -1) in (-1, None)  # Llama 1/2 releases wrote -1
        if rope_factor is not None:
            if not scaled:
                raise UsageError(
                    f"--rope-factor {rope_factor:g}: {where} does not set use_scaled_rope, so the model "
                    "uses no rope scaling; drop the flag"
                )
            if not float(rope_factor) > 0:
                raise UsageError(f"--rope-factor {rope_factor:g}: must be > 0 (8 for Llama 3.1/3.3, 32 for 3.2 1B/3B)")
            factor = float(rope_factor)
        elif scaled:
            factor = 32.0 if tied else 8.0
            log.warning(
                "%s: use_scaled_rope does not say the factor; using %g because output.weight %s "
                "tok_embeddings.weight (tied: Llama 3.2 1B/3B use 32; untied: 3.1/3.3 use 8). "
                "Pass --rope-factor (rope_factor=) to override.",
                where,
                factor,
                "equals" if tied else "differs from",
            )
        dim, heads = p["dim"], p["n_heads"]
        try:
            ffn = intermediate_size(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier"))
            eps, theta = float(p.get("norm_eps", 1e-5)), float(p.get("rope_theta", 10000.0))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=ffn,
            num_hidden_layers=p["n_layers"],
            num_attention_heads=heads,
            num_key_value_heads=p.get("n_kv_heads") or heads,
            head_dim=dim // heads,
            rms_norm_eps=eps,
            rope_theta=theta,
            rope_scaling=RopeScaling(factor, **_LLAMA3_ROPE) if scaled else None,
            max_position_embeddings=131072 if scaled else (4096 if legacy else 8192),
            tie_word_embeddings=tied,
            bos_token_id=1 if legacy else 128000,
            eos_token_id=2 if legacy else ((128001, 128008, 128009) if scaled else (128001, 128009)),
            dtype=self.dtype.name,
        )

    def source_for(self, key: keys.Key):
        """Reader of param-space slices for io.loader.build: (read(idx) -> np.ndarray, nbytes)."""
        tensors = [self.tensors[n] for n in keys.names(key, self.config, "meta")]
        head_dim = self.config.head_dim

        def read_one(t: Merged, idx):
            return _rotary_rows(t, *idx, head_dim) if key.rotary else t.read(idx)

        def read(idx: tuple[slice, ...]):
            if not key.layered:
                return read_one(tensors[0], idx)
            return np.stack([read_one(tensors[i], idx[1:]) for i in range(*idx[0].indices(len(tensors)))])

        return Source(read, sum(t.nbytes for t in tensors))


def meta_config(path, rope_factor: float | None = None) -> LlamaConfig:
    """The LlamaConfig a Meta dir describes (reads pickles, and only enough rows to tell a tied head).

    Args:
      path: the Meta dir; rope_factor: the llama3 rope factor params.json omits (default: guessed).

    Returns:
      The `LlamaConfig`.

    Example:
      >>> meta_config("Meta-Llama-3.1-8B/original").vocab_size
      128256
    """
    return MetaCheckpoint(Path(path), rope_factor).config


def read_meta(
    path,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    show_progress: bool = True,
    rope_factor: float | None = None,
    choices: dict | None = None,
    rows: int | None = None,
    fill=None,
) -> Llama:
    """Load a Meta dir onto `mesh` (its tokenizer.model travels through `load_tokenizer(path).files`).

    Args:
      path: the Meta dir (params.json, consolidated.*.pth, tokenizer.model).
      dtype: params' dtype (default: the checkpoint's).
      mesh: where the params live (default: one device).
      show_progress: draw a byte progress bar.
      rope_factor: the llama3 rope scaling factor, for dirs whose params.json omits it.
      choices: the model's construction choices (compute_dtype, attention, remat).
      rows: vocabulary rows to allocate (default: the checkpoint's); rows past the checkpoint are zero.
      fill: rows to write into the tables before they are final (`loader.build`).

    Returns:
      The `Llama`.

    Example:
      >>> model = read_meta("Meta-Llama-3.1-8B/original", dtype="bfloat16")
    """
    ckpt = MetaCheckpoint(Path(path), rope_factor)
    dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype
    return build(ckpt.config, dtype, mesh, ckpt.source_for, show_progress, choices, rows=rows, fill=fill)
