"""Entry points that pick the right reader/writer: `load`, `load_plan`, `save_hf`, `save_checkpoint`."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from jax.sharding import Mesh

from jaxvocab.config import hf_ids
from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.io import checkpoint, finite, hf
from jaxvocab.io.atomic import check_overlap
from jaxvocab.io.carried import CarriedFiles
from jaxvocab.io.multihost import is_main, shared_atomic_dir
from jaxvocab.model import Llama, check_attention, check_live, check_remat


def detect(path: Path) -> str:
    """'jaxvocab' | 'hf' | 'meta', or an error saying what the dir lacks."""
    if not path.exists():
        hint = ""
        if not str(path).startswith(".") and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # a repo id?
            hint = (
                "; jaxvocab reads local dirs only (nothing from a hub): download it first, e.g. "
                f"`huggingface-cli download {path} --local-dir DIR`, and pass DIR"
            )
        raise CheckpointError(f"{path}: no such file or directory{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if checkpoint.is_jaxvocab_dir(path):
        return "jaxvocab"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    snapshot = _hub_snapshot(path)
    if snapshot is not None:
        raise CheckpointError(f"{path}: a hub cache repo, not a checkpoint dir; pass its snapshot {snapshot}")
    raise CheckpointError(f"{path}: not a checkpoint dir (no config.json, params.json or {checkpoint.MARKER})")


def _hub_snapshot(path: Path) -> Path | None:
    """The snapshot a hub cache repo dir (models--org--name/) points at with refs/main, if `path` is one."""
    try:
        ref = (path / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = path / "snapshots" / ref
    return snapshot if ref and snapshot.is_dir() else None


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
    compute_dtype=None,
    vocab_rows: int | None = None,
    fill=None,
) -> Llama:
    """Load any supported checkpoint dir (HF, hub-cache snapshot, Meta, jaxvocab) onto a mesh.

    Args:
      path: the checkpoint dir.
      dtype: the params' dtype (default: as stored); mesh: where they live (default: one device).
      rope_factor: overrides the llama3 rope factor a Meta params.json omits.
      allow_nonfinite: accept weights holding NaN or Inf (refused by default).
      attention, remat, compute_dtype: the model's construction choices (see `Llama`).
      vocab_rows: read an HF or Meta checkpoint straight into tables of that many rows (rows past the
        checkpoint are zero; see `vocab_load.expand_loaded`).
      fill: with vocab_rows, rows to write into the tables before they are final (`vocab_load.load_expanded`
        passes it; see `loader.Fill`).
    Returns:
      The Llama. Its tokenizer and vocab plan are separate objects: `load_tokenizer(path)`,
      `load_plan(path)`.
    Example:
      >>> model = load("Llama-3.2-1B", mesh=parse_mesh("fsdp=2,tensor=4"))
    """
    path = Path(path)
    choices = {"attention": check_attention(attention), "remat": check_remat(remat), "compute_dtype": compute_dtype}
    with finite.scan_reads() as scan:
        model = _load(path, dtype, mesh, show_progress, rope_factor, choices, vocab_rows, fill)
    if not allow_nonfinite:
        finite.check_loaded(model, path, scan)
    return model


def _load(path: Path, dtype, mesh, show_progress: bool, rope_factor, choices: dict, rows=None, fill=None) -> Llama:
    kind = detect(path)
    if rows is not None and kind == "jaxvocab":
        raise UsageError(f"vocab_rows: {path} is a jaxvocab checkpoint; grow it with expand_vocab")
    if rope_factor is not None and kind != "meta":
        raise UsageError(f"--rope-factor: {path} is not a Meta checkpoint; its config.json states its own rope scaling")
    if kind == "jaxvocab":
        return checkpoint.read_jaxvocab(path, dtype=dtype, mesh=mesh, choices=choices)
    if kind == "meta":
        from jaxvocab.io import meta

        return meta.read_meta(
            path,
            dtype=dtype,
            mesh=mesh,
            show_progress=show_progress,
            rope_factor=rope_factor,
            choices=choices,
            rows=rows,
            fill=fill,
        )
    return hf.read_hf(path, dtype=dtype, mesh=mesh, show_progress=show_progress, choices=choices, rows=rows, fill=fill)


def load_plan(path):
    """The vocabulary plan saved beside a checkpoint, or None when it has none.

    Args:
      path: a jaxvocab checkpoint or an HF dir `save_hf` wrote (both hold vocab_plan.json).
    Returns:
      A `VocabPlan`, or None.
    Example:
      >>> plan = load_plan("ckpt"); rm = rows.split(model, rows.new_ids(plan))
    """
    f = Path(path) / "vocab_plan.json"
    if not f.is_file():
        return None
    from jaxvocab.errors import malformed
    from jaxvocab.vocab import VocabPlan

    with malformed(str(f), "re-create it with plan_vocab"):
        return VocabPlan.from_json(f.read_text(encoding="utf-8"))


def _files_of(tokenizer) -> CarriedFiles | None:
    """What the writers carry: a Tokenizer's files, a CarriedFiles, or nothing."""
    if tokenizer is None or isinstance(tokenizer, CarriedFiles):
        return tokenizer
    files = getattr(tokenizer, "files", _MISSING)
    if files is _MISSING:
        raise UsageError(
            f"tokenizer={type(tokenizer).__name__}: pass a Tokenizer from load_tokenizer(dir) or io.carried.CarriedFiles"
        )
    return files


