"""f32 logits of checkpoints loaded by jaxvocab against transformers running the same files.

The matrix crosses every axis a loader can get wrong: attention layout (MHA and GQA 8:1, 4:1, 2:1),
tied head, llama3 rope scaling and its config spellings, single file vs sharded index. Inputs are
520 tokens while the builder's original context is 64, so the scaled low frequencies are exercised.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxvocab
from jaxvocab import Llama
from jaxvocab.config import LLAMA_3_1_8B, LLAMA_3_2_1B, LLAMA_3_8B, LlamaConfig
from jaxvocab.rope import inverse_frequencies
from tests.builders import make_hf_checkpoint, random_ids, torch_logits

TOL = 1e-4
SELF_TOL = 3e-5  # jaxvocab against itself at other shapes: only summation order differs
LENGTH = 520
HEADS = 8

# The full 4 x 2 x 2 x 2 x 2 = 64-case product. The forward pass compiles once per distinct config
# (16: the style and file axes do not change the config) and a case costs ~0.2-0.5 s after that, so the
# whole matrix takes ~40-60 s on 2 shared CPU cores, under the 90 s budget: no covering subset needed.
MATRIX = list(
    itertools.product((8, 1, 2, 4), (False, True), (False, True), ("rope_scaling", "rope_parameters"), (False, True))
)
# The older `type` spelling of rope_scaling, once per head layout.
MATRIX += [(kv, False, True, "rope_scaling_type", False) for kv in (1, 8)]


def _id(case):
    kv, tied, scaling, style, shards = case
    return (
        f"{'mha' if kv == HEADS else f'gqa{HEADS // kv}'}-{'tied' if tied else 'untied'}-"
        f"{'llama3' if scaling else 'noscale'}-{style}-{'sharded' if shards else 'single'}"
    )


def _graph(model, attention: str | None):
    """The model's structure, or that of its twin built with another attention choice. A graph
    holds only the config and the construction choices, so equal models share one compilation."""
    if attention is None or attention == model.attention:
        return nnx.graphdef(model)
    c = model.config
    return nnx.graphdef(
        nnx.eval_shape(
            lambda: Llama(c, param_dtype=jnp.dtype(c.dtype), compute_dtype=model.compute_dtype, attention=attention)
        )
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graph, state, ids, kw):
    return nnx.merge(graph, state)(ids, **kw)


def logits(model, ids, attention: str | None = None, **kw) -> np.ndarray:
    graph = _graph(model, attention)
    return np.asarray(_forward(graph, nnx.state(model), jnp.asarray(ids), {k: jnp.asarray(v) for k, v in kw.items()}))


def assert_parity(ours: np.ndarray, ref: np.ndarray, tol: float = TOL) -> float:
    """Max abs diff <= tol and the same argmax. Where the reference's two best logits are within
    2 x tol (random weights give a few such near-ties in 520 x 256; the smallest gap in the matrix
    is 1.4e-5) the argmax is decided by rounding, so there ours only has to be one of the tied."""
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * tol
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    picked = np.take_along_axis(ref, ours.argmax(-1)[..., None], -1)[..., 0]
    assert (picked >= top2[..., 1] - 2 * tol).all()
    return diff


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_logits_match_transformers(tmp_path, case, record_property):
    kv, tied, scaling, style, shards = case
    seed = MATRIX.index(case)
    path, ref_model = make_hf_checkpoint(
        tmp_path / "hf",
        heads=HEADS,
        kv_heads=kv,
        tied=tied,
        scaling=scaling,
        style=style,
        shards=shards,
        seed=seed,
        max_pos=1024,
    )
    n_files = len(list(path.glob("*.safetensors")))
    assert n_files > 1 if shards else n_files == 1  # the case is what it claims
    model = jaxvocab.load(path, show_progress=False)
    assert model.config.num_key_value_heads == kv and model.config.tie_word_embeddings == tied
    assert (model.config.rope_scaling is not None) == scaling
    ids = random_ids(256, batch=1, length=LENGTH, seed=seed)
    diff = assert_parity(logits(model, ids), torch_logits(ref_model, ids))
    record_property("max_abs_diff", diff)


# MHA untied, GQA 8:1 tied with llama3 scaling, GQA 2:1 sharded
CHUNKED = [
    (8, False, False, "rope_scaling", False),
    (1, True, True, "rope_parameters", False),
    (4, False, True, "rope_scaling", True),
]


@pytest.mark.parametrize("case", CHUNKED, ids=[_id(c) for c in CHUNKED])
def test_chunked_attention_matches_transformers(tmp_path, case):
    """The memory-linear attention (block 128 here, so 520 tokens span 5 blocks, the last partial)."""
    kv, tied, scaling, style, shards = case
    path, ref_model = make_hf_checkpoint(
        tmp_path / "hf",
        heads=HEADS,
        kv_heads=kv,
        tied=tied,
        scaling=scaling,
        style=style,
        shards=shards,
        seed=11,
        max_pos=1024,
    )
    model = jaxvocab.load(path, show_progress=False, attention="chunked")
    assert model.attention == "chunked"
    ids = random_ids(256, batch=1, length=LENGTH, seed=11)
    with _block(128):
        assert_parity(logits(model, ids, attention="chunked"), torch_logits(ref_model, ids))


@contextlib.contextmanager
def _block(n: int):
    from jaxvocab import attention

    old, attention.BLOCK = attention.BLOCK, n
    try:
        yield
    finally:
        attention.BLOCK = old


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """One GQA 2:1 checkpoint with llama3 scaling, built once for every test below the matrix."""
    path, ref = make_hf_checkpoint(
        tmp_path_factory.mktemp("gqa") / "hf", heads=HEADS, kv_heads=2, scaling=True, seed=7, max_pos=2048
    )
    return path, ref, jaxvocab.load(path, show_progress=False)


def test_scaling_matters_at_these_lengths(gqa):
    """Guard for the matrix: dropping the llama3 scaling must break parity beyond position 64."""
    _, ref, model = gqa
    unscaled = _with_config(model, model.config.replace(rope_scaling=None))
    ids = random_ids(256, batch=1, length=LENGTH, seed=1)
    want = torch_logits(ref, ids)
    wrong = logits(unscaled, ids)
    assert np.abs(wrong[:, :64] - want[:, :64]).max() > TOL  # even the smoothed band differs early
    assert np.abs(wrong[:, 64:] - want[:, 64:]).max() > 100 * TOL
    assert_parity(logits(model, ids), want)


def _with_config(model, config: LlamaConfig):
    """The same weights under another config (to show that the config is what the parity sees)."""
    graph, state = nnx.split(model)
    clone = nnx.merge(graph, state)
    clone.config = config
    return clone


@pytest.mark.parametrize("config", [LLAMA_3_2_1B, LLAMA_3_1_8B, LLAMA_3_8B], ids=["3.2-1b", "3.1-8b", "3-8b"])
def test_inverse_frequencies_bitwise_equal_to_transformers(config):
    """At the real head_dim / theta / factor, where the tiny matrix cannot look: a last-bit
    difference here is an angle error of position x ulp, visible at long context."""
    from transformers import LlamaConfig as TFConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for c in (config, config.replace(rope_scaling=None)):
        ref = LlamaRotaryEmbedding(TFConfig.from_dict(c.to_hf_dict()))
        assert ref.attention_scaling == 1.0
        np.testing.assert_array_equal(inverse_frequencies(c), ref.inv_freq.numpy())


# ------------------------------------------------------------------------- masks, packing, bfloat16
def test_left_padding_matches_transformers(gqa):
    import torch

    _, ref, model = gqa
    ids = random_ids(256, batch=2, length=LENGTH, seed=3)
    pad = 120
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    # Same mask, default positions (what transformers does when given no position_ids).
    want = torch_logits(ref, ids, attention_mask=torch.tensor(mask))
    got = logits(model, ids, attention_mask=mask)
    assert_parity(got[0], want[0])
    assert_parity(got[1, pad:], want[1, pad:])
    # Positions counted from the first real token (what generation does): the padded row then
    # equals the same tokens run unpadded.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    want = torch_logits(
        ref, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions, dtype=torch.long)
    )
    got = logits(model, ids, attention_mask=mask, positions=positions)
    assert_parity(got[1, pad:], want[1, pad:])
    alone = logits(model, ids[1:, pad:])
    np.testing.assert_allclose(got[1, pad:], alone[0], atol=SELF_TOL, rtol=0)
    assert np.abs(got[1, pad:] - logits(model, ids[1:])[0, pad:]).max() > 1e-2  # the mask is doing the work


@pytest.mark.parametrize("attention", ["auto", "chunked"])
def test_packed_segments_equal_documents_run_alone(gqa, attention):
    _, ref, model = gqa
    logits = functools.partial(_logits_with, attention)
    a = random_ids(256, batch=1, length=LENGTH, seed=4)[0]
    b = random_ids(256, batch=1, length=300, seed=5)[0]
    tail = np.zeros(20, np.int32)
    ids = np.stack([np.concatenate([a, b, tail]), np.concatenate([b, a, tail])])
    seg = np.stack([np.repeat([1, 2, 0], [len(a), len(b), 20]), np.repeat([1, 2, 0], [len(b), len(a), 20])]).astype(
        np.int32
    )
    packed = logits(model, ids, segment_ids=seg)
    alone_a, alone_b = logits(model, a[None])[0], logits(model, b[None])[0]
    np.testing.assert_allclose(packed[0, : len(a)], alone_a, atol=SELF_TOL, rtol=0)
    np.testing.assert_allclose(packed[0, len(a) : len(a) + len(b)], alone_b, atol=SELF_TOL, rtol=0)
    np.testing.assert_allclose(packed[1, : len(b)], alone_b, atol=SELF_TOL, rtol=0)
    np.testing.assert_allclose(packed[1, len(b) : len(a) + len(b)], alone_a, atol=SELF_TOL, rtol=0)
    assert_parity(packed[0, : len(a)], torch_logits(ref, a[None])[0])
    assert_parity(packed[0, len(a) : len(a) + len(b)], torch_logits(ref, b[None])[0])
    unpacked = logits(model, ids)
    assert np.abs(unpacked[0, len(a) : len(a) + len(b)] - alone_b).max() > 1e-2  # segments are doing the work


def _logits_with(attention, model, ids, **kw):
    with _block(128):  # chunked: documents of 520 and 300 tokens cross 128-token block edges
        return logits(model, ids, attention=attention, **kw)


def test_bfloat16_load_runs_close_to_f32(gqa):
    path, _, f32 = gqa
    model = jaxvocab.load(path, dtype=jnp.bfloat16, show_progress=False)
    params = [model.embed[...], model.norm[...], model.head_table[...], *model.layers.weights().values()]
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    assert model.compute_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    ids = random_ids(256, batch=1, length=LENGTH, seed=6)
    want, got = logits(f32, ids), logits(model, ids)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.1 * scale, (np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert np.abs(got - want).max() > 1e-4  # it did run in bfloat16
