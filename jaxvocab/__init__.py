"""jaxvocab: Llama-3 checkpoints into JAX, vocabulary grown the right way, new rows fine-tuned.

    import jaxvocab
    model = jaxvocab.load("Llama-3.2-1B", mesh=jaxvocab.parse_mesh("fsdp=2,tensor=4"))
    tok = jaxvocab.load_tokenizer("Llama-3.2-1B")          # carries the dir's tokenizer files
    plan = jaxvocab.plan_vocab(tok, ["<|lang_xx|>"], model=model)
    model, tok, plan = jaxvocab.expand_vocab(model, tok, plan)   # new objects
    jaxvocab.save_hf(model, "out-hf", tokenizer=tok, plan=plan)

Heavy submodules load on first use, so `import jaxvocab` stays fast.
"""

import importlib

from jaxvocab.config import PRESETS, LlamaConfig, RopeScaling
from jaxvocab.errors import JaxVocabError
from jaxvocab.io import load, load_plan, save_checkpoint, save_hf
from jaxvocab.model import KVCache, Llama
from jaxvocab.sharding import parse_mesh

_LAZY = {
    "load_tokenizer": "jaxvocab.io.tokenizer_read",
    "Tokenizer": "jaxvocab.tokenizer",
    "plan_vocab": "jaxvocab.vocab",
    "VocabPlan": "jaxvocab.vocab",
    "expand_vocab": "jaxvocab.vocab",
    "find_untrained": "jaxvocab.vocab",
    "fix_untrained": "jaxvocab.vocab",
    "CarriedFiles": "jaxvocab.io.carried",
    "generate": "jaxvocab.generation",
}
_SUBMODULES = ("rows", "lora", "diagnostics", "vocab", "tokenizer", "generation")

__all__ = [
    "JaxVocabError",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "PRESETS",
    "RopeScaling",
    "load",
    "load_plan",
    "parse_mesh",
    "save_checkpoint",
    "save_hf",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxvocab.{name}")
    raise AttributeError(f"module 'jaxvocab' has no attribute {name!r}")
