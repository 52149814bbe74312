"""Entry points that pick the right reader/writer: `load`, `save_hf`, `save_checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

from jax.sharding import Mesh

from jaxvocab.config import hf_ids
from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.io import checkpoint, finite, hf
from jaxvocab.io.atomic import check_overlap
from jaxvocab.io.multihost import is_main, shared_atomic_dir
from jaxvocab.model import Llama, check_attention, check_remat


def detect(path: Path) -> str:
    """'jaxvocab' | 'hf' | 'meta', or an error saying what the dir lacks."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if checkpoint.is_jaxvocab_dir(path):
        return "jaxvocab"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise CheckpointError(f"{path}: not a checkpoint dir (no config.json, params.json or {checkpoint.MARKER})")


def load(
    path,
    dtype=None,
    mesh: Mesh | None = None,
    *,
    show_progress: bool = True,
    rope_factor: float | None = None,
    allow_nonfinite: bool = False,
    attention: str = "auto",
    remat: str = "auto",
    vocab_rows: int | None = None,
) -> Llama:
    """Load any supported checkpoint dir onto `mesh` (default: one device), params in `dtype`
    (default: as stored). `rope_factor` overrides the llama3 rope factor a Meta params.json omits.
    Weights holding NaN or Inf are refused unless `allow_nonfinite`. `attention` and `remat` are
    the model's construction choices (see Llama). `vocab_rows` reads an HF or Meta checkpoint
    straight into tables of that many rows (rows past the checkpoint zero; see vocab.expand_loaded)."""
    path = Path(path)
    with finite.scan_reads() as scan:
        model = _load(path, dtype, mesh, show_progress, rope_factor, vocab_rows)
    if not allow_nonfinite:
        finite.check_loaded(model, path, scan)
    model.attention, model.remat = check_attention(attention), check_remat(remat)
    return model


def _load(path: Path, dtype, mesh, show_progress: bool, rope_factor, rows: int | None = None) -> Llama:
    kind = detect(path)
    if rows is not None and kind == "jaxvocab":
        raise UsageError(f"vocab_rows: {path} is a jaxvocab checkpoint; grow it with expand_vocab")
    if rope_factor is not None and kind != "meta":
        raise UsageError(f"--rope-factor: {path} is not a Meta checkpoint; its config.json states its own rope scaling")
    if kind == "jaxvocab":
        return checkpoint.read_jaxvocab(path, dtype=dtype, mesh=mesh)
    if kind == "meta":
        from jaxvocab.io import meta

        return meta.read_meta(
            path, dtype=dtype, mesh=mesh, show_progress=show_progress, rope_factor=rope_factor, rows=rows
        )
    model = hf.read_hf(path, dtype=dtype, mesh=mesh, show_progress=show_progress, rows=rows)
    model.vocab_plan = None
    return model


def _plan_of(model: Llama, plan):
    if plan is None:
        plan = getattr(model, "vocab_plan", None)
    if plan is None:
        return None
    from jaxvocab.vocab import VocabPlan

    return (
        plan
        if isinstance(plan, VocabPlan)
        else VocabPlan.from_json(plan if isinstance(plan, str) else json.dumps(plan))
    )


def _write_support_files(model: Llama, out: Path, plan, *, hf_export: bool, llama_version: str | None) -> None:
    """config.json's siblings: tokenizer files (generated for a Meta source, edited per the vocab
    plan), the source's other allow-listed files (parsed and re-written), generation config, plan."""
    from jaxvocab.io import carried
    from jaxvocab.io.meta_tokenizer import is_meta_tokenizer_dir, write_meta_tokenizer_files

    src = getattr(model, "source_dir", None) or None
    plan = _plan_of(model, plan)
    tok_dir, generated = src, bool(src and is_meta_tokenizer_dir(src))
    if generated:
        write_meta_tokenizer_files(src, out, llama_version)
        tok_dir = out
    if plan is not None and (plan.renamed or plan.appended) and tok_dir and (generated or not plan.applied_in(tok_dir)):
        from jaxvocab.io.tokenizer_files import write_tokenizer_files

        write_tokenizer_files(tok_dir, out, plan.renamed, plan.appended, plan.special_ids, model.config.vocab_size)
    if plan is not None:
        (out / "vocab_plan.json").write_text(plan.to_json() + "\n")
    # HF exports keep the tiktoken tokenizer.model under original/ as Meta's HF repos do: at the top
    # level llama.cpp's converter takes it for a SentencePiece model and fails.
    carried.carry(src, out, dest={"tokenizer.model": "original/tokenizer.model"} if hf_export else None)
    gen = out / "generation_config.json"
    if not gen.exists():  # token ids only: sampling settings are the model author's to state, not ours
        c = model.config
        ids = {
            k: hf_ids(v)
            for k, v in (
                ("bos_token_id", c.bos_token_id),
                ("eos_token_id", c.eos_token_id),
                ("pad_token_id", c.pad_token_id),
            )
            if v is not None
        }
        gen.write_text(json.dumps(ids, indent=2) + "\n")


def export_rows(model: Llama, plan, keep_padding: bool = False) -> int:
    """Rows an HF export keeps: padding jaxvocab added to divide a mesh axis is dropped (it carries
    the mean init, and a client that cannot suppress it gives it real probability); padding the
    source already had stays."""
    plan = _plan_of(model, plan)
    rows = model.config.vocab_size
    if keep_padding or plan is None or rows != plan.new_rows:
        return rows
    return max(plan.old_rows, plan.tokenizer_size_after)


def _check_source(model: Llama, out: Path) -> None:
    """Library callers too: writing over the dir the model was read from would destroy it."""
    src = getattr(model, "source_dir", None)
    if src:
        check_overlap({"out_dir": out}, {"the model's source dir": Path(src)})


def save_hf(
    model: Llama,
    out_dir,
    max_shard_size="5GB",
    *,
    plan=None,
    overwrite: bool = False,
    show_progress: bool = True,
    keep_padding: bool = False,
    llama_version: str | None = None,
) -> Path:
    """Write an HF dir that transformers / vLLM / llama.cpp load: safetensors shards under
    `max_shard_size`, index, config.json, generation_config.json and the tokenizer files.
    Padding rows jaxvocab added are dropped unless `keep_padding`; `llama_version` ('3.0'/'3.1')
    names the special tokens when the source is a bare Meta tokenizer.model (default: params.json)."""
    out = Path(out_dir)
    _check_source(model, out)
    rows = export_rows(model, plan, keep_padding)
    with shared_atomic_dir(out, overwrite) as tmp:  # many processes: each tensor gathered, process 0 writes
        hf.write_weights(model, tmp, max_shard_size, show_progress and is_main(), rows=rows)
        if is_main():
            config = model.config.replace(vocab_size=rows).to_hf_dict()
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(model.embed[...].dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _write_support_files(model, tmp, plan, hf_export=True, llama_version=llama_version)
    return out


def save_checkpoint(
    model: Llama, out_dir, *, plan=None, overwrite: bool = False, llama_version: str | None = None
) -> Path:
    """A jaxvocab checkpoint dir (orbax state + config + tokenizer files + vocab plan)."""
    out = Path(out_dir)
    _check_source(model, out)
    with shared_atomic_dir(out, overwrite) as tmp:  # many processes: orbax's multi-host save, process 0 the rest
        checkpoint.save_state(model, tmp)
        if is_main():
            _write_support_files(model, tmp, plan, hf_export=False, llama_version=llama_version)
    return out
