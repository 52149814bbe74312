"""Hugging Face checkpoint dirs: streamed, sharded read; streamed, sharded write.

Read: validate every file against config.json before touching any weight, then hand a reader
per param to `io.loader.build`, so every device reads only its own slice straight from disk. Write: one safetensors shard at a time, one layer slice at a time
pulled from the devices, into a temporary sibling dir renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

from jaxvocab.config import LlamaConfig
from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.io import keys
from jaxvocab.io.loader import TABLES, Source, build
from jaxvocab.io.multihost import gather_only, is_main, to_host
from jaxvocab.io.safetensors_io import FLOATS, TensorInfo, aligned_empty, read_header, read_slice, write_file
from jaxvocab.model import Llama
from jaxvocab.progress import progress

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def tensor_index(path: Path) -> dict[str, TensorInfo]:
    """name -> header entry over all shards, with the index checked against the files.

    Args:
      path: an HF checkpoint dir.

    Returns:
      {tensor name: TensorInfo (file, dtype, shape, offsets)}.

    Example:
      >>> tensor_index(Path("Llama-3.2-1B"))["model.norm.weight"].shape
      (2048,)
    """
    index_file = path / INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
            weight_map = None
        if not (
            isinstance(weight_map, dict)
            and all(isinstance(k, str) and isinstance(v, str) and v and "\0" not in v for k, v in weight_map.items())
        ):
            raise CheckpointError(
                f"{index_file}: not a valid index (needs a 'weight_map' object of tensor name -> "
                "shard file name); fix or re-download it"
            )
        files = sorted(set(weight_map.values()))
        for f in files:
            if not _inside(f):
                raise CheckpointError(f"{index_file}: weight_map entry {f!r} points outside {path}; fix the index")
            if not (path / f).is_file():  # follows links: a hub snapshot's shards live in ../../blobs
                raise CheckpointError(f"{index_file}: shard {f!r} is named in the index but missing from {path}")
    elif (path / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        files, weight_map = sorted(p.name for p in path.glob("*.safetensors")), None
        if not files:
            raise CheckpointError(f"{path}: no model.safetensors or {INDEX}; is this an HF checkpoint dir?")
    infos = {}
    for f in files:
        for name, info in read_header(path / f)[0].items():
            if name in infos:
                raise CheckpointError(f"{path / f}: tensor {name!r} also appears in {infos[name].path.name}")
            infos[name] = info
    for name, f in (weight_map or {}).items():
        if name in infos and infos[name].path.name != Path(f).name:
            raise CheckpointError(f"{index_file}: {name!r} is mapped to {f} but stored in {infos[name].path.name}")
        if name not in infos:
            raise CheckpointError(f"{index_file}: {name!r} is mapped to {f} but that file does not contain it")
    return infos


def _inside(name: str) -> bool:
    """Whether an index NAME stays inside its dir. Only the name is judged: where a link in the dir
    resolves (a hub snapshot's blobs) is the filesystem's business, as for transformers."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not os.path.isabs(name) and "\0" not in name and not any(p in ("", ".", "..") for p in parts)


def validate(config: LlamaConfig, infos: dict, path: Path) -> None:
    """Refuse a checkpoint whose tensors do not match config.json, before any weight is read.

    Args:
      config: from config.json; infos: `tensor_index(path)`; path: the dir (for messages).

    Example:
      >>> validate(LlamaConfig.from_hf_file(path), tensor_index(path), path)
    """
    expected = {n: (k, keys.checkpoint_shape(k, config)) for k in keys.keys_for(config) for n in keys.names(k, config)}
    missing = sorted(set(expected) - set(infos), key=keys.natural_order)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: tensor {missing[0]!r}{more} is missing; the checkpoint does not match config.json"
        )
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in infos if n not in expected and n not in allowed_extra and not keys.IGNORED.fullmatch(n)
    )
    if unexpected:
        raise CheckpointError(
            f"{infos[unexpected[0]].path}: unexpected tensor {unexpected[0]!r}; "
            "jaxvocab reads plain LlamaForCausalLM checkpoints"
        )
    for name, (_, shape) in expected.items():
        info = infos[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{info.path}: {name} has shape {list(info.shape)} but config.json implies {list(shape)}"
            )
        if info.dtype not in FLOATS:
            raise CheckpointError(f"{info.path}: {name} has dtype {info.dtype}; weights must be floating point")


def read_hf(
    path,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    show_progress: bool = True,
    choices: dict | None = None,
    rows: int | None = None,
    fill=None,
) -> Llama:
    """Load an HF checkpoint dir onto `mesh`, each device reading only its slices.

    Args:
      path: the dir (config.json + safetensors shards, or a hub-cache snapshot).
      dtype: params' dtype (default: the checkpoint's).
      mesh: where the params live (default: one device).
      show_progress: draw a byte progress bar.
      choices: the model's construction choices (compute_dtype, attention, remat).
      rows: vocabulary rows to allocate (default: the checkpoint's); rows past the checkpoint are zero.
      fill: rows to write into the tables before they are final (`loader.build`).

    Returns:
      The `Llama`.

    Example:
      >>> model = read_hf("Llama-3.2-1B", dtype="bfloat16")
    """
    path = Path(path)
    config = LlamaConfig.from_hf_file(path)
    infos = tensor_index(path)
    validate(config, infos, path)
    stored = infos[keys.names(keys.KEYS[0], config)[0]].dtype
    dtype = np.dtype(dtype) if dtype is not None else stored
    return build(
        config, dtype, mesh, lambda key: _hf_source(key, config, infos), show_progress, choices, rows=rows, fill=fill
    )


