"""Issue 9 through both CLIs in-process: outputs overlapping inputs (as given and through links, hub
cache blobs included), unusable outputs caught before loading, absurd flags, damaged jaxvocab
checkpoints and run dirs, and non-finite training steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxvocab
from convert.__main__ import main as convert
from tests.builders import make_hf_checkpoint
from tests.hardening_util import attempt, cases, count, tree_hash
from train.__main__ import main as train


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama3_tokenizer_dir):
    """An HF dir (with the real tokenizer), its jaxvocab import, a hub-cache snapshot of it, data."""
    root = tmp_path_factory.mktemp("hardening-cli")
    hf, _ = make_hf_checkpoint(root / "hf", vocab=256, hidden=32, intermediate=64, heads=4, kv_heads=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama3_tokenizer_dir / f, hf / f)
    assert convert(["import", str(hf), str(root / "ckpt")]) == 0
    hub = root / "hub" / "models--meta--tiny"
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in hf.iterdir():
        shutil.copy(f, hub / "blobs" / f.name)
        os.symlink(os.path.relpath(hub / "blobs" / f.name, snap), snap / f.name)
    data = root / "data" / "train.jsonl"
    data.parent.mkdir()
    rs = np.random.RandomState(0)
    data.write_text("".join(json.dumps({"input_ids": rs.randint(0, 256, 40).tolist()}) + "\n" for _ in range(8)))
    return {"root": root, "hf": hf, "ckpt": root / "ckpt", "hub": hub, "snap": snap, "data": data}


@pytest.fixture
def no_load(monkeypatch):
    """Output problems must be caught before any weight is read."""

    def refuse(*a, **k):
        raise AssertionError("loaded a model before checking the output")

    monkeypatch.setattr(jaxvocab, "load", refuse)


# ----------------------------------------------------------------------------------- overlaps
def _overlap_cases(w):
    hf, ckpt, snap, hub = w["hf"], w["ckpt"], w["snap"], w["hub"]
    link = w["root"] / "link-to-hf"
    if not link.exists():
        os.symlink(hf, link)
    return [
        ("import", hf, hf),
        ("import", hf, hf.parent),
        ("import", hf, hf / "sub"),
        ("import", hf, link),
        ("import", link, hf),
        ("import", link, hf / "x" / "y"),
        ("import", snap, snap),
        ("import", snap, hub / "blobs"),
        ("import", snap, hub / "blobs" / "new"),
        ("import", snap, hub),
        ("import", snap, hub.parent),
        ("import", hf, hf / "config.json"),
        ("export", ckpt, ckpt),
        ("export", ckpt, ckpt / "hf"),
        ("export", ckpt, ckpt.parent),
        ("export", ckpt, ckpt / "state"),
    ]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_overlapping_an_input_is_refused(world, capsys, no_load, overwrite):
    for cmd, src, out in _overlap_cases(world):
        argv = [cmd, src, out] + (["--overwrite"] if overwrite else [])
        code, err = attempt(
            capsys,
            convert,
            argv,
            inputs=[world["hf"], world["ckpt"], world["hub"]],
            codes=(2,),
            category="overlap: convert",
        )
        assert "overlaps" in err or "is a file" in err, err


def test_tokens_file_as_output_is_refused(world, capsys, no_load, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<a>\n")
    attempt(
        capsys,
        convert,
        ["import", world["hf"], tokens, "--add-tokens", f"@{tokens}", "--overwrite"],
        inputs=[tokens],
        codes=(2,),
        category="overlap: convert",
    )


def test_train_outputs_overlapping_inputs_are_refused(world, capsys, no_load, tmp_path):
    base = ["--data", world["data"], "--trainable", "ids:5", "--quiet"]
    m, d = world["hf"], world["data"]
    for out, export, extra in [
        (m, None, []),
        (m.parent, None, ["--overwrite"]),
        (m / "run", None, []),
        (d, None, ["--overwrite"]),
        (d.parent, None, ["--overwrite"]),
        (tmp_path / "run", m, ["--overwrite"]),
        (tmp_path / "run", tmp_path / "run", []),
        (tmp_path / "run", tmp_path / "run" / "hf", []),
        (tmp_path / "run", d.parent, []),
    ]:
        argv = ["--model", m, "--out", out, *base, *extra] + (["--export-hf", export] if export else [])
        attempt(capsys, train, argv, inputs=[m, d], codes=(2,), category="overlap: train")
        assert not (tmp_path / "run").exists()


def test_library_saves_refuse_the_models_source_dir(world, tmp_path):
    from jaxvocab.errors import UsageError

    count("overlap: library")
    model = jaxvocab.load(world["ckpt"])
    tok = jaxvocab.load_tokenizer(world["ckpt"])  # the files a save carries come from the source dir
    before = tree_hash(world["ckpt"])
    for save, out in (
        (jaxvocab.save_checkpoint, world["ckpt"]),
        (jaxvocab.save_hf, world["ckpt"] / "hf"),
        (jaxvocab.save_checkpoint, world["ckpt"].parent),
    ):
        with pytest.raises(UsageError, match="overlaps"):
            save(model, out, tokenizer=tok, overwrite=True)
    assert tree_hash(world["ckpt"]) == before


# ------------------------------------------------------------------------------ bad outputs
def test_unusable_outputs_fail_before_loading(world, capsys, no_load, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv in (
        ["import", world["hf"], a_file],
        ["import", world["hf"], a_file, "--overwrite"],
        ["import", world["hf"], a_file / "out"],
        ["import", world["hf"], a_file / "a" / "b", "--overwrite"],
        ["export", world["ckpt"], a_file, "--overwrite"],
        ["export", world["ckpt"], a_file / "hf"],
    ):
        attempt(
            capsys,
            convert,
            argv,
            inputs=[world["hf"], world["ckpt"], a_file],
            codes=(2,),
            category="bad output: convert",
        )
    for extra in (
        ["--out", a_file, "--overwrite"],
        ["--out", a_file / "run"],
        ["--out", tmp_path / "run", "--export-hf", a_file / "hf"],
    ):
        attempt(
            capsys,
            train,
            ["--model", world["hf"], "--data", world["data"], "--trainable", "ids:5", *extra],
            inputs=[world["hf"], a_file],
            codes=(2,),
            category="bad output: train",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    "flags",
    [
        ["--add-tokens", ""],
        ["--add-tokens", " , "],
        ["--pad-to-multiple-of", "0"],
        ["--pad-to-multiple-of", "-8"],
        ["--init", "mean"],
        ["--add-tokens", "@/nonexistent"],
    ],
    ids=["empty tokens", "blank tokens", "pad 0", "pad -8", "init alone", "missing file"],
)
def test_bad_vocab_flags_exit_2_before_loading(world, capsys, no_load, tmp_path, flags):
    attempt(
        capsys,
        convert,
        ["import", world["hf"], tmp_path / "out", *flags],
        inputs=[world["hf"]],
        codes=(2,),
        outs=[tmp_path / "out"],
        category="flags",
    )


def test_absurd_padding_checked_against_memory(world, capsys, tmp_path):
    _, err = attempt(
        capsys,
        convert,
        ["import", world["hf"], tmp_path / "out", "--pad-to-multiple-of", "100000000"],
        inputs=[world["hf"]],
        outs=[tmp_path / "out"],
        codes=(2,),
        category="flags",
    )
    assert "GiB" in err and "--pad-to-multiple-of" in err


def test_tokens_file_entries_are_stripped_like_the_inline_list(tmp_path):
    from convert.vocab_cli import parse_tokens

    f = tmp_path / "t.txt"
    f.write_text("  <a>  \n\t<b>=  the b token \n\n <c>\n")
    count("flags")
    assert parse_tokens(f"@{f}") == {"<a>": None, "<b>": "the b token", "<c>": None}
    assert list(parse_tokens(" <a> ,<b>, <c>")) == list(parse_tokens(f"@{f}"))


def test_tokens_file_as_editors_write_it(tmp_path):
    """A BOM (Notepad's UTF-8) is no part of the first token; '=' inside a <|...|> token is not its
    description's separator; a '# ' line is a token, with a warning; a typo in a [flag] is refused."""
    from convert.vocab_cli import parse_token_flags, parse_tokens
    from jaxvocab.errors import UsageError

    f = tmp_path / "t.txt"
    f.write_bytes("\ufeff<|lang_aa|>\n<|x=y|>\n<|z|>=a z = word\n=\n# my tokens\n".encode())
    count("flags")
    with pytest.warns(UserWarning, match=r"t.txt:5: '# my tokens' is added as a token"):
        got = parse_tokens(f"@{f}")
    assert got == {"<|lang_aa|>": None, "<|x=y|>": None, "<|z|>": "a z = word", "=": None, "# my tokens": None}
    with pytest.raises(UsageError, match=r"\[spcial\], not a flag; write \[special\] or \[plain\]"):
        parse_token_flags("foo [spcial],bar")


def test_tokens_file_quoted_lines_keep_the_token_exactly(tmp_path):
    """A line in double quotes is a JSON string: spaces, commas and '=' stay in the token; a flag and
    a description may follow the closing quote; anything else after it, or a broken string, is refused."""
    from convert.vocab_cli import parse_token_flags
    from jaxvocab.errors import UsageError

    f = tmp_path / "t.txt"
    f.write_text('" Paris" [plain]=the city\n"a,b"\n  "x=y"=  a word \n"<|t|>" [special]\n"\\u00e9t\u00e9 "\n<z>\n')
    count("flags")
    tokens, flags = parse_token_flags(f"@{f}")
    assert tokens == {
        " Paris": "the city",
        "a,b": None,
        "x=y": "a word",
        "<|t|>": None,
        "\u00e9t\u00e9 ": None,
        "<z>": None,
    }
    assert flags == {" Paris": False, "<|t|>": True}
    from jaxvocab.vocab_plan import PlannedToken, VocabPlan

    plan = VocabPlan([PlannedToken(" Paris", 7, "appended"), PlannedToken("a\\b", 8, "appended")], 7, 9, 7, 9, 1, [])
    shown = plan.summary().splitlines()
    assert shown[1].startswith('" Paris"  7') and shown[2].startswith("a\\b       8")  # quoted only where needed
    with pytest.warns(UserWarning, match="quotes in the inline list are part of the token"):
        assert parse_token_flags('" x",y')[0] == {'" x"': None, "y": None}
    for line, match in [
        ('"unterminated', r"t.txt:1: .* is not a quoted JSON string"),
        ('"x" trailing', r"t.txt:1: .*after a quoted token write only \[special\], \[plain\] or =description"),
        ('""', r"t.txt:1: '\"\"' is an empty or all-space token"),
        ('"  "', r"empty or all-space token"),
        ('"\\ud83d"', r"t.txt:1: .* is not valid UTF-8 text \(a lone surrogate\)"),
        ("foo [plain] [special]", r"t.txt:1: 'foo \[plain\] \[special\]' has two \[flags\]"),
        ("foo [Plain]", r"t.txt:1: 'foo \[Plain\]' ends in \[Plain\], not a flag"),
        ('"x" =', r"t.txt:1: empty description"),
        ('" a"\n" a"', r"t.txt:2: ' a' is listed twice"),
    ]:
        f.write_text(line + "\n")
        with pytest.raises(UsageError, match=match):
            parse_token_flags(f"@{f}")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--weight-decay", "nan"),
        ("--weight-decay", "inf"),
        ("--clip", "nan"),
        ("--steps", "0"),
    ],
)
def test_non_finite_train_flags_exit_2(world, capsys, no_load, tmp_path, flag, value):
    attempt(
        capsys,
        train,
        [
            "--model",
            world["hf"],
            "--data",
            world["data"],
            "--out",
            tmp_path / "run",
            "--trainable",
            "ids:5",
            flag,
            value,
        ],
        inputs=[world["hf"]],
        outs=[tmp_path / "run"],
        codes=(2,),
        category="flags",
    )


