"""jaxvocab-train --lora-rank end to end: merged and PEFT exports that transformers/PEFT load, adapters
only, one-line errors for bad LoRA flags and corrupt adapter dirs."""

import json

import jax
import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main as convert_main
from tests.builders import make_hf_checkpoint, train_argv
from tests.test_train_cli import IDS, _data
from train.__main__ import main

LORA = [
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--lora-lr",
    "1e-2",
    "--lora-dropout",
    "0.1",
    "--lora-targets",
    "q,o,up",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_cli")
    ckpt, _ = make_hf_checkpoint(d / "model", tied=False, seed=7, max_pos=128)
    return ckpt, _data(d / "train.jsonl")


def _run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def _host(a):
    return np.asarray(jax.device_get(a))


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.slow
def test_lora_train_and_both_exports(setup, tmp_path, capsys):
    """Rows + adapters through the CLI; the merged HF dir and the PEFT dir on the converted base agree."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    ckpt, data = setup
    out, hf, ad = tmp_path / "run", tmp_path / "hf", tmp_path / "adapter"
    flags = [*LORA, "--steps", 8, "--batch-size", 4, "--seq-len", 64, "--lr", 3e-2, "--dtype", "float32"]
    flags += ["--export-hf", hf, "--export-peft", ad, "--quiet"]
    code, cap = _run(capsys, *train_argv(ckpt, data, out, *flags, trainable=f"ids:{IDS}"))
    assert code == 0, cap.err
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["o_proj", "q_proj", "up_proj"]
    assert cfg["trainable_token_indices"] == {"lm_head": [5, 9, 77, 200], "embed_tokens": [5, 9, 77, 200]}
    before, after = jaxvocab.load(ckpt, show_progress=False), jaxvocab.load(hf, show_progress=False)
    keep = np.setdiff1d(np.arange(256), [5, 9, 77, 200])
    assert np.array_equal(_host(before.embed[...])[keep], _host(after.embed[...])[keep])
    assert np.array_equal(_host(before.layers.attn_norm[...]), _host(after.layers.attn_norm[...]))
    assert not np.array_equal(_host(before.layers.wq[...]), _host(after.layers.wq[...]))  # adapters merged
    assert convert_main(["export", str(ckpt), str(tmp_path / "base")]) == 0
    ids = np.random.RandomState(0).randint(0, 256, (2, 100))
    merged = _torch_logits(LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32), ids)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    via_peft = _torch_logits(peft.PeftModel.from_pretrained(base, ad).eval(), ids)
    assert np.max(np.abs(merged - via_peft)) < 1e-4
    # the adapter dir seeds a new run: --lora-init reads back exactly what --export-peft wrote, and
    # its r, alpha and targets stand for the flags not passed
    flags = ["--lora-init", ad, "--lora-lr", "1e-2", "--steps", 1, "--seq-len", 64, "--dtype", "float32", "--quiet"]
    code, cap = _run(capsys, *train_argv(ckpt, data, tmp_path / "again", *flags, trainable="none"))
    assert code == 0, cap.err
    run = json.loads((tmp_path / "again" / "run.json").read_text())
    assert (run["lora_rank"], run["lora_alpha"], run["lora_targets"]) == (4, 8.0, "wq,wo,w_up"), run
    again = jaxvocab.load(tmp_path / "again" / "final", show_progress=False)
    assert np.array_equal(_host(before.embed[...]), _host(again.embed[...]))  # adapters only: rows untouched


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--lora-rank", "0"], "--lora-rank 0"),
        (["--lora-rank", "4", "--lora-alpha", "-1"], "--lora-alpha"),
        (["--lora-rank", "4", "--lora-targets", "q,foo"], "unknown foo"),
        (["--lora-rank", "4", "--lora-dropout", "1.0"], "--lora-dropout"),
        (["--lora-rank", "4", "--lora-lr", "0"], "--lora-lr"),
        (["--lora-alpha", "8"], "needs --lora-rank"),
        (["--export-peft", "x"], "needs --lora-rank"),
        (["--trainable", "none"], "--trainable none"),
    ],
)
def test_bad_lora_flags_exit_2(setup, tmp_path, capsys, extra, match):
    ckpt, data = setup
    code, cap = _run(capsys, *train_argv(ckpt, data, tmp_path / "out", "--quiet", *extra))
    assert code == 2 and cap.err.startswith("error: ") and cap.err.strip().count("\n") == 0 and match in cap.err, (
        cap.err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing", "not a PEFT adapter dir"),
        ("config", "not valid JSON"),
        ("rank", "r=8"),
        ("weights", "adapter_model.safetensors"),
    ],
)
def test_corrupt_adapter_dir_exit_1(setup, tmp_path, capsys, damage, match):
    ckpt, data = setup
    ad = tmp_path / "ad"
    ad.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    if damage != "missing":
        (ad / "adapter_config.json").write_text(
            "{oops" if damage == "config" else json.dumps(dict(cfg, r=8) if damage == "rank" else cfg)
        )
        (ad / "adapter_model.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" if damage == "weights" else _one_adapter()
        )
    flags = ["--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", "q", "--lora-init", ad, "--seq-len", 64]
    code, cap = _run(
        capsys, *train_argv(ckpt, data, tmp_path / "out", *flags, "--steps", 1, "--quiet", trainable=f"ids:{IDS}")
    )
    assert code == 1 and cap.err.startswith("error: ") and cap.err.strip().count("\n") == 0, cap.err
    assert match in cap.err, cap.err


def _one_adapter() -> bytes:
    from safetensors.numpy import save

    return save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32)})


def test_lora_targets_default_names_every_target():
    """flags spells --lora-targets' default itself (no jax import for --help); it must stay lora.TARGETS."""
    from jaxvocab.lora import TARGETS
    from train.flags import ALL_TARGETS

    assert ALL_TARGETS == ",".join(TARGETS)
