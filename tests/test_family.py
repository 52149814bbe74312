"""The whole Llama-3 family, each member from the HF and the Meta layout, against transformers.

Members are tiny but keep the structural flags of the real ones: rope scaling (none / factor 8 /
factor 32 with Meta's original context 8192, theta 500000), tied or untied head, GQA ratio, and
Meta's model-parallel layout (405B: more ranks than kv heads, so kv heads are duplicated).
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxvocab
from jaxvocab.io.checkpoint import params_of
from tests.builders import random_ids, torch_logits
from tests.meta_writer import make_hf_model, meta_reference_logits, write_meta

# name: (rope factor, tied, dim, heads, kv heads, meta MP, multiple_of, ffn_dim_multiplier)
FAMILY = {
    "llama-3-8b": (None, False, 128, 8, 2, 1, 32, 1.3),
    "llama-3.1-8b": (8, False, 128, 8, 2, 1, 32, 1.3),
    "llama-3.1-70b": (8, False, 128, 8, 2, 2, 64, 1.3),  # real: MP 8 = kv heads, one per rank
    "llama-3.1-405b": (8, False, 128, 8, 2, 4, 64, 1.2),  # real: MP 16 > 8 kv heads, duplicated
    "llama-3.2-1b": (32, True, 64, 4, 2, 1, 32, 1.5),
    "llama-3.2-3b": (32, True, 96, 6, 2, 1, 32, 1.0),  # 3:1 GQA like 24:8
    "llama-3.3-70b": (8, False, 128, 8, 4, 4, 64, 1.3),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=list(FAMILY))
def member(request, tmp_path_factory):
    """Per member: HF dir, Meta dir, transformers' f32 logits on 520 tokens."""
    factor, tied, dim, heads, kv, mp, multiple_of, ffn = FAMILY[request.param]
    root = tmp_path_factory.mktemp(request.param)
    vocab = 320 if tied else 384
    hf_dir, model = make_hf_model(
        root / "hf",
        vocab=vocab,
        dim=dim,
        heads=heads,
        kv_heads=kv,
        tied=tied,
        factor=factor,
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn,
        seed=len(request.param),
        std=0.1,
    )
    meta_dir = write_meta(model, root / "meta", mp=mp, multiple_of=multiple_of, ffn_dim_multiplier=ffn)
    ids = random_ids(vocab, batch=1, length=520, seed=3)
    return dict(
        name=request.param, factor=factor, tied=tied, hf=hf_dir, meta=meta_dir, ids=ids, torch=torch_logits(model, ids)
    )


def _logits(model, ids):
    return np.asarray(model(ids))


def _check(out, ref):
    assert np.abs(out - ref).max() <= TOL
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_writer_matches_meta_reference(member):
    """Our Meta files compute, under Meta's own forward pass, what transformers computes: the
    oracle for the Meta layout does not depend on jaxvocab's reader."""
    ref = meta_reference_logits(member["meta"], member["ids"], scale_factor=member["factor"] or 8)
    assert np.abs(ref - member["torch"]).max() < 1e-3


def test_hf_layout(member, mesh24):
    model = jaxvocab.load(member["hf"], mesh=mesh24, show_progress=False)
    c = model.config
    assert c.tie_word_embeddings == member["tied"]
    assert (c.rope_scaling.factor if c.rope_scaling else None) == member["factor"]
    _check(_logits(model, member["ids"]), member["torch"])


def test_meta_layout(member, mesh24):
    meta = jaxvocab.load(member["meta"], mesh=mesh24, show_progress=False)
    hf = jaxvocab.load(member["hf"], mesh=mesh24, show_progress=False)
    mc, hc = meta.config, hf.config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "rms_norm_eps",
    ):
        assert getattr(mc, field) == getattr(hc, field), field
    for name, a in params_of(meta).items():  # the merge and rotary reorder are exact, not just close
        np.testing.assert_array_equal(np.asarray(a), np.asarray(params_of(hf)[name]), err_msg=name)
    _check(_logits(meta, member["ids"]), member["torch"])


def test_rope_factor_is_observable(member, mesh24):
    """The parity checks above would catch a wrong factor: the other factor moves the logits."""
    if member["factor"] is None:
        pytest.skip("Llama 3.0 has no rope scaling")
    wrong = 8 if member["factor"] == 32 else 32
    model = jaxvocab.load(member["meta"], mesh=mesh24, show_progress=False, rope_factor=wrong)
    assert model.config.rope_scaling.factor == wrong
    assert np.abs(_logits(model, member["ids"]) - member["torch"]).max() > 1e-2
