"""`jaxvocab-convert import / export / inspect`, run in-process through `main([...])`, and every
bad input answered with one `error:` line naming the file, no output dir and untouched inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main
from jaxvocab.errors import CheckpointError, ConfigError
from jaxvocab.io import hf, safetensors_io
from tests.builders import make_hf_checkpoint

SUBCOMMANDS = ("import", "export", "inspect", "demo")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree_hash(*roots: Path) -> str:
    """Names, modes and bytes of every file under `roots`: proof that inputs were not touched."""
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            h.update(str(p.relative_to(root)).encode())
            if p.is_file():
                h.update(oct(p.stat().st_mode).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, llama3_tokenizer_dir):
    """One single-file and one sharded HF source, copied afresh by tests that damage them."""
    root = tmp_path_factory.mktemp("sources")
    dirs = {}
    for name, shards in (("single", False), ("sharded", True)):
        path, _ = make_hf_checkpoint(root / name, heads=8, kv_heads=2, shards=shards, seed=11)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(llama3_tokenizer_dir / f, path / f)
        dirs[name] = path
    return dirs


# ------------------------------------------------------------------------------------- happy paths
def test_import_export_round_trip(tmp_path, pristine, capsys):
    import torch
    from transformers import LlamaForCausalLM

    src = pristine["sharded"]
    before = tree_hash(src)
    code, out, err = run(capsys, "import", src, tmp_path / "ck", "--mesh", "data=1,fsdp=2,tensor=4")
    assert code == 0, err
    assert f"wrote {tmp_path / 'ck'}" in out and "float32" in out
    code, out, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf", "--max-shard-size", "100KB")
    assert code == 0, err
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    a = LlamaForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    b = LlamaForCausalLM.from_pretrained(src).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text()) == json.loads(
        (src / "tokenizer.json").read_text()
    )
    assert tree_hash(src) == before


def test_import_with_dtype(tmp_path, pristine, capsys):
    code, out, err = run(capsys, "import", pristine["single"], tmp_path / "ck", "--dtype", "bfloat16")
    assert code == 0, err
    assert "bfloat16" in out
    model = jaxvocab.load(tmp_path / "ck")
    assert str(model.embed[...].dtype) == "bfloat16" and str(model.layers.wq[...].dtype) == "bfloat16"


def test_inspect_reads_headers_only(pristine, tmp_path, capsys, monkeypatch):
    src = pristine["sharded"]

    def no_weights(*a, **kw):
        raise AssertionError("inspect read a weight")

    monkeypatch.setattr(safetensors_io, "read_slice", no_weights)
    monkeypatch.setattr(hf, "read_slice", no_weights)
    with pytest.raises(AssertionError, match="read a weight"):  # the trap is on the load path
        jaxvocab.load(src, show_progress=False)
    code, out, err = run(capsys, "inspect", src)
    assert code == 0, err
    config = jaxvocab.LlamaConfig.from_hf_file(src)
    n = config.num_params()
    assert f"{n:,}" in out
    assert "float32" in out and "untied" in out
    assert "theta 10000" in out and "llama3 scaling factor 8" in out and "original context 64" in out
    assert "8 heads x 8, 2 kv heads (GQA 4:1)" in out
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert f"{len(files)} shard(s)" in out and all(f in out for f in files)


def test_inspect_jaxvocab_checkpoint(tmp_path, pristine, capsys):
    assert run(capsys, "import", pristine["single"], tmp_path / "ck")[0] == 0
    code, out, err = run(capsys, "inspect", tmp_path / "ck")
    assert code == 0, err
    assert (
        "jaxvocab checkpoint" in out
        and f"{jaxvocab.LlamaConfig.from_hf_file(pristine['single']).num_params():,}" in out
    )


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(capsys, sub):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"] if sub else ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: jaxvocab-convert") and (sub is None or f"jaxvocab-convert {sub}" in text)
    if sub is None:
        assert all(s in text for s in SUBCOMMANDS)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """The CLIs' log files get no `\\r` frames around the one error line; a terminal still sees the
    bar, and a library caller (a notebook's stderr is no terminal) keeps it anywhere."""
    import io

    from jaxvocab import progress as bars
    from jaxvocab.errors import run_command

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(bars, "_terminal_only", False)
    assert not bars.progress(total=3).disable
    assert run_command(lambda: None, "") == 0  # every CLI command runs through it
    assert bars.progress(total=3).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bars.progress(total=3).disable and bars.progress(total=3, disable=True).disable


def test_console_script_is_installed(pristine):
    exe = Path(sys.executable).parent / "jaxvocab-convert"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [str(exe), "inspect", str(pristine["single"])], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout and "model.safetensors" in proc.stdout


# --------------------------------------------------------------------------------------- bad inputs
def _rewrite_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _first_shard_with(src: Path, name: str) -> Path:
    return src / json.loads((src / hf.INDEX).read_text())["weight_map"][name]


def missing_tensor(src):
    _rewrite_tensors(src / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return src, "'model.layers.1.mlp.up_proj.weight' is missing"


def unexpected_tensor(src):
    import torch

    _rewrite_tensors(
        src / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    )
    return src / "model.safetensors", "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"


def shape_mismatch(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    return src / "model.safetensors", "config.json implies [96, 64]"


def int_tensor(src):
    import torch

    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_tensors(
        src / "model.safetensors", lambda t: t.update({name: torch.ones(t[name].shape, dtype=torch.int32)})
    )
    return src / "model.safetensors", "must be floating point"


def missing_shard(src):
    shard = _first_shard_with(src, "model.norm.weight")
    shard.unlink()
    return src / hf.INDEX, f"shard '{shard.name}' is named in the index but missing"


def outside_shard(src):
    """The index points one shard at ../evil.safetensors (which exists, so only the path is wrong)."""
    shard = _first_shard_with(src, "model.norm.weight")
    shutil.copy(shard, src.parent / "evil.safetensors")
    index = json.loads((src / hf.INDEX).read_text())
    index["weight_map"] = {k: ("../evil.safetensors" if v == shard.name else v) for k, v in index["weight_map"].items()}
    (src / hf.INDEX).write_text(json.dumps(index))
    return src / hf.INDEX, "'../evil.safetensors' points outside"


def truncated(src):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    return f, "truncated"


def not_safetensors(src):
    (src / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    return src / "model.safetensors", "not safetensors"


def no_config(src):
    (src / "config.json").unlink()
    return src, "not a checkpoint dir"


def mistral_config(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (src / "config.json").write_text(json.dumps(cfg))
    return src / "config.json", "model_type='mistral'"


BAD = [  # (damage, which pristine source, error class)
    (missing_tensor, "single", CheckpointError),
    (unexpected_tensor, "single", CheckpointError),
    (shape_mismatch, "single", CheckpointError),
    (int_tensor, "single", CheckpointError),
    (missing_shard, "sharded", CheckpointError),
    (outside_shard, "sharded", CheckpointError),
    (truncated, "single", CheckpointError),
    (not_safetensors, "single", CheckpointError),
    (no_config, "single", CheckpointError),
    (mistral_config, "single", ConfigError),
]


@pytest.mark.parametrize("damage, kind, error", BAD, ids=[b[0].__name__ for b in BAD])
def test_bad_input_one_line_error_no_output(tmp_path, pristine, capsys, damage, kind, error):
    src = shutil.copytree(pristine[kind], tmp_path / "in" / "src")
    named, words = damage(src)
    before = tree_hash(tmp_path / "in")
    out = tmp_path / "out" / "ck"

    code, stdout, stderr = run(capsys, "import", src, out)
    assert code == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert str(named) in stderr and words in stderr, stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    with pytest.raises(error) as e:
        jaxvocab.load(src, show_progress=False)
    assert f"error: {e.value}\n" == stderr
    assert tree_hash(tmp_path / "in") == before


def test_existing_output_needs_overwrite(tmp_path, pristine, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, "import", pristine["single"], out)
    assert code == 2 and str(out) in err and "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, _, err = run(capsys, "import", pristine["single"], out, "--overwrite")
    assert code == 0, err
    assert not (out / "mine.txt").exists() and jaxvocab.load(out).config.vocab_size == 256
    code, _, err = run(capsys, "export", out, out, "--overwrite")
    assert code == 2 and "overlaps CKPT" in err  # with or without --overwrite: it would delete its input


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--mesh", "fsdp=3"], "--mesh"),
        (["--mesh", "pipeline=8"], "--mesh"),
        (["--mesh", "fsdp=two"], "--mesh"),
        (["--mesh", "fsdp=8,fsdp=1"], "given twice"),  # not the last value silently
    ],
)
def test_bad_mesh_exits_2(tmp_path, pristine, capsys, argv, flag):
    code, _, err = run(capsys, "import", pristine["single"], tmp_path / "ck", *argv)
    assert code == 2 and err.startswith("error: --mesh") and flag in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_mesh_larger_than_the_cpu_devices_says_how_to_make_more(tmp_path, pristine, capsys):
    code, _, err = run(capsys, "import", pristine["single"], tmp_path / "ck", "--mesh", "fsdp=16")
    assert code == 2 and "--xla_force_host_platform_device_count" in err, err


@pytest.mark.parametrize("size", ["lots", "0", "0GB"])
def test_bad_shard_size_exits_2(tmp_path, pristine, capsys, size):
    code, _, err = run(capsys, "export", pristine["single"], tmp_path / "hf", "--max-shard-size", size)
    assert code == 2 and err.startswith(f"error: --max-shard-size '{size}'"), err  # before any loading
    assert list(tmp_path.iterdir()) == []


def test_hub_cache_repo_and_repo_ids_get_a_hint(tmp_path, pristine, capsys, monkeypatch):
    """The repo dir of a hub cache names its snapshot; a repo id says that only local dirs are read."""
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(pristine["single"], repo / "snapshots" / "abc123")
    code, _, err = run(capsys, "inspect", repo)
    assert code == 1 and f"pass its snapshot {repo / 'snapshots' / 'abc123'}" in err, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "inspect", "meta-llama/Llama-3.2-1B")
    assert code == 1 and "local dirs only" in err and "huggingface-cli download" in err, err
    code, _, err = run(capsys, "inspect", "../nope")  # a relative path, no repo id
    assert code == 1 and "no such file or directory" in err and "huggingface" not in err, err


def test_bad_flags_are_argparse_errors(tmp_path, pristine, capsys):
    for argv in (
        ["import", str(pristine["single"])],
        ["import", str(pristine["single"]), str(tmp_path / "x"), "--dtype", "int8"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path, pristine, capsys, monkeypatch):
    from jaxvocab.io import checkpoint

    def interrupted(model, out, meanwhile=None):
        (out / "partial").write_bytes(np.zeros(10).tobytes())
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", interrupted)
    code, _, err = run(capsys, "import", pristine["single"], tmp_path / "ck")
    assert code == 130 and "no output was written" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_alias_from_the_installed_console_script(tmp_path):
    """`jaxvocab-convert demo` run as the console script of an editable install (as `make` installs
    it), from another dir: examples/ is found beside the checkout's packages. The run stops at once
    on an OUT that is a file, after the demo module was imported."""
    script = Path(sys.executable).parent / "jaxvocab-convert"
    if not script.exists():
        pytest.skip("no console script beside this interpreter (not the project's venv)")
    (tmp_path / "out").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAXVOCAB_HUGE_PAGES": "0"}
    r = subprocess.run(
        [str(script), "demo", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr, r.stderr
