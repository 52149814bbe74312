"""Entry points that pick the right reader/writer: `load`, `save_hf`, `save_checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

from jax.sharding import Mesh

from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.io import checkpoint, hf
from jaxvocab.io.atomic import atomic_dir
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


def load(path, dtype=None, mesh: Mesh | None = None, *, show_progress: bool = True,
         rope_factor: float | None = None, attention: str = "auto", remat: str = "auto") -> Llama:
    """Load any supported checkpoint dir onto `mesh` (default: one device), params in `dtype`
    (default: as stored). `rope_factor` overrides the llama3 rope factor a Meta params.json omits.
    `attention` and `remat` are the model's construction choices (see Llama)."""
    model = _read(Path(path), dtype, mesh, show_progress, rope_factor)
    model.attention, model.remat = check_attention(attention), check_remat(remat)
    return model


def _read(path: Path, dtype, mesh, show_progress: bool, rope_factor) -> Llama:
    kind = detect(path)
    if rope_factor is not None and kind != "meta":
        raise UsageError(f"--rope-factor: {path} is not a Meta checkpoint; its config.json states its own rope scaling")
    if kind == "jaxvocab":
        return checkpoint.read_jaxvocab(path, dtype=dtype, mesh=mesh)
    if kind == "meta":
        from jaxvocab.io import meta
        return meta.read_meta(path, dtype=dtype, mesh=mesh, show_progress=show_progress, rope_factor=rope_factor)
    model = hf.read_hf(path, dtype=dtype, mesh=mesh, show_progress=show_progress)
    model.vocab_plan = None
    return model


def _plan_of(model: Llama, plan):
    if plan is None:
        plan = getattr(model, "vocab_plan", None)
    if plan is None:
        return None
    from jaxvocab.vocab import VocabPlan
    return plan if isinstance(plan, VocabPlan) else VocabPlan.from_json(plan if isinstance(plan, str) else json.dumps(plan))


def _write_support_files(model: Llama, out: Path, plan) -> None:
    """config.json's siblings: tokenizer files (edited per the vocab plan), generation config, plan."""
    src = getattr(model, "source_dir", None) or None
    plan = _plan_of(model, plan)
    if plan is not None and (plan.renamed or plan.appended) and src and not plan.applied_in(src):
        from jaxvocab.io.tokenizer_files import write_tokenizer_files
        write_tokenizer_files(src, out, plan.renamed, plan.appended, plan.special_ids, model.config.vocab_size)
    checkpoint.carry_files(src, out)
    if plan is not None:
        (out / "vocab_plan.json").write_text(plan.to_json() + "\n")
    gen = out / "generation_config.json"
    if not gen.exists():
        c = model.config
        gen.write_text(json.dumps({"bos_token_id": hf_ids(c.bos_token_id), "eos_token_id": hf_ids(c.eos_token_id),
                                   "do_sample": True, "temperature": 0.6, "top_p": 0.9}, indent=2) + "\n")


def hf_ids(v):
    return list(v) if isinstance(v, tuple) else v


def save_hf(model: Llama, out_dir, max_shard_size="5GB", *, plan=None, overwrite: bool = False,
            show_progress: bool = True) -> Path:
    """Write an HF dir that transformers / vLLM / llama.cpp load: safetensors shards under
    `max_shard_size`, index, config.json, generation_config.json and the tokenizer files."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        hf.write_weights(model, tmp, max_shard_size, show_progress)
        config = model.config.to_hf_dict()
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(model.embed[...].dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_support_files(model, tmp, plan)
    return out


def save_checkpoint(model: Llama, out_dir, *, plan=None, overwrite: bool = False) -> Path:
    """A jaxvocab checkpoint dir (orbax state + config + tokenizer files + vocab plan)."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        checkpoint.save_state(model, tmp)
        _write_support_files(model, tmp, plan)
    return out