# ------------------------------------------------------------------ damaged jaxvocab checkpoints
def _damaged_ckpt(world, tmp_path) -> Path:
    ck = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], ck)
    return ck


@pytest.mark.parametrize(
    "damage", ["state missing", "state empty", "marker list", "marker format", "config list", "state is a file"]
)
def test_damaged_checkpoint_export(world, capsys, tmp_path, damage):
    ck = _damaged_ckpt(world, tmp_path)
    if damage.startswith("state"):
        shutil.rmtree(ck / "state")
        if damage == "state empty":
            (ck / "state").mkdir()
        elif damage == "state is a file":
            (ck / "state").write_text("x")
    elif damage == "marker list":
        (ck / "jaxvocab.json").write_text("[1]")
    elif damage == "marker format":
        (ck / "jaxvocab.json").write_text('{"format": "1"}')
    else:
        (ck / "config.json").write_text("[]")
    attempt(
        capsys,
        convert,
        ["export", ck, tmp_path / "hf"],
        inputs=[ck],
        outs=[tmp_path / "hf"],
        category="damaged jaxvocab checkpoint",
    )


@cases(25)
@given(data=st.data())
def test_state_files_truncated_or_corrupted(world, capsys, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    ck = _damaged_ckpt(world, tmp)
    files = sorted(p for p in (ck / "state").rglob("*") if p.is_file() and p.stat().st_size > 0)
    f = data.draw(st.sampled_from(files))
    blob = f.read_bytes()
    how = data.draw(st.sampled_from(["empty", "half", "flip", "delete"]))
    if how == "delete":
        f.unlink()
    else:
        f.write_bytes(
            b"" if how == "empty" else blob[: len(blob) // 2] if how == "half" else bytes(b ^ 0x5A for b in blob)
        )
    attempt(
        capsys,
        convert,
        ["export", ck, tmp / "hf"],
        inputs=[ck],
        ok=True,
        outs=[tmp / "hf"],
        category="damaged jaxvocab checkpoint",
    )
    shutil.rmtree(tmp)


# ------------------------------------------------------------------------------- training
def _train_argv(world, out, *extra):
    argv = [
        "--model",
        world["hf"],
        "--data",
        world["data"],
        "--out",
        out,
        "--trainable",
        "ids:5,9",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--schedule",
        "constant",
        "--quiet",
        *extra,
    ]
    return [str(a) for a in argv]


def _poisoned(world, tmp_path) -> tuple[Path, Path]:
    """A model whose frozen embedding row 77 is NaN (loaded with --allow-nonfinite), and data where
    token 77 occurs once, in one document: only the step that packs it goes non-finite."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["hf"], model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.embed_tokens.weight"][77] = np.nan
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    rs = np.random.RandomState(1)
    docs = [rs.choice([i for i in range(256) if i != 77], 40) for _ in range(8)]
    docs[5][20] = 77
    data = tmp_path / "poison.jsonl"
    data.write_text("".join(json.dumps({"input_ids": d.tolist()}) + "\n" for d in docs))
    return model, data


def test_training_stops_at_the_first_non_finite_step(world, capsys, tmp_path):
    model, data = _poisoned(world, tmp_path)
    poisoned = {"hf": model, "data": data}
    code = train(_train_argv(poisoned, tmp_path / "skip", "--steps", "12", "--allow-nonfinite", "--skip-nonfinite"))
    err = capsys.readouterr().err
    logged = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in logged if r.get("skipped")]
    assert code == 0 and skipped and err.count("step skipped") == len(skipped), err
    final = np.asarray(jaxvocab.load(tmp_path / "skip" / "final", allow_nonfinite=True).embed[...])
    assert np.isfinite(final[[5, 9]]).all()  # the skipped steps changed nothing

    run = tmp_path / "run"
    _, err = attempt(
        capsys,
        train,
        _train_argv(poisoned, run, "--steps", "12", "--save-every", "1", "--allow-nonfinite"),
        inputs=[model, data],
        category="non-finite training",
    )
    first = skipped[0]
    assert f"step {first}:" in err and "--skip-nonfinite" in err, err
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1:] == ([first - 1] if first > 1 else []) and not (run / "final").exists()
    if first > 1:
        assert f"last good checkpoint (step {first - 1})" in err
    attempt(
        capsys,
        train,
        _train_argv(poisoned, tmp_path / "refused", "--steps", "2"),
        inputs=[model],
        outs=[tmp_path / "refused"],
        category="non-finite training",
    )  # without --allow-nonfinite


def test_resume_with_damaged_run_dir(world, capsys, tmp_path):
    run = tmp_path / "run"
    assert train(_train_argv(world, run, "--steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    keep = (run / "run.json").read_text()
    for text in ("{oops", "[1, 2]", '"run"'):
        (run / "run.json").write_text(text)
        _, err = attempt(
            capsys,
            train,
            _train_argv(world, run, "--steps", "2", "--save-every", "1", "--resume"),
            inputs=[world["hf"], world["data"]],
            category="damaged run dir",
        )
        assert "run.json" in err
    (run / "run.json").write_text(keep)
    for f in (run / "checkpoints" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0")
    _, err = attempt(
        capsys,
        train,
        _train_argv(world, run, "--steps", "3", "--save-every", "1", "--resume"),
        inputs=[world["hf"], world["data"]],
        category="damaged run dir",
        codes=(1, 2),
    )
    assert "checkpoint" in err or "--steps" in err


@pytest.mark.parametrize(
    "line",
    [
        '{"input_ids": [1, 100000000000000000000]}',
        '{"input_ids": [1, 1e20]}',
        '{"input_ids": [1, -5]}',
        "[1, 2]",
        '{"text": 5}',
        '{"input_ids": [' * 3000,
    ],
)
def test_bad_training_data(world, capsys, tmp_path, line):
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    h = tree_hash(data)
    attempt(
        capsys,
        train,
        ["--model", world["hf"], "--data", data, "--out", tmp_path / "run", "--trainable", "ids:5", "--quiet"],
        inputs=[world["hf"]],
        outs=[tmp_path / "run"],
        category="bad training data",
    )
    assert tree_hash(data) == h


# ----------------------------------------------------------------------------- tokenizer files
@cases(12)
@given(data=st.data())
def test_tokenizer_json_type_swaps(world, capsys, data, tmp_path_factory):
    from tests.hardening_util import JSON_VALUES

    tmp = tmp_path_factory.mktemp("tok")
    src = tmp / "hf"
    shutil.copytree(world["hf"], src)
    name = data.draw(st.sampled_from(["tokenizer_config.json", "tokenizer.json"]))
    doc = json.loads((src / name).read_text())
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(JSON_VALUES)
    (src / name).write_text(json.dumps(doc))
    attempt(
        capsys,
        convert,
        ["inspect", src, "--add-tokens", "<x>,<y>"],
        inputs=[src],
        ok=True,
        category="tokenizer files: field type swap",
    )
    shutil.rmtree(tmp)
