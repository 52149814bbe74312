"""PEFT adapter dirs: what `PeftModel.from_pretrained(base, DIR)` loads, written and read back.

Layout (peft 0.21): adapter_config.json (a LoRA config with `target_modules`, `r`, `lora_alpha` and
`trainable_token_indices`) and adapter_model.safetensors with keys
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta   [k, d]
    base_model.model.lm_head.token_adapter.trainable_tokens_delta              [k, d]  (untied head rows)
PEFT's "delta" is the rows' full new value (it replaces the base rows, index_copy), so the rows go
in as they are. The base it loads on is the expanded model that `jaxvocab-convert export` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxvocab.errors import CheckpointError
from jaxvocab.io.multihost import gather_only, is_main, shared_atomic_dir, to_host
from jaxvocab.io.safetensors_io import read_header, read_slice, write_file
from jaxvocab.lora import HF_MODULES, LoraSpec, a_key, b_key

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBED_KEY = PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_KEY = PREFIX + "lm_head.token_adapter.trainable_tokens_delta"


def lora_key(layer: int, name: str, ab: str) -> str:
    return f"{PREFIX}model.layers.{layer}.{HF_MODULES[name]}.lora_{ab}.weight"


def adapter_config(spec: LoraSpec, ids: list[int], tied: bool, head_rows: bool, embed_rows: bool) -> dict:
    tokens: list[int] | dict | None = None
    if ids and (tied or not head_rows):
        tokens = ids if embed_rows else None
    if ids and not tied and head_rows:
        tokens = {"lm_head": ids, **({"embed_tokens": ids} if embed_rows else {})}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in spec.targets),
        "trainable_token_indices": tokens,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }


def save_peft(rm, out_dir, *, overwrite: bool = False) -> Path:
    """Write a RowsModel's adapters and rows (f32) as a PEFT adapter dir."""
    if rm.lora is None:
        raise CheckpointError("--export-peft: this run has no LoRA adapters; pass --lora-rank")
    spec, ids = rm.lora_spec, [int(i) for i in to_host(rm.ids[...])]
    tensors: dict[str, tuple] = {}
    for name in spec.targets:
        for ab, key in (("A", a_key(name)), ("B", b_key(name))):
            stacked = rm.lora[key]
            for i in range(stacked.shape[0]):
                tensors[lora_key(i, name, ab)] = (stacked, i)
    # Rows as the model used them: through the table's dtype (rows.py), then f32.
    if rm.embed_rows is not None:
        tensors[EMBED_KEY] = (rm.embed_rows, rm.embed[...].dtype)
    if rm.head_rows is not None:
        tensors[HEAD_KEY] = (rm.head_rows, rm.lm_head[...].dtype)
    entries = [
        (k, np.dtype(np.float32), tuple(v[0].shape[1:] if isinstance(v[1], int) else v[0].shape))
        for k, v in tensors.items()
    ]

    def produce(key):
        var, where = tensors[key]
        arr = var[...][where] if isinstance(where, int) else var[...].astype(where)
        return np.asarray(to_host(arr), np.float32)  # gathered when the job spans several processes

    config = adapter_config(spec, ids, rm.tied, rm.head_rows is not None, rm.embed_rows is not None)
    out = Path(out_dir)
    with shared_atomic_dir(out, overwrite) as tmp:  # many processes: each tensor gathered, process 0 writes
        (write_file if is_main() else gather_only)(tmp / WEIGHTS, entries, produce)
        if is_main():
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_peft(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) of a PEFT LoRA dir, checked: one-line CheckpointError naming the file."""
    cfg = read_peft_config(path)
    weights = Path(path) / WEIGHTS
    infos, _ = read_header(weights)
    tensors = {name: read_slice(info) for name, info in infos.items()}
    for name, arr in tensors.items():
        if ".lora_A." in name and arr.shape[0] != cfg["r"] or ".lora_B." in name and arr.shape[-1] != cfg["r"]:
            raise CheckpointError(f"{weights}: {name} has shape {arr.shape}, which does not match r={cfg['r']}")
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{weights}: {name} holds NaN or infinite values")
    return cfg, tensors


def read_peft_config(path) -> dict:
    """A PEFT LoRA dir's adapter_config.json, checked (the dir must hold the weights file too)."""
    path = Path(path)
    cfg_file, weights = path / CONFIG, path / WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter dir (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); re-export the adapter") from None
    if (
        not isinstance(cfg, dict)
        or cfg.get("peft_type") != "LORA"
        or not isinstance(cfg.get("r"), int)
        or cfg["r"] <= 0
    ):
        raise CheckpointError(f"{cfg_file}: not a LoRA adapter config (needs peft_type LORA and a positive r)")
    return cfg


def load_adapters(rm, path) -> None:
    """Start `rm`'s adapters from a PEFT LoRA dir (e.g. one --export-peft wrote): its r, lora_alpha and
    target_modules must be the run's; the rows keep their own init (the vocab plan's)."""
    cfg, tensors = read_peft(path)
    spec = rm.lora_spec
    targets = sorted(HF_MODULES[t].split(".")[1] for t in spec.targets)
    got = (cfg["r"], float(cfg.get("lora_alpha") or 0), sorted(cfg.get("target_modules") or []))
    if got != (spec.rank, spec.alpha, targets):
        raise CheckpointError(
            f"{Path(path) / CONFIG}: r={got[0]}, lora_alpha={got[1]:g}, target_modules={got[2]} "
            f"but this run has --lora-rank {spec.rank} --lora-alpha {spec.alpha:g} with {targets}; "
            "pass the adapter's values"
        )
    for name in spec.targets:
        for ab, key in (("A", a_key(name)), ("B", b_key(name))):
            var = rm.lora[key]
            layers = []
            for i in range(var.shape[0]):
                k = lora_key(i, name, ab)
                if k not in tensors or tensors[k].shape != tuple(var.shape[1:]):
                    shape = tensors[k].shape if k in tensors else "missing"
                    raise CheckpointError(
                        f"{Path(path) / WEIGHTS}: {k} is {shape}; expected {tuple(var.shape[1:])} "
                        "(an adapter for another model?)"
                    )
                layers.append(tensors[k].astype(np.float32))
            var.set_value(jax.device_put(np.stack(layers), var[...].sharding))