def _hf_source(key: keys.Key, config: LlamaConfig, infos: dict) -> Source:
    """Reader of param-space slices for one key: index over the (stacked) param -> np.ndarray."""
    tensors = [infos[n] for n in keys.names(key, config)]
    shape = keys.param_shape(key, config)
    stacked_dtype = np.result_type(*{t.dtype for t in tensors})

    def read(idx: tuple[slice, ...], out: np.ndarray | None = None):
        if not key.layered:  # `out`: the caller's buffer (a table read into its final size)
            return read_slice(tensors[0], idx, out=out if out is not None and out.dtype == tensors[0].dtype else None)
        # Layers land one by one in the final (aligned) buffer: no list of layers plus a stacked copy.
        out = aligned_empty(tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape, strict=True)), stacked_dtype)
        for j, i in enumerate(range(*idx[0].indices(len(tensors)))):
            if tensors[i].dtype == out.dtype:
                read_slice(tensors[i], idx[1:], out=out[j])
            else:  # a checkpoint mixing dtypes across layers: promote
                out[j] = read_slice(tensors[i], idx[1:])
        return out

    return Source(read, sum(t.nbytes for t in tensors))


# --------------------------------------------------------------------------------------- write
def parse_size(text: str | int) -> int:
    """Bytes of a --max-shard-size value.

    Args:
      text: an int, or "5GB" / "500MB" / "2GiB" (decimal and binary units).

    Returns:
      The size in bytes.

    Example:
      >>> parse_size("2GiB")
      2147483648
    """
    size = text if isinstance(text, int) else _size_bytes(text)
    if size <= 0:
        raise UsageError(f"--max-shard-size {text!r}: must be positive, e.g. 5GB")
    return size


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise UsageError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = m.group(2).rstrip("B") or ""
    scale = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(float(m.group(1)) * scale)


def tensors_of(model: Llama) -> list[tuple[str, keys.Key, int | None]]:
    """(HF name, key, layer) in HF's module order: embed, layer by layer, norm, head."""
    config = model.config
    out = [(keys.KEYS[0].hf, keys.KEYS[0], None)]
    layered = [k for k in keys.KEYS if k.layered]
    for i in range(config.num_hidden_layers):
        out += [(k.hf.format(i=i), k, i) for k in layered]
    out += [(k.hf, k, None) for k in keys.keys_for(config) if not k.layered and k.path != ("embed",)]
    return out


def host_tensor(model: Llama, key: keys.Key, layer: int | None, rows: int | None = None) -> np.ndarray:
    """One checkpoint tensor gathered to host (for stacked params, only that layer's slice; for the
    vocab tables, only the first `rows` rows)."""
    arr = keys.get_param(model, key)[...]
    if layer is not None:
        arr = arr[layer]
    if rows is not None:
        arr = arr[:rows]
    return to_host(arr)


class ExportTensor(NamedTuple):
    """One tensor of an HF export: where it comes from in the model, and how it is stored."""

    name: str  # HF tensor name
    key: keys.Key
    layer: int | None  # index into the stacked layers, None for unstacked params
    dtype: np.dtype
    shape: tuple[int, ...]  # checkpoint shape (tables cut to the exported rows)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_weights(
    model: Llama, out: Path, max_shard_size="5GB", show_progress: bool = True, rows: int | None = None
) -> dict:
    """The weights as safetensors shards; `rows` keeps only the first rows of the vocab tables.

    Args:
      model: the `Llama`; out: the (temporary) output dir; max_shard_size: e.g. "5GB";
      show_progress: draw a progress bar; rows: vocabulary rows to export (default: all).

    Returns:
      {"total_size": bytes, "shards": count}.

    Example:
      >>> write_weights(model, Path(tmp), "2GB", rows=128256)
    """
    limit = parse_size(max_shard_size)
    config = model.config if rows is None else model.config.replace(vocab_size=rows)
    plan = [
        ExportTensor(
            name, key, layer, np.dtype(keys.get_param(model, key)[...].dtype), keys.checkpoint_shape(key, config)
        )
        for name, key, layer in tensors_of(model)
    ]
    shards, current, size = [], [], 0
    for entry in plan:
        nbytes = entry.nbytes
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    total = 0
    weight_map = {}
    by_name = {e.name: e for e in plan}
    bar = progress(total=len(plan), desc="writing", unit="tensor", disable=not show_progress)
    with bar:
        for n, shard in enumerate(shards):
            fname = SINGLE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"

            def produce(name):
                e = by_name[name]
                bar.update(1)
                return host_tensor(model, e.key, e.layer, rows=e.shape[0] if e.key.path in TABLES else None)

            write = write_file if is_main() else gather_only  # a gather is collective: all take part
            total += write(out / fname, [(e.name, e.dtype, e.shape) for e in shard], produce)
            weight_map.update({e.name: fname for e in shard})
    if len(shards) > 1 and is_main():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return {"total_size": total, "shards": len(shards)}
