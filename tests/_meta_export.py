"""One Meta dir taken through import (reserved renames + appended tokens) and export, shared by the
tokenizer checks (test_sources_exports) and the llama.cpp conversion (test_gguf): built once."""

from __future__ import annotations

from pathlib import Path

import pytest

# every free reserved slot of Meta's 3.1 names is taken: <think> and <|tool_call|> rename the first
# two, 246 fillers the rest, and </think> and <|x|> are appended
PLANNED = {128002: "<think>", 128003: "<|tool_call|>", 128256: "</think>", 128257: "<|x|>"}


def tokens_file(path: Path, src: Path) -> Path:
    """Plain and control tokens that take reserved slots (filling all of them), then two appended."""
    import jaxvocab

    free = len(jaxvocab.load_tokenizer(src).free_reserved())
    lines = ["<think>", "<|tool_call|>", *[f"<|lang_{i}|>" for i in range(free - 2)], "</think>", "<|x|>"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def meta_export(tmp_path_factory, llama3_tokenizer_dir):
    """(meta dir, jaxvocab checkpoint, HF export) for a tiny Llama-3.1 Meta checkpoint."""
    from convert.__main__ import main
    from tests.meta_writer import make_hf_model, write_meta

    d = tmp_path_factory.mktemp("meta-export")
    _, model = make_hf_model(d / "m-hf", vocab=128256, dim=32, layers=1, heads=4, kv_heads=2, factor=8)
    meta = write_meta(model, d / "meta", tokenizer=llama3_tokenizer_dir / "tokenizer.model")
    before = {p.name: p.read_bytes() for p in meta.iterdir()}
    assert main(["import", str(meta), str(d / "ck"), "--add-tokens", f"@{tokens_file(d / 't.txt', meta)}"]) == 0
    assert main(["export", str(d / "ck"), str(d / "hf")]) == 0
    assert {p.name: p.read_bytes() for p in meta.iterdir()} == before  # the source is untouched
    return meta, d / "ck", d / "hf"
