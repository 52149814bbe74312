"""HF exports through llama.cpp's own converter (convert_hf_to_gguf.py), read back with `gguf`.

The converter comes from a pinned llama-cpp-python sdist (it vendors llama.cpp with its gguf-py),
fetched with pip at test time into a cache later runs reuse (never committed; no C++ build). When
the package registry is reachable the download must work: the test fails rather than skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from convert.__main__ import main
from tests._meta_export import PLANNED, tokens_file

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("JAXVOCAB_TEST_CACHE", Path.home() / ".cache" / "jaxvocab-tests"))
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # gguf.TokenType

pytestmark = pytest.mark.slow


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")
def converter() -> Path:
    """vendor/llama.cpp of the pinned sdist, unpacked once into the cache (script, conversion/, gguf-py/, vocabs)."""
    root = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        got = _pip(
            "download", "--no-deps", "--no-binary", ":all:", "-d", str(CACHE), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        )
        if got.returncode != 0 or not sdist.is_file():
            reachable = _pip("index", "versions", "llama-cpp-python").returncode == 0
            msg = f"cannot download llama-cpp-python=={LLAMA_CPP_PYTHON}: {got.stderr.strip()[-500:]}"
            if reachable:
                pytest.fail(msg)
            pytest.skip(msg + " (package registry unreachable)")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-gpt-2.gguf")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted) and (m.isfile() or m.isdir())
        ]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(tmp, members=members, filter="data")
    try:
        os.replace(tmp, root)
    except OSError:  # another session unpacked it first
        import shutil

        shutil.rmtree(tmp)
    return script


def convert_to_gguf(script: Path, hf_dir: Path, out: Path):
    """Run llama.cpp's converter on `hf_dir`; returns a GGUFReader over the result."""
    from gguf import GGUFReader

    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py goes first on sys.path
    got = subprocess.run(
        [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    return GGUFReader(out)


def field(reader, name):
    f = reader.get_field(name)
    assert f is not None, name
    return f.contents()


def check_gguf(reader, rows: int, new: dict[int, tuple[str, int]], pre: str) -> None:
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == rows
    assert field(reader, "tokenizer.ggml.pre") == pre
    assert {i: (tokens[i], types[i]) for i in new} == new
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert rows in [int(d) for d in emb.shape]


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


NEW = {
    **{i: (t, CONTROL if t.startswith("<|") else USER_DEFINED) for i, t in PLANNED.items()},
    128009: ("<|eot_id|>", CONTROL),
}


def test_llama3_hf_source_renamed_and_appended(tmp_path, converter):
    from examples.llama3_tokenizer import write_text_tokenizer
    from tests.builders import make_hf_checkpoint

    src = tmp_path / "src"
    make_hf_checkpoint(src, vocab=128256, hidden=32, intermediate=64, layers=1)
    write_text_tokenizer(src)  # Llama-3 files, tokenizer.model at the top as some repos have it
    run("import", src, tmp_path / "ck", "--add-tokens", f"@{tokens_file(tmp_path / 't.txt', src)}")
    run("export", tmp_path / "ck", tmp_path / "hf")  # padding to 128384 dropped
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    check_gguf(convert_to_gguf(converter, tmp_path / "hf", tmp_path / "m.gguf"), 128258, NEW, "llama-bpe")


def test_llama3_meta_source_with_chat_template(tmp_path, converter, meta_export):
    _, _, hf = meta_export
    reader = convert_to_gguf(converter, hf, tmp_path / "m.gguf")
    check_gguf(reader, 128258, NEW, "llama-bpe")
    template = json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
    assert field(reader, "tokenizer.chat_template") == template
    assert field(reader, "tokenizer.ggml.bos_token_id") == 128000
    assert reader.get_field("general.sampling.temp") is None  # no invented sampling settings


def gpt2_tokenizer_dir(vocab_gguf: Path, out: Path) -> int:
    """GPT-2's real tokenizer (the vocab llama.cpp ships for its tests) as HF files; returns its size."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    reader = GGUFReader(vocab_gguf)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(field(reader, "tokenizer.ggml.tokens"))}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = "<|endoftext|>"
    tok.add_special_tokens([eot])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": eot,
                "eos_token": eot,
                "added_tokens_decoder": {
                    str(vocab[eot]): {
                        "content": eot,
                        "special": True,
                        "normalized": False,
                        "lstrip": False,
                        "rstrip": False,
                        "single_word": False,
                    }
                },
            }
        )
    )
    return len(vocab)


def test_gpt2_style_tokenizer_with_appended_tokens_padded(tmp_path, converter):
    from tests.builders import make_hf_checkpoint

    src = tmp_path / "src"
    n = gpt2_tokenizer_dir(converter.parent / "models" / "ggml-vocab-gpt-2.gguf", src)
    make_hf_checkpoint(src, vocab=n, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1)
    run("import", src, tmp_path / "ck", "--add-tokens", "<|tool|>,<think>,<tag> [special]", "--mesh", "fsdp=8")
    run("export", tmp_path / "ck", tmp_path / "hf", "--keep-padding")
    rows = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert rows % 128 == 0 and rows > n + 3
    reader = convert_to_gguf(converter, tmp_path / "hf", tmp_path / "m.gguf")
    new = {
        n: ("<|tool|>", CONTROL),
        n + 1: ("<think>", USER_DEFINED),
        n + 2: ("<tag>", CONTROL),
        n + 3: (f"[PAD{n + 3}]", UNUSED),
    }
    check_gguf(reader, rows, new, "gpt-2")
