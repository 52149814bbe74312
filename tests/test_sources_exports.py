"""The paths users take in and out: hub-cache snapshots, Meta dirs with new tokens, and what an HF
export carries (allow-listed files only, special flags, generation config, chat template, padding)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main
from tests._meta_export import PLANNED
from tests._tok_util import LLAMA3_CHAT_TEMPLATE, reference_tiktoken
from tests.builders import make_hf_checkpoint
from tests.meta_writer import make_hf_model, write_meta


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (through links), so inputs can be checked untouched."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def to_hub_cache(src: Path, cache: Path, extra: dict[str, bytes]) -> Path:
    """Lay `src` out as the hub does: blobs/<sha256> and snapshots/<commit>/<name> -> ../../blobs/<sha256>."""
    repo = cache / "models--meta-llama--Tiny"
    snap = repo / "snapshots" / ("ab" * 20)
    files = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    files.update({Path(k): v for k, v in extra.items()})
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / digest).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    return snap


def hf_source(path: Path, shards: bool) -> Path:
    """An HF Llama-3 text checkpoint laid out like the hub repos: tokenizer.json at the top, no tokenizer.model."""
    from examples.llama3_tokenizer import write_text_tokenizer

    make_hf_checkpoint(path, vocab=128256, hidden=32, intermediate=64, layers=1, shards=shards)
    write_text_tokenizer(path)
    (path / "tokenizer.model").unlink()
    return path


# ------------------------------------------------------------------------------------ hub cache
@pytest.mark.parametrize("shards", [True, False], ids=["sharded", "single"])
def test_hub_cache_snapshot_loads_imports_inspects_exports(tmp_path, capsys, llama3_tokenizer_dir, shards):
    plain = hf_source(tmp_path / "plain", shards)
    extra = {
        "original/tokenizer.model": (llama3_tokenizer_dir / "tokenizer.model").read_bytes(),
        "original/params.json": b'{"dim": 32}',
        "LICENSE": b"LLAMA 3 COMMUNITY LICENSE\n",
        "README.md": b"# Tiny\n",
    }
    snap = to_hub_cache(plain, tmp_path / "hub", extra)
    assert all(p.is_symlink() for p in snap.rglob("*") if p.is_file())
    assert (snap / "model.safetensors.index.json").is_file() == shards
    before = tree(tmp_path / "hub")

    want = np.asarray(jaxvocab.load(plain, show_progress=False).embed[...])
    np.testing.assert_array_equal(np.asarray(jaxvocab.load(snap, show_progress=False).embed[...]), want)
    code, out, err = run(capsys, "inspect", snap)
    assert code == 0 and "Hugging Face" in out, err
    code, out, err = run(capsys, "export", snap, tmp_path / "hf-direct")  # export reads a snapshot too
    assert code == 0, err
    outs = [tmp_path / "hf-direct"]
    if shards:  # import (with new tokens) and the export of its result, once
        code, out, err = run(capsys, "import", snap, tmp_path / "ck", "--add-tokens", "<|tool_call|>,<think>")
        assert code == 0, err
        code, out, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf")
        assert code == 0, err
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert hf_tok.convert_tokens_to_ids(["<|tool_call|>", "<think>"]) == [128002, 128003]
        outs += [tmp_path / "ck", tmp_path / "hf"]
    for out_dir in outs:
        names = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")}
        assert not {"LICENSE", "README.md", "original", "original/params.json"} & names, out_dir
        assert not any(p.is_symlink() for p in out_dir.rglob("*")), out_dir
    assert tree(tmp_path / "hub") == before


def test_index_names_outside_the_dir_are_still_refused(tmp_path, llama3_tokenizer_dir):
    from jaxvocab.errors import CheckpointError

    src = hf_source(tmp_path / "src", shards=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for bad in ("../x.safetensors", "/etc/passwd", "a/../../b.safetensors"):
        name = next(iter(index["weight_map"]))
        edited = {**index, "weight_map": {**index["weight_map"], name: bad}}
        (src / "model.safetensors.index.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match="points outside"):
            jaxvocab.load(src, show_progress=False)


# ------------------------------------------------------------------------------- carried files
def test_only_allow_listed_files_ride_along_parsed_and_rewritten(tmp_path, capsys, gpt2_src):
    src = gpt2_src(tmp_path / "src")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": "evil.EvilTokenizer"}  # foreign key inside valid JSON
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tc.json").write_text(json.dumps(cfg))
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere" / "tc.json")  # read through the link
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "top_p": 0.5, "payload": "x"}))
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name in ("LICENSE", "README.md", "evil.py", "original/notes.txt"):
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_text("x")
    before = tree(src)
    code, _, err = run(capsys, "import", src, tmp_path / "ck")
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf")
    assert code == 0, err
    for d in (tmp_path / "ck", tmp_path / "hf"):
        assert not {"LICENSE", "README.md", "evil.py", "original"} & {p.name for p in d.iterdir()}
        assert not any(p.is_symlink() for p in d.rglob("*"))
        assert "auto_map" not in json.loads((d / "tokenizer_config.json").read_text())
        assert json.loads((d / "generation_config.json").read_text()) == {"eos_token_id": 1, "top_p": 0.5}
        assert (d / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert tree(src) == before

    for name, content in (
        ("tokenizer_config.json", "{not json"),
        ("chat_template.jinja", "{% for %}"),
        ("generation_config.json", "[1, 2]"),
    ):
        bad = gpt2_src(tmp_path / f"bad-{name}")
        (bad / name).write_text(content)
        capsys.readouterr()
        code, _, err = run(capsys, "import", bad, tmp_path / f"out-{name}")
        last = err.strip().splitlines()[-1].split("\r")[-1].strip()  # after the loading bar
        assert code == 1 and last.startswith("error:") and name in last and "Traceback" not in err, err
        assert not (tmp_path / f"out-{name}").exists()


@pytest.fixture
def gpt2_src():
    from tests._tok_util import build_gpt2_style

    def make(path: Path) -> Path:
        make_hf_checkpoint(path, vocab=313, hidden=32, intermediate=64, layers=1)
        build_gpt2_style(str(path))
        return path

    return make


# ---------------------------------------------------------------------------------- Meta dirs
def corpus() -> list[str]:
    """Multilingual prose, real Python source, whitespace and digit runs: where BPE ports break."""
    import json as json_mod

    prose = [
        "The quick brown fox jumps over the lazy dog. It's 3:14pm; we'll see.",
        "Le cœur a ses raisons que la raison ne connaît point.",
        "Ünïcödé straße — naïve façade",
        "日本語のテキストを分かち書きせずに書きます。東京は晴れ。",
        "中文分词测试：我们今天去北京。",
        "Привет, как дела? Всё хорошо!",
        "مرحبا بالعالم، كيف حالك؟",
        "हिन्दी में एक वाक्य।",
        "한국어 문장도 있습니다.",
        "Ελληνικά γράμματα",
        "emoji 🎉🚀👍🏽 and ZWJ 👨‍👩‍👧",
        "1234567890 12 345 6789",
    ]
    code = [inspect.getsource(json_mod.decoder), inspect.getsource(json_mod.encoder)]
    space = [
        "a  b   c\t\td\n\n\ne",
        "   leading",
        "trailing   ",
        "\r\n\r\nwin\r\n",
        " " * 40 + "x" + "\n" * 7,
        "tab\there\t\t\tend",
        "mixed \u00a0nbsp\u2003em",
    ]
    return prose + code + space + ["\n".join(prose + space)]


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory):
    _, model = make_hf_model(
        tmp_path_factory.mktemp("meta-hf"), vocab=128256, dim=32, layers=1, heads=4, kv_heads=2, factor=8
    )
    return model


@pytest.mark.slow
def test_meta_source_takes_new_tokens_and_exports_hf_tokenizer_files(meta_export, llama3_tokenizer_dir, caplog):
    import transformers
    from transformers import AutoTokenizer

    tm = llama3_tokenizer_dir / "tokenizer.model"
    _, ck, hf = meta_export  # use_scaled_rope: 3.1 names; reserved slots renamed, two tokens appended
    assert sorted(p.name for p in hf.iterdir() if not p.name.endswith(".safetensors")) == [
        "config.json",
        "generation_config.json",
        "original",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab_plan.json",
    ]
    assert (hf / "original" / "tokenizer.model").read_bytes() == tm.read_bytes()
    assert json.loads((hf / "generation_config.json").read_text()) == {  # ids only: no sampling settings
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    plan = json.loads((hf / "vocab_plan.json").read_text())
    transformers.logging.enable_propagation()  # its warnings reach caplog
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            hf_tok = AutoTokenizer.from_pretrained(hf)
    finally:
        transformers.logging.disable_propagation()
    # params.json names no transformers version: without one in config.json transformers 5 warns
    # that this Llama-3 tokenizer has "an incorrect regex pattern" (a check meant for Mistral's)
    assert not [r for r in caplog.records if "regex pattern" in r.getMessage()]
    assert hf_tok.convert_tokens_to_ids(list(PLANNED.values())) == list(PLANNED)
    assert len(hf_tok) == plan["tokenizer_size_after"] == json.loads((hf / "config.json").read_text())["vocab_size"]
    assert hf_tok.convert_ids_to_tokens([128000, 128004, 128009]) == [
        "<|begin_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|eot_id|>",
    ]
    # special flags: deliberate and the same in both files
    tj = {e["id"]: e["special"] for e in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]}
    tc = {
        int(i): e["special"]
        for i, e in json.loads((hf / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()
    }
    assert tj == tc and len(tj) == plan["tokenizer_size_after"] - 128000
    assert {i: tj[i] for i in PLANNED} == {i: t.startswith("<|") for i, t in PLANNED.items()}
    # ids identical to jaxvocab's tokenizer and to tiktoken built straight from tokenizer.model
    ours = jaxvocab.load_tokenizer(ck)
    ref = reference_tiktoken(str(tm))
    for text in corpus():
        want = ref.encode_ordinary(text)
        assert hf_tok.encode(text, add_special_tokens=False) == want == ours.encode(text), text[:40]
    assert hf_tok.encode("hi")[0] == 128000  # <|begin_of_text|> post-processor
    # the chat template renders Meta's dialog format, as jaxvocab's encoder writes it
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi there \n"},
        {"role": "assistant", "content": "Hello! <think>"},
    ]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! <think><|eot_id|>"
    )
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert list(ids) == ours.encode_chat(msgs)[0]


def test_meta_names_follow_params_json_and_the_flag(tmp_path, capsys, meta_model, llama3_tokenizer_dir):
    tm = llama3_tokenizer_dir / "tokenizer.model"
    m30 = write_meta(meta_model, tmp_path / "m30", tokenizer=tm, use_scaled_rope=False)
    assert jaxvocab.load_tokenizer(m30).special_tokens["<|reserved_special_token_4|>"] == 128008
    assert jaxvocab.load_tokenizer(m30, llama_version="3.1").special_tokens["<|eom_id|>"] == 128008
    code, out, err = run(capsys, "import", m30, tmp_path / "ck", "--add-tokens", "<|a|>")
    assert code == 0, err
    assert "renames <|reserved_special_token_0|>" in out and "128002" in out
    tc = json.loads((tmp_path / "ck" / "tokenizer_config.json").read_text())
    assert (
        tc["chat_template"].count("ipython") == 0
        and tc["added_tokens_decoder"]["128008"]["content"] == "<|reserved_special_token_4|>"
    )
    code, out, err = run(capsys, "import", m30, tmp_path / "ck31", "--llama-version", "3.1")
    assert code == 0, err
    tc = json.loads((tmp_path / "ck31" / "tokenizer_config.json").read_text())
    assert tc["added_tokens_decoder"]["128008"]["content"] == "<|eom_id|>"
    code, _, err = run(capsys, "import", tmp_path / "ck", tmp_path / "x", "--llama-version", "3.0")
    assert code == 2 and "--llama-version" in err


# --------------------------------------------------------------------------- export details
def test_special_flags_generation_config_chat_template_and_padding(tmp_path, capsys, llama3_tokenizer_dir):
    src = hf_source(tmp_path / "src", shards=False)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA3_CHAT_TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "generation_config.json").unlink()  # a source without one: ids only, no sampling
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<|tool|>\n<think>\n<|visible|> [plain]\n<tag> [special]=a tag\nzqxjaxvocab\n")
    code, out, err = run(
        capsys,
        "import",
        src,
        tmp_path / "ck",
        "--add-tokens",
        f"@{tokens}",
        "--no-reuse-reserved",
        "--mesh",
        "fsdp=2,tensor=4",
    )
    assert code == 0, err
    assert "rows 128256 -> 128384" in out
    code, out, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf")
    assert code == 0, err
    hf = tmp_path / "hf"
    special = {e["content"]: e["special"] for e in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]}
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert {e["content"]: e["special"] for e in tc["added_tokens_decoder"].values()} == special
    assert {t: special[t] for t in ("<|tool|>", "<think>", "<|visible|>", "<tag>", "zqxjaxvocab")} == {
        "<|tool|>": True,
        "<think>": False,
        "<|visible|>": False,
        "<tag>": True,
        "zqxjaxvocab": False,
    }
    src_cfg = json.loads((src / "config.json").read_text())
    ids = {k: src_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src_cfg.get(k) is not None}
    assert ids and json.loads((hf / "generation_config.json").read_text()) == ids  # ids only: no sampling settings
    assert tc["chat_template"] == LLAMA3_CHAT_TEMPLATE
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 128261  # padding dropped
    code, out, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf-pad", "--keep-padding")
    assert code == 0 and json.loads((tmp_path / "hf-pad" / "config.json").read_text())["vocab_size"] == 128384
    # transformers 5 stores the template as chat_template.jinja: written back the same way
    (src / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, out, err = run(capsys, "export", src, tmp_path / "hf-jinja")
    assert code == 0, err
    assert (tmp_path / "hf-jinja" / "chat_template.jinja").read_text() == LLAMA3_CHAT_TEMPLATE
    assert "chat_template" not in json.loads((tmp_path / "hf-jinja" / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(tmp_path / "hf-jinja").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert rendered == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


def test_special_flag_syntax_and_defaults(llama3_tokenizer_dir):
    from convert.vocab_cli import parse_token_flags
    from jaxvocab.errors import UsageError

    tokens, flags = parse_token_flags("<|a|>, <b> [special],<|c|>  [plain],zqxword,[plain]")
    assert list(tokens) == ["<|a|>", "<b>", "<|c|>", "zqxword", "[plain]"] and flags == {"<b>": True, "<|c|>": False}
    tok = jaxvocab.load_tokenizer(llama3_tokenizer_dir)

    def flagged(special="auto"):
        plan = jaxvocab.plan_vocab(tok, tokens, special=special)
        return {t.token for t in plan.tokens if t.special}

    assert flagged() == {"<|a|>", "<|c|>"}  # default: <|...|> special, the rest plain
    assert flagged(flags) == {"<|a|>", "<b>"}  # per-token overrides on top of the default
    assert flagged(True) == set(tokens) and flagged(False) == set()
    with pytest.raises(UsageError):
        parse_token_flags("<x> [plain],<x>")
    described = jaxvocab.plan_vocab(tok, {"<|q|>": "a q word"})
    assert "described 'a q word' (init subword uses it)" in described.summary()  # no init claimed before it runs
    assert "subword init from 'a q word'" in dataclasses.replace(described, init="subword").summary()
