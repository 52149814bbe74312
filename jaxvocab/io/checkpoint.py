"""jaxvocab checkpoint dirs: orbax state + config.json + tokenizer files + vocab_plan.json.

Layout:
    jaxvocab.json      marker and format version (how `load` recognises the dir)
    config.json        HF-style config, so every tool that reads configs can read ours
    state/             orbax StandardCheckpointer tree of the params (sharded, restorable on any mesh)
    tokenizer.*, generation_config.json, vocab_plan.json   carried along (parsed, re-written) / as planned
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxvocab.config import LlamaConfig
from jaxvocab.errors import CheckpointError, JaxVocabError, brief, fault_point
from jaxvocab.io import keys
from jaxvocab.io.atomic import signals_blocked
from jaxvocab.model import Llama
from jaxvocab.sharding import sharding_for, single_device_mesh

MARKER = "jaxvocab.json"
FORMAT_VERSION = 1  # what save_checkpoint writes
READABLE_FORMATS = (1,)  # every format `load` still reads: a new version is added here, none removed


def is_jaxvocab_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def params_of(model: Llama) -> dict:
    """Plain {path: array} dict of the weights, the tree orbax stores."""
    return {"/".join(k.path): keys.get_param(model, k)[...] for k in keys.keys_for(model.config)}


def save_state(model: Llama, out: Path, meanwhile: Callable[[], None] | None = None) -> None:
    """Orbax tree + config + marker into `out` (an already-created temp dir). `meanwhile()` runs
    while orbax writes the tree in its background threads, so the small files (the tokenizer's edits
    take ~0.5 s at 128k tokens) mostly hide behind the write: `import --add-tokens` of a 2.5 GB
    checkpoint ran ~0.4 s faster than with the files written after it.

    Stored without compression, like safetensors: zstd saves ~20% of the disk on bf16 weights but
    halves the write on a CPU host (2.5 GB: 5.2-6.8 s -> 2.4-2.8 s on 2 cores) and slows every
    restore (4.7 -> 3.0 s); checkpoints written compressed before still load."""
    import orbax.checkpoint as ocp  # on first use: ~25 MB and ~0.2 s that a run which never saves is spared

    with ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        try:
            ckptr.save((out / "state").absolute(), args=ocp.args.PyTreeSave(params_of(model)))
            fault_point("save:state")
            fault_point("save:files")
            if meanwhile is not None:
                meanwhile()
        finally:
            # An interrupt must not leave orbax writing into a dir the caller is about to remove.
            with signals_blocked():
                ckptr.wait_until_finished()
    if jax.process_index() != 0:  # orbax wrote this process's shards; the small files are process 0's
        return
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    (out / MARKER).write_text(json.dumps({"format": FORMAT_VERSION, "vocab_size": model.config.vocab_size}) + "\n")


def _restore(state: Path, config: LlamaConfig, dtype, mesh: Mesh):
    """The orbax tree, checked against config.json, restored onto `mesh`; (params, dtype)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(state)
        tree = getattr(stored, "item_metadata", stored)
        if not hasattr(tree, "get") or tree.get("embed") is None:
            raise CheckpointError(f"{state}: holds no 'embed' param; the checkpoint is corrupt, re-create it")
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(tree["embed"].dtype)
        target = {}
        for k in keys.keys_for(config):
            shape = keys.param_shape(k, config)
            name = "/".join(k.path)
            if name not in tree or tuple(tree[name].shape) != shape:
                raise CheckpointError(f"{state}: {name} is missing or does not match config.json")
            target[name] = jax.ShapeDtypeStruct(
                shape, jnp.dtype(tree[name].dtype), sharding=sharding_for(shape, keys.logical_axes(k), mesh)
            )
        return ckptr.restore(state, target), dtype


def _check_format(path: Path, marker) -> None:
    """One line for a marker this jaxvocab cannot read: newer (upgrade) or malformed (re-create)."""
    fmt = marker.get("format") if isinstance(marker, dict) else marker
    if isinstance(fmt, int) and not isinstance(fmt, bool):
        if fmt in READABLE_FORMATS:
            return
        if fmt > FORMAT_VERSION:
            raise CheckpointError(
                f"{path / MARKER}: format {fmt} was written by a newer jaxvocab (this one reads "
                f"{', '.join(map(str, READABLE_FORMATS))}); upgrade jaxvocab"
            )
    raise CheckpointError(
        f"{path / MARKER}: format {brief(fmt)} is not supported by this jaxvocab; re-create the checkpoint"
    )


def _root_cause(e: BaseException) -> str:
    """The innermost cause's first line: orbax wraps tensorstore's error (which names the tensor and
    what is wrong with its bytes) in a generic "Encountered error while reading array index" whose
    text is mostly a repr of the TensorStore spec."""
    while e.__cause__ is not None:
        e = e.__cause__
    line = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {line[:200]}{' ...' if len(line) > 200 else ''}"


def read_jaxvocab(path: Path, *, dtype=None, mesh: Mesh | None = None, choices: dict | None = None) -> Llama:
    """The model of jaxvocab checkpoint `path`, built with the construction `choices` and restored
    onto `mesh` (its tokenizer and plan: `load_tokenizer(path)`, `load_plan(path)`)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path / MARKER}: corrupt marker file; re-create the checkpoint") from None
    _check_format(path, marker)
    config = LlamaConfig.from_hf_file(path)
    mesh = mesh or single_device_mesh()
    state = (path / "state").absolute()
    if not state.is_dir():
        raise CheckpointError(f"{state}: missing; the checkpoint is incomplete, re-create it")
    try:
        params, dtype = _restore(state, config, dtype, mesh)
    except JaxVocabError:
        raise
    except Exception as e:  # orbax / tensorstore raise many types for a damaged state dir
        raise CheckpointError(
            f"{state}: cannot be read ({_root_cause(e)}); the checkpoint is corrupt, re-create it"
        ) from None
    model = nnx.eval_shape(lambda: Llama(config.replace(dtype=dtype.name), param_dtype=dtype, **(choices or {})))
    for k in keys.keys_for(config):
        keys.get_param(model, k).set_value(params["/".join(k.path)].astype(dtype))
    return model
