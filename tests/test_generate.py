"""jaxvocab.generate: cached decoding == full recompute, suppression, stopping, sampling, prompts."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxvocab
from jaxvocab import rows as row_split
from jaxvocab.errors import UsageError
from jaxvocab.generation import default_suppressed, prompt_ids
from jaxvocab.io.tokenizer_read import load_tokenizer
from tests.builders import make_hf_checkpoint, random_llama

ZERO = tuple(range(100, 164))  # untrained rows, like Llama-3's reserved ones


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("g") / "hf", tied=True, seed=5, zero_rows=ZERO)
    return jaxvocab.load(path, show_progress=False)


@nnx.jit
def _logits(model, x):
    return model(x)


def test_greedy_with_cache_equals_full_recompute(model, caplog):
    prompt = np.random.RandomState(0).randint(0, 100, 70).tolist()  # longer than one prompt bucket
    _, got = jaxvocab.generate(model, None, prompt, 40, suppress=(), stop=(), return_ids=True)
    seq = list(prompt)
    for _ in range(40):
        # causal: right-padding to a fixed length leaves position len-1 unchanged (and compiles once)
        x = np.zeros((1, 128), np.int32)
        x[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(_logits(model, jnp.asarray(x)))[0, len(seq) - 1])))
    assert got == seq[len(prompt) :]
    assert len(set(got)) > 3  # not a degenerate constant stream
    # one compiled decode step serves every token, and later calls in the same size buckets
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        jaxvocab.generate(model, None, prompt[:65], 20, suppress=(), stop=())
    assert not [r for r in caplog.records if "_step" in r.getMessage() or "_prefill" in r.getMessage()]


def test_rows_model_generates_like_its_merge(model):
    rm = row_split.split(model, [3, 4])
    prompt = [1, 2, 3, 4, 5]
    assert jaxvocab.generate(rm, None, prompt, 8, return_ids=True) == jaxvocab.generate(
        row_split.merge(rm), None, prompt, 8, return_ids=True
    )


def test_suppressed_ids_are_never_sampled(model):
    prompt = [7, 8, 9]
    banned = list(range(0, 256, 2))
    _, free = jaxvocab.generate(model, None, prompt, 150, temperature=50.0, suppress=(), stop=(), return_ids=True)
    assert set(free) & set(banned)  # hot sampling hits the even ids when allowed ...
    _, ids = jaxvocab.generate(model, None, prompt, 150, temperature=50.0, suppress=banned, stop=(), return_ids=True)
    assert not set(ids) & set(banned)  # ... and never when suppressed
    # default: untrained (zero) rows are suppressed
    assert set(ZERO) <= set(default_suppressed(model, None))
    _, free = jaxvocab.generate(model, None, prompt, 150, temperature=50.0, suppress=(), stop=(), return_ids=True)
    _, dflt = jaxvocab.generate(model, None, prompt, 150, temperature=50.0, stop=(), return_ids=True)
    assert set(free) & set(ZERO) and not set(dflt) & set(ZERO)


def test_stops_at_stop_ids_and_eos(model):
    prompt = [11, 12, 13]
    _, ids = jaxvocab.generate(model, None, prompt, 30, stop=(), return_ids=True)
    stop = ids[5]
    _, short = jaxvocab.generate(model, None, prompt, 30, stop=[stop], return_ids=True)
    assert short == ids[: ids.index(stop)]
    # the config's eos ids stop by default (the builder's eos_token_id is 1)
    _, sampled = jaxvocab.generate(model, None, prompt, 400, temperature=50.0, seed=3, return_ids=True)
    assert 1 not in sampled and len(sampled) < 400


def test_sampling_is_seeded_and_top_p_narrows(model):
    prompt = [21, 22]
    a = jaxvocab.generate(model, None, prompt, 20, temperature=1.0, seed=1, stop=(), return_ids=True)
    b = jaxvocab.generate(model, None, prompt, 20, temperature=1.0, seed=1, stop=(), return_ids=True)
    c = jaxvocab.generate(model, None, prompt, 20, temperature=1.0, seed=2, stop=(), return_ids=True)
    assert a == b and a != c
    greedy = jaxvocab.generate(model, None, prompt, 20, stop=(), return_ids=True)
    assert (
        jaxvocab.generate(model, None, prompt, 20, temperature=1.0, top_p=1e-6, seed=4, stop=(), return_ids=True)
        == greedy
    )
    with pytest.raises(UsageError):
        jaxvocab.generate(model, None, prompt, 5, top_p=0.0)
    with pytest.raises(UsageError):
        jaxvocab.generate(model, None, "text needs a tokenizer", 5)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        jaxvocab.generate(model, None, prompt, 5000)


def test_prompts_with_llama3_tokenizer(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    # Meta's template with add_generation_prompt appends this header (test_tokenizer checks the rest against HF)
    header = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", allowed_special="all")
    assert prompt_ids(tok, msgs) == tok.encode_chat(msgs)[0] + header
    assert header == [128006, 78191, 128007, 271]
    assert prompt_ids(tok, "Hello") == [128000] + tok.encode("Hello")

    # a real-vocabulary model: reserved slots are suppressed by default and text comes back decoded
    cfg = jaxvocab.LlamaConfig(
        128256, 64, 128, 1, 4, 2, rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=128001
    )
    model = random_llama(cfg, std=0.2)
    banned = default_suppressed(model, tok)
    assert set(tok.free_reserved()) <= set(banned) and 128009 not in banned
    text, ids = jaxvocab.generate(model, tok, msgs, 12, temperature=1.0, return_ids=True)
    assert text == tok.decode(ids) and not set(ids) & set(tok.free_reserved())