_MISSING = object()


def _check_plan(plan):
    from jaxvocab.vocab import VocabPlan

    if plan is not None and not isinstance(plan, VocabPlan):
        raise UsageError(f"plan={type(plan).__name__}: pass a VocabPlan (load_plan(dir) reads a saved one)")
    return plan


def _write_support_files(
    model: Llama, out: Path, files: CarriedFiles | None, plan, *, hf_export: bool, llama_version: str | None
) -> None:
    """config.json's siblings: tokenizer files (generated for a Meta source, edited per the vocab
    plan), the source's other allow-listed files (parsed and re-written), generation config, plan."""
    from jaxvocab.io.meta_tokenizer import write_meta_tokenizer_files

    tok_dir, generated = (files.source if files else None), bool(files and files.is_meta)
    if generated:
        write_meta_tokenizer_files(files.source, out, llama_version)
        tok_dir = out
    if plan is not None and (plan.renamed or plan.appended) and tok_dir and (generated or not plan.applied_in(tok_dir)):
        from jaxvocab.io.tokenizer_files import write_tokenizer_files

        write_tokenizer_files(tok_dir, out, plan.renamed, plan.appended, plan.special_ids, model.config.vocab_size)
    if plan is not None:
        (out / "vocab_plan.json").write_text(plan.to_json() + "\n")
    # HF exports keep the tiktoken tokenizer.model under original/ as Meta's HF repos do: at the top
    # level llama.cpp's converter takes it for a SentencePiece model and fails.
    if files is not None:
        files.write(out, dest={"tokenizer.model": "original/tokenizer.model"} if hf_export else None)
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
    rows = model.config.vocab_size
    if keep_padding or plan is None or rows != plan.new_rows:
        return rows
    return max(plan.old_rows, plan.tokenizer_size_after)


def _check_writable(model: Llama, out: Path, files: CarriedFiles | None) -> None:
    """Library callers too: writing over the dir the files come from would destroy them."""
    check_live(model)
    if files is not None:
        check_overlap({"out_dir": out}, {"the tokenizer files' source dir": files.source})


def save_hf(
    model: Llama,
    out_dir,
    max_shard_size="5GB",
    *,
    tokenizer=None,
    plan=None,
    overwrite: bool = False,
    show_progress: bool = True,
    keep_padding: bool = False,
    llama_version: str | None = None,
) -> Path:
    """Write an HF dir that transformers / vLLM / llama.cpp load.

    Args:
      model: the Llama to write; out_dir: the new dir (written to a temp sibling, renamed at the end).
      max_shard_size: safetensors shards stay under it ("5GB", "500MB", bytes).
      tokenizer: a Tokenizer from `load_tokenizer(dir)` (or its `CarriedFiles`): the tokenizer files,
        chat template and generation config written beside the weights, edited per `plan`.
      plan: the `VocabPlan` the model was expanded by (written as vocab_plan.json, so `load_plan`
        reads it back); its padding rows are dropped unless `keep_padding`.
      llama_version: '3.0' / '3.1' names the special tokens when the source is a bare Meta tokenizer.model.
    Returns:
      The output path.
    Example:
      >>> save_hf(model, "out-hf", tokenizer=tok, plan=plan)
    """
    out, files, plan = Path(out_dir), _files_of(tokenizer), _check_plan(plan)
    _check_writable(model, out, files)
    rows = export_rows(model, plan, keep_padding)
    with shared_atomic_dir(out, overwrite) as tmp:  # many processes: each tensor gathered, process 0 writes
        hf.write_weights(model, tmp, max_shard_size, show_progress and is_main(), rows=rows)
        if is_main():
            config = model.config.replace(vocab_size=rows).to_hf_dict()
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(model.embed[...].dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _write_support_files(model, tmp, files, plan, hf_export=True, llama_version=llama_version)
    return out


def save_checkpoint(
    model: Llama,
    out_dir,
    *,
    tokenizer=None,
    plan=None,
    overwrite: bool = False,
    llama_version: str | None = None,
) -> Path:
    """A jaxvocab checkpoint dir (orbax state + config + tokenizer files + vocab plan).

    Args:
      model: the Llama to write; out_dir: the new dir.
      tokenizer: a Tokenizer from `load_tokenizer(dir)` (or its `CarriedFiles`) whose files travel along.
      plan: the `VocabPlan` to save beside the weights (`load_plan` reads it back).
    Returns:
      The output path.
    Example:
      >>> save_checkpoint(model, "ckpt", tokenizer=tok, plan=plan); load("ckpt")
    """
    out, files, plan = Path(out_dir), _files_of(tokenizer), _check_plan(plan)
    _check_writable(model, out, files)
    with shared_atomic_dir(out, overwrite) as tmp:  # many processes: orbax's multi-host save, process 0 the rest
        checkpoint.save_state(
            model,
            tmp,
            meanwhile=functools.partial(
                _write_support_files, model, tmp, files, plan, hf_export=False, llama_version=llama_version
            )
            if is_main()
            else None,
        )
    return out
